// Row-wise softmax pieces of the CPU attention tiles. Written by hand because ATen's exp_ on a tile view costs a
// dispatch per call and ATen's Vectorized<float> needs per-ISA builds of the including file; these loops are
// branch-free, so GCC vectorizes them, multi-versioned for AVX-512 / AVX2 / baseline (multiversion.h).
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "multiversion.h"

namespace cep {

template <typename T>
constexpr T kMinusInf = -std::numeric_limits<T>::infinity();

// exp(x) for the x <= ~0 of a softmax (exp(-inf) = 0): Cephes expf, i.e. x = n ln2 + r with |r| <= ln2 / 2 and a
// degree-6 polynomial for exp(r) (about 1 ulp); 2^n is built in the exponent bits. fp64 keeps std::exp.
CEP_ALWAYS_INLINE float softmax_exp(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;
  // round-to-nearest via the 1.5 * 2^23 trick (no SSE4.1 needed; valid because we never build with -ffast-math)
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;  // Cody-Waite split of ln 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float exp_r = p * r * r + r + 1.0f;
  const float two_pow_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : exp_r * two_pow_n;
}
inline double softmax_exp(double x) { return std::exp(x); }

// max over a row. The fp32 version keeps 8 running maxima in a GCC vector (the ternary on vector types becomes
// maxps/blends for each clone's ISA): GCC does not vectorize an IEEE max reduction written as a scalar loop.
typedef float Float8 __attribute__((vector_size(32)));

CEP_ALWAYS_INLINE float max_of_row(const float* row, int64_t n) {
  constexpr float lowest = kMinusInf<float>;
  Float8 running = {lowest, lowest, lowest, lowest, lowest, lowest, lowest, lowest};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    Float8 values;
    std::memcpy(&values, row + j, sizeof(values));
    running = values > running ? values : running;
  }
  float result = lowest;
  for (int lane = 0; lane < 8; ++lane) result = running[lane] > result ? running[lane] : result;
  for (; j < n; ++j) result = row[j] > result ? row[j] : result;
  return result;
}

CEP_ALWAYS_INLINE double max_of_row(const double* row, int64_t n) {
  double result = kMinusInf<double>;
  for (int64_t j = 0; j < n; ++j) result = std::max(result, row[j]);
  return result;
}

// Online-softmax update of one score tile [nt, mt] (Dao et al. 2022, Alg. 1): per row, the new running max m, the
// factor exp(m_old - m_new) for what was accumulated so far (returned in `correction`), scores -> exp(s - m_new) in
// place, and the running sum l. Rows without any valid key so far keep m = -inf, l = 0, correction = 1.
template <typename T>
CEP_ALWAYS_INLINE void online_softmax_tile_impl(T* scores, int64_t nt, int64_t mt, T* row_max, T* row_sum, T* correction) {
  for (int64_t i = 0; i < nt; ++i) {
    T* row = scores + i * mt;
    const T new_max = std::max(row_max[i], max_of_row(row, mt));
    const bool empty = new_max == kMinusInf<T>;
    const T shift = empty ? T(0) : new_max;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < mt; ++j) {
      row[j] = softmax_exp(row[j] - shift);
      sum += row[j];
    }
    correction[i] = empty ? T(1) : softmax_exp(row_max[i] - new_max);
    row_sum[i] = row_sum[i] * correction[i] + sum;
    row_max[i] = new_max;
  }
}

// Backward: P = exp(S - lse) in place; rows with lse = -inf (every key masked) become 0.
template <typename T>
CEP_ALWAYS_INLINE void probs_from_lse_tile_impl(T* scores, int64_t nt, int64_t mt, const T* lse) {
  for (int64_t i = 0; i < nt; ++i) {
    T* row = scores + i * mt;
    const T shift = lse[i];
    if (shift == kMinusInf<T>) {
      std::fill(row, row + mt, T(0));
      continue;
    }
#pragma omp simd
    for (int64_t j = 0; j < mt; ++j) row[j] = softmax_exp(row[j] - shift);
  }
}

// Backward: dS = P * (dP - D), D_i = rowsum(dO_i * O_i), in place in dprobs.
template <typename T>
CEP_ALWAYS_INLINE void softmax_grad_tile_impl(const T* probs, T* dprobs, int64_t nt, int64_t mt, const T* delta) {
  for (int64_t i = 0; i < nt; ++i) {
    const T d = delta[i];
    const T* prow = probs + i * mt;
    T* drow = dprobs + i * mt;
#pragma omp simd
    for (int64_t j = 0; j < mt; ++j) drow[j] = prow[j] * (drow[j] - d);
  }
}

// Multi-versioned fp32 entry points; fp64 (gradcheck only) uses the plain templates.
CEP_TARGET_CLONES static void online_softmax_tile(float* s, int64_t nt, int64_t mt, float* m, float* l, float* c) {
  online_softmax_tile_impl(s, nt, mt, m, l, c);
}
CEP_TARGET_CLONES static void probs_from_lse_tile(float* s, int64_t nt, int64_t mt, const float* lse) {
  probs_from_lse_tile_impl(s, nt, mt, lse);
}
CEP_TARGET_CLONES static void softmax_grad_tile(const float* p, float* dp, int64_t nt, int64_t mt, const float* d) {
  softmax_grad_tile_impl(p, dp, nt, mt, d);
}
static inline void online_softmax_tile(double* s, int64_t nt, int64_t mt, double* m, double* l, double* c) {
  online_softmax_tile_impl(s, nt, mt, m, l, c);
}
static inline void probs_from_lse_tile(double* s, int64_t nt, int64_t mt, const double* lse) {
  probs_from_lse_tile_impl(s, nt, mt, lse);
}
inline void softmax_grad_tile(const double* p, double* dp, int64_t nt, int64_t mt, const double* d) {
  softmax_grad_tile_impl(p, dp, nt, mt, d);
}

}  // namespace cep
