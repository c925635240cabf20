// Philox4x32-10 counter-based generator and the CEP noise mappings, shared by the CPU kernels (csrc/*.cpp) and the
// CUDA kernels (csrc/cuda/*.cu) so both draw the same stream. Written by hand: ATen's Philox engines keep a
// (seed, subsequence, offset) state whose layout is an implementation detail, and we need a documented one.
//
// Stream layout (also documented in models/cep.py, whose pure-PyTorch twin reproduces it bit for bit):
//   key     = (seed mod 2^32, seed >> 32)
//   element i of the logical row-major flattening uses g = offset + i;
//   counter = (g >> 2 mod 2^32, g >> 34, 0, 0), lane = g & 3: element g takes output word `lane` of that call.
//   uniform : w -> ((w >> 8) * 2 + 1 - 2^24) * 2^-24, odd multiples of 2^-24 in (-1, 1), exact in fp32.
//   gaussian: Box-Muller on the word pairs (0, 1) and (2, 3) of one call: u1 = ((w0 >> 8) + 1) 2^-24 in (0, 1],
//             theta = 2 pi (w1 >> 8) 2^-24, lane 0 = r cos(theta), lane 1 = r sin(theta), r = sqrt(-2 ln u1).
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CEP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CEP_HOST_DEVICE inline
#endif

namespace cep {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;  // Salmon et al. 2011, Random123
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr float kTwoPow24Inv = 5.9604644775390625e-08f;  // 2^-24
constexpr float kTwoPiTwoPow24Inv = 3.7450702e-07f;        // 2 pi 2^-24

// Philox4x32-10 for the n consecutive counters first_block .. first_block + n - 1 (counter (block mod 2^32,
// block >> 32, 0, 0)) under key `seed`: words[w][i] is output word w of counter i. The output is a structure of
// arrays so the CPU loop over counters vectorizes without shuffles; the CUDA kernels use n = 1.
template <int n>
CEP_HOST_DEVICE void philox4x32_10(uint64_t first_block, uint64_t seed, uint32_t words[4][n]) {
  for (int i = 0; i < n; ++i) {  // the CPU vectorizes this loop (the 10 rounds unroll into its body)
    const uint64_t block = first_block + static_cast<uint64_t>(i);
    uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      if (round > 0) {
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
      }
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
      c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      c1 = static_cast<uint32_t>(p1);
      c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c3 = static_cast<uint32_t>(p0);
    }
    words[0][i] = c0;
    words[1][i] = c1;
    words[2][i] = c2;
    words[3][i] = c3;
  }
}

// U(-1, 1): the odd integers -(2^24 - 1) .. 2^24 - 1 are exact in fp32, so every backend gives the same bits.
CEP_HOST_DEVICE float uniform_from_word(uint32_t word) {
  return static_cast<float>(static_cast<int32_t>((word >> 8) * 2u + 1u) - (1 << 24)) * kTwoPow24Inv;
}

// Box-Muller: two N(0, 1) values from a word pair.
CEP_HOST_DEVICE void gaussian_from_words(uint32_t w0, uint32_t w1, float* n0, float* n1) {
  const float u1 = static_cast<float>((w0 >> 8) + 1u) * kTwoPow24Inv;  // (0, 1]: log never sees 0
  const float theta = static_cast<float>(w1 >> 8) * kTwoPiTwoPow24Inv;
#if defined(__CUDA_ARCH__)
  const float radius = sqrtf(-2.0f * logf(u1));
  float s, c;
  sincosf(theta, &s, &c);
#else
  const float radius = std::sqrt(-2.0f * std::log(u1));
  const float s = std::sin(theta), c = std::cos(theta);
#endif
  *n0 = radius * c;
  *n1 = radius * s;
}

// The four noise values of one Philox call (lanes 0..3).
CEP_HOST_DEVICE void noise_block(uint64_t block, uint64_t seed, bool gaussian, float out[4]) {
  uint32_t words[4][1];
  philox4x32_10<1>(block, seed, words);
  if (gaussian) {
    gaussian_from_words(words[0][0], words[1][0], &out[0], &out[1]);
    gaussian_from_words(words[2][0], words[3][0], &out[2], &out[3]);
  } else {
    for (int lane = 0; lane < 4; ++lane) out[lane] = uniform_from_word(words[lane][0]);
  }
}

}  // namespace cep
