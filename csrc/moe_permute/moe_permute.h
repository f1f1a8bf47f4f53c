// MoE routing (stable counting sort of (token, slot) assignments by expert) and the permute / unpermute
// gathers. The math and the priority rule: fastgen/ops/moe_permute.py. Arguments are validated in
// csrc/bindings.cpp; the impls see contiguous, well-typed tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastgen {
namespace moe {

struct RouteArgs {
  at::Tensor expert_idx;             // (T, k) int32 / int64
  std::optional<at::Tensor> valid;   // (T, k) bool
  int64_t num_experts = 0;           // E
  int64_t capacity = -1;             // -1: dropless
  at::Tensor dest;                   // out (T, k) int32
  at::Tensor src;                    // out (T*k,) int32, pre-filled with -1
  at::Tensor offsets;                // out (E+1,) int32
  at::Tensor counts;                 // out (E,) int32
};

void moe_route_cpu_impl(RouteArgs& a);

// out[row] = scale.flat[s] * x[s / k] for s = src[row] >= 0, else 0. scale: optional, float32 (float64 for
// a float64 x), numel T*k. src: any number of rows (the whole T*k table, its used rows, or one block of them).
void moe_gather_cpu_impl(const at::Tensor& x, const at::Tensor& src, const std::optional<at::Tensor>& scale,
                         int64_t k, at::Tensor& out);
// out[t] = sum_{j: dest[t, j] >= 0} gates[t, j] * buf[dest[t, j]] (gates optional: 1), opmath accumulation. buf
// may hold fewer than T*k rows (only the used ones): every dest entry must be below its row count.
void moe_combine_cpu_impl(const at::Tensor& buf, const at::Tensor& dest, const std::optional<at::Tensor>& gates,
                          at::Tensor& out);
// out[src[r] / k] += scale.flat[src[r]] * rows[r] for src[r] >= 0 (in place; scale optional: 1). out: (T, D) of
// rows' dtype, or float32 for float16 / bfloat16 rows (an accumulator); columns split over threads.
void moe_scatter_add_cpu_impl(at::Tensor& out, const at::Tensor& rows, const at::Tensor& src,
                              const std::optional<at::Tensor>& scale, int64_t k);
// out[t, j] = <dy[t], buf[dest[t, j]]> (0 where dest < 0), out float32 (float64 for float64 inputs).
void moe_gate_grad_cpu_impl(const at::Tensor& dy, const at::Tensor& buf, const at::Tensor& dest, at::Tensor& out);

// Top-2 router statistics of logits (T, E >= 2) (fastgen/ops/moe_gating.py): top (T, 2) softmax probabilities
// of the first / second argmax, lse (T,) (NaN for a row with a non-finite logit), psum (E,) the per-expert
// sums of the probabilities, idx (T, 2) int32, first (E,) int32 first-choice counts. Statistics in float32
// (float64 for float64 logits).
void moe_top2_router_cpu_impl(const at::Tensor& logits, at::Tensor& top, at::Tensor& lse, at::Tensor& psum,
                              at::Tensor& idx, at::Tensor& first);

#ifdef FASTGEN_WITH_CUDA
constexpr int64_t kMaxCudaExperts = 12288;  // shared-memory counters: one int per expert (per warp)
void moe_route_cuda_impl(RouteArgs& a);
#endif

}  // namespace moe
}  // namespace fastgen
