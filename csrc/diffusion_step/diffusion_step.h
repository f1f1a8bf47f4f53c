// Fused diffusion sampler step: the argument bundle, the coefficient layout, the per-element math and
// the counter-based normal generator. The C++ CPU kernel and the CUDA kernel both use the functions
// below, so the math and the RNG have exactly one definition in C++. The hashing (fmix32 keys and
// counters, the 24-bit uniforms) is bit-exact with the Triton kernel and the torch reference in
// fastgen/ops/diffusion_step.py; Box-Muller's ln / sin / cos and the learned-range exp are computed here
// by branch-free float32 approximations (within ~2 ulp of libm's logf / sinf / cosf / expf, so the normals
// and variances agree with the other backends to ~1e-6) that vectorize on the CPU and are the same
// arithmetic on the GPU (the exp with FMA where the hardware has it: see exp_approx).
//
// This header is included by the CUDA translation unit, so it must not include torch/extension.h.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

#if defined(__CUDACC__)
#define FASTGEN_HD __host__ __device__ __forceinline__
#define FASTGEN_HD_INLINE __host__ __device__ __forceinline__
#else
#define FASTGEN_HD inline
// Always inlined on the host: the FMA forms must be compiled inside the caller's target("avx2,fma") /
// target("avx512f") function (an out-of-line copy has no target, and its fmaf is a libm call).
#define FASTGEN_HD_INLINE inline __attribute__((always_inline))
#endif

