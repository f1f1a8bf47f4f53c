// Fused diffusion sampler step, C++ CPU kernel (at::parallel_for over tiles of a row), with runtime SIMD
// dispatch.
//
// Each tile of kTile (or kTileSmall) elements of one sample goes through a short pipeline of stages
// (guidance, prediction + known-region replacement + clipping + update, prev_x0 term, guidance-gradient
// shift, noise, stores), each a tight loop over float32 buffers that stay in L1. Every stage is templated
// on the features it handles, so its loop has no branches and GCC / clang vectorize it (the RNG and the
// learned-range exp included: see log_positive, sincos_turn and exp_approx in the header); the features
// are resolved once per tile, not per element. Staging keeps the template instantiations additive in the
// features (about 25 loops per dtype and path) instead of multiplicative.
//
// SIMD paths. The per-chunk body (tile loop + every stage, all always-inline) is instantiated four
// times in this one translation unit: in a wrapper without a target attribute (the portable x86-64
// baseline, SSE2), in a target("avx2,fma") wrapper, in a target("avx512f") wrapper and, for CPUs with
// cpu::has_avx512_bf16_set() (Cooper Lake, Sapphire Rapids, Zen 4), in an AVX-512 F/BW/DQ/VL/BF16 one, so
// the vectorizer emits 128-bit, 256-bit and (where GCC's cost model picks them) 512-bit loops from one
// source; only with BW does it widen the bf16 loads to 512 bits. cpu::selected_isa() (cpuid, capped by
// FASTGEN_CPU_ISA) picks the wrapper at every call. No global -m flag is involved, so the baseline never
// executes an instruction the CPU might lack.
//
// Same results on every path, bit for bit, with one exception: every stage is elementwise (no
// reductions), and FMA contraction is switched off for this file (the pragma below; GCC contracts a * b + c
// into an FMA under target("avx2,fma") / "avx512f" otherwise, even in ISO mode, which rounds differently
// from the scalar path and from the torch reference). sqrt, division and the int <-> float conversions are
// IEEE-exact in every width, and the kernel calls no libm function. The exception is the learned-range
// exp, which the SIMD paths compute with explicit FMAs (exp_approx<true>: ~30% less time a value on
// AVX-512 and AVX2); the baseline keeps the unfused form. Both are within 1 ulp of e^x, so x_prev of a
// learned-range step with noise or a guidance gradient may differ between paths by 2 ulp of the sd (4 of
// the variance); pred_x0 and every other output do not.
//
// 16-bit types. bf16 inputs are read inside the stage loops (bf16 -> f32 is a 16-bit shift, vectorized
// there: vpmovzxwd + vpslld); fp16 inputs are converted to float32 tile buffers first. The stages write
// float32, and each 16-bit output is converted by one pass with explicit intrinsics on the SIMD paths:
// f32 -> bf16 rounds to nearest even on the integer bits, NaN -> 0x7FC0 (c10::BFloat16's rounding, which
// torch's .to(bfloat16) uses too), or with AVX512-BF16's vcvtneps2bf16 (the same rounding; the rare
// vector with a subnormal or a NaN takes the integer form); fp16 uses F16C's vcvtph2ps / vcvtps2ph (round
// to nearest even) under target("avx2,f16c") where cpuid reports F16C, or the AVX-512F forms. The
// baseline uses the scalar forms; all give the same bits (a NaN stays a NaN; an fp16 NaN's payload may
// differ). The bf16 loops are bound by the vector ALUs, not by memory (the same time per element whether
// the tensors sit in L2 or stream from memory): a bf16 DDIM step costs ~1.35x the fp32 one at 16x4x64x64
// (the conversions' instructions), ~0.75x at 8x3x256x256, where fp32 waits on memory (1 thread, Zen 4;
// the BF16 wrapper takes ~20% off the avx512f wrapper's bf16 time).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include "diffusion_step/diffusion_step.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cpu_isa.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTGEN_STEP_X86 1
#include <immintrin.h>
#endif

