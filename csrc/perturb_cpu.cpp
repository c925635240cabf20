// cep::perturb on the CPU: out = x + gamma/sqrt(dim) * noise in one pass, noise from the Philox stream of philox.h.
// Each thread regenerates exactly the counters of its own elements, so the result does not depend on the number of
// threads or on how at::parallel_for splits the tensor.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

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
      fill_uniform_blocks(noise, first >> 2, num_blocks, stream.seed);
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
