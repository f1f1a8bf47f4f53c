// KV-cache decoding attention, C++ CPU kernel (at::parallel_for over (batch, KV head, split)).
//
// One task handles one KV head of one sequence and ALL its query rows (the G query heads of the group
// times the Sq new tokens), so every K/V row is read once per group (a tile of kTile keys stays in L1/L2
// while all the rows use it). Scores are dot products with 16 independent partial sums (vectorised by
// GCC without reassociating one sum, no -ffast-math); P @ V is `acc[d] += p[t] v[t][d]`, vectorised over d.
// float32 / float64 caches are read in place, 16-bit ones converted once per tile. Accumulation is float32
// (float64 for double inputs) with an online softmax; splits of long caches write (out, lse) partials that
// a second parallel pass merges.
#include "attention_decode/attention_decode.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastgen {
namespace decode {
namespace {

constexpr int64_t kTile = 64;
constexpr int64_t kBlock = 4096;  // keys per running accumulator (see attend_chunk)

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// a . b with W independent partial sums: vectorises without reassociating one sum (no -ffast-math).
template <typename A>
inline A dot(const A* __restrict__ a, const A* __restrict__ b, int64_t n) {
  constexpr int W = 16;
  A part[W] = {};
  int64_t d = 0;
  for (; d + W <= n; d += W) {
    for (int l = 0; l < W; ++l) part[l] += a[d + l] * b[d + l];
  }
  A s = 0;
  for (; d < n; ++d) s += a[d] * b[d];
  for (int l = 0; l < W; ++l) s += part[l];
  return s;
}

// Online-softmax attention of all R query rows of (b, h) over keys [j0, j1) (at most kBlock of them):
// leaves the unnormalised accumulator in acc (R x D), the running max in m and the running sum in l. K/V
// rows are read in place when T is the accumulation type, else converted once per tile into kbuf / vbuf
// (kTile x D).
template <typename T, typename A>
void attend_block(const DecodeParams<T>& p, int64_t b, int64_t h, int64_t j0, int64_t j1, const A* qf,
                  const int64_t* lim, A* acc, A* m, A* l, A* kbuf, A* vbuf, A* s) {
  constexpr bool kInPlace = std::is_same_v<T, A>;
  const int64_t R = p.Sq * p.G, D = p.D;
  const A neg_inf = -std::numeric_limits<A>::infinity();
  for (int64_t r = 0; r < R; ++r) {
    m[r] = neg_inf;
    l[r] = 0;
  }
  std::fill(acc, acc + R * D, A(0));
  int64_t jmax = 0;
  for (int64_t r = 0; r < R; ++r) jmax = std::max(jmax, lim[r]);
  j1 = std::min(j1, jmax);
  const A* krow[kTile];
  const A* vrow[kTile];
  for (int64_t jb = j0; jb < j1; jb += kTile) {
    const int64_t nk = std::min(kTile, j1 - jb);
    for (int64_t t = 0; t < nk; ++t) {
      const T* kp = p.k + key_offset(p, b, jb + t, p.k_s0, p.k_s1) + h * p.k_s2;
      const T* vp = p.v + key_offset(p, b, jb + t, p.v_s0, p.v_s1) + h * p.v_s2;
      if constexpr (kInPlace) {
        krow[t] = kp;
        vrow[t] = vp;
      } else {
        A* kd = kbuf + t * D;
        A* vd = vbuf + t * D;
        for (int64_t d = 0; d < D; ++d) kd[d] = static_cast<A>(kp[d]);
        for (int64_t d = 0; d < D; ++d) vd[d] = static_cast<A>(vp[d]);
        krow[t] = kd;
        vrow[t] = vd;
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t nv = std::clamp<int64_t>(lim[r] - jb, 0, nk);
      if (nv == 0) continue;
      const A* qr = qf + r * D;
      A mx = m[r];
      for (int64_t t = 0; t < nv; ++t) {
        s[t] = dot(qr, krow[t], D);
        mx = s[t] > mx ? s[t] : mx;
      }
      // every score so far -inf: exponentiate against 0 (exp(-inf - -inf) would be NaN), as the reference
      const A mu = mx == neg_inf ? A(0) : mx;
      const A corr = std::exp(m[r] - mu);  // exp(-inf) = 0 on the first tile
      A sum = 0;
      for (int64_t t = 0; t < nv; ++t) {
        s[t] = std::exp(s[t] - mu);
        sum += s[t];
      }
      l[r] = l[r] * corr + sum;
      m[r] = mx;
      A* __restrict__ ar = acc + r * D;
      for (int64_t d = 0; d < D; ++d) ar[d] *= corr;
      for (int64_t t = 0; t < nv; ++t) {
        const A pt = s[t];
        const A* __restrict__ vr = vrow[t];
        for (int64_t d = 0; d < D; ++d) ar[d] += pt * vr[d];
      }
    }
  }
}

// attend_block over any key range, kBlock keys at a time, each block's (acc, m, l) folded into the
// running one with the log-sum-exp rescaling. A float32 running sum grows by one key at a time only within
// a block: over 2^24 keys one accumulator would stall (x + 3 == x past 2^26) and give a wrong mean.
template <typename T, typename A>
void attend_chunk(const DecodeParams<T>& p, int64_t b, int64_t h, int64_t j0, int64_t j1, const A* qf,
                  const int64_t* lim, A* acc, A* m, A* l, A* bacc, A* bm, A* bl, A* kbuf, A* vbuf, A* s) {
  const int64_t R = p.Sq * p.G, D = p.D;
  if (j1 - j0 <= kBlock) {
    attend_block<T, A>(p, b, h, j0, j1, qf, lim, acc, m, l, kbuf, vbuf, s);
    return;
  }
  const A neg_inf = -std::numeric_limits<A>::infinity();
  for (int64_t r = 0; r < R; ++r) {
    m[r] = neg_inf;
    l[r] = 0;
  }
  std::fill(acc, acc + R * D, A(0));
  for (int64_t cb = j0; cb < j1; cb += kBlock) {
    attend_block<T, A>(p, b, h, cb, std::min(j1, cb + kBlock), qf, lim, bacc, bm, bl, kbuf, vbuf, s);
    for (int64_t r = 0; r < R; ++r) {
      const A mx = std::max(m[r], bm[r]);
      const A mu = mx == neg_inf ? A(0) : mx;
      const A ca = std::exp(m[r] - mu), cb_ = std::exp(bm[r] - mu);
      l[r] = l[r] * ca + bl[r] * cb_;
      m[r] = mx;
      A* __restrict__ ar = acc + r * D;
      const A* __restrict__ br = bacc + r * D;
      for (int64_t d = 0; d < D; ++d) ar[d] = ar[d] * ca + br[d] * cb_;
    }
  }
}

// log-sum-exp of a row from its running max and sum: -inf with no visible key, NaN when the sum is NaN
// (a NaN / inf input), so that the split merge propagates it rather than dropping the split as empty.
template <typename A>
inline A row_lse(A m, A l) {
  if (l == A(0)) return -std::numeric_limits<A>::infinity();
  return m + std::log(l);
}

template <typename T>
void run(const DecodeArgs& a) {
  using A = acc_t<T>;
  const DecodeParams<T> p = make_params<T>(a);
  const int64_t R = p.Sq * p.G, D = p.D, BH = p.B * p.Hkv;
  if (BH == 0 || R == 0) return;
  const int64_t threads = at::get_num_threads();
  int64_t heuristic = 1;
  if (BH < threads) heuristic = std::min((2 * threads + BH - 1) / BH, std::max<int64_t>(1, p.capacity / 256));
  const int64_t S = clamp_splits(a.num_splits, heuristic);
  const A neg_inf = -std::numeric_limits<A>::infinity();

  // partials of every (b, h, split): normalised out (R x D) and lse (R); only with S > 1
  at::Tensor ws_o, ws_lse;
  A* wo = nullptr;
  A* wl = nullptr;
  if (S > 1) {
    const auto opts = a.q.options().dtype(std::is_same_v<A, double> ? at::kDouble : at::kFloat);
    ws_o = at::empty({BH * S * R * D}, opts);
    ws_lse = at::empty({BH * S * R}, opts);
    wo = ws_o.data_ptr<A>();
    wl = ws_lse.data_ptr<A>();
  }

  at::parallel_for(0, BH * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(R * D * 3 + 5 * R + kTile * D * 2 + kTile);
    A* qf = buf.data();
    A* acc = qf + R * D;
    A* bacc = acc + R * D;
    A* m = bacc + R * D;
    A* l = m + R;
    A* bm = l + R;
    A* bl = bm + R;
    A* kbuf = bl + R;
    A* vbuf = kbuf + kTile * D;
    A* s = vbuf + kTile * D;
    std::vector<int64_t> lim(R);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / S, split = task % S;
      const int64_t b = bh / p.Hkv, h = bh % p.Hkv;
      const int64_t len = seq_len(p, b);
      const int64_t chunk = (len + S - 1) / S;
      const int64_t j0 = std::min(len, split * chunk), j1 = std::min(len, j0 + chunk);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = r / p.G, g = r % p.G;
        lim[r] = row_limit(p, len, i);
        const T* qr = p.q + b * p.q_s0 + i * p.q_s1 + (h * p.G + g) * p.q_s2;
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<A>(qr[d]) * static_cast<A>(a.scale);
      }
      attend_chunk<T, A>(p, b, h, j0, j1, qf, lim.data(), acc, m, l, bacc, bm, bl, kbuf, vbuf, s);
      for (int64_t r = 0; r < R; ++r) {
        const A inv = l[r] == A(0) ? A(0) : A(1) / l[r];  // no visible key: zeros; a NaN sum stays NaN
        const A* ar = acc + r * D;
        if (S == 1) {
          const int64_t i = r / p.G, g = r % p.G;
          T* o = p.out + ((b * p.Sq + i) * p.Hq + h * p.G + g) * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(ar[d] * inv);
        } else {
          A* o = wo + ((bh * S + split) * R + r) * D;
          for (int64_t d = 0; d < D; ++d) o[d] = ar[d] * inv;
          wl[(bh * S + split) * R + r] = row_lse(m[r], l[r]);
        }
      }
    }
  });
  if (S == 1) return;