#define FASTGEN_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fastgen {
namespace diffusion {
namespace {

// Elements per tile: even, so RNG pairs never straddle tiles; the stage buffers take ~22 KiB of stack. A
// tile reads and writes up to eleven streams (rows of page-aligned tensors, all at the same page offset).
// With many of them (7 in float32, 8 in 16 bits: learned-range steps with noise, inpainting, guidance
// gradients) 128-element tiles stay in L1 from one stage to the next, 512-element ones did not: 128 took
// 15-35% off those rows at 8 x 3 x 256 x 256 (1 thread: fp32 GLIDE inpainting 2.5 -> 1.8 ms, with the
// guidance gradient 2.2 -> 1.4 ms; bf16 inpainting 2.0-2.1 -> 1.8 ms). With fewer streams the shorter
// tiles' overhead cost 5-10% (DDIM / DPM-Solver rows), so those keep 512.
constexpr int64_t kTile = 512;
constexpr int64_t kTileSmall = 128;
// Elements per parallel chunk at least: smaller calls run on the calling thread.
constexpr int64_t kGrainElems = 32768;

// The code path of one instantiation (a template argument; the wrappers at the end set the target).
// PATH_AVX512BF16 is the avx512 path on CPUs with cpu::has_avx512_bf16_set().
enum Path : int { PATH_BASE = 0, PATH_AVX2 = 1, PATH_AVX512 = 2, PATH_AVX512BF16 = 3 };

// ---- 16-bit conversions ---------------------------------------------------------------------------------
//
// Scalar forms (the baseline and the tails of the SIMD loops).

FASTGEN_ALWAYS_INLINE float bf16_bits_to_f32(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even on the bits; NaN -> the quiet NaN 0x7FC0 (as c10::BFloat16(float)).
FASTGEN_ALWAYS_INLINE uint16_t f32_to_bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t r = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0) : r;
}

void f32_to_bf16_base(const float* __restrict__ src, uint16_t* __restrict__ dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = f32_to_bf16_bits(src[j]);
}
void f16_to_f32_base(const c10::Half* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}
void f32_to_f16_base(const float* __restrict__ src, c10::Half* __restrict__ dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}

#ifdef FASTGEN_STEP_X86
__attribute__((target("avx2"))) FASTGEN_ALWAYS_INLINE __m256i bf16_round8(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);  // 32-bit lanes, values < 2^16
}

__attribute__((target("avx2"))) void f32_to_bf16_avx2(const float* __restrict__ src, uint16_t* __restrict__ dst,
                                                       int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256i a = bf16_round8(_mm256_loadu_ps(src + j));
    const __m256i b = bf16_round8(_mm256_loadu_ps(src + j + 8));
    // packus per 128-bit lane: [a0-3 b0-3 | a4-7 b4-7]; the 64-bit permute puts them in order
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), packed);
  }
  for (; j < n; ++j) dst[j] = f32_to_bf16_bits(src[j]);
}

__attribute__((target("avx2,f16c"))) void f16_to_f32_f16c(const c10::Half* __restrict__ src,
                                                           float* __restrict__ dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

__attribute__((target("avx2,f16c"))) void f32_to_f16_f16c(const float* __restrict__ src,
                                                           c10::Half* __restrict__ dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; j < n; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}

// GCC 12's AVX-512 conversion intrinsics start from _mm512_undefined_*(), which -Wmaybe-uninitialized
// reports as a false positive (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) void f32_to_bf16_avx512(const float* __restrict__ src,
                                                            uint16_t* __restrict__ dst, int64_t n) {
  int64_t j = 0;
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF), qnan = _mm512_set1_epi32(0x7FC0);
  for (; j + 16 <= n; j += 16) {
    const __m512 f = _mm512_loadu_ps(src + j);
    const __m512i u = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, bias)), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), qnan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), _mm512_cvtepi32_epi16(r));  // vpmovdw
  }
  for (; j < n; ++j) dst[j] = f32_to_bf16_bits(src[j]);
}

