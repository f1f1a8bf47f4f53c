// Grouped GEMMs of grouped_mm's CPU path (fastgen/ops/grouped_mm.py) for many small experts: the experts'
// GEMMs (split into row or column pieces) are spread over the threads, each GEMM single-threaded, in ONE
// parallel region. torch._grouped_mm's CPU loop (and a Python loop of torch.mm) forks and joins the thread
// pool inside every expert's GEMM instead: for experts of 16-300 rows the fork/join and the split of a tiny
// GEMM cost more than the GEMM (measured: 64 experts, 2 threads slower than 1). Arguments are validated in
// csrc/bindings.cpp; off is the host copy of the (E + 1) row offsets.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace fastgen {
namespace grouped_gemm {

// out[r] = a[r] @ b[e] (+ bias[e]) for the rows r in [off[e], off[e + 1]); other rows of out untouched.
// a (R, K), b (E, K, N) (any strides: transposed views serve the backward's dx), out (R, N).
void rows_cpu_impl(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                   const std::vector<int64_t>& off, at::Tensor& out);

// out[e] = a[rows of e]^T @ g[rows of e] (K, N), zeros for an expert without rows; dbias[e] = the sum of g
// over the rows of e when given. a (R, K), g (R, N), out (E, K, N), dbias (E, N).
void wgrad_cpu_impl(const at::Tensor& a, const at::Tensor& g, const std::vector<int64_t>& off, at::Tensor& out,
                    const std::optional<at::Tensor>& dbias);

}  // namespace grouped_gemm
}  // namespace fastgen
