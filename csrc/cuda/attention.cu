// cep::cross_attention on CUDA. The context perturbation and the K/V projections (cuBLAS via ATen) are shared with
// the CPU path (attention_common.cpp); this file holds the attention core: one warp per query row, K/V tiles in
// shared memory, an online softmax over keys (Dao et al. 2022, Alg. 1) in the forward, and in the backward a
// recomputation of the probabilities from the saved row log-sum-exp (Alg. 2). dK/dV partial sums are reduced per
// block in shared memory before one global atomicAdd per element, so their summation order (unlike the CPU
// kernel's) is not deterministic. Fully masked rows: output 0, lse = -inf, zero gradients (as on the CPU).
// Only ATen/c10 headers (DESIGN.md §4); launches on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuBLAS/cuSPARSE/cuSOLVER headers

#include <limits>

#include "attention_common.h"

namespace cep {
namespace {

constexpr int kWarps = 4;          // query rows per block, one warp each
constexpr int kMaxPerLane = 8;     // a lane holds head-dim elements lane, lane + 32, ...: head_dim <= 256
constexpr int kMaxKeyTile = 32;    // keys per shared-memory tile
constexpr int kSharedBytes = 48 * 1024;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float device_exp(float x) { return expf(x); }
__device__ __forceinline__ double device_exp(double x) { return exp(x); }
__device__ __forceinline__ float device_log(float x) { return logf(x); }
__device__ __forceinline__ double device_log(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int step = 16; step > 0; step >>= 1) value += __shfl_xor_sync(kFullMask, value, step);
  return value;
}

template <typename T>
struct Params {
  const T* q;        // [B, H, N, Dh]
  const T* k;        // [B, M, H*Dh]
  const T* v;        // [B, M, H*Dh]
  const bool* mask;  // [B, M] or nullptr
  int64_t heads, queries, head_dim, tokens, query_blocks;
  T scale;        // 1 / sqrt(Dh)
  int key_tile;   // keys per shared-memory tile
};

// Row `row` of a [*, Dh] matrix into a lane's registers (zeros past Dh or for inactive warps).
template <typename T>
__device__ void load_row(const T* base, int64_t row, int64_t head_dim, int lane, bool active, T reg[kMaxPerLane]) {
#pragma unroll
  for (int r = 0; r < kMaxPerLane; ++r) {
    const int64_t d = lane + 32 * r;
    reg[r] = active && d < head_dim ? base[row * head_dim + d] : T(0);
  }
}

// <reg, row> over the head dim, reduced across the warp (every lane gets the result).
template <typename T>
__device__ T warp_dot(const T reg[kMaxPerLane], const T* row, int64_t head_dim, int lane) {
  T sum = 0;
#pragma unroll
  for (int r = 0; r < kMaxPerLane; ++r) {
    const int64_t d = lane + 32 * r;
    if (d < head_dim) sum += reg[r] * row[d];
  }
  return warp_sum(sum);
}

// Keys m0 .. m0 + mt - 1 of head h into shared memory, [mt, Dh] each for K and V.
template <typename T>
__device__ void load_key_tile(const Params<T>& p, int64_t b, int64_t h, int64_t m0, int mt, T* k_tile, T* v_tile) {
  const int64_t width = p.heads * p.head_dim;
  for (int64_t idx = threadIdx.x; idx < mt * p.head_dim; idx += blockDim.x) {
    const int64_t j = idx / p.head_dim, d = idx % p.head_dim;
    const int64_t src = (b * p.tokens + m0 + j) * width + h * p.head_dim + d;
    k_tile[idx] = p.k[src];
    v_tile[idx] = p.v[src];
  }
}

template <typename T>
__device__ bool key_masked(const Params<T>& p, int64_t b, int64_t m) {
  return p.mask != nullptr && !p.mask[b * p.tokens + m];
}

template <typename T>
__global__ void forward_kernel(Params<T> p, T* __restrict__ out, T* __restrict__ lse) {
  extern __shared__ unsigned char shared_bytes[];
  T* k_tile = reinterpret_cast<T*>(shared_bytes);
  T* v_tile = k_tile + p.key_tile * p.head_dim;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x / p.query_blocks, b = bh / p.heads, h = bh % p.heads;
  const int64_t n = (blockIdx.x % p.query_blocks) * kWarps + warp;
  const bool active = n < p.queries;  // inactive warps still help load tiles and reach every __syncthreads
  const int64_t row = bh * p.queries + n;
  T q_reg[kMaxPerLane], acc[kMaxPerLane];
  load_row(p.q, row, p.head_dim, lane, active, q_reg);
#pragma unroll
  for (int r = 0; r < kMaxPerLane; ++r) acc[r] = 0;
  T row_max = -std::numeric_limits<T>::infinity(), row_sum = 0;
  for (int64_t m0 = 0; m0 < p.tokens; m0 += p.key_tile) {
    const int mt = static_cast<int>(min(static_cast<int64_t>(p.key_tile), p.tokens - m0));
    __syncthreads();
    load_key_tile(p, b, h, m0, mt, k_tile, v_tile);
    __syncthreads();
    if (!active) continue;
    for (int j = 0; j < mt; ++j) {
      if (key_masked(p, b, m0 + j)) continue;  // warp-uniform branch
      const T score = warp_dot(q_reg, k_tile + j * p.head_dim, p.head_dim, lane) * p.scale;
      const T new_max = max(row_max, score);
      const T correction = device_exp(row_max - new_max);  // exp(-inf) = 0 before the first valid key
      const T prob = device_exp(score - new_max);
      row_sum = row_sum * correction + prob;
#pragma unroll
      for (int r = 0; r < kMaxPerLane; ++r) {
        const int64_t d = lane + 32 * r;
        if (d < p.head_dim) acc[r] = acc[r] * correction + prob * v_tile[j * p.head_dim + d];
      }
      row_max = new_max;
    }
  }
  if (!active) return;
  const T inv = row_sum > 0 ? T(1) / row_sum : T(0);
#pragma unroll
  for (int r = 0; r < kMaxPerLane; ++r) {
    const int64_t d = lane + 32 * r;
    if (d < p.head_dim) out[row * p.head_dim + d] = acc[r] * inv;
  }
  if (lane == 0) lse[row] = row_sum > 0 ? row_max + device_log(row_sum) : -std::numeric_limits<T>::infinity();
}

template <typename T>
__global__ void backward_kernel(Params<T> p, const T* __restrict__ grad_out, const T* __restrict__ out,
                                const T* __restrict__ lse, T* __restrict__ grad_q, T* __restrict__ grad_k,
                                T* __restrict__ grad_v) {
  extern __shared__ unsigned char shared_bytes[];
  const int64_t tile_size = p.key_tile * p.head_dim;
  T* k_tile = reinterpret_cast<T*>(shared_bytes);
  T* v_tile = k_tile + tile_size;
  T* dk_tile = v_tile + tile_size;  // this block's partial dK, dV of the tile
  T* dv_tile = dk_tile + tile_size;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x / p.query_blocks, b = bh / p.heads, h = bh % p.heads;
  const int64_t n = (blockIdx.x % p.query_blocks) * kWarps + warp;
  const bool active = n < p.queries;
  const int64_t row = bh * p.queries + n;
  T q_reg[kMaxPerLane], go_reg[kMaxPerLane], o_reg[kMaxPerLane], dq[kMaxPerLane];
  load_row(p.q, row, p.head_dim, lane, active, q_reg);
  load_row(grad_out, row, p.head_dim, lane, active, go_reg);
  load_row(out, row, p.head_dim, lane, active, o_reg);
  T delta = 0;  // D_i = rowsum(dO_i * O_i)
#pragma unroll
  for (int r = 0; r < kMaxPerLane; ++r) {
    delta += go_reg[r] * o_reg[r];
    dq[r] = 0;
  }
  delta = warp_sum(delta);
  const T row_lse = active ? lse[row] : -std::numeric_limits<T>::infinity();
  const bool has_keys = row_lse != -std::numeric_limits<T>::infinity();  // else P = 0: no gradient from this row
  const int64_t width = p.heads * p.head_dim;
  for (int64_t m0 = 0; m0 < p.tokens; m0 += p.key_tile) {
    const int mt = static_cast<int>(min(static_cast<int64_t>(p.key_tile), p.tokens - m0));
    __syncthreads();
    load_key_tile(p, b, h, m0, mt, k_tile, v_tile);
    for (int64_t idx = threadIdx.x; idx < mt * p.head_dim; idx += blockDim.x) dk_tile[idx] = dv_tile[idx] = 0;
    __syncthreads();
    if (has_keys) {
      for (int j = 0; j < mt; ++j) {
        if (key_masked(p, b, m0 + j)) continue;
        const T* k_row = k_tile + j * p.head_dim;
        const T prob = device_exp(warp_dot(q_reg, k_row, p.head_dim, lane) * p.scale - row_lse);
        const T dprob = warp_dot(go_reg, v_tile + j * p.head_dim, p.head_dim, lane);
        const T dscore = prob * (dprob - delta) * p.scale;  // dS, with the 1/sqrt(Dh) of S = q k^T / sqrt(Dh)
#pragma unroll
        for (int r = 0; r < kMaxPerLane; ++r) {
          const int64_t d = lane + 32 * r;
          if (d >= p.head_dim) continue;
          dq[r] += dscore * k_row[d];
          atomicAdd(&dk_tile[j * p.head_dim + d], dscore * q_reg[r]);
          atomicAdd(&dv_tile[j * p.head_dim + d], prob * go_reg[r]);
        }
      }
    }
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < mt * p.head_dim; idx += blockDim.x) {
      const int64_t j = idx / p.head_dim, d = idx % p.head_dim;
      const int64_t dst = (b * p.tokens + m0 + j) * width + h * p.head_dim + d;
      atomicAdd(&grad_k[dst], dk_tile[idx]);
      atomicAdd(&grad_v[dst], dv_tile[idx]);
    }
  }
  if (!active) return;
#pragma unroll
  for (int r = 0; r < kMaxPerLane; ++r) {
    const int64_t d = lane + 32 * r;
    if (d < p.head_dim) grad_q[row * p.head_dim + d] = dq[r];
  }
}