// vcvtneps2bf16 rounds to nearest even as c10 does, but flushes subnormal inputs to zero and keeps a NaN's
// sign and payload: a vector holding either (vfpclassps: QNaN 0x01, subnormal 0x20, SNaN 0x80; rare) takes
// the scalar rounding, so the bits stay those of every other path.
__attribute__((target("avx512f,avx512dq,avx512bf16"))) void f32_to_bf16_avx512bf16(const float* __restrict__ src,
                                                                                  uint16_t* __restrict__ dst,
                                                                                  int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 f = _mm512_loadu_ps(src + j);
    if (__builtin_expect(_mm512_fpclass_ps_mask(f, 0xA1) != 0, 0)) {
      for (int64_t i = j; i < j + 16; ++i) dst[i] = f32_to_bf16_bits(src[i]);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(f)));
    }
  }
  for (; j < n; ++j) dst[j] = f32_to_bf16_bits(src[j]);
}

__attribute__((target("avx512f"))) void f16_to_f32_avx512(const c10::Half* __restrict__ src,
                                                           float* __restrict__ dst, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j))));
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

__attribute__((target("avx512f"))) void f32_to_f16_avx512(const float* __restrict__ src,
                                                           c10::Half* __restrict__ dst, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; j < n; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}
#pragma GCC diagnostic pop
#endif

// The conversion passes of one (dtype, path): fp16 loads and stores, and bf16 stores of an x_prev that
// was accumulated in float32; float32 needs none (its data is used in place).
template <typename T, int PATH>
struct Convert;

template <int PATH>
struct Convert<c10::BFloat16, PATH> {
  static void store(const float* s, c10::BFloat16* d, int64_t n) {
    uint16_t* dst = reinterpret_cast<uint16_t*>(d);
#ifdef FASTGEN_STEP_X86
    if constexpr (PATH == PATH_AVX512BF16) return f32_to_bf16_avx512bf16(s, dst, n);
    if constexpr (PATH == PATH_AVX512) return f32_to_bf16_avx512(s, dst, n);
    if constexpr (PATH == PATH_AVX2) return f32_to_bf16_avx2(s, dst, n);
#endif
    f32_to_bf16_base(s, dst, n);
  }
};

template <int PATH>
struct Convert<c10::Half, PATH> {
  static void load(const c10::Half* s, float* d, int64_t n) {
#ifdef FASTGEN_STEP_X86
    if constexpr (PATH >= PATH_AVX512) return f16_to_f32_avx512(s, d, n);
    if constexpr (PATH == PATH_AVX2) {
      if (cpu::has_f16c()) return f16_to_f32_f16c(s, d, n);
    }
#endif
    f16_to_f32_base(s, d, n);
  }
  static void store(const float* s, c10::Half* d, int64_t n) {
#ifdef FASTGEN_STEP_X86
    if constexpr (PATH >= PATH_AVX512) return f32_to_f16_avx512(s, d, n);
    if constexpr (PATH == PATH_AVX2) {
      if (cpu::has_f16c()) return f32_to_f16_f16c(s, d, n);
    }
#endif
    f32_to_f16_base(s, d, n);
  }
};

// ---- element access ---------------------------------------------------------------------------------------
//
// The stages read float32 or bfloat16 directly (bf16 -> f32 is a 16-bit shift, vectorized inside the stage
// loops, so reading bf16 costs no extra pass); fp16 is converted to float32 buffers first (F16C /
// AVX-512F, see Convert). The stages write float32; 16-bit outputs are converted by one pass per output
// (Convert::store: explicit intrinsics, fewer instructions than the rounding fused into a stage loop).

FASTGEN_ALWAYS_INLINE float ld(const float* p, int64_t j) { return p[j]; }
FASTGEN_ALWAYS_INLINE float ld(const c10::BFloat16* p, int64_t j) { return bf16_bits_to_f32(p[j].x); }

// What the stages read and write for element type T: fp16 goes through float32 buffers.
template <typename T>
using Elem = std::conditional_t<std::is_same_v<T, c10::Half>, float, T>;

// ---- stages (always inlined into the path's chunk function) ----------------------------------------------

