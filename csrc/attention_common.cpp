#include "attention_common.h"

#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>

namespace cep {

PreparedAttention prepare_attention(const at::Tensor& q, const at::Tensor& context, const at::Tensor& w_k,
                                    const at::Tensor& w_v, const std::optional<at::Tensor>& key_mask, double gamma,
                                    c10::string_view mode, int64_t seed, int64_t offset, int64_t dim) {
  const auto ct = compute_type(q.scalar_type());
  PreparedAttention r;
  r.q = q.to(ct).contiguous();
  const at::Tensor clean = context.to(ct).contiguous();
#ifdef CEP_WITH_CUDA
  const auto perturb = clean.is_cuda() ? &perturb_cuda : &perturb_cpu;
#else
  const auto perturb = &perturb_cpu;
#endif
  r.noisy_context = gamma > 0 ? perturb(clean, gamma, mode, seed, offset, dim) : clean;
  r.w_k = w_k.to(ct);
  r.w_v = w_v.to(ct);
  r.k = at::matmul(r.noisy_context, r.w_k.t()).contiguous();
  r.v = at::matmul(r.noisy_context, r.w_v.t()).contiguous();
  if (key_mask.has_value()) r.key_mask = key_mask->contiguous();
  return r;
}

TensorQuad attention_input_grads(const PreparedAttention& r, const AttentionShape& s, const at::Tensor& grad_q,
                                 const at::Tensor& grad_k, const at::Tensor& grad_v, at::ScalarType dtype) {
  const int64_t width = s.heads * s.head_dim;
  const at::Tensor dk = grad_k.view({-1, width}), dv = grad_v.view({-1, width});
  const at::Tensor noisy = r.noisy_context.view({-1, s.channels});
  const at::Tensor grad_context = at::mm(dk, r.w_k).addmm_(dv, r.w_v).view({s.batch, s.tokens, s.channels});
  return {grad_q.to(dtype), grad_context.to(dtype), at::mm(dk.t(), noisy).to(dtype), at::mm(dv.t(), noisy).to(dtype)};
}

}  // namespace cep
