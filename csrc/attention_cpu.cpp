// cep::cross_attention on the CPU: perturb the context (Philox, csrc/philox.h), project K and V, then a flash-style
// attention over (batch, head, query tile) work items with an online softmax across key tiles (Dao et al. 2022,
// Alg. 1). Forward saves only the row log-sum-exp; backward regenerates the noise and K/V and recomputes the
// probabilities tile by tile from it (Alg. 2). Tile products go through BLAS (at::cpu::mm_out / addmm_ on views of raw
// buffers); the softmax row loops live in tile_math.h (auto-vectorized, multi-versioned for AVX-512/AVX2).
//
// Fully masked rows (every key of a batch element masked): output 0, lse = -inf, and zero gradients.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/addmm_cpu_dispatch.h>  // at::cpu::*: straight to the CPU kernels, no dispatcher round trip
#include <ATen/ops/mm_cpu_dispatch.h>

#include "attention_common.h"
#include "tile_math.h"

namespace cep {
namespace {

constexpr int64_t kKeyTile = 128;
// Query rows per tile: as many as keep a score tile near 32K values (128 KiB fp32, L2-resident), at least 64. Few
// keys (M = 1 .. 77 text tokens) thus give tall tiles and few BLAS calls, whose fixed cost dominates at small M.
constexpr int64_t kTileValues = 32768;
constexpr int64_t kMinQueryTile = 64;

int64_t query_tile(const AttentionShape& s) {
  const int64_t rows = std::max(kMinQueryTile, kTileValues / std::min(s.tokens, kKeyTile));
  return std::max<int64_t>(1, std::min(rows, s.queries));
}

// A row-major [rows, cols] view of raw memory with the given row stride (no copy).
template <typename T>
at::Tensor view(const T* data, int64_t rows, int64_t cols, int64_t row_stride) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {row_stride, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Problem description shared by forward and backward; all tensors contiguous in the compute type T.
template <typename T>
struct Problem {
  AttentionShape s;
  T scale;           // 1 / sqrt(Dh)
  const T* q;        // [B, H, N, Dh]
  const T* k;        // [B, M, H*Dh]
  const T* v;        // [B, M, H*Dh]
  const bool* mask;  // [B, M] or nullptr
  int64_t query_tile;

  int64_t width() const { return s.heads * s.head_dim; }
  const T* q_rows(int64_t b, int64_t h, int64_t n0) const { return q + ((b * s.heads + h) * s.queries + n0) * s.head_dim; }
  int64_t kv_index(int64_t b, int64_t h, int64_t m0) const { return (b * s.tokens + m0) * width() + h * s.head_dim; }
  bool masked(int64_t b, int64_t m) const { return mask != nullptr && !mask[b * s.tokens + m]; }
};

// scores = scale * Q_tile K_tile^T with masked keys set to -inf.  [nt, mt]
template <typename T>
void tile_scores(const Problem<T>& p, int64_t b, int64_t h, int64_t n0, int64_t nt, int64_t m0, int64_t mt,
                 at::Tensor& scores) {
  const at::Tensor q_tile = view(p.q_rows(b, h, n0), nt, p.s.head_dim, p.s.head_dim);
  const at::Tensor k_tile = view(p.k + p.kv_index(b, h, m0), mt, p.s.head_dim, p.width());
  at::cpu::addmm_(scores, q_tile, k_tile.t(), /*beta=*/0, /*alpha=*/p.scale);
  if (p.mask == nullptr) return;
  T* sc = scores.data_ptr<T>();
  for (int64_t j = 0; j < mt; ++j) {
    if (!p.masked(b, m0 + j)) continue;
    for (int64_t i = 0; i < nt; ++i) sc[i * mt + j] = kMinusInf<T>;
  }
}

// Forward of one (batch, head, query tile) item: online softmax over key tiles, accumulating straight into `out`.
// The first tile overwrites `out` (beta = 0) and the last one folds the normalisation 1/l into P and into the
// rescaling of earlier tiles, so `out` is never zeroed or re-scaled in separate passes.
template <typename T>
void forward_item(const Problem<T>& p, int64_t b, int64_t h, int64_t n0, int64_t nt, T* out, T* lse, T* buffer) {
  const int64_t dh = p.s.head_dim;
  T* out_rows = out + ((b * p.s.heads + h) * p.s.queries + n0) * dh;
  T* lse_rows = lse + (b * p.s.heads + h) * p.s.queries + n0;
  at::Tensor acc = view(out_rows, nt, dh, dh);
  T* row_max = buffer;               // running max m_i
  T* row_sum = buffer + p.query_tile;  // running sum l_i
  T* correction = buffer + 2 * p.query_tile;
  T* scores_ptr = buffer + 3 * p.query_tile;
  std::fill(row_max, row_max + nt, kMinusInf<T>);
  std::fill(row_sum, row_sum + nt, T(0));
  for (int64_t m0 = 0; m0 < p.s.tokens; m0 += kKeyTile) {
    const int64_t mt = std::min(kKeyTile, p.s.tokens - m0);
    const bool first = m0 == 0, last = m0 + mt == p.s.tokens;
    at::Tensor scores = view(scores_ptr, nt, mt, mt);
    tile_scores(p, b, h, n0, nt, m0, mt, scores);
    online_softmax_tile(scores_ptr, nt, mt, row_max, row_sum, correction);
    for (int64_t i = 0; i < nt; ++i) {
      if (last) {
        const T inv = row_sum[i] > 0 ? T(1) / row_sum[i] : T(0);  // fully masked row -> 0
        T* prob_row = scores_ptr + i * mt;
        for (int64_t j = 0; j < mt; ++j) prob_row[j] *= inv;
        correction[i] *= inv;
      }
      if (first || correction[i] == T(1)) continue;
      T* acc_row = out_rows + i * dh;
      for (int64_t d = 0; d < dh; ++d) acc_row[d] *= correction[i];
    }
    at::cpu::addmm_(acc, scores, view(p.v + p.kv_index(b, h, m0), mt, dh, p.width()), /*beta=*/first ? 0 : 1);
  }
  for (int64_t i = 0; i < nt; ++i) {
    lse_rows[i] = row_sum[i] > 0 ? row_max[i] + std::log(row_sum[i]) : kMinusInf<T>;
  }
}

// Backward of one (batch, head): all query tiles in order, so dK/dV of this head are touched by one thread only.
template <typename T>
void backward_item(const Problem<T>& p, int64_t b, int64_t h, const T* grad_out, const T* out, const T* lse,
                   T* grad_q, T* grad_k, T* grad_v, T* buffer) {
  const int64_t dh = p.s.head_dim, width = p.width();
  T* delta = buffer;  // D_i = rowsum(dO_i * O_i)
  T* probs_ptr = buffer + p.query_tile;
  T* dprobs_ptr = probs_ptr + p.query_tile * kKeyTile;
  for (int64_t n0 = 0; n0 < p.s.queries; n0 += p.query_tile) {
    const int64_t nt = std::min(p.query_tile, p.s.queries - n0);
    const int64_t row0 = (b * p.s.heads + h) * p.s.queries + n0;
    const T* go_rows = grad_out + row0 * dh;
    const T* lse_rows = lse + row0;
    for (int64_t i = 0; i < nt; ++i) {
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < dh; ++d) sum += go_rows[i * dh + d] * out[(row0 + i) * dh + d];
      delta[i] = sum;
    }
    const at::Tensor go_tile = view(go_rows, nt, dh, dh);
    const at::Tensor q_tile = view(p.q_rows(b, h, n0), nt, dh, dh);
    at::Tensor dq_tile = view(grad_q + row0 * dh, nt, dh, dh);
    for (int64_t m0 = 0; m0 < p.s.tokens; m0 += kKeyTile) {
      const int64_t mt = std::min(kKeyTile, p.s.tokens - m0);
      at::Tensor probs = view(probs_ptr, nt, mt, mt);
      at::Tensor dprobs = view(dprobs_ptr, nt, mt, mt);
      tile_scores(p, b, h, n0, nt, m0, mt, probs);
      probs_from_lse_tile(probs_ptr, nt, mt, lse_rows);
      const at::Tensor k_tile = view(p.k + p.kv_index(b, h, m0), mt, dh, width);
      const at::Tensor v_tile = view(p.v + p.kv_index(b, h, m0), mt, dh, width);
      at::Tensor dv_tile = view(grad_v + p.kv_index(b, h, m0), mt, dh, width);
      at::Tensor dk_tile = view(grad_k + p.kv_index(b, h, m0), mt, dh, width);
      at::cpu::addmm_(dv_tile, probs.t(), go_tile);  // dV += P^T dO
      at::cpu::mm_out(dprobs, go_tile, v_tile.t());  // dP = dO V^T
      softmax_grad_tile(probs_ptr, dprobs_ptr, nt, mt, delta);  // dS = P * (dP - D)
      at::cpu::addmm_(dq_tile, dprobs, k_tile, /*beta=*/m0 == 0 ? 0 : 1, /*alpha=*/p.scale);  // dQ = s dS K
      at::cpu::addmm_(dk_tile, dprobs.t(), q_tile, /*beta=*/1, /*alpha=*/p.scale);            // dK += s dS^T Q
    }
  }
}

template <typename T>
Problem<T> problem(const AttentionShape& s, const PreparedAttention& r) {
  return {s, static_cast<T>(1.0 / std::sqrt(static_cast<double>(s.head_dim))), r.q.const_data_ptr<T>(),
          r.k.const_data_ptr<T>(), r.v.const_data_ptr<T>(),
          r.key_mask.defined() ? r.key_mask.const_data_ptr<bool>() : nullptr, query_tile(s)};
}

}  // namespace

TensorPair cross_attention_cpu(const at::Tensor& q, const at::Tensor& context, const at::Tensor& w_k,
                               const at::Tensor& w_v, const std::optional<at::Tensor>& key_mask, double gamma,
                               c10::string_view mode, int64_t seed, int64_t offset, int64_t dim) {
  AttentionForward f =
      begin_attention_forward(at::kCPU, q, context, w_k, w_v, key_mask, gamma, mode, seed, offset, dim);
  const AttentionShape& s = f.s;
  AT_DISPATCH_FLOATING_TYPES(f.r.q.scalar_type(), "cep_cross_attention_cpu", [&] {
    const Problem<scalar_t> p = problem<scalar_t>(s, f.r);
    const int64_t tile = p.query_tile, tiles = (s.queries + tile - 1) / tile;
    scalar_t* out_ptr = f.out.data_ptr<scalar_t>();
    scalar_t* lse_ptr = f.lse.data_ptr<scalar_t>();
    at::parallel_for(0, s.batch * s.heads * tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buffer(3 * tile + tile * kKeyTile);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / tiles, n0 = (item % tiles) * tile;
        forward_item(p, bh / s.heads, bh % s.heads, n0, std::min(tile, s.queries - n0), out_ptr, lse_ptr,
                     buffer.data());
      }
    });
  });
  return {f.out.to(q.scalar_type()), f.lse};
}