// m = guided, rescaled model output.
template <bool UNCOND, bool RESCALE, typename I>
FASTGEN_ALWAYS_INLINE void stage_guide(const I* __restrict__ c, const I* __restrict__ u, float g, float rs,
                                       float* __restrict__ m, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float v = ld(c, j);
    if constexpr (UNCOND) v = guide(v, ld(u, j), g);
    if constexpr (RESCALE) v *= rs;
    m[j] = v;
  }
}

// x0 and the deterministic part of x_prev; img / keep (the known region) are read only when KNOWN.
template <int CLIP, bool KNOWN, typename I>
FASTGEN_ALWAYS_INLINE void stage_predict(const StepCoeffs& k, const I* __restrict__ xv, const float* __restrict__ m,
                                         const I* __restrict__ img, const I* __restrict__ keep, float clip, float s,
                                         float* __restrict__ x0, float* __restrict__ xp, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float a, e;
    const float xj = ld(xv, j);
    predict<CLIP, KNOWN>(k, xj, m[j], KNOWN ? ld(img, j) : 0.0f, KNOWN ? ld(keep, j) : 0.0f, clip, s, a, e);
    x0[j] = a;
    xp[j] = update(k, xj, a, e);
  }
}

// |x0| only (the pre-pass of dynamic thresholding).
template <int CLIP, bool KNOWN, typename I>
FASTGEN_ALWAYS_INLINE void stage_abs_x0(const StepCoeffs& k, const I* __restrict__ xv, const float* __restrict__ m,
                                        const I* __restrict__ img, const I* __restrict__ keep, float clip, float s,
                                        float* __restrict__ out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float a, e;
    predict<CLIP, KNOWN>(k, ld(xv, j), m[j], KNOWN ? ld(img, j) : 0.0f, KNOWN ? ld(keep, j) : 0.0f, clip, s, a, e);
    out[j] = std::fabs(a);
  }
}

// The run-time clip mode of a call resolved to one instantiation (uniform per call, so the branches are
// predicted; each arm is a straight vectorized loop).
template <bool KNOWN, typename I>
FASTGEN_ALWAYS_INLINE void predict_any(int clip_mode, const StepCoeffs& k, const I* xv, const float* m, const I* img,
                                       const I* keep, float clip, float s, float* x0, float* xp, int64_t n) {
  if (clip_mode == CLIP_STATIC) return stage_predict<CLIP_STATIC, KNOWN>(k, xv, m, img, keep, clip, s, x0, xp, n);
  if (clip_mode == CLIP_DYNAMIC) return stage_predict<CLIP_DYNAMIC, KNOWN>(k, xv, m, img, keep, clip, s, x0, xp, n);
  stage_predict<CLIP_NONE, KNOWN>(k, xv, m, img, keep, clip, s, x0, xp, n);
}

template <bool KNOWN, typename I>
FASTGEN_ALWAYS_INLINE void abs_x0_any(int clip_mode, const StepCoeffs& k, const I* xv, const float* m, const I* img,
                                      const I* keep, float clip, float s, float* out, int64_t n) {
  if (clip_mode == CLIP_STATIC) return stage_abs_x0<CLIP_STATIC, KNOWN>(k, xv, m, img, keep, clip, s, out, n);
  if (clip_mode == CLIP_DYNAMIC) return stage_abs_x0<CLIP_DYNAMIC, KNOWN>(k, xv, m, img, keep, clip, s, out, n);
  stage_abs_x0<CLIP_NONE, KNOWN>(k, xv, m, img, keep, clip, s, out, n);
}

