// Backend-independent parts of cep::cross_attention: the input preparation (upcast, CEP perturbation, K/V
// projection) and the projection gradients. The CPU (attention_cpu.cpp) and CUDA (cuda/attention.cu) kernels only
// implement the attention core between them. Host-only ATen headers, so .cu files may include it.
#pragma once
#include "cep.h"

namespace cep {

// Inputs in the compute type (contiguous), the perturbed context c' and K = c' W_k^T, V = c' W_v^T: [B, M, H*Dh].
struct PreparedAttention {
  at::Tensor q, noisy_context, w_k, w_v, k, v, key_mask;  // key_mask undefined when absent
};

// Validated shape, prepared inputs and the outputs (compute type) a backend's forward kernel fills in.
struct AttentionForward {
  AttentionShape s;
  PreparedAttention r;
  at::Tensor out, lse;  // [B, H, N, Dh], [B, H, N]
};

// The same for the backward: upcast grad_out/out/lse, grad_q to fill, zeroed dK, dV [B, M, H*Dh] to accumulate into.
struct AttentionBackward {
  AttentionShape s;
  PreparedAttention r;
  at::Tensor grad_out, out, lse, grad_q, grad_k, grad_v;
};

// Both check every argument (naming it in the error) and that q lives on `device` (the backend's device type).
AttentionForward begin_attention_forward(at::DeviceType device, const at::Tensor& q, const at::Tensor& context,
                                         const at::Tensor& w_k, const at::Tensor& w_v,
                                         const std::optional<at::Tensor>& key_mask, double gamma,
                                         c10::string_view mode, int64_t seed, int64_t offset, int64_t dim);
AttentionBackward begin_attention_backward(at::DeviceType device, const at::Tensor& grad_out, const at::Tensor& q,
                                           const at::Tensor& context, const at::Tensor& w_k, const at::Tensor& w_v,
                                           const std::optional<at::Tensor>& key_mask, const at::Tensor& out,
                                           const at::Tensor& lse, double gamma, c10::string_view mode, int64_t seed,
                                           int64_t offset, int64_t dim);

// From the filled-in dQ, dK, dV of `b` to (grad_q, grad_context, grad_w_k, grad_w_v) in the input
// dtypes: K = c' W_k^T gives dW_k = dK^T c' and dc' = dK W_k (same for V); dc/dc' = I since the noise is additive.
TensorQuad attention_input_grads(const AttentionBackward& b, at::ScalarType dtype);

}  // namespace cep