// Launch geometry and shared memory: `tiles` key tiles of [key_tile, Dh] live in shared memory at once.
template <typename T>
Params<T> make_params(const AttentionShape& s, const PreparedAttention& r, int tiles) {
  const int64_t per_key = tiles * s.head_dim * static_cast<int64_t>(sizeof(T));
  const int key_tile = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxKeyTile, kSharedBytes / per_key)));
  return {r.q.const_data_ptr<T>(), r.k.const_data_ptr<T>(), r.v.const_data_ptr<T>(),
          r.key_mask.defined() ? r.key_mask.const_data_ptr<bool>() : nullptr, s.heads, s.queries, s.head_dim,
          s.tokens, (s.queries + kWarps - 1) / kWarps, static_cast<T>(1.0 / std::sqrt(static_cast<double>(s.head_dim))),
          key_tile};
}

void check_head_dim(const AttentionShape& s) {
  TORCH_CHECK_VALUE(s.head_dim <= 32 * kMaxPerLane, "q head_dim must be <= ", 32 * kMaxPerLane,
                    " on CUDA, got ", s.head_dim);
}

int64_t launch_blocks(const AttentionShape& s) {
  const int64_t blocks = s.batch * s.heads * ((s.queries + kWarps - 1) / kWarps);
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "q is too large for one launch: B*H*N/",
                    kWarps, " = ", blocks, " blocks");
  return blocks;
}

}  // namespace