// x0 and the whole x_prev of a learned-range step with noise and neither prev_x0 nor a guidance gradient
// (GLIDE's DDPM and inpainting steps) in one loop: the same operations in the same order as stage_predict
// followed by stage_add_noise<VAR_LEARNED_RANGE> (the same bits), but x_prev is stored once instead of
// being written, read back and written again. With inpainting a tile touches nine streams at the same
// page offset (rows of page-aligned tensors), so fewer passes over them save L1 misses.
template <int CLIP, bool KNOWN, bool FMA, typename I, typename Z>
FASTGEN_ALWAYS_INLINE void stage_predict_noise(const StepCoeffs& k, const I* __restrict__ xv,
                                               const float* __restrict__ m, const I* __restrict__ img,
                                               const I* __restrict__ keep, const I* __restrict__ v,
                                               const Z* __restrict__ z, float clip, float s, float* __restrict__ x0,
                                               float* __restrict__ xp, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float a, e;
    const float xj = ld(xv, j);
    predict<CLIP, KNOWN>(k, xj, m[j], KNOWN ? ld(img, j) : 0.0f, KNOWN ? ld(keep, j) : 0.0f, clip, s, a, e);
    x0[j] = a;
    const float u = update(k, xj, a, e);
    xp[j] = u + k[NOISE_MASK] * learned_sd<FMA>(k, ld(v, j)) * ld(z, j);
  }
}

template <bool KNOWN, bool FMA, typename I, typename Z>
FASTGEN_ALWAYS_INLINE void predict_noise_any(int clip_mode, const StepCoeffs& k, const I* xv, const float* m,
                                             const I* img, const I* keep, const I* v, const Z* z, float clip,
                                             float s, float* x0, float* xp, int64_t n) {
  if (clip_mode == CLIP_STATIC) {
    return stage_predict_noise<CLIP_STATIC, KNOWN, FMA>(k, xv, m, img, keep, v, z, clip, s, x0, xp, n);
  }
  if (clip_mode == CLIP_DYNAMIC) {
    return stage_predict_noise<CLIP_DYNAMIC, KNOWN, FMA>(k, xv, m, img, keep, v, z, clip, s, x0, xp, n);
  }
  stage_predict_noise<CLIP_NONE, KNOWN, FMA>(k, xv, m, img, keep, v, z, clip, s, x0, xp, n);
}

// The learned-range sd of a tile, when both the guidance shift and the noise need it (one exp per element;
// learned_var is its square).
constexpr int VAR_SD_GIVEN = 2;  // a stage's v holds learned_sd already (float32)

template <bool FMA, typename I>
FASTGEN_ALWAYS_INLINE void stage_learned_sd(const StepCoeffs& k, const I* __restrict__ v, float* __restrict__ sd,
                                            int64_t n) {
  for (int64_t j = 0; j < n; ++j) sd[j] = learned_sd<FMA>(k, ld(v, j));
}

// Guidance shift of the mean (GLIDE's condition_mean): xp += variance * scale * grad, also at t = 0.
template <int VAR, bool FMA, typename I, typename V>
FASTGEN_ALWAYS_INLINE void stage_grad(const StepCoeffs& k, const I* __restrict__ grad, const V* __restrict__ v,
                                      float scale, float* __restrict__ xp, int64_t n) {
  if constexpr (VAR == VAR_SIGMA) {
    const float c = k[SIGMA] * k[SIGMA] * scale;
    for (int64_t j = 0; j < n; ++j) xp[j] += c * ld(grad, j);
  } else if constexpr (VAR == VAR_SD_GIVEN) {
    for (int64_t j = 0; j < n; ++j) xp[j] += v[j] * v[j] * scale * ld(grad, j);  // = learned_var
  } else {
    for (int64_t j = 0; j < n; ++j) xp[j] += learned_var<FMA>(k, ld(v, j)) * scale * ld(grad, j);
  }
}

template <typename I>
FASTGEN_ALWAYS_INLINE void stage_prev(float cprev, const I* __restrict__ prev, float* __restrict__ xp, int64_t n) {
  for (int64_t j = 0; j < n; ++j) xp[j] += cprev * ld(prev, j);
}

// Normals of elements [i0, i0 + n) of one sample, i0 even: the uniforms of all pairs first, then one
// Box-Muller transform per pair for both of its elements (both loops vectorize).
FASTGEN_ALWAYS_INLINE void stage_rng(RngKey key, int64_t i0, float* __restrict__ u1, float* __restrict__ u2,
                                     float* __restrict__ z, int64_t n) {
  const int64_t pairs = (n + 1) / 2;
  const uint32_t p0 = static_cast<uint32_t>(i0 >> 1);
  for (int64_t q = 0; q < pairs; ++q) pair_uniforms(key, p0 + static_cast<uint32_t>(q), u1[q], u2[q]);
  for (int64_t q = 0; q < pairs; ++q) box_muller(u1[q], u2[q], z[2 * q], z[2 * q + 1]);
}

