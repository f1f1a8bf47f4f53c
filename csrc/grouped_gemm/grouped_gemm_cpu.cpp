// Grouped GEMMs on the CPU, one parallel region over all experts (see grouped_gemm.h). Each expert's GEMM
// is cut into pieces (rows of out for out = a @ b[e] and for the K-grouped weight gradient, so that no piece
// needs a reduction with another and each writes a contiguous block) of about equal cost; the pieces, in order, are dealt to the threads
// as contiguous runs of equal total cost; each piece is one at::mm / addmm / sum on views, which runs
// single-threaded inside the region (ATen and MKL do not nest). Same GEMMs as a loop of torch.mm on the same
// views, so the results are those of the BLAS on each piece.
#include "grouped_gemm/grouped_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastgen {
namespace grouped_gemm {
namespace {

struct Piece {
  int64_t e, lo, hi;  // expert; rows (rows_cpu) or output columns (wgrad_cpu) [lo, hi)
  double cost;
};

// Pieces of one expert with `extent` rows / columns and `unit` cost per row / column: at least `min_len`
// long, about `target` cost each.
void cut(std::vector<Piece>& out, int64_t e, int64_t extent, double unit, double target, int64_t min_len) {
  if (extent <= 0) return;
  int64_t n = std::max<int64_t>(1, static_cast<int64_t>(extent * unit / std::max(target, 1.0)));
  n = std::min(n, std::max<int64_t>(1, extent / min_len));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t lo = extent * i / n, hi = extent * (i + 1) / n;
    out.push_back({e, lo, hi, (hi - lo) * unit});
  }
}

// fn(piece) for every piece; thread p of `parts` takes the pieces whose cost midpoint falls in its share.
template <class F>
void run(const std::vector<Piece>& pieces, const F& fn) {
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(pieces.size()));
  const auto guarded = [&](const Piece& p) {
    const c10::NoGradGuard no_grad;  // pool threads start with grad mode on; out= ops refuse it on parameters
    fn(p);
  };
  if (parts <= 1 || at::in_parallel_region()) {
    for (const auto& p : pieces) guarded(p);
    return;
  }
  std::vector<double> mid(pieces.size());
  double total = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    mid[i] = total + pieces[i].cost / 2;
    total += pieces[i].cost;
  }
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    const double lo = total * p0 / parts, hi = total * p1 / parts;
    for (size_t i = 0; i < pieces.size(); ++i) {
      if (mid[i] >= lo && (mid[i] < hi || p1 == parts)) guarded(pieces[i]);
    }
  });
}

// ~4 pieces per thread (whole experts on one thread): enough to balance, few enough to keep the GEMMs big.
double target_cost(double total) {
  const int threads = at::get_num_threads();
  return threads <= 1 ? total : total / (4.0 * threads);
}

}  // namespace

void rows_cpu_impl(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                   const std::vector<int64_t>& off, at::Tensor& out) {
  const int64_t E = b.size(0), K = b.size(1), N = b.size(2);
  const double unit = static_cast<double>(K) * N;
  const double target = target_cost((off[E] - off[0]) * unit);
  std::vector<Piece> pieces;
  for (int64_t e = 0; e < E; ++e) cut(pieces, e, off[e + 1] - off[e], unit, target, 32);
  run(pieces, [&](const Piece& p) {
    const int64_t r0 = off[p.e] + p.lo, n = p.hi - p.lo;
    at::Tensor o = out.narrow(0, r0, n);
    const at::Tensor x = a.narrow(0, r0, n), w = b.select(0, p.e);
    if (bias.has_value()) {
      at::addmm_out(o, bias->select(0, p.e), x, w);
    } else {
      at::mm_out(o, x, w);
    }
  });
}

void wgrad_cpu_impl(const at::Tensor& a, const at::Tensor& g, const std::vector<int64_t>& off, at::Tensor& out,
                    const std::optional<at::Tensor>& dbias) {
  const int64_t E = out.size(0), K = out.size(1), N = out.size(2);
  double total = 0;
  for (int64_t e = 0; e < E; ++e) total += static_cast<double>(off[e + 1] - off[e]) * K * N;
  const double target = target_cost(total);
  std::vector<Piece> pieces;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = off[e + 1] - off[e];
    if (rows == 0) {
      pieces.push_back({e, 0, K, 0.0});  // zeros: nearly free
    } else {
      cut(pieces, e, K, static_cast<double>(rows) * N, target, 16);
    }
  }
  run(pieces, [&](const Piece& p) {
    // rows [lo, hi) of out[e] (K, N): a contiguous block, written in place (a column block would be a
    // strided output, which at::mm_out fills through a temporary allocated on the pool thread)
    const int64_t rows = off[p.e + 1] - off[p.e];
    at::Tensor o = out.select(0, p.e).narrow(0, p.lo, p.hi - p.lo);
    const bool db = dbias.has_value() && p.lo == 0;  // the expert's first piece sums its rows of g
    if (rows == 0) {
      o.zero_();
      if (db) dbias->select(0, p.e).zero_();
      return;
    }
    const at::Tensor gs = g.narrow(0, off[p.e], rows);
    at::mm_out(o, a.narrow(0, off[p.e], rows).narrow(1, p.lo, p.hi - p.lo).transpose(0, 1), gs);
    if (db) {
      at::Tensor d = dbias->select(0, p.e);
      at::sum_out(d, gs, {0});
    }
  });
}

}  // namespace grouped_gemm
}  // namespace fastgen
