// SwiGLU forward / backward on the CPU (see swiglu.h). Rows are split over threads (at::parallel_for);
// each row's loop is compiled three times, for the portable x86-64 baseline (SSE2), AVX2+FMA and AVX-512F,
// and the widest one the CPU runs is picked at run time (cpu::selected_isa(), FASTGEN_CPU_ISA caps it).
// torch runs silu and the product as two passes (plus a third for the backward's dout * u): one pass reads
// h once and writes the result once, and the exp vectorizes (no libm call).
#include "swiglu/swiglu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu_isa.h"
#include "diffusion_step/diffusion_step.h"

// No FMA contraction (GCC contracts a * b + c under target("avx2,fma") / "avx512f"): every path rounds each
// step as torch does; only the exp's own explicit fused forms differ between paths (within 1 ulp).
#pragma GCC optimize("fp-contract=off")

namespace fastgen {
namespace swiglu {
namespace {

using diffusion::exp_approx;

struct Rows {
  const float* h;   // (R, 2F): g = h[r, :F], u = h[r, F:]
  int64_t hs;       // row stride of h
  const float* d;   // dout (R, F) (backward)
  int64_t ds;
  float* o;         // out (R, F) forward, dh (R, 2F) backward
  int64_t os;
  int64_t f;        // F
};

#define FASTGEN_SWIGLU_INLINE inline __attribute__((always_inline))

// FMA: the exp's fused form (the AVX2 / AVX-512 paths; the baseline has no FMA instruction).
template <bool FMA>
FASTGEN_SWIGLU_INLINE void fwd_rows(const Rows& a, int64_t r0, int64_t r1) {
  const int64_t f = a.f;
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict__ g = a.h + r * a.hs;
    const float* __restrict__ u = g + f;
    float* __restrict__ o = a.o + r * a.os;
#pragma omp simd
    for (int64_t j = 0; j < f; ++j) {
      const float x = g[j];
      const float silu = x / (1.0f + exp_approx<FMA>(-x));
      o[j] = silu * u[j];
    }
  }
}

template <bool FMA>
FASTGEN_SWIGLU_INLINE void bwd_rows(const Rows& a, int64_t r0, int64_t r1) {
  const int64_t f = a.f;
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict__ g = a.h + r * a.hs;
    const float* __restrict__ u = g + f;
    const float* __restrict__ dy = a.d + r * a.ds;
    float* __restrict__ dg = a.o + r * a.os;
    float* __restrict__ du = dg + f;
#pragma omp simd
    for (int64_t j = 0; j < f; ++j) {
      const float x = g[j];
      const float e1 = 1.0f + exp_approx<FMA>(-x);
      const float s = 1.0f / e1;
      const float dyu = dy[j] * u[j];
      dg[j] = dyu * s * (1.0f + x * (1.0f - s));
      du[j] = x / e1 * dy[j];
    }
  }
}

template <bool BWD, bool FMA>
FASTGEN_SWIGLU_INLINE void rows(const Rows& a, int64_t r0, int64_t r1) {
  if constexpr (BWD) {
    bwd_rows<FMA>(a, r0, r1);
  } else {
    fwd_rows<FMA>(a, r0, r1);
  }
}

// The three compilations of the row loop (the target attribute sets the instruction set of the inlined body).
template <bool BWD>
void rows_base(const Rows& a, int64_t r0, int64_t r1) {
  rows<BWD, false>(a, r0, r1);
}
template <bool BWD>
__attribute__((target("avx2,fma"))) void rows_avx2(const Rows& a, int64_t r0, int64_t r1) {
  rows<BWD, true>(a, r0, r1);
}
template <bool BWD>
__attribute__((target("avx512f"))) void rows_avx512(const Rows& a, int64_t r0, int64_t r1) {
  rows<BWD, true>(a, r0, r1);
}

template <bool BWD>
void run(const Rows& a, int64_t n_rows) {
  if (n_rows == 0 || a.f == 0) return;
  void (*body)(const Rows&, int64_t, int64_t) = rows_base<BWD>;
  switch (cpu::selected_isa()) {
    case cpu::Isa::kAvx512:
      body = rows_avx512<BWD>;
      break;
    case cpu::Isa::kAvx2:
      body = rows_avx2<BWD>;
      break;
    default:
      break;
  }
  // ~32K elements of F per task: smaller calls stay on the calling thread (a fork costs more than them)
  const int64_t grain = std::max<int64_t>(1, (BWD ? 16384 : 32768) / a.f);
  at::parallel_for(0, n_rows, grain, [&](int64_t r0, int64_t r1) { body(a, r0, r1); });
}

}  // namespace

void swiglu_fwd_cpu_impl(const at::Tensor& h, at::Tensor& out) {
  const Rows a{h.data_ptr<float>(), h.stride(0), nullptr, 0, out.data_ptr<float>(), out.stride(0), out.size(1)};
  run<false>(a, h.size(0));
}

void swiglu_bwd_cpu_impl(const at::Tensor& dout, const at::Tensor& h, at::Tensor& dh) {
  const Rows a{h.data_ptr<float>(), h.stride(0), dout.data_ptr<float>(), dout.stride(0), dh.data_ptr<float>(),
               dh.stride(0), dout.size(1)};
  run<true>(a, h.size(0));
}

}  // namespace swiglu
}  // namespace fastgen