template <int VAR, bool FMA, typename Z, typename I>
FASTGEN_ALWAYS_INLINE void stage_add_noise(const StepCoeffs& k, const Z* __restrict__ z, const I* __restrict__ v,
                                           float* __restrict__ xp, int64_t n) {
  if constexpr (VAR == VAR_SIGMA) {
    const float c = k[NOISE_MASK] * k[SIGMA];
    for (int64_t j = 0; j < n; ++j) xp[j] += c * ld(z, j);
  } else if constexpr (VAR == VAR_SD_GIVEN) {
    for (int64_t j = 0; j < n; ++j) xp[j] += k[NOISE_MASK] * v[j] * ld(z, j);
  } else {
    for (int64_t j = 0; j < n; ++j) xp[j] += k[NOISE_MASK] * learned_sd<FMA>(k, ld(v, j)) * ld(z, j);
  }
}

template <int VAR, bool FMA, typename I, typename V>
FASTGEN_ALWAYS_INLINE void add_noise_any(const StepCoeffs& k, const float* z, const I* zt, const V* v, float* xp,
                                         int64_t n) {
  if (zt != nullptr) return stage_add_noise<VAR, FMA>(k, zt, v, xp, n);
  stage_add_noise<VAR, FMA>(k, z, v, xp, n);
}

// ---- the tile loop -----------------------------------------------------------------------------------------

// Everything a chunk needs, resolved once per call.
template <typename T>
struct Ctx {
  StepParams<T> p;
  StepCoeffs k;
  uint32_t rng_step;
  int64_t tile;  // kTile or kTileSmall, even
  int64_t tiles_per_row;
};

