// SwiGLU activation of a grouped GEMM's output on the CPU, forward and backward in one pass over the rows
// (fastgen/ops/grouped_mm.py: the CPU path of grouped_mm and of the MoE expert FFN). For h = [g | u] (R, 2F):
//   out = silu(g) * u                                  silu(g) = g / (1 + e^-g)
//   dg  = (dout * u) * s * (1 + g (1 - s))             s = 1 / (1 + e^-g)
//   du  = silu(g) * dout
// the same formulas and rounding steps as torch's silu / silu_backward followed by the product, with e^-g
// from the branch-free exp of diffusion_step.h (within 1 ulp of expf; fused multiply-adds on the AVX2 /
// AVX-512 paths). Arguments are validated in csrc/bindings.cpp: float32, unit column stride, rows at any
// row stride (views of a larger buffer), outputs not overlapping the inputs.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastgen {
namespace swiglu {

void swiglu_fwd_cpu_impl(const at::Tensor& h, at::Tensor& out);
void swiglu_bwd_cpu_impl(const at::Tensor& dout, const at::Tensor& h, at::Tensor& dh);

}  // namespace swiglu
}  // namespace fastgen
