// Fused diffusion sampler step, CUDA kernel.
//
// One thread handles VEC consecutive elements of one sample: with VEC = 16 / sizeof(T) and one 16-byte
// load / store per tensor when every row start is 16-byte aligned, else VEC = 2 with scalar, bounds-
// checked accesses. Grid = (blocks over the elements of a sample, samples), with a grid-stride loop over
// samples beyond gridDim.y. The 16 coefficients are read from device memory into shared memory by each
// block, so a step never synchronises with the host and a sampling loop can be captured in a CUDA graph.
// Feature flags are kernel arguments: they are uniform over the launch (no divergence), and the kernel
// is memory-bound, so instantiating one kernel per feature combination would only cost build time.
//
// The math and the RNG are the header's (shared with the CPU kernel, exp_approx for the learned range
// included). Build without --use_fast_math: it would swap in approximate sqrtf and division
// (thresholding, Box-Muller).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "diffusion_step/diffusion_step.h"

namespace fastgen {
namespace diffusion {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// 16 bytes of T.
template <typename T>
struct alignas(16) Pack16 {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// VEC elements from src as float. VECTOR: 16-byte loads (the caller guarantees n == VEC and 16-byte
// alignment); otherwise element loads, zero past the end of the row (n < VEC).
template <typename T, int VEC, bool VECTOR>
__device__ __forceinline__ void load(const T* __restrict__ src, int n, float (&dst)[VEC]) {
  if constexpr (VECTOR) {
    constexpr int W = Pack16<T>::kN;
    static_assert(VEC % W == 0, "VEC must be a whole number of 16-byte packs");
#pragma unroll
    for (int c = 0; c < VEC / W; ++c) {
      const Pack16<T> v = reinterpret_cast<const Pack16<T>*>(src)[c];
#pragma unroll
      for (int j = 0; j < W; ++j) dst[c * W + j] = static_cast<float>(v.v[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) dst[j] = j < n ? static_cast<float>(src[j]) : 0.0f;
  }
}

template <typename T, int VEC, bool VECTOR>
__device__ __forceinline__ void store(T* __restrict__ dst, int n, const float (&src)[VEC]) {
  if constexpr (VECTOR) {
    constexpr int W = Pack16<T>::kN;
    static_assert(VEC % W == 0, "VEC must be a whole number of 16-byte packs");
#pragma unroll
    for (int c = 0; c < VEC / W; ++c) {
      Pack16<T> v;
#pragma unroll
      for (int j = 0; j < W; ++j) v.v[j] = static_cast<T>(src[c * W + j]);
      reinterpret_cast<Pack16<T>*>(dst)[c] = v;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (j < n) dst[j] = static_cast<T>(src[j]);
    }
  }
}

template <typename T, int VEC, bool VECTOR>
__global__ void __launch_bounds__(kThreads) sampler_step_kernel(const StepParams<T> p) {
  static_assert(VEC % 2 == 0, "a thread must own whole RNG pairs");
  __shared__ float k[NUM_COEFFS];
  if (threadIdx.x < NUM_COEFFS) k[threadIdx.x] = p.coef[threadIdx.x];
  __syncthreads();

  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (i0 >= p.N) return;
  const int n = static_cast<int>(p.N - i0 < VEC ? p.N - i0 : VEC);
  const uint32_t rng_step = rng_step_of(k[RNG_STEP]);

  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    const int64_t row = b * p.N + i0;
    // per-sample scalars: one load per thread and sample
    const float rs = p.rscale != nullptr ? p.rscale[b] : 1.0f;
    const float s = p.thresh != nullptr ? p.thresh[b] : 1.0f;

    float xv[VEC], m[VEC], t[VEC];
    load<T, VEC, VECTOR>(p.x + row, n, xv);
    load<T, VEC, VECTOR>(p.cond + b * p.Lc + i0, n, m);
    if (p.uncond != nullptr) {
      load<T, VEC, VECTOR>(p.uncond + (b + p.uoff) * p.Lu + i0, n, t);
#pragma unroll
      for (int j = 0; j < VEC; ++j) m[j] = guide(m[j], t[j], p.g);
    }
    if (p.rscale != nullptr) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) m[j] *= rs;
    }

    float xp[VEC], x0[VEC];
    if (p.known != nullptr) {  // inpainting: the known region replaces x0 before clipping
      float img[VEC];
      load<T, VEC, VECTOR>(p.known + row, n, img);
      load<T, VEC, VECTOR>(p.keep + row, n, t);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const ElemOut e = step_element<true>(k, xv[j], m[j], img[j], t[j], p.clip_mode, p.clip, s);
        xp[j] = e.xp;
        x0[j] = e.x0;
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const ElemOut e = step_element<false>(k, xv[j], m[j], 0.0f, 0.0f, p.clip_mode, p.clip, s);
        xp[j] = e.xp;
        x0[j] = e.x0;
      }
    }
    if (p.absx0 != nullptr) {  // x0_only: |x0| as float32
#pragma unroll
      for (int j = 0; j < VEC; ++j) x0[j] = fabsf(x0[j]);
      store<float, VEC, VECTOR>(p.absx0 + row, n, x0);
      continue;
    }
    if (p.prev != nullptr) {
      load<T, VEC, VECTOR>(p.prev + row, n, t);
#pragma unroll
      for (int j = 0; j < VEC; ++j) xp[j] += k[CPREV] * t[j];
    }
    if (p.grad != nullptr) {  // guidance shift of the mean: + variance * scale * grad (also at t = 0)
      float gr[VEC];
      load<T, VEC, VECTOR>(p.grad + row, n, gr);
      if (p.var_mode == VAR_LEARNED_RANGE) {
        load<T, VEC, VECTOR>(p.cond + b * p.Lc + p.N + i0, n, t);
#pragma unroll
        for (int j = 0; j < VEC; ++j) xp[j] += learned_var<true>(k, t[j]) * p.grad_scale * gr[j];
      } else {
        const float c = k[SIGMA] * k[SIGMA] * p.grad_scale;
#pragma unroll
        for (int j = 0; j < VEC; ++j) xp[j] += c * gr[j];
      }
    }
    if (p.noise_mode != NOISE_NONE) {
      float z[VEC];
      if (p.noise_mode == NOISE_TENSOR) {
        load<T, VEC, VECTOR>(p.noise + row, n, z);
      } else {
        const RngKey key = rng_key(p.seed_lo, p.seed_hi, p.sample_offset + static_cast<uint32_t>(b), rng_step);
        const uint32_t p0 = static_cast<uint32_t>(i0 >> 1);  // i0 is even
#pragma unroll
        for (int j = 0; j < VEC; j += 2) normal_pair(key, p0 + j / 2, z[j], z[j + 1]);
      }
      if (p.var_mode == VAR_LEARNED_RANGE) {
        load<T, VEC, VECTOR>(p.cond + b * p.Lc + p.N + i0, n, t);
#pragma unroll
        for (int j = 0; j < VEC; ++j) xp[j] += k[NOISE_MASK] * learned_sd<true>(k, t[j]) * z[j];
      } else {
        const float c = k[NOISE_MASK] * k[SIGMA];
#pragma unroll
        for (int j = 0; j < VEC; ++j) xp[j] += c * z[j];
      }
    }
    store<T, VEC, VECTOR>(p.out + row, n, xp);
    if (p.x0 != nullptr) store<T, VEC, VECTOR>(p.x0 + row, n, x0);
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, int VEC, bool VECTOR>
void launch(const StepParams<T>& p, cudaStream_t stream) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * VEC;
  const dim3 grid(static_cast<unsigned>((p.N + per_block - 1) / per_block),
                  static_cast<unsigned>(std::min(p.B, kMaxGridY)));
  sampler_step_kernel<T, VEC, VECTOR><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void sampler_step_cuda_impl(const StepArgs& a) {
  if (a.x.size(0) == 0 || a.x.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTGEN_DISPATCH_STEP_TYPES(a.x.scalar_type(), "fastgen::sampler_step_cuda", [&] {
    const StepParams<scalar_t> p = make_params<scalar_t>(a);
    constexpr int V = 16 / sizeof(scalar_t);
    // 16-byte accesses need every row start aligned: aligned bases and row lengths that are multiples
    // of V. float32 |x0| (x0_only) is written as V / 4 packs of 4 floats, also 16-byte aligned.
    const void* ptrs[] = {p.x, p.cond, p.uncond, p.prev, p.noise, p.known, p.keep, p.grad, p.out, p.x0, p.absx0};
    bool vec = p.N % V == 0 && p.Lc % V == 0 && p.Lu % V == 0;
    for (const void* q : ptrs) vec = vec && (q == nullptr || aligned16(q));
    if (vec) {
      launch<scalar_t, V, true>(p, stream);
    } else {
      launch<scalar_t, 2, false>(p, stream);
    }
  });
}

}  // namespace diffusion
}  // namespace fastgen