TensorPair cross_attention_cuda(const at::Tensor& q, const at::Tensor& context, const at::Tensor& w_k,
                                const at::Tensor& w_v, const std::optional<at::Tensor>& key_mask, double gamma,
                                c10::string_view mode, int64_t seed, int64_t offset, int64_t dim) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  AttentionForward f =
      begin_attention_forward(at::kCUDA, q, context, w_k, w_v, key_mask, gamma, mode, seed, offset, dim);
  check_head_dim(f.s);
  const int64_t blocks = launch_blocks(f.s);
  if (blocks > 0) {
    AT_DISPATCH_FLOATING_TYPES(f.r.q.scalar_type(), "cep_cross_attention_cuda", [&] {
      const Params<scalar_t> p = make_params<scalar_t>(f.s, f.r, 2);
      const size_t shared = 2 * p.key_tile * f.s.head_dim * sizeof(scalar_t);
      forward_kernel<scalar_t><<<blocks, kWarps * 32, shared, c10::cuda::getCurrentCUDAStream()>>>(
          p, f.out.data_ptr<scalar_t>(), f.lse.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {f.out.to(q.scalar_type()), f.lse};
}

TensorQuad cross_attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& context,
                                         const at::Tensor& w_k, const at::Tensor& w_v,
                                         const std::optional<at::Tensor>& key_mask, const at::Tensor& out,
                                         const at::Tensor& lse, double gamma, c10::string_view mode, int64_t seed,
                                         int64_t offset, int64_t dim) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  AttentionBackward b = begin_attention_backward(at::kCUDA, grad_out, q, context, w_k, w_v, key_mask, out, lse,
                                                 gamma, mode, seed, offset, dim);
  check_head_dim(b.s);
  const int64_t blocks = launch_blocks(b.s);
  if (blocks > 0) {
    AT_DISPATCH_FLOATING_TYPES(b.r.q.scalar_type(), "cep_cross_attention_backward_cuda", [&] {
      const Params<scalar_t> p = make_params<scalar_t>(b.s, b.r, 4);
      const size_t shared = 4 * p.key_tile * b.s.head_dim * sizeof(scalar_t);
      backward_kernel<scalar_t><<<blocks, kWarps * 32, shared, c10::cuda::getCurrentCUDAStream()>>>(
          p, b.grad_out.const_data_ptr<scalar_t>(), b.out.const_data_ptr<scalar_t>(),
          b.lse.const_data_ptr<scalar_t>(), b.grad_q.data_ptr<scalar_t>(), b.grad_k.data_ptr<scalar_t>(),
          b.grad_v.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return attention_input_grads(b, q.scalar_type());
}

}  // namespace cep
