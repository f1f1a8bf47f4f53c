// Fused nearest-codebook lookup (vector quantisation): for every row x[h, n] the code c[h, k] that
// minimises
//   L2:     d = (||x||^2 - 2 x.c) + ||c||^2      (argmin on this value; dist reports max(0, d))
//   cosine: d = 1 - x.c                           (the caller passes normalised x and codes; dist in [0, 2])
// ties -> the lowest k (as torch.argmin; a NaN distance wins, the first one). Never forms the N x K
// matrix: running (min, argmin) per row over tiles of codes. Math and reference: fastgen/ops/vq.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fastgen {
namespace vq {

struct VqArgs {
  at::Tensor x;            // (H, N, D) float / half / bfloat16 (CPU also double), contiguous
  at::Tensor codebook;     // (H, K, D) same dtype, contiguous
  at::Tensor code_sqnorm;  // (H, K) float32 (float64 for float64 inputs on the CPU), contiguous
  bool cosine = false;
  bool exact = false;  // top-4 by the expanded form, re-ranked by the direct form (vq_cpu.cpp, vq_cuda.cu)
  bool with_counts = false;
  at::Tensor indices;  // out (H, N) int64
  at::Tensor dist;     // out (H, N) float32
  at::Tensor counts;   // out (H, K) int64, zero-filled (only when with_counts)
};

// Validates every argument (TORCH_CHECK), allocates the outputs and runs the CPU or CUDA kernel.
// Returns (indices, dist, counts or an empty int64 tensor). Both kernels accumulate every dot product in
// fp32 (fp64 for fp64 inputs). `exact` (both kernels): the best 4 candidates by the expanded form are
// re-ranked by the direct form (L2 sum((x - c)^2), cosine 1 - x.c) from the original values, ties -> the
// lowest index; dist is that direct distance (cosine: clamped to [0, 2]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> vq_nearest(bool cuda, const at::Tensor& x, const at::Tensor& codebook,
                                                          const at::Tensor& code_sqnorm, bool cosine, bool exact,
                                                          bool with_counts);

void vq_nearest_cpu_impl(const VqArgs& a);
#ifdef FASTGEN_WITH_CUDA
void vq_nearest_cuda_impl(const VqArgs& a);
#endif

constexpr const char* kVqDoc = R"doc(Fused nearest-codebook lookup (no N x K matrix).

vq_nearest_{cpu,cuda}(x, codebook, code_sqnorm, cosine, exact, with_counts) -> (indices, dist, counts)

x: (H, N, D); codebook: (H, K, D), same dtype (float32 / float16 / bfloat16; CPU also float64), contiguous;
code_sqnorm: (H, K) float32 ||c||^2 (float64 allowed for float64 inputs). L2: d = (||x||^2 - 2 x.c) + ||c||^2,
dist = max(0, d); cosine (normalised inputs): dist = 1 - x.c (CPU: clamped to [0, 2]). indices: (H, N) int64
argmin, ties -> lowest index; dist: (H, N) float32; counts: (H, K) int64 histogram of indices if with_counts,
else empty. Dot products accumulate in fp32 (fp64 for fp64). exact (CPU and CUDA): the best 4 candidates by
the expanded form are re-ranked by the direct form (L2 sum((x - c)^2), cosine 1 - x.c) from the original
values, ties -> lowest index, dist = the direct distance. Math: fastgen/ops/vq.py.
)doc";

}  // namespace vq
}  // namespace fastgen
