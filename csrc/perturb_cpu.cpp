// cep::perturb on the CPU: out = x + gamma/sqrt(dim) * noise in one pass, noise from the Philox stream of philox.h.
// Each thread regenerates exactly the counters of its own elements, so the result does not depend on the number of
// threads or on how at::parallel_for splits the tensor.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cep.h"
#include "multiversion.h"
#include "philox.h"

namespace cep {
namespace {

constexpr int64_t kChunk = 1024;  // elements per noise buffer (a multiple of 4, fits in L1)
constexpr int kCallsPerBatch = 16;  // Philox calls computed side by side (vector lanes)
// A chunk touches at most kChunk / 4 + 2 calls; whole batches may overrun that by kCallsPerBatch - 1 calls.
constexpr int64_t kNoiseBuffer = kChunk + 8 + 4 * kCallsPerBatch;

CEP_ALWAYS_INLINE void fill_uniform_blocks(float* noise, uint64_t first_block, int64_t num_blocks, uint64_t seed) {
  for (int64_t b0 = 0; b0 < num_blocks; b0 += kCallsPerBatch) {
    uint32_t words[4][kCallsPerBatch];
    philox4x32_10<kCallsPerBatch>(first_block + b0, seed, words);
    for (int i = 0; i < kCallsPerBatch; ++i) {
      for (int lane = 0; lane < 4; ++lane) noise[4 * (b0 + i) + lane] = uniform_from_word(words[lane][i]);
    }
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
// The same stream with AVX2 intrinsics, 8 Philox calls per iteration (2.5x the auto-vectorized loop above, which
// GCC fills with lane shuffles around the 32x32->64-bit products). Hand-written: no library offers a vectorized
// Philox with our counter layout. Bit-identical to philox.h (tests/test_cep_ops.py checks it against the twin).
__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) void fill_uniform_blocks_avx2(float* noise, uint64_t first_block,
                                                                int64_t num_blocks, uint64_t seed) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0)), m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i call_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i bias = _mm256_set1_epi32((1 << 24) - 1);  // (w >> 8) * 2 + 1 - 2^24 = ((w >> 8) << 1) - (2^24 - 1)
  const __m256 two_pow_minus_24 = _mm256_set1_ps(kTwoPow24Inv);
  for (int64_t b0 = 0; b0 < num_blocks; b0 += 8) {
    const uint64_t block = first_block + static_cast<uint64_t>(b0);
    if (static_cast<uint32_t>(block) > 0xFFFFFFF8u) {  // the counters' low word wraps inside this batch
      fill_uniform_blocks(noise + 4 * b0, block, 8, seed);
      continue;
    }
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(block))), call_index);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(block >> 32)));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      if (round > 0) {
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
      }
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0, m0, &hi0, &lo0);
      mulhilo8(c2, m1, &hi1, &lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c1 = lo1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c3 = lo0;
    }
    __m256 lanes[4];  // lanes[w] = uniform(word w) of the 8 calls
    const __m256i words[4] = {c0, c1, c2, c3};
    for (int w = 0; w < 4; ++w) {
      const __m256i odd = _mm256_sub_epi32(_mm256_slli_epi32(_mm256_srli_epi32(words[w], 8), 1), bias);
      lanes[w] = _mm256_mul_ps(_mm256_cvtepi32_ps(odd), two_pow_minus_24);
    }
    // 4x8 -> 8x4 transpose: element 4 * call + w
    const __m256 t0 = _mm256_unpacklo_ps(lanes[0], lanes[1]), t1 = _mm256_unpackhi_ps(lanes[0], lanes[1]);
    const __m256 t2 = _mm256_unpacklo_ps(lanes[2], lanes[3]), t3 = _mm256_unpackhi_ps(lanes[2], lanes[3]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    float* out = noise + 4 * b0;
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
    _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
  }
}

const bool kHasAvx2 = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
#endif

void fill_uniform(float* noise, uint64_t first_block, int64_t num_blocks, uint64_t seed) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (kHasAvx2) return fill_uniform_blocks_avx2(noise, first_block, num_blocks, seed);
#endif
  fill_uniform_blocks(noise, first_block, num_blocks, seed);
}

void fill_gaussian_blocks(float* noise, uint64_t first_block, int64_t num_blocks, uint64_t seed) {
  for (int64_t b = 0; b < num_blocks; ++b) noise_block(first_block + b, seed, /*gaussian=*/true, noise + 4 * b);
}

template <typename scalar_t>
CEP_ALWAYS_INLINE void perturb_range_impl(const scalar_t* x, scalar_t* out, int64_t begin, int64_t end,
                                          const Stream& stream) {
  using acc_t = at::opmath_type<scalar_t>;  // fp32 for fp16/bf16/fp32, fp64 for fp64
  const acc_t scale = static_cast<acc_t>(stream.scale);
  alignas(64) float noise[kNoiseBuffer];
  for (int64_t start = begin; start < end; start += kChunk) {
    const int64_t count = std::min(kChunk, end - start);
    const uint64_t first = stream.offset + static_cast<uint64_t>(start);
    const int64_t lead = static_cast<int64_t>(first & 3);  // element `first` is lane `lead` of its Philox call
    const int64_t num_blocks = (lead + count + 3) / 4;
    if (stream.gaussian) {
      fill_gaussian_blocks(noise, first >> 2, num_blocks, stream.seed);
    } else {
      fill_uniform(noise, first >> 2, num_blocks, stream.seed);
    }
    const float* window = noise + lead;
    for (int64_t i = 0; i < count; ++i) {
      out[start + i] = static_cast<scalar_t>(static_cast<acc_t>(x[start + i]) + scale * static_cast<acc_t>(window[i]));
    }
  }
}

// fp32 is the hot path (CEP-U at gamma = 1 in the paper): multi-versioned, so Philox and the add run in AVX2 /
// AVX-512 vectors where the CPU has them (the uniform stream stays bit-identical: its mapping is exact).
CEP_TARGET_CLONES void perturb_range(const float* x, float* out, int64_t begin, int64_t end, const Stream& stream) {
  perturb_range_impl(x, out, begin, end, stream);
}

// fp16 / bf16 / fp64 (overload resolution prefers the fp32 function above for float).
template <typename scalar_t>
void perturb_range(const scalar_t* x, scalar_t* out, int64_t begin, int64_t end, const Stream& stream) {
  perturb_range_impl(x, out, begin, end, stream);
}

}  // namespace

at::Tensor perturb_cpu(const at::Tensor& x, double gamma, c10::string_view mode, int64_t seed, int64_t offset,
                       int64_t dim) {
  check_float_tensor(x, "x");
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor for perturb_cpu, got ", x.device());
  const Stream stream = check_stream(gamma, mode, seed, offset, dim, x.numel());
  // Element index = position in the logical row-major order, so the noise does not depend on x's strides.
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (gamma == 0) return out.copy_(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cep_perturb_cpu", [&] {
    const scalar_t* in_ptr = input.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, input.numel(), 4 * kChunk, [&](int64_t begin, int64_t end) {
      perturb_range(in_ptr, out_ptr, begin, end, stream);
    });
  });
  return out;
}

}  // namespace cep
