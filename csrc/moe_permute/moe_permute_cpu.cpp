// CPU kernels for MoE routing and the permute / unpermute gathers (see moe_permute.h).
#include "moe_permute/moe_permute.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace fastgen {
namespace moe {
namespace {

// Key of priority position p (p = j*T + t, the j-major order): the expert id, or E for an assignment that
// is not made (invalid, or an id out of range: Python asserts the range, the kernel never trusts it).
template <typename idx_t>
inline int64_t key_at(const idx_t* idx, const bool* valid, int64_t p, int64_t T, int64_t k, int64_t E,
                      int64_t* a_out) {
  const int64_t t = p % T, j = p / T, a = t * k + j;
  *a_out = a;
  if (valid != nullptr && !valid[a]) return E;
  const int64_t e = static_cast<int64_t>(idx[a]);
  return (e >= 0 && e < E) ? e : E;
}

template <typename idx_t>
void route(RouteArgs& r) {
  const int64_t T = r.expert_idx.size(0), k = r.expert_idx.size(1), n = T * k, E = r.num_experts;
  const idx_t* idx = r.expert_idx.data_ptr<idx_t>();
  const bool* valid = r.valid.has_value() ? r.valid->data_ptr<bool>() : nullptr;
  int32_t* dest = r.dest.data_ptr<int32_t>();
  int32_t* src = r.src.data_ptr<int32_t>();
  int32_t* offsets = r.offsets.data_ptr<int32_t>();
  int32_t* counts = r.counts.data_ptr<int32_t>();
  // Chunks of the priority order: per-chunk histograms in parallel, a sequential scan over (chunk, expert),
  // then every chunk assigns ranks in order from its own base: stable, identical to a sequential pass.
  constexpr int64_t kMinChunk = 4096;
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kMinChunk));
  const int64_t chunk = (n + nchunks - 1) / nchunks;
  std::vector<int64_t> base(static_cast<size_t>(nchunks * E), 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = base.data() + c * E;
      int64_t a;
      for (int64_t p = c * chunk, end = std::min(n, (c + 1) * chunk); p < end; ++p) {
        const int64_t e = key_at(idx, valid, p, T, k, E, &a);
        if (e < E) ++h[e];
      }
    }
  });
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t run = 0;
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t v = base[c * E + e];
      base[c * E + e] = run;
      run += v;
    }
    counts[e] = static_cast<int32_t>(run);
    offsets[e] = static_cast<int32_t>(row);
    row += r.capacity < 0 ? run : std::min(run, r.capacity);
  }
  offsets[E] = static_cast<int32_t>(row);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* rank = base.data() + c * E;  // this chunk's running ranks (owned by this chunk only)
      int64_t a;
      for (int64_t p = c * chunk, end = std::min(n, (c + 1) * chunk); p < end; ++p) {
        const int64_t e = key_at(idx, valid, p, T, k, E, &a);
        int32_t d = -1;
        if (e < E) {
          const int64_t rk = rank[e]++;
          if (r.capacity < 0 || rk < r.capacity) {
            d = static_cast<int32_t>(offsets[e] + rk);
            src[d] = static_cast<int32_t>(a);
          }
        }
        dest[a] = d;
      }
    }
  });
}

}  // namespace

void moe_route_cpu_impl(RouteArgs& a) {
  if (a.expert_idx.scalar_type() == at::kInt) {
    route<int32_t>(a);
  } else {
    route<int64_t>(a);
  }
}

void moe_gather_cpu_impl(const at::Tensor& x, const at::Tensor& src, const std::optional<at::Tensor>& scale,
                         int64_t k, at::Tensor& out) {
  const int64_t R = src.size(0), D = x.size(1);
  const int32_t* s = src.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_gather_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const opmath_t* sc = scale.has_value() ? scale->data_ptr<opmath_t>() : nullptr;
    at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* o = op + r * D;
        const int64_t a = s[r];
        if (a < 0) {
          std::fill(o, o + D, scalar_t(0));
        } else if (sc == nullptr) {
          std::memcpy(o, xp + (a / k) * D, sizeof(scalar_t) * D);
        } else {
          const scalar_t* xi = xp + (a / k) * D;
          const opmath_t w = sc[a];
          for (int64_t i = 0; i < D; ++i) o[i] = static_cast<scalar_t>(w * static_cast<opmath_t>(xi[i]));
        }
      }
    });
  });
}

