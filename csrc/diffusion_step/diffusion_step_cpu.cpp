// Fused diffusion sampler step, C++ CPU kernel (at::parallel_for over tiles of a row).
//
// Each tile of kTile elements of one sample goes through a short pipeline of stages (guidance,
// prediction + known-region replacement + clipping + update, prev_x0 term, guidance-gradient shift,
// noise, stores), each a tight loop over float32 buffers that stay in L1. Every stage is templated on the features it handles, so its loop has no branches and
// GCC / clang vectorize it (all but the learned-range expf; the RNG included, see log_positive and
// sincos_turn in the header); the features are resolved once per tile, not per element. Staging keeps
// the template instantiations additive in the features (about 30 loops per dtype) instead of
// multiplicative (~500 fused loops per dtype): a lean build at no cost in speed, as the step is
// memory-bound and the buffers never leave L1.
#include "diffusion_step/diffusion_step.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace fastgen {
namespace diffusion {
namespace {

// Elements per tile: even, so RNG pairs never straddle tiles; the stage buffers take ~12 KiB of stack.
constexpr int64_t kTile = 512;
// Tiles per parallel chunk at least (32K elements): smaller calls run on the calling thread.
constexpr int64_t kGrainTiles = 64;

// ---- loads and stores (the only dtype-dependent stages) -----------------------------------------------

template <typename T>
void load_f32(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename T>
void store_f32(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

// float32 data is used in place; other types are converted into buf.
template <typename T>
const float* as_f32(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    load_f32(src, buf, n);
    return buf;
  }
}

// ---- stages ---------------------------------------------------------------------------------------------

// m = guided, rescaled model output.
template <typename T, bool UNCOND, bool RESCALE>
void stage_guide(const T* __restrict__ c, const T* __restrict__ u, float g, float rs, float* __restrict__ m,
                 int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float v = static_cast<float>(c[j]);
    if constexpr (UNCOND) v = guide(v, static_cast<float>(u[j]), g);
    if constexpr (RESCALE) v *= rs;
    m[j] = v;
  }
}

// x0 and the deterministic part of x_prev; img / keep (the known region) are read only when KNOWN.
template <int CLIP, bool KNOWN>
void stage_predict(const StepCoeffs k, const float* __restrict__ xv, const float* __restrict__ m,
                   const float* __restrict__ img, const float* __restrict__ keep, float clip, float s,
                   float* __restrict__ x0, float* __restrict__ xp, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float a, e;
    predict<CLIP, KNOWN>(k, xv[j], m[j], KNOWN ? img[j] : 0.0f, KNOWN ? keep[j] : 0.0f, clip, s, a, e);
    x0[j] = a;
    xp[j] = update(k, xv[j], a, e);
  }
}

// |x0| only (the pre-pass of dynamic thresholding).
template <int CLIP, bool KNOWN>
void stage_abs_x0(const StepCoeffs k, const float* __restrict__ xv, const float* __restrict__ m,
                  const float* __restrict__ img, const float* __restrict__ keep, float clip, float s,
                  float* __restrict__ out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    float a, e;
    predict<CLIP, KNOWN>(k, xv[j], m[j], KNOWN ? img[j] : 0.0f, KNOWN ? keep[j] : 0.0f, clip, s, a, e);
    out[j] = std::fabs(a);
  }
}

