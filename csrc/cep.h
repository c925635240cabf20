// Declarations shared by the CEP op implementations: argument checks (one place, used by every backend) and the
// per-backend kernels that csrc/ops.cpp registers. Host-only ATen/c10 headers, so .cu files may include it.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

namespace cep {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using TensorQuad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Noise stream parameters after validation.
struct Stream {
  double scale;  // gamma / sqrt(dim), paper 1 Eq. 8
  bool gaussian;
  uint64_t seed;
  uint64_t offset;
};

inline Stream check_stream(double gamma, c10::string_view mode, int64_t seed, int64_t offset, int64_t dim,
                           int64_t numel) {
  TORCH_CHECK_VALUE(mode == "uniform" || mode == "gaussian", "mode must be 'uniform' or 'gaussian', got '",
                    std::string(mode.data(), mode.size()), "'");
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma >= 0, "gamma must be finite and >= 0, got ", gamma);
  TORCH_CHECK_VALUE(seed >= 0, "seed must be >= 0, got ", seed);
  TORCH_CHECK_VALUE(offset >= 0 && offset <= std::numeric_limits<int64_t>::max() - numel,
                    "offset must be in [0, 2^63 - 1 - numel], got ", offset);
  TORCH_CHECK_VALUE(dim >= 1, "dim must be >= 1, got ", dim);
  const double scale = gamma / std::sqrt(static_cast<double>(dim));
  return {scale, mode == "gaussian", static_cast<uint64_t>(seed),
          static_cast<uint64_t>(offset)};
}

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, name,
                   " must be float16/bfloat16/float32/float64, got ", dtype);
}

// Kernels compute in fp32 (fp16/bf16 inputs are upcast: they accumulate in fp32) or in fp64 for gradcheck.
inline at::ScalarType compute_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

struct AttentionShape {
  int64_t batch, heads, queries, head_dim, tokens, channels;
};

inline AttentionShape check_attention(const at::Tensor& q, const at::Tensor& context, const at::Tensor& w_k,
                                      const at::Tensor& w_v, const std::optional<at::Tensor>& key_mask) {
  check_float_tensor(q, "q");
  check_float_tensor(context, "context");
  check_float_tensor(w_k, "w_k");
  check_float_tensor(w_v, "w_v");
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be [B, H, N, Dh], got ", q.sizes());
  TORCH_CHECK_VALUE(context.dim() == 3, "context must be [B, M, C], got ", context.sizes());
  const AttentionShape s{q.size(0), q.size(1), q.size(2), q.size(3), context.size(1), context.size(2)};
  TORCH_CHECK_VALUE(context.size(0) == s.batch, "context batch ", context.size(0), " != q batch ", s.batch);
  TORCH_CHECK_VALUE(s.tokens >= 1 && s.channels >= 1 && s.heads >= 1 && s.head_dim >= 1,
                    "context tokens/channels and q heads/head_dim must be >= 1, got context ", context.sizes(),
                    ", q ", q.sizes());
  for (const auto& [w, name] : {std::pair{&w_k, "w_k"}, std::pair{&w_v, "w_v"}}) {
    TORCH_CHECK_VALUE(w->dim() == 2 && w->size(0) == s.heads * s.head_dim && w->size(1) == s.channels, name,
                      " must be [H*Dh, C] = [", s.heads * s.head_dim, ", ", s.channels, "], got ", w->sizes());
  }
  for (const auto& [t, name] : {std::pair{&context, "context"}, std::pair{&w_k, "w_k"}, std::pair{&w_v, "w_v"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, " dtype ", t->scalar_type(), " != q dtype ",
                     q.scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), name, " device ", t->device(), " != q device ", q.device());
  }
  if (key_mask.has_value()) {
    TORCH_CHECK_TYPE(key_mask->scalar_type() == at::kBool, "key_mask must be bool, got ", key_mask->scalar_type());
    TORCH_CHECK_VALUE(key_mask->dim() == 2 && key_mask->size(0) == s.batch && key_mask->size(1) == s.tokens,
                      "key_mask must be [B, M] = [", s.batch, ", ", s.tokens, "], got ", key_mask->sizes());
    TORCH_CHECK_VALUE(key_mask->device() == q.device(), "key_mask device ", key_mask->device(), " != q device ",
                      q.device());
  }
  return s;
}

inline void check_backward(const AttentionShape& s, const at::Tensor& q, const at::Tensor& grad_out,
                           const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes(), "grad_out must have q's shape ", q.sizes(), ", got ",
                    grad_out.sizes());
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), "out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == s.batch && lse.size(1) == s.heads && lse.size(2) == s.queries,
                    "lse must be [B, H, N], got ", lse.sizes());
  for (const auto& [t, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}, std::pair{&lse, "lse"}}) {
    check_float_tensor(*t, name);
    TORCH_CHECK_VALUE(t->device() == q.device(), name, " device ", t->device(), " != q device ", q.device());
  }
}

// The kernels each backend registers (csrc/ops.cpp), with the same signatures on every backend:
// perturb_cpu / cross_attention_cpu / cross_attention_backward_cpu (csrc/*_cpu.cpp) and the _cuda ones (csrc/cuda/).
#define CEP_DECLARE_KERNELS(backend)                                                                                \
  at::Tensor perturb_##backend(const at::Tensor& x, double gamma, c10::string_view mode, int64_t seed,             \
                               int64_t offset, int64_t dim);                                                        \
  TensorPair cross_attention_##backend(const at::Tensor& q, const at::Tensor& context, const at::Tensor& w_k,     \
                                       const at::Tensor& w_v, const std::optional<at::Tensor>& key_mask,           \
                                       double gamma, c10::string_view mode, int64_t seed, int64_t offset,          \
                                       int64_t dim);                                                                \
  TensorQuad cross_attention_backward_##backend(                                                                    \
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& context, const at::Tensor& w_k,          \
      const at::Tensor& w_v, const std::optional<at::Tensor>& key_mask, const at::Tensor& out,                     \
      const at::Tensor& lse, double gamma, c10::string_view mode, int64_t seed, int64_t offset, int64_t dim);

CEP_DECLARE_KERNELS(cpu)
#ifdef CEP_WITH_CUDA
CEP_DECLARE_KERNELS(cuda)
#endif
#undef CEP_DECLARE_KERNELS

}  // namespace cep
