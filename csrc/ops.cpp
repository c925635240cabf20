// Op schemas (declared once) and the backend registrations of the CEP ops. Fake kernels and autograd formulas are
// registered from Python (models/cep.py). The module init below only makes `models._C` importable: loading it runs
// the static TORCH_LIBRARY registrations; no pybind11 is involved (the pytorch/extension-cpp pattern).
#include <Python.h>
#include <torch/library.h>

#include "cep.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(cep, m) {
  m.def("perturb(Tensor x, float gamma, str mode, int seed, int offset, int dim) -> Tensor");
  // Returns (out, lse): lse [B, H, N] (fp32, or fp64 for fp64 inputs) is what backward needs to rebuild softmax.
  m.def("cross_attention(Tensor q, Tensor context, Tensor w_k, Tensor w_v, Tensor? key_mask, float gamma, str mode, "
        "int seed, int offset, int dim) -> (Tensor, Tensor)");
  // Returns (grad_q, grad_context, grad_w_k, grad_w_v).
  m.def("cross_attention_backward(Tensor grad_out, Tensor q, Tensor context, Tensor w_k, Tensor w_v, "
        "Tensor? key_mask, Tensor out, Tensor lse, float gamma, str mode, int seed, int offset, int dim) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cep, CPU, m) {
  m.impl("perturb", &cep::perturb_cpu);
  m.impl("cross_attention", &cep::cross_attention_cpu);
  m.impl("cross_attention_backward", &cep::cross_attention_backward_cpu);
}

#ifdef CEP_WITH_CUDA
TORCH_LIBRARY_IMPL(cep, CUDA, m) {
  m.impl("perturb", &cep::perturb_cuda);
  m.impl("cross_attention", &cep::cross_attention_cuda);
  m.impl("cross_attention_backward", &cep::cross_attention_backward_cuda);
}
#endif