void moe_combine_cpu_impl(const at::Tensor& buf, const at::Tensor& dest, const std::optional<at::Tensor>& gates,
                          at::Tensor& out) {
  const int64_t T = dest.size(0), k = dest.size(1), D = buf.size(1);
  const int32_t* dp = dest.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buf.scalar_type(), "moe_combine_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* bp = buf.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const opmath_t* g = gates.has_value() ? gates->data_ptr<opmath_t>() : nullptr;
    at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(D * k, 1)), [&](int64_t t0, int64_t t1) {
      std::vector<opmath_t> acc(static_cast<size_t>(D));
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), opmath_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = dp[t * k + j];
          if (r < 0) continue;
          const opmath_t w = g != nullptr ? g[t * k + j] : opmath_t(1);
          const scalar_t* b = bp + r * D;
          for (int64_t i = 0; i < D; ++i) acc[i] += w * static_cast<opmath_t>(b[i]);
        }
        scalar_t* o = op + t * D;
        for (int64_t i = 0; i < D; ++i) o[i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
}

namespace {

// out[src[r] / k] += scale[src[r]] * rows[r] (scale 1 when absent; rows with src < 0 skipped). The threads
// split the columns, so every element of out is updated by one thread in row order: deterministic, and
// correct when src names the same token twice.
template <typename scalar_t, typename out_t>
void scatter_add(at::Tensor& out, const at::Tensor& rows, const at::Tensor& src,
                 const std::optional<at::Tensor>& scale, int64_t k) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t R = rows.size(0), D = rows.size(1);
  const int32_t* s = src.data_ptr<int32_t>();
  const scalar_t* rp = rows.data_ptr<scalar_t>();
  out_t* op = out.data_ptr<out_t>();
  const opmath_t* sc = scale.has_value() ? scale->data_ptr<opmath_t>() : nullptr;
  // below ~32K elements one thread is faster than waking the others; column chunks of whole cache lines
  const int64_t grain =
      R * D < 32768 ? D : std::max<int64_t>(16, std::min<int64_t>(D, 32768 / std::max<int64_t>(R, 1)));
  at::parallel_for(0, D, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t a = s[r];
      if (a < 0) continue;
      const opmath_t w = sc != nullptr ? sc[a] : opmath_t(1);
      const scalar_t* b = rp + r * D;
      out_t* o = op + (a / k) * D;
      for (int64_t i = c0; i < c1; ++i) {
        o[i] = static_cast<out_t>(static_cast<opmath_t>(o[i]) + w * static_cast<opmath_t>(b[i]));
      }
    }
  });
}

}  // namespace

void moe_scatter_add_cpu_impl(at::Tensor& out, const at::Tensor& rows, const at::Tensor& src,
                              const std::optional<at::Tensor>& scale, int64_t k) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "moe_scatter_add_cpu", [&] {
    if (out.scalar_type() == rows.scalar_type()) {
      scatter_add<scalar_t, scalar_t>(out, rows, src, scale, k);
    } else {
      scatter_add<scalar_t, at::opmath_type<scalar_t>>(out, rows, src, scale, k);
    }
  });
}

void moe_gate_grad_cpu_impl(const at::Tensor& dy, const at::Tensor& buf, const at::Tensor& dest, at::Tensor& out) {
  const int64_t T = dest.size(0), k = dest.size(1), D = buf.size(1);
  const int32_t* dp = dest.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buf.scalar_type(), "moe_gate_grad_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* bp = buf.data_ptr<scalar_t>();
    const scalar_t* yp = dy.data_ptr<scalar_t>();
    opmath_t* op = out.data_ptr<opmath_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(D * k, 1)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* y = yp + t * D;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = dp[t * k + j];
          opmath_t acc = 0;
          if (r >= 0) {
            const scalar_t* b = bp + r * D;
            for (int64_t i = 0; i < D; ++i) acc += static_cast<opmath_t>(y[i]) * static_cast<opmath_t>(b[i]);
          }
          op[t * k + j] = acc;
        }
      }
    });
  });
}

}  // namespace moe
}  // namespace fastgen