template <typename T, int PATH>
FASTGEN_ALWAYS_INLINE void chunk_body(const Ctx<T>& c, int64_t begin, int64_t end) {
  using I = Elem<T>;  // what the stages read: T, or float32 buffers for fp16
  constexpr bool kBuffered = !std::is_same_v<I, T>;
  const StepParams<T>& p = c.p;
  const StepCoeffs k = c.k;
  const int64_t N = p.N;
  const bool known = p.known != nullptr;
  const bool learned = p.var_mode == VAR_LEARNED_RANGE;
  constexpr bool kF32 = std::is_same_v<T, float>;
  constexpr bool kFma = PATH != PATH_BASE;  // the learned-range exp's form (see exp_approx)
  const int64_t tile = c.tile;
  alignas(64) float m[kTile], z[kTile], xpbuf[kTile], x0buf[kTile], u1[kTile / 2], u2[kTile / 2];
  // fp16 staging buffers (unused for float32 / bf16)
  constexpr int64_t kH = kBuffered ? kTile : 1;
  alignas(64) float hc[kH], hx[kH], hu[kH], hi[kH], hk[kH], hv[kH], hp[kH];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / c.tiles_per_row;
    const int64_t i0 = (t - b * c.tiles_per_row) * tile;
    const int64_t n = std::min(tile, N - i0);
    const int64_t row = b * N + i0;
    const float rs = p.rscale ? p.rscale[b] : 1.0f;
    const float s = p.thresh ? p.thresh[b] : 1.0f;
    // a row of an input as the stages read it
    auto in = [&](const T* src, float* buf) -> const I* {
      if constexpr (kBuffered) {
        Convert<T, PATH>::load(src, buf, n);
        return buf;
      } else {
        return src;
      }
    };

    const T* crow = p.cond + b * p.Lc + i0;
    const I* cf = in(crow, hc);
    const I* uf = p.uncond ? in(p.uncond + (b + p.uoff) * p.Lu + i0, hu) : nullptr;
    const float* mm = m;  // the guided model output
    if (p.uncond) {
      if (p.rscale) {
        stage_guide<true, true>(cf, uf, p.g, rs, m, n);
      } else {
        stage_guide<true, false>(cf, uf, p.g, rs, m, n);
      }
    } else if (p.rscale) {
      stage_guide<false, true>(cf, uf, p.g, rs, m, n);
    } else if constexpr (std::is_same_v<I, float>) {
      mm = cf;  // the conditional row itself (float32) or its float32 staging (fp16)
    } else {
      stage_guide<false, false>(cf, uf, p.g, rs, m, n);  // bf16 -> float32
    }

    const I* xv = in(p.x + row, hx);
    const I* img = known ? in(p.known + row, hi) : nullptr;
    const I* keep = known ? in(p.keep + row, hk) : nullptr;
    if (p.absx0) {
      if (known) {
        abs_x0_any<true>(p.clip_mode, k, xv, mm, img, keep, p.clip, s, p.absx0 + row, n);
      } else {
        abs_x0_any<false>(p.clip_mode, k, xv, mm, img, keep, p.clip, s, p.absx0 + row, n);
      }
      continue;
    }
    // the step's noise: the given tensor's row (nullptr: the counter-based draw, staged in z)
    auto noise_row = [&]() -> const I* {
      if (p.noise_mode == NOISE_TENSOR) return in(p.noise + row, z);
      const RngKey key = rng_key(p.seed_lo, p.seed_hi, p.sample_offset + static_cast<uint32_t>(b), c.rng_step);
      stage_rng(key, i0, u1, u2, z, n);
      return nullptr;
    };
    // float32 outputs are computed in place in the output rows (they stay in L1 until the tile ends);
    // 16-bit ones in xpbuf / x0buf, converted at the end
    float* xp = xpbuf;
    float* x0 = x0buf;
    if constexpr (kF32) {
      xp = p.out + row;
      if (p.x0) x0 = p.x0 + row;
    }
    if (learned && p.noise_mode != NOISE_NONE && !p.grad && !p.prev) {
      const I* vf = in(crow + N, hv);
      const I* zt = noise_row();
      if (known && zt) {
        predict_noise_any<true, kFma>(p.clip_mode, k, xv, mm, img, keep, vf, zt, p.clip, s, x0, xp, n);
      } else if (known) {
        predict_noise_any<true, kFma>(p.clip_mode, k, xv, mm, img, keep, vf, static_cast<const float*>(z), p.clip,
                                      s, x0, xp, n);
      } else if (zt) {
        predict_noise_any<false, kFma>(p.clip_mode, k, xv, mm, img, keep, vf, zt, p.clip, s, x0, xp, n);
      } else {
        predict_noise_any<false, kFma>(p.clip_mode, k, xv, mm, img, keep, vf, static_cast<const float*>(z), p.clip,
                                       s, x0, xp, n);
      }
      if constexpr (!kF32) {
        Convert<T, PATH>::store(xp, p.out + row, n);
        if (p.x0) Convert<T, PATH>::store(x0, p.x0 + row, n);
      }
      continue;
    }
    if (known) {
      predict_any<true>(p.clip_mode, k, xv, mm, img, keep, p.clip, s, x0, xp, n);
    } else {
      predict_any<false>(p.clip_mode, k, xv, mm, img, keep, p.clip, s, x0, xp, n);
    }
    if (p.prev) stage_prev(k[CPREV], in(p.prev + row, hp), xp, n);
    // the learned-variance channels of the conditional output (its second half)
    const I* vf = learned && (p.grad || p.noise_mode != NOISE_NONE) ? in(crow + N, hv) : nullptr;
    // both need the learned sd: once, into m (the guided output is consumed by now)
    const bool sd_given = learned && p.grad && p.noise_mode != NOISE_NONE;
    if (sd_given) stage_learned_sd<kFma>(k, vf, m, n);
    if (p.grad) {
      const I* gf = in(p.grad + row, hp);
      if (sd_given) {
        stage_grad<VAR_SD_GIVEN, kFma>(k, gf, m, p.grad_scale, xp, n);
      } else if (learned) {
        stage_grad<VAR_LEARNED_RANGE, kFma>(k, gf, vf, p.grad_scale, xp, n);
      } else {
        stage_grad<VAR_SIGMA, kFma>(k, gf, vf, p.grad_scale, xp, n);
      }
    }
    if (p.noise_mode != NOISE_NONE) {
      const I* zt = noise_row();
      if (sd_given) {
        add_noise_any<VAR_SD_GIVEN, kFma>(k, z, zt, static_cast<const float*>(m), xp, n);
      } else if (learned) {
        add_noise_any<VAR_LEARNED_RANGE, kFma>(k, z, zt, vf, xp, n);
      } else {
        add_noise_any<VAR_SIGMA, kFma>(k, z, zt, vf, xp, n);
      }
    }
    if constexpr (!kF32) {
      Convert<T, PATH>::store(xp, p.out + row, n);
      if (p.x0) Convert<T, PATH>::store(x0, p.x0 + row, n);
    }
  }
}