namespace fastgen {
namespace diffusion {

// Index of each per-step scalar in the float32 (16,) coefficient vector (same order as the Python
// constants AX ... RNG_STEP in fastgen/ops/diffusion_step.py).
enum Coef : int {
  AX = 0,
  AM = 1,
  EX = 2,
  EM = 3,
  EX2 = 4,
  EX0 = 5,
  CX = 6,
  CX0 = 7,
  CEPS = 8,
  CPREV = 9,
  SIGMA = 10,
  MINLOG = 11,
  MAXLOG = 12,
  NOISE_MASK = 13,
  RNG_STEP = 14,
  NUM_COEFFS = 16,
};

enum ClipMode : int { CLIP_NONE = 0, CLIP_STATIC = 1, CLIP_DYNAMIC = 2 };
enum NoiseMode : int { NOISE_NONE = 0, NOISE_TENSOR = 1, NOISE_COUNTER = 2 };
enum VarMode : int { VAR_SIGMA = 0, VAR_LEARNED_RANGE = 1 };

// ---- counter-based normal generator -----------------------------------------------------------------

// MurmurHash3's 32-bit finaliser (uint32 arithmetic wraps mod 2^32).
FASTGEN_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

struct RngKey {
  uint32_t k0, k1;
};

// The key of one (seed, global sample index, step): an element's normal depends on nothing else, so a
// sample does not change with the batch it is drawn in or with the backend.
FASTGEN_HD RngKey rng_key(uint32_t seed_lo, uint32_t seed_hi, uint32_t sample, uint32_t step) {
  uint32_t base = fmix32(seed_lo ^ 0x243F6A88u);
  base = fmix32(base ^ seed_hi);
  base = fmix32(base ^ sample);
  base = fmix32(base ^ step);
  return RngKey{fmix32(base ^ 0x13198A2Eu), fmix32(base ^ 0x03707344u)};
}

// RNG_STEP is a non-negative integer stored as float32. The guard keeps the float -> uint32 conversion
// defined for any stored value (negative or NaN -> 0).
FASTGEN_HD uint32_t rng_step_of(float v) {
  return v >= 1.0f ? (v < 4294967296.0f ? static_cast<uint32_t>(v) : 0xFFFFFFFFu) : 0u;
}

// The two uniforms of element pair p (elements 2p and 2p+1): u1 in (0, 1], u2 in [0, 1).
FASTGEN_HD void pair_uniforms(RngKey key, uint32_t p, float& u1, float& u2) {
  const uint32_t c0 = 2u * p;
  const uint32_t h0 = fmix32(fmix32(c0 + key.k0) ^ key.k1);
  const uint32_t h1 = fmix32(fmix32(c0 + 1u + key.k0) ^ key.k1);
  u1 = static_cast<float>((h0 >> 8) + 1u) * 5.9604644775390625e-08f;
  u2 = static_cast<float>(h1 >> 8) * 5.9604644775390625e-08f;
}

FASTGEN_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FASTGEN_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// ln(u) for a normal float u > 0 (here u1 in [2^-24, 1]), within 2 ulp: u = 2^e m with m in (1/sqrt2,
// sqrt2], ln m = 2 atanh(t) with t = (m - 1) / (m + 1), |t| <= 0.1716, by its series to t^9 (next term
// < 3e-9 relative). Branch-free and without table lookups, so the CPU loops over pairs vectorize (libm's
// logf is an opaque call) and the GPU runs the same arithmetic.
FASTGEN_HD float log_positive(float u) {
  const uint32_t bits = float_bits(u);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127);
  float m = bits_float((bits & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1.0f : e;
  const float t = (m - 1.0f) / (m + 1.0f);
  const float t2 = t * t;
  const float series =
      1.0f + t2 * (0.333333333f + t2 * (0.2f + t2 * (0.142857143f + t2 * 0.111111111f)));
  // ln 2 = LN2_HI + LN2_LO with LN2_HI on 16 bits: e * LN2_HI is exact for |e| < 256
  return e * 0.693145751953125f + (e * 1.428606765330187e-06f + 2.0f * t * series);
}

// sin and cos of theta in [0, 2 pi + pi/4): reduction by multiples of pi/2 in three parts (the first two
// on 12 bits, so q * part is exact for q <= 4), then the Taylor polynomials on [-pi/4, pi/4] (truncation
// < 2e-9). Agrees with libm's sinf / cosf to ~1 ulp; branch-free for the same reason as log_positive.
FASTGEN_HD void sincos_turn(float theta, float& s, float& c) {
  const int q = static_cast<int>(theta * 0.636619772f + 0.5f);  // theta >= 0: truncation rounds
  const float qf = static_cast<float>(q);
  float r = theta - qf * 1.57080078125f;
  r = r - qf * -4.453584551811218e-06f;
  r = r - qf * -8.705516307827565e-10f;
  const float r2 = r * r;
  const float sr =
      r + r * r2 * (-1.0f / 6 + r2 * (1.0f / 120 + r2 * (-1.0f / 5040 + r2 * (1.0f / 362880))));
  const float cr =
      1.0f + r2 * (-0.5f + r2 * (1.0f / 24 + r2 * (-1.0f / 720 + r2 * (1.0f / 40320 + r2 * (-1.0f / 3628800)))));
  // quadrant q mod 4: (sin, cos) = (sr, cr), (cr, -sr), (-sr, -cr), (-cr, sr)
  const bool swap = (q & 1) != 0;
  const float s0 = swap ? cr : sr;
  const float c0 = swap ? sr : cr;
  s = (q & 2) ? -s0 : s0;
  c = ((q + 1) & 2) ? -c0 : c0;
}

// a * b + c, fused (one rounding) when FMA, else two roundings. Only the learned-range exp uses the fused
// form (see exp_approx): the AVX2 / AVX-512 CPU paths and the GPU have an FMA instruction; the portable
// CPU baseline does not (fmaf would be a libm call there, ~20x slower), so it keeps the unfused form.
template <bool FMA>
FASTGEN_HD_INLINE float mul_add(float a, float b, float c) {
  if constexpr (FMA) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return __builtin_fmaf(a, b, c);
#endif
  } else {
    return a * b + c;
  }
}

// e^x for any float x within 1 ulp of the correctly rounded value, with or without FMA (measured on 9M
// points over [-110, 95] for both forms: normal and subnormal results, 0 below -104, inf above 89):
// x = n ln2 + r with n = round(x log2 e) (adding 1.5 * 2^23 rounds it and leaves it in the low mantissa
// bits; ln 2 in two parts, Cody-Waite), |r| <= ln2 / 2, e^r by a degree-6 polynomial (relative
// least-squares fit on Chebyshev nodes), times 2^n as two powers of two so that n in [-150, 129] needs no
// subnormal or infinite scale. Outside [-104, 89] the arithmetic gives garbage that the two selects at the
// end replace by 0 or inf (selecting last keeps them off the polynomial's dependency chain); a NaN fails
// both tests and makes r, so the result, NaN. Branch-free for the same reason as log_positive: the
// learned-range loops vectorize (libm's expf is an opaque call, ~4 ns a value on a CPU).
// FMA selects the fused form (9 operations fewer, a shorter dependency chain: ~30% less time a value on
// AVX-512 / AVX2). The two forms may differ by 1 ulp on the same x (both within 1 ulp of e^x), so the
// learned-range outputs of the SIMD CPU paths and of the GPU may differ from the baseline path's by that.
template <bool FMA>
FASTGEN_HD_INLINE float exp_approx(float x) {
  const float shifted = mul_add<FMA>(x, 1.44269504f, 12582912.0f);
  const float nf = shifted - 12582912.0f;
  float r = mul_add<FMA>(nf, -0.693359375f, x);  // 9 significant bits: exact for |n| <= 150
  r = mul_add<FMA>(nf, 2.12194440e-4f, r);
  const float q = mul_add<FMA>(r, mul_add<FMA>(r, mul_add<FMA>(r, 0.0013859291f, 0.0083747637f), 0.041667726f),
                               0.16666421f);
  const float p = mul_add<FMA>(r, mul_add<FMA>(r, mul_add<FMA>(r, q, 0.49999994f), 1.0f), 1.0f);
  const uint32_t nbits = float_bits(shifted) - 0x4B400000u;  // 0x4B400000: 1.5 * 2^23; wraps outside the range
  const int32_t n = static_cast<int32_t>(nbits);
  const int32_t n1 = n >> 1;  // floor(n / 2): both halves in [-75, 65] inside the range
  const float e = p * bits_float(static_cast<uint32_t>(n1 + 127) << 23) *
                  bits_float(static_cast<uint32_t>(n - n1 + 127) << 23);
  const float lo = x < -104.0f ? 0.0f : e;  // e^x < 2^-150: rounds to 0
  return x > 89.0f ? INFINITY : lo;         // e^x > FLT_MAX
}

// Box-Muller on one pair of uniforms: element 2p takes the cosine, element 2p+1 the sine.
FASTGEN_HD void box_muller(float u1, float u2, float& z_even, float& z_odd) {
  const float r = sqrtf(-2.0f * log_positive(u1));
  const float theta = 6.2831853071795864f * u2;
  float s, c;
  sincos_turn(theta, s, c);
  z_even = r * c;
  z_odd = r * s;
}

FASTGEN_HD void normal_pair(RngKey key, uint32_t p, float& z_even, float& z_odd) {
  float u1, u2;
  pair_uniforms(key, p, u1, u2);
  box_muller(u1, u2, z_even, z_odd);
}

// The normal of element i (i < 2^31).
FASTGEN_HD float normal_at(RngKey key, uint32_t i) {
  float ze, zo;
  normal_pair(key, i >> 1, ze, zo);
  return (i & 1u) ? zo : ze;
}

// ---- per-element math (all float32) -------------------------------------------------------------------
//
// Written once for any coefficient holder K indexable as k[AX] ... k[NOISE_MASK]: a `const float*`
// (e.g. shared memory in the CUDA kernel) or StepCoeffs (by value in registers, the CPU kernel).

// The coefficients of one step by value: the CPU loops keep them in registers (through a pointer they
// would be re-read after every store through a float* that might alias them).
struct StepCoeffs {
  float v[NUM_COEFFS];
  FASTGEN_HD float operator[](int i) const { return v[i]; }
};

FASTGEN_HD StepCoeffs load_coeffs(const float* k) {
  StepCoeffs c;
  for (int i = 0; i < NUM_COEFFS; ++i) c.v[i] = k[i];
  return c;
}

// Classifier-free guidance.
FASTGEN_HD float guide(float c, float u, float g) { return u + g * (c - u); }

// Clamp to [lo, hi] that keeps a NaN v (as torch.clamp does, so a NaN model output stays NaN instead of
// becoming a finite x0), written as selects: v < lo ? lo : v is maxps(lo, v) on x86, which returns its
// second operand when either is NaN, so the loops vectorize without -ffast-math (fminf / fmaxf are
// library calls there, and they would drop the NaN).
FASTGEN_HD float clampf(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// x0 and eps of one element from the sample xv and the (guided, rescaled) model output m, clipped or
// thresholded as CLIP says (clip: static bound; s: this sample's dynamic threshold, > 0, or NaN when the
// sample's x0 holds a NaN: then the whole sample is NaN, as in the reference).
// KNOWN (inpainting, GLIDE's denoised_fn): x0 takes the known image where keep = 1, BEFORE clipping.
template <int CLIP, bool KNOWN, class K>
FASTGEN_HD void predict(const K& k, float xv, float m, float img, float keep, float clip, float s, float& x0,
                        float& eps) {
  x0 = k[AX] * xv + k[AM] * m;
  if (KNOWN) x0 = x0 * (1.0f - keep) + img * keep;
  if (CLIP == CLIP_NONE && !KNOWN) {
    eps = k[EX] * xv + k[EM] * m;
  } else {
    if (CLIP != CLIP_NONE) x0 = (CLIP == CLIP_STATIC) ? clampf(x0, -clip, clip) : clampf(x0, -s, s) / s;
    eps = k[EX2] * xv + k[EX0] * x0;  // re-derived from the replaced / clipped x0
  }
}

// The deterministic part of x_prev (without CPREV * prev_x0 and without noise).
template <class K>
FASTGEN_HD float update(const K& k, float xv, float x0, float eps) {
  return k[CX] * xv + k[CX0] * x0 + k[CEPS] * eps;
}

// Everything of one element after the loads with the clip mode chosen at run time (uniform per launch):
// returns x_prev without the prev_x0 and noise terms, and the (clipped) x0.
struct ElemOut {
  float xp, x0;
};

template <bool KNOWN, class K>
FASTGEN_HD ElemOut step_element(const K& k, float xv, float m, float img, float keep, int clip_mode, float clip,
                                float s) {
  float x0, eps;
  if (clip_mode == CLIP_STATIC) {
    predict<CLIP_STATIC, KNOWN>(k, xv, m, img, keep, clip, s, x0, eps);
  } else if (clip_mode == CLIP_DYNAMIC) {
    predict<CLIP_DYNAMIC, KNOWN>(k, xv, m, img, keep, clip, s, x0, eps);
  } else {
    predict<CLIP_NONE, KNOWN>(k, xv, m, img, keep, clip, s, x0, eps);
  }
  return ElemOut{update(k, xv, x0, eps), x0};
}

// Learned-range standard deviation (GLIDE / improved DDPM) from the variance output v in [-1, 1]. The
// argument is formed without FMA on every path (the reference's float32 arithmetic, bit for bit); FMA
// picks exp_approx's form.
template <bool FMA, class K>
FASTGEN_HD_INLINE float learned_sd(const K& k, float v) {
  const float f = (v + 1.0f) * 0.5f;
  return exp_approx<FMA>(0.5f * (f * k[MAXLOG] + (1.0f - f) * k[MINLOG]));
}

// The step's variance (GLIDE's exp(model_log_variance)), for the guidance shift mean + var * scale * grad:
// the square of learned_sd (within 3 ulp of the exp of the log-variance), so that a step with both the
// guidance shift and noise computes one exp per element.
template <bool FMA, class K>
FASTGEN_HD_INLINE float learned_var(const K& k, float v) {
  const float sd = learned_sd<FMA>(k, v);
  return sd * sd;
}

// ---- host side -------------------------------------------------------------------------------------------

// Validated arguments of one call: built and checked by the entry points in csrc/bindings.cpp, which
// also allocate the outputs.
struct StepArgs {
  at::Tensor x, cond;  // (B, N), (Bc, Lc); dtype T
  std::optional<at::Tensor> uncond;  // (Bu, Lu) dtype T, row b + uoff
  int64_t uoff = 0;
  at::Tensor coeffs;  // float32 (16,)
  std::optional<at::Tensor> prev, noise, row_scale, thresh;
  std::optional<at::Tensor> known, keep;  // (B, N) dtype T: inpainting's known image and mask (1 = keep)
  std::optional<at::Tensor> grad;         // (B, N) dtype T: guidance gradient (mean += var * grad_scale * grad)
  double g = 1.0, clip = 0.0, grad_scale = 0.0;
  int64_t var_mode = VAR_SIGMA, noise_mode = NOISE_NONE;
  uint64_t seed = 0;
  uint32_t sample_offset = 0;
  at::Tensor out, x0;  // x_prev (B, N) dtype T, empty when x0_only; x0: pred_x0 (B, N) dtype T, or
                       // float32 |x0| when x0_only, or empty when not wanted
  bool x0_only = false;
};

// Raw pointers and sizes of one call, as the kernels take them; T is the element type.
template <typename T>
struct StepParams {
  const T* x;           // (B, N)
  const T* cond;        // (Bc, Lc), row b
  const T* uncond;      // (Bu, Lu), row b + uoff; nullptr without guidance
  const float* coef;    // (16,)
  const T* prev;        // (B, N) or nullptr
  const T* noise;       // (B, N) or nullptr
  const float* rscale;  // (B,) or nullptr
  const float* thresh;  // (B,) or nullptr
  const T* known;       // (B, N) or nullptr (then keep is nullptr too)
  const T* keep;        // (B, N) or nullptr
  const T* grad;        // (B, N) or nullptr
  T* out;               // (B, N) x_prev, nullptr when x0_only
  T* x0;                // (B, N) pred_x0, nullptr unless wanted
  float* absx0;         // (B, N) |x0|, only when x0_only
  int64_t B, N, Lc, Lu, uoff;
  float g, clip, grad_scale;
  int clip_mode, noise_mode, var_mode;
  uint32_t seed_lo, seed_hi, sample_offset;
};

template <typename T>
StepParams<T> make_params(const StepArgs& a) {
  auto opt = [](const std::optional<at::Tensor>& t) -> const T* {
    return t.has_value() ? t->template data_ptr<T>() : nullptr;
  };
  auto optf = [](const std::optional<at::Tensor>& t) -> const float* {
    return t.has_value() ? t->template data_ptr<float>() : nullptr;
  };
  StepParams<T> p;
  p.x = a.x.data_ptr<T>();
  p.cond = a.cond.data_ptr<T>();
  p.uncond = opt(a.uncond);
  p.coef = a.coeffs.data_ptr<float>();
  p.prev = opt(a.prev);
  p.noise = a.noise_mode == NOISE_TENSOR ? opt(a.noise) : nullptr;
  p.rscale = optf(a.row_scale);
  p.thresh = optf(a.thresh);
  p.known = opt(a.known);
  p.keep = opt(a.keep);
  p.grad = opt(a.grad);
  p.grad_scale = static_cast<float>(a.grad_scale);
  p.out = a.x0_only ? nullptr : a.out.data_ptr<T>();
  p.x0 = (!a.x0_only && a.x0.defined() && a.x0.numel() > 0) ? a.x0.data_ptr<T>() : nullptr;
  p.absx0 = a.x0_only ? a.x0.data_ptr<float>() : nullptr;
  p.B = a.x.size(0);
  p.N = a.x.size(1);
  p.Lc = a.cond.size(1);
  p.Lu = a.uncond.has_value() ? a.uncond->size(1) : 0;
  p.uoff = a.uoff;
  p.g = static_cast<float>(a.g);
  p.clip = static_cast<float>(a.clip);
  p.clip_mode = a.clip > 0 ? CLIP_STATIC : (a.thresh.has_value() ? CLIP_DYNAMIC : CLIP_NONE);
  p.noise_mode = static_cast<int>(a.noise_mode);
  p.var_mode = static_cast<int>(a.var_mode);
  p.seed_lo = static_cast<uint32_t>(a.seed & 0xFFFFFFFFull);
  p.seed_hi = static_cast<uint32_t>(a.seed >> 32);
  p.sample_offset = a.sample_offset;
  return p;
}

// The element types the kernels are built for (float64 is served by the torch backend). Both kernel
// files dispatch through this one list; `scalar_t` is the element type inside __VA_ARGS__.
#define FASTGEN_DISPATCH_STEP_TYPES(TYPE, NAME, ...)                            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)       \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)        \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

void sampler_step_cpu_impl(const StepArgs& a);
#ifdef FASTGEN_WITH_CUDA
void sampler_step_cuda_impl(const StepArgs& a);
#endif

}  // namespace diffusion
}  // namespace fastgen
