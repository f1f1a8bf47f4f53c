// Fused diffusion sampler step, C++ CPU. (row, column block) work items are split over threads with
// at::parallel_for; each block is processed in L1-sized chunks, one simple loop per stage, so that every
// stage vectorises and the feature flags are tested once per chunk, not per element.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "diffusion_step/diffusion_step.h"

namespace fastgen {
namespace diffusion {
namespace {

constexpr int64_t kChunk = 512;

template <typename T>
inline void load_chunk(const T* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// Row b, columns [c_begin, c_end) (c_begin even, so RNG pairs stay together).
template <typename T>
void run_segment(const StepParams<T>& p, const float* k, int64_t b, int64_t c_begin, int64_t c_end) {
  alignas(64) float fx[kChunk], fm[kChunk], fu[kChunk], x0[kChunk], eps[kChunk], xp[kChunk], z[kChunk + 1];
  const float rs = p.rscale ? p.rscale[b] : 1.0f;
  const float s = p.thresh ? p.thresh[b] : 1.0f;
  const uint32_t step = static_cast<uint32_t>(k[RNG_STEP]);
  const RngKey key = rng_key(p.seed_lo, p.seed_hi, p.sample_offset + static_cast<uint32_t>(b), step);
  const T* xrow = p.x + b * p.N;
  const T* crow = p.cond + b * p.Lc;
  const T* urow = p.uncond ? p.uncond + (b + p.uoff) * p.Lu : nullptr;

  for (int64_t i0 = c_begin; i0 < c_end; i0 += kChunk) {
    const int64_t n = std::min(kChunk, c_end - i0);
    load_chunk(xrow + i0, fx, n);
    load_chunk(crow + i0, fm, n);
    if (urow) {
      load_chunk(urow + i0, fu, n);
      const float g = p.g;
      for (int64_t j = 0; j < n; ++j) fm[j] = fu[j] + g * (fm[j] - fu[j]);
    }
    if (p.rscale) {
      for (int64_t j = 0; j < n; ++j) fm[j] *= rs;
    }
    for (int64_t j = 0; j < n; ++j) {
      x0[j] = k[AX] * fx[j] + k[AM] * fm[j];
      eps[j] = k[EX] * fx[j] + k[EM] * fm[j];
    }
    if (p.clip_mode == CLIP_STATIC) {
      const float c = p.clip;
      for (int64_t j = 0; j < n; ++j) {
        x0[j] = clampf(x0[j], -c, c);
        eps[j] = k[EX2] * fx[j] + k[EX0] * x0[j];
      }
    } else if (p.clip_mode == CLIP_DYNAMIC) {
      for (int64_t j = 0; j < n; ++j) {
        x0[j] = clampf(x0[j], -s, s) / s;
        eps[j] = k[EX2] * fx[j] + k[EX0] * x0[j];
      }
    }
    if (p.absx0) {
      float* dst = p.absx0 + b * p.N + i0;
      for (int64_t j = 0; j < n; ++j) dst[j] = std::fabs(x0[j]);
      continue;
    }
    for (int64_t j = 0; j < n; ++j) xp[j] = k[CX] * fx[j] + k[CX0] * x0[j] + k[CEPS] * eps[j];
    if (p.prev) {
      load_chunk(p.prev + b * p.N + i0, fu, n);
      for (int64_t j = 0; j < n; ++j) xp[j] += k[CPREV] * fu[j];
    }
    if (p.noise_mode != NOISE_NONE) {
      if (p.noise_mode == NOISE_TENSOR) {
        load_chunk(p.noise + b * p.N + i0, z, n);
      } else {
        for (int64_t j = 0; j < n; j += 2) {  // i0 is even: pairs (2q, 2q+1) share one transform
          normal_pair(key, static_cast<uint32_t>((i0 + j) >> 1), z[j], z[j + 1]);
        }
      }
      const float nm = k[NOISE_MASK];
      if (p.var_mode == 1) {
        load_chunk(crow + p.N + i0, fu, n);
        for (int64_t j = 0; j < n; ++j) xp[j] += nm * learned_sd(k, fu[j]) * z[j];
      } else {
        const float sd = nm * k[SIGMA];
        for (int64_t j = 0; j < n; ++j) xp[j] += sd * z[j];
      }
    }
    T* orow = p.out + b * p.N + i0;
    for (int64_t j = 0; j < n; ++j) orow[j] = static_cast<T>(xp[j]);
    if (p.x0) {
      T* x0row = p.x0 + b * p.N + i0;
      for (int64_t j = 0; j < n; ++j) x0row[j] = static_cast<T>(x0[j]);
    }
  }
}

}  // namespace

void sampler_step_cpu_impl(const StepArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "fastgen_sampler_step_cpu", [&] {
    const StepParams<scalar_t> p = make_params<scalar_t>(a);
    if (p.B == 0 || p.N == 0) return;
    float k[NUM_COEFFS];
    for (int i = 0; i < NUM_COEFFS; ++i) k[i] = p.coef[i];
    // Work items are (row, column block) pairs of ~64K elements, so that a few long rows still
    // spread over all threads; blocks are multiples of kChunk (even) to keep RNG pairs together.
    const int64_t block = std::min<int64_t>(p.N, int64_t{128} * kChunk);
    const int64_t nblocks = (p.N + block - 1) / block;
    at::parallel_for(0, p.B * nblocks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / nblocks, c0 = (t % nblocks) * block;
        run_segment(p, k, b, c0, std::min(p.N, c0 + block));
      }
    });
  });
}

}  // namespace diffusion
}  // namespace fastgen