// The three instantiations of the chunk body: the portable baseline (no target: SSE2 on x86-64) and
// the AVX2+FMA and AVX-512F targets, chosen at run time.
template <typename T>
void chunk_base(const Ctx<T>& c, int64_t begin, int64_t end) {
  chunk_body<T, PATH_BASE>(c, begin, end);
}
#ifdef FASTGEN_STEP_X86
template <typename T>
__attribute__((target("avx2,fma"))) void chunk_avx2(const Ctx<T>& c, int64_t begin, int64_t end) {
  chunk_body<T, PATH_AVX2>(c, begin, end);
}
template <typename T>
__attribute__((target("avx512f"))) void chunk_avx512(const Ctx<T>& c, int64_t begin, int64_t end) {
  chunk_body<T, PATH_AVX512>(c, begin, end);
}
// With BW, GCC vectorizes the bf16 loads (vpmovzxwd + vpslld) in 512-bit registers instead of 256-bit ones.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"))) void chunk_avx512bf16(const Ctx<T>& c,
                                                                                            int64_t begin,
                                                                                            int64_t end) {
  chunk_body<T, PATH_AVX512BF16>(c, begin, end);
}
#endif

template <typename T>
void run(const StepArgs& a, cpu::Isa isa) {
  Ctx<T> c;
  c.p = make_params<T>(a);
  if (c.p.B == 0 || c.p.N == 0) return;
  c.k = load_coeffs(c.p.coef);
  c.rng_step = rng_step_of(c.k[RNG_STEP]);
  // the streams of a tile (x, cond, x_prev and the optional ones)
  const int streams = 3 + (c.p.uncond != nullptr) + (c.p.x0 != nullptr) + (c.p.prev != nullptr) +
                      (c.p.noise != nullptr) + 2 * (c.p.known != nullptr) + (c.p.grad != nullptr) +
                      (c.p.var_mode == VAR_LEARNED_RANGE && (c.p.noise_mode != NOISE_NONE || c.p.grad));
  c.tile = streams >= (std::is_same_v<T, float> ? 7 : 8) ? kTileSmall : kTile;
  c.tiles_per_row = (c.p.N + c.tile - 1) / c.tile;
  void (*chunk)(const Ctx<T>&, int64_t, int64_t) = chunk_base<T>;
#ifdef FASTGEN_STEP_X86
  if (isa == cpu::Isa::kAvx512) {
    chunk = cpu::has_avx512_bf16_set() ? chunk_avx512bf16<T> : chunk_avx512<T>;
  } else if (isa == cpu::Isa::kAvx2) {
    chunk = chunk_avx2<T>;
  }
#endif
  at::parallel_for(0, c.p.B * c.tiles_per_row, kGrainElems / c.tile, [&](int64_t begin, int64_t end) { chunk(c, begin, end); });
}

}  // namespace

void sampler_step_cpu_impl(const StepArgs& a) {
  // Read before any work: a bad FASTGEN_CPU_ISA is an error, raised before the kernel runs.
  const cpu::Isa isa = cpu::selected_isa();
  FASTGEN_DISPATCH_STEP_TYPES(a.x.scalar_type(), "fastgen::sampler_step_cpu", [&] { run<scalar_t>(a, isa); });
}

}  // namespace diffusion
}  // namespace fastgen
