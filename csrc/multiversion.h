// Function multi-versioning for the hand-vectorizable CPU loops: GCC compiles a function marked CEP_TARGET_CLONES for
// AVX-512, AVX2 and baseline x86-64 and picks one at load time, so a single portable build still uses the widest
// vectors of the running CPU. Helpers marked CEP_ALWAYS_INLINE are inlined into (and so compiled for) each clone.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CEP_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define CEP_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define CEP_TARGET_CLONES
#define CEP_ALWAYS_INLINE inline
#endif
