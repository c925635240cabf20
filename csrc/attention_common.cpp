#include "attention_common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros_like.h>

namespace cep {

namespace {

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

void check_device(at::DeviceType device, const at::Tensor& q) {
  TORCH_CHECK_VALUE(q.device().type() == device, "q must be a ", c10::DeviceTypeName(device),
                    " tensor for this kernel, got ", q.device());
}

}  // namespace

AttentionForward begin_attention_forward(at::DeviceType device, const at::Tensor& q, const at::Tensor& context,
                                         const at::Tensor& w_k, const at::Tensor& w_v,
                                         const std::optional<at::Tensor>& key_mask, double gamma,
                                         c10::string_view mode, int64_t seed, int64_t offset, int64_t dim) {
  AttentionForward f;
  f.s = check_attention(q, context, w_k, w_v, key_mask);
  check_device(device, q);
  check_stream(gamma, mode, seed, offset, dim, context.numel());
  f.r = prepare_attention(q, context, w_k, w_v, key_mask, gamma, mode, seed, offset, dim);
  f.out = at::empty({f.s.batch, f.s.heads, f.s.queries, f.s.head_dim}, f.r.q.options());
  f.lse = at::empty({f.s.batch, f.s.heads, f.s.queries}, f.r.q.options());
  return f;
}

AttentionBackward begin_attention_backward(at::DeviceType device, const at::Tensor& grad_out, const at::Tensor& q,
                                           const at::Tensor& context, const at::Tensor& w_k, const at::Tensor& w_v,
                                           const std::optional<at::Tensor>& key_mask, const at::Tensor& out,
                                           const at::Tensor& lse, double gamma, c10::string_view mode, int64_t seed,
                                           int64_t offset, int64_t dim) {
  AttentionBackward b;
  b.s = check_attention(q, context, w_k, w_v, key_mask);
  check_backward(b.s, q, grad_out, out, lse);
  check_device(device, q);
  check_stream(gamma, mode, seed, offset, dim, context.numel());
  b.r = prepare_attention(q, context, w_k, w_v, key_mask, gamma, mode, seed, offset, dim);
  const auto ct = b.r.q.scalar_type();
  b.grad_out = grad_out.to(ct).contiguous();
  b.out = out.to(ct).contiguous();
  b.lse = lse.to(ct).contiguous();
  b.grad_q = at::empty_like(b.r.q);
  b.grad_k = at::zeros_like(b.r.k);
  b.grad_v = at::zeros_like(b.r.v);
  return b;
}

TensorQuad attention_input_grads(const AttentionBackward& b, at::ScalarType dtype) {
  const AttentionShape& s = b.s;
  const int64_t width = s.heads * s.head_dim;
  const at::Tensor dk = b.grad_k.view({-1, width}), dv = b.grad_v.view({-1, width});
  const at::Tensor noisy = b.r.noisy_context.view({-1, s.channels});
  const at::Tensor grad_context = at::mm(dk, b.r.w_k).addmm_(dv, b.r.w_v).view({s.batch, s.tokens, s.channels});
  return {b.grad_q.to(dtype), grad_context.to(dtype), at::mm(dk.t(), noisy).to(dtype),
          at::mm(dv.t(), noisy).to(dtype)};
}

}  // namespace cep
