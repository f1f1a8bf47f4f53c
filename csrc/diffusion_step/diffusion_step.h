// Fused diffusion sampler step: the argument bundle, the coefficient layout, the per-element math and
// the counter-based normal generator. The C++ CPU kernel and the CUDA kernel both use the functions
// below, so the math and the RNG have exactly one definition in C++ (which must stay bit-compatible
// in its hashing with the Triton kernel and the torch reference in fastgen/ops/diffusion_step.py).
//
// This header is included by the CUDA translation unit, so it must not include torch/extension.h.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>

#if defined(__CUDACC__)
#define FASTGEN_HD __host__ __device__ __forceinline__
#else
#define FASTGEN_HD inline
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
};
constexpr int64_t kNumCoeffs = 16;

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

// Box-Muller on one pair of uniforms: element 2p takes the cosine, element 2p+1 the sine.
// logf / sinf / cosf must be the accurate functions (no --use_fast_math in the CUDA build).
FASTGEN_HD void box_muller(float u1, float u2, float& z_even, float& z_odd) {
  const float r = sqrtf(-2.0f * logf(u1));
  const float theta = 6.2831853071795864f * u2;
  z_even = r * cosf(theta);
  z_odd = r * sinf(theta);
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

// The coefficients of one step by value: kernels keep them in registers (a pointer would have to be
// re-read after every store through a float* that might alias it).
struct StepCoeffs {
  float ax, am, ex, em, ex2, ex0, cx, cx0, ceps, cprev, sigma, minlog, maxlog, noise_mask;
  uint32_t rng_step;
};

FASTGEN_HD StepCoeffs load_coeffs(const float* k) {
  StepCoeffs c;
  c.ax = k[AX];
  c.am = k[AM];
  c.ex = k[EX];
  c.em = k[EM];
  c.ex2 = k[EX2];
  c.ex0 = k[EX0];
  c.cx = k[CX];
  c.cx0 = k[CX0];
  c.ceps = k[CEPS];
  c.cprev = k[CPREV];
  c.sigma = k[SIGMA];
  c.minlog = k[MINLOG];
  c.maxlog = k[MAXLOG];
  c.noise_mask = k[NOISE_MASK];
  c.rng_step = rng_step_of(k[RNG_STEP]);
  return c;
}

// Classifier-free guidance.
FASTGEN_HD float guide(float c, float u, float g) { return u + g * (c - u); }

// min(max(v, lo), hi) written as selects, which compile to maxps/minps on x86 and vectorize without
// -ffast-math (fminf / fmaxf are library calls there). A NaN v gives lo, as fmaxf(NaN, lo) would.
FASTGEN_HD float clampf(float v, float lo, float hi) {
  v = v > lo ? v : lo;
  return v < hi ? v : hi;
}

// x0 and eps of one element from the sample xv and the (guided, rescaled) model output m, clipped or
// thresholded as CLIP says (clip: static bound; s: this sample's dynamic threshold, > 0).
template <int CLIP>
FASTGEN_HD void predict(const StepCoeffs& k, float xv, float m, float clip, float s, float& x0, float& eps) {
  x0 = k.ax * xv + k.am * m;
  if (CLIP == CLIP_NONE) {
    eps = k.ex * xv + k.em * m;
  } else {
    x0 = (CLIP == CLIP_STATIC) ? clampf(x0, -clip, clip) : clampf(x0, -s, s) / s;
    eps = k.ex2 * xv + k.ex0 * x0;  // re-derived from the clipped x0
  }
}

// The deterministic part of x_prev (without CPREV * prev_x0 and without noise).
FASTGEN_HD float update(const StepCoeffs& k, float xv, float x0, float eps) {
  return k.cx * xv + k.cx0 * x0 + k.ceps * eps;
}

// Learned-range standard deviation (GLIDE / improved DDPM) from the variance output v in [-1, 1].
FASTGEN_HD float learned_sd(const StepCoeffs& k, float v) {
  const float f = (v + 1.0f) * 0.5f;
  return expf(0.5f * (f * k.maxlog + (1.0f - f) * k.minlog));
}

// ---- host side: validated arguments of one call ------------------------------------------------------

// Built and checked by the entry points in csrc/bindings.cpp; outputs are allocated there.
struct StepArgs {
  at::Tensor x;                     // (B, N) dtype T
  at::Tensor cond;                  // (Bc, Lc) dtype T
  std::optional<at::Tensor> uncond; // (Bu, Lu) dtype T
  int64_t uoff = 0;
  at::Tensor coeffs;                // float32 (16,)
  std::optional<at::Tensor> prev, noise, row_scale, thresh;
  float g = 1.0f, clip = 0.0f;
  int clip_mode = CLIP_NONE, noise_mode = NOISE_NONE, var_mode = VAR_SIGMA;
  uint32_t seed_lo = 0, seed_hi = 0, sample_offset = 0;
  bool want_x0 = false, x0_only = false;
  at::Tensor out;    // (B, N) dtype T; undefined when x0_only
  at::Tensor out_x0; // (B, N): dtype T pred_x0 when want_x0, float32 |x0| when x0_only; else undefined
};

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