// Guidance shift of the mean (GLIDE's condition_mean): xp += variance * scale * grad, also at t = 0.
template <typename T, int VAR>
void stage_grad(const StepCoeffs k, const T* __restrict__ grad, const T* __restrict__ v, float scale,
                float* __restrict__ xp, int64_t n) {
  if constexpr (VAR == VAR_SIGMA) {
    const float c = k[SIGMA] * k[SIGMA] * scale;
    for (int64_t j = 0; j < n; ++j) xp[j] += c * static_cast<float>(grad[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      xp[j] += learned_var(k, static_cast<float>(v[j])) * scale * static_cast<float>(grad[j]);
    }
  }
}

template <typename T>
void stage_prev(float cprev, const T* __restrict__ prev, float* __restrict__ xp, int64_t n) {
  for (int64_t j = 0; j < n; ++j) xp[j] += cprev * static_cast<float>(prev[j]);
}

// Normals of elements [i0, i0 + n) of one sample, i0 even: the uniforms of all pairs first, then one
// Box-Muller transform per pair for both of its elements (both loops vectorize).
void stage_rng(RngKey key, int64_t i0, float* __restrict__ u1, float* __restrict__ u2, float* __restrict__ z,
               int64_t n) {
  const int64_t pairs = (n + 1) / 2;
  const uint32_t p0 = static_cast<uint32_t>(i0 >> 1);
  for (int64_t q = 0; q < pairs; ++q) pair_uniforms(key, p0 + static_cast<uint32_t>(q), u1[q], u2[q]);
  for (int64_t q = 0; q < pairs; ++q) box_muller(u1[q], u2[q], z[2 * q], z[2 * q + 1]);
}

template <typename T, int VAR>
void stage_add_noise(const StepCoeffs k, const float* __restrict__ z, const T* __restrict__ v,
                     float* __restrict__ xp, int64_t n) {
  if constexpr (VAR == VAR_SIGMA) {
    const float c = k[NOISE_MASK] * k[SIGMA];
    for (int64_t j = 0; j < n; ++j) xp[j] += c * z[j];
  } else {
    for (int64_t j = 0; j < n; ++j) xp[j] += k[NOISE_MASK] * learned_sd(k, static_cast<float>(v[j])) * z[j];
  }
}

// ---- per-call selection of the stage instantiations ------------------------------------------------------

template <typename T>
using GuideFn = void (*)(const T*, const T*, float, float, float*, int64_t);
using PredictFn = void (*)(StepCoeffs, const float*, const float*, const float*, const float*, float, float,
                           float*, float*, int64_t);
using AbsX0Fn = void (*)(StepCoeffs, const float*, const float*, const float*, const float*, float, float, float*,
                         int64_t);
template <typename T>
using GradFn = void (*)(StepCoeffs, const T*, const T*, float, float*, int64_t);
template <typename T>
using NoiseFn = void (*)(StepCoeffs, const float*, const T*, float*, int64_t);

template <typename T>
GuideFn<T> pick_guide(bool uncond, bool rescale) {
  if (uncond) return rescale ? stage_guide<T, true, true> : stage_guide<T, true, false>;
  return rescale ? stage_guide<T, false, true> : stage_guide<T, false, false>;
}

template <template <int> class Pick>
auto pick_clip(int clip_mode) {
  switch (clip_mode) {
    case CLIP_STATIC:
      return Pick<CLIP_STATIC>::fn;
    case CLIP_DYNAMIC:
      return Pick<CLIP_DYNAMIC>::fn;
    default:
      return Pick<CLIP_NONE>::fn;
  }
}
template <bool KNOWN>
struct Predict {
  template <int C>
  struct At {
    static constexpr PredictFn fn = stage_predict<C, KNOWN>;
  };
};
template <bool KNOWN>
struct AbsX0 {
  template <int C>
  struct At {
    static constexpr AbsX0Fn fn = stage_abs_x0<C, KNOWN>;
  };
};

template <typename T>
void run(const StepArgs& a) {
  const StepParams<T> p = make_params<T>(a);
  const int64_t N = p.N;
  if (p.B == 0 || N == 0) return;
  const StepCoeffs k = load_coeffs(p.coef);
  const uint32_t rng_step = rng_step_of(k[RNG_STEP]);
  const GuideFn<T> guide_fn = pick_guide<T>(p.uncond != nullptr, p.rscale != nullptr);
  const bool known = p.known != nullptr;
  const PredictFn predict_fn =
      known ? pick_clip<Predict<true>::At>(p.clip_mode) : pick_clip<Predict<false>::At>(p.clip_mode);
  const AbsX0Fn abs_fn = known ? pick_clip<AbsX0<true>::At>(p.clip_mode) : pick_clip<AbsX0<false>::At>(p.clip_mode);
  const NoiseFn<T> noise_fn =
      p.var_mode == VAR_LEARNED_RANGE ? stage_add_noise<T, VAR_LEARNED_RANGE> : stage_add_noise<T, VAR_SIGMA>;
  const GradFn<T> grad_fn =
      p.var_mode == VAR_LEARNED_RANGE ? stage_grad<T, VAR_LEARNED_RANGE> : stage_grad<T, VAR_SIGMA>;
  const int64_t tiles_per_row = (N + kTile - 1) / kTile;

  at::parallel_for(0, p.B * tiles_per_row, kGrainTiles, [&](int64_t begin, int64_t end) {
    alignas(64) float xbuf[kTile], m[kTile], x0buf[kTile], xpbuf[kTile], z[kTile], ibuf[kTile], kbuf[kTile];
    alignas(64) float u1[kTile / 2], u2[kTile / 2];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tiles_per_row;
      const int64_t i0 = (t - b * tiles_per_row) * kTile;
      const int64_t n = std::min(kTile, N - i0);
      const int64_t row = b * N + i0;
      const float rs = p.rscale ? p.rscale[b] : 1.0f;
      const float s = p.thresh ? p.thresh[b] : 1.0f;

      guide_fn(p.cond + b * p.Lc + i0, p.uncond ? p.uncond + (b + p.uoff) * p.Lu + i0 : nullptr, p.g, rs, m, n);
      const float* xv = as_f32(p.x + row, xbuf, n);
      const float* img = known ? as_f32(p.known + row, ibuf, n) : nullptr;
      const float* keep = known ? as_f32(p.keep + row, kbuf, n) : nullptr;
      if (p.absx0) {
        abs_fn(k, xv, m, img, keep, p.clip, s, p.absx0 + row, n);
        continue;
      }
      // float32 outputs are computed in place in the output rows (they stay in L1 until the tile ends).
      float* xp = xpbuf;
      float* x0 = x0buf;
      if constexpr (std::is_same_v<T, float>) {
        xp = p.out + row;
        if (p.x0) x0 = p.x0 + row;
      }
      predict_fn(k, xv, m, img, keep, p.clip, s, x0, xp, n);
      if (p.prev) stage_prev<T>(k[CPREV], p.prev + row, xp, n);
      if (p.grad) grad_fn(k, p.grad + row, p.cond + b * p.Lc + N + i0, p.grad_scale, xp, n);
      if (p.noise_mode != NOISE_NONE) {
        const float* zz = z;
        if (p.noise_mode == NOISE_TENSOR) {
          zz = as_f32(p.noise + row, z, n);
        } else {
          const RngKey key = rng_key(p.seed_lo, p.seed_hi, p.sample_offset + static_cast<uint32_t>(b), rng_step);
          stage_rng(key, i0, u1, u2, z, n);
        }
        noise_fn(k, zz, p.cond + b * p.Lc + N + i0, xp, n);
      }
      if constexpr (!std::is_same_v<T, float>) {
        store_f32(xp, p.out + row, n);
        if (p.x0) store_f32(x0, p.x0 + row, n);
      }
    }
  });
}

}  // namespace

void sampler_step_cpu_impl(const StepArgs& a) {
  FASTGEN_DISPATCH_STEP_TYPES(a.x.scalar_type(), "fastgen::sampler_step_cpu", [&] { run<scalar_t>(a); });
}

}  // namespace diffusion
}  // namespace fastgen
