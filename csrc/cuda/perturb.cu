// cep::perturb on CUDA: one thread per Philox call (4 consecutive stream elements), the same stream as the CPU
// kernel (csrc/philox.h), launched on the current stream. Only ATen/c10 headers (DESIGN.md §4).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuBLAS/cuSPARSE/cuSOLVER headers

#include "cep.h"
#include "philox.h"

namespace cep {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void perturb_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t numel,
                               at::opmath_type<scalar_t> scale, bool gaussian, uint64_t seed, uint64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t lead = static_cast<int64_t>(offset & 3);  // element 0 is lane `lead` of Philox call offset >> 2
  const int64_t num_calls = (lead + numel + 3) / 4;
  for (int64_t call = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; call < num_calls;
       call += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float noise[4];
    noise_block((offset >> 2) + static_cast<uint64_t>(call), seed, gaussian, noise);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t i = call * 4 + lane - lead;
      if (i >= 0 && i < numel) {
        out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) + scale * static_cast<acc_t>(noise[lane]));
      }
    }
  }
}

}  // namespace

at::Tensor perturb_cuda(const at::Tensor& x, double gamma, c10::string_view mode, int64_t seed, int64_t offset,
                        int64_t dim) {
  check_float_tensor(x, "x");
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor for perturb_cuda, got ", x.device());
  const Stream stream = check_stream(gamma, mode, seed, offset, dim, x.numel());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor input = x.contiguous();  // element index = logical row-major position
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (gamma == 0) return out.copy_(input);
  const int64_t num_calls = (static_cast<int64_t>(stream.offset & 3) + x.numel() + 3) / 4;
  if (num_calls == 0) return out;
  const int64_t blocks = std::min<int64_t>((num_calls + kThreads - 1) / kThreads, 65535);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cep_perturb_cuda", [&] {
    perturb_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        input.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel(),
        static_cast<at::opmath_type<scalar_t>>(stream.scale), stream.gaussian, stream.seed, stream.offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace cep