  // merge the splits of every (b, h, row): out = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M)
  at::parallel_for(0, BH * R, 16, [&](int64_t begin, int64_t end) {
    std::vector<A> o(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / R, r = task % R;
      const int64_t b = bh / p.Hkv, h = bh % p.Hkv, i = r / p.G, g = r % p.G;
      A mx = neg_inf;  // std::max skips a NaN lse; its weight below is NaN and reaches den and o
      for (int64_t sp = 0; sp < S; ++sp) mx = std::max(mx, wl[(bh * S + sp) * R + r]);
      const A mu = mx == neg_inf ? A(0) : mx;
      std::fill(o.begin(), o.end(), A(0));
      A den = 0;
      for (int64_t sp = 0; sp < S; ++sp) {
        const A lse = wl[(bh * S + sp) * R + r];
        if (lse == neg_inf) continue;  // a split without visible keys (its partial is all zeros)
        const A w = std::exp(lse - mu);
        den += w;
        const A* src = wo + ((bh * S + sp) * R + r) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * src[d];
      }
      const A inv = den == A(0) ? A(0) : A(1) / den;
      T* dst = p.out + ((b * p.Sq + i) * p.Hq + h * p.G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d] * inv);
    }
  });
}

}  // namespace

void attention_decode_cpu_impl(const DecodeArgs& a) {
  AT_DISPATCH_SWITCH(a.q.scalar_type(), "fastgen::attention_decode_cpu",
                     AT_DISPATCH_CASE(at::ScalarType::Float, [&] { run<scalar_t>(a); })
                     AT_DISPATCH_CASE(at::ScalarType::Double, [&] { run<scalar_t>(a); })
                     AT_DISPATCH_CASE(at::ScalarType::Half, [&] { run<scalar_t>(a); })
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, [&] { run<scalar_t>(a); }));
}

}  // namespace decode
}  // namespace fastgen
