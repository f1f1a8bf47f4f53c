// Which SIMD path the C++ CPU kernels take: the best one this CPU runs (cpuid), capped by the
// environment variable FASTGEN_CPU_ISA=scalar|avx2|avx512, read at every call so that tests can run
// every path the machine supports in one process. A value naming a path above the CPU's best is capped
// to the best (the kernels never execute instructions the CPU lacks); an unknown value is an error.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace fastgen {
namespace cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

// The best path this CPU supports (AVX2 needs FMA too; AVX-512 means AVX-512F).
inline Isa best_isa() {
  static const Isa best = [] {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
    return Isa::kScalar;
  }();
  return best;
}

// F16C (the packed float16 <-> float32 conversions): the AVX2 path converts fp16 with it only where the
// CPU has it (every AVX2 part in practice, but it is a separate cpuid bit). AVX-512F has its own forms.
inline bool has_f16c() {
  static const bool yes = [] {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c") != 0;
#else
    return false;
#endif
  }();
  return yes;
}

// Extensions past AVX-512F that a kernel's avx512 path may add where cpuid reports all of them: BW, DQ and
// VL (16-bit lanes in 512-bit registers, vfpclassps: every AVX-512 part since Skylake-SP and Zen 4) and
// BF16 (vcvtneps2bf16, float32 -> bfloat16 in one instruction: Cooper Lake, Sapphire Rapids, Zen 4).
// FASTGEN_CPU_ISA=avx512 keeps them; a capped path (avx2, scalar) never uses them.
inline bool has_avx512_bf16_set() {
  static const bool yes = [] {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
  }();
  return yes;
}

inline Isa selected_isa() {
  const Isa best = best_isa();
  const char* env = std::getenv("FASTGEN_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return best;
  Isa want;
  if (std::strcmp(env, "scalar") == 0) {
    want = Isa::kScalar;
  } else if (std::strcmp(env, "avx2") == 0) {
    want = Isa::kAvx2;
  } else if (std::strcmp(env, "avx512") == 0) {
    want = Isa::kAvx512;
  } else {
    TORCH_CHECK_VALUE(false, "FASTGEN_CPU_ISA=", env, " is not one of scalar, avx2, avx512");
  }
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

}  // namespace cpu
}  // namespace fastgen
