// CPU kernels for MoE routing and the permute / unpermute gathers (see moe_permute.h).
#include "moe_permute/moe_permute.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sub.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
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

namespace {

// Per row of logits: the first and second argmax (ties: the lowest index, as torch.argmax), the logsumexp
// (NaN when the row holds a non-finite value) and the softmax probabilities, which are added to fixed
// chunks' partial per-expert sums (summed in chunk order afterwards: the result does not depend on the
// number of threads). Three passes: the row maxima, one vectorised at::exp over all of x - max (ATen's SIMD
// exp; a scalar std::exp per element cost more than the rest of the router), then the sums.
template <typename scalar_t, typename stat_t>
void top2_router(const at::Tensor& logits, at::Tensor& top, at::Tensor& lse, at::Tensor& psum, at::Tensor& idx,
                 at::Tensor& first) {
  const int64_t T = logits.size(0), E = logits.size(1);
  constexpr int64_t kChunk = 256;
  const int64_t nchunks = (T + kChunk - 1) / kChunk;
  const scalar_t* xp = logits.data_ptr<scalar_t>();
  stat_t* topp = top.data_ptr<stat_t>();
  stat_t* lsep = lse.data_ptr<stat_t>();
  int32_t* idxp = idx.data_ptr<int32_t>();
  at::Tensor mx = at::empty({T, 1}, top.options());
  stat_t* mp = mx.data_ptr<stat_t>();
  std::vector<uint8_t> finite(static_cast<size_t>(T));
  at::parallel_for(0, T, 1024, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const scalar_t* x = xp + t * E;
      int64_t i1 = 0, i2 = -1;
      stat_t m1 = static_cast<stat_t>(x[0]), m2 = -std::numeric_limits<stat_t>::infinity();
      bool fin = std::isfinite(m1);
      for (int64_t e = 1; e < E; ++e) {
        const stat_t v = static_cast<stat_t>(x[e]);
        fin = fin && std::isfinite(v);
        if (v > m1) {
          m2 = m1, i2 = i1, m1 = v, i1 = e;
        } else if (v > m2 || i2 < 0) {
          m2 = v, i2 = e;
        }
      }
      mp[t] = m1;
      finite[t] = fin;
      idxp[2 * t] = static_cast<int32_t>(i1);
      idxp[2 * t + 1] = static_cast<int32_t>(i2);
    }
  });
  // (T, E), contiguous; detached: logits may require grad, and nothing here is to be recorded
  const at::Tensor ex = at::sub(logits.detach().to(top.scalar_type()), mx).exp_();
  const stat_t* exp_ = ex.data_ptr<stat_t>();
  std::vector<stat_t> part(static_cast<size_t>(nchunks * E), stat_t(0));
  std::vector<int32_t> cnt(static_cast<size_t>(nchunks * E), 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      stat_t* ps = part.data() + c * E;
      for (int64_t t = c * kChunk, end = std::min(T, (c + 1) * kChunk); t < end; ++t) {
        const stat_t* er = exp_ + t * E;
        stat_t sum = 0;
        for (int64_t e = 0; e < E; ++e) sum += er[e];
        const stat_t inv = stat_t(1) / sum;
        for (int64_t e = 0; e < E; ++e) ps[e] += er[e] * inv;
        const int64_t i1 = idxp[2 * t], i2 = idxp[2 * t + 1];
        topp[2 * t] = er[i1] * inv;
        topp[2 * t + 1] = er[i2] * inv;
        lsep[t] = finite[t] ? mp[t] + std::log(sum) : std::numeric_limits<stat_t>::quiet_NaN();
        ++cnt[c * E + i1];
      }
    }
  });
  stat_t* psp = psum.data_ptr<stat_t>();
  int32_t* fp = first.data_ptr<int32_t>();
  for (int64_t e = 0; e < E; ++e) {
    stat_t acc = 0;
    int32_t n = 0;
    for (int64_t c = 0; c < nchunks; ++c) acc += part[c * E + e], n += cnt[c * E + e];
    psp[e] = acc;
    fp[e] = n;
  }
}

}  // namespace

void moe_top2_router_cpu_impl(const at::Tensor& logits, at::Tensor& top, at::Tensor& lse, at::Tensor& psum,
                              at::Tensor& idx, at::Tensor& first) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_top2_router_cpu", [&] {
    if (logits.scalar_type() == at::kDouble) {
      top2_router<scalar_t, double>(logits, top, lse, psum, idx, first);
    } else {
      top2_router<scalar_t, float>(logits, top, lse, psum, idx, first);
    }
  });
}

}  // namespace moe
}  // namespace fastgen