TensorQuad cross_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& context,
                                        const at::Tensor& w_k, const at::Tensor& w_v,
                                        const std::optional<at::Tensor>& key_mask, const at::Tensor& out,
                                        const at::Tensor& lse, double gamma, c10::string_view mode, int64_t seed,
                                        int64_t offset, int64_t dim) {
  AttentionBackward b = begin_attention_backward(at::kCPU, grad_out, q, context, w_k, w_v, key_mask, out, lse,
                                                 gamma, mode, seed, offset, dim);
  const AttentionShape& s = b.s;
  AT_DISPATCH_FLOATING_TYPES(b.r.q.scalar_type(), "cep_cross_attention_backward_cpu", [&] {
    const Problem<scalar_t> p = problem<scalar_t>(s, b.r);
    at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buffer(p.query_tile + 2 * p.query_tile * kKeyTile);
      for (int64_t bh = begin; bh < end; ++bh) {
        backward_item(p, bh / s.heads, bh % s.heads, b.grad_out.const_data_ptr<scalar_t>(),
                      b.out.const_data_ptr<scalar_t>(), b.lse.const_data_ptr<scalar_t>(),
                      b.grad_q.data_ptr<scalar_t>(), b.grad_k.data_ptr<scalar_t>(), b.grad_v.data_ptr<scalar_t>(),
                      buffer.data());
      }
    });
  });
  return attention_input_grads(b, q.scalar_type());
}

}  // namespace cep
