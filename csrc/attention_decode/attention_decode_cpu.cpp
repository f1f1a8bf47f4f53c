// KV-cache decoding attention, C++ CPU kernels (at::parallel_for over (batch, KV-head block, key split)).
//
// float32 / bfloat16 / float16 caches (the vectorised kernel, `simd` below). A work item is one key range
// [j0, j1) of one sequence b and a block of consecutive KV heads [h0, h1) (all heads of the row when
// their query rows fit 32 KiB of accumulators, so the item streams the cache in its own layout: in a
// (B, S, H, D) cache the heads of a key row are one contiguous run of H*D elements, the next row follows).
// The item walks its keys in tiles of kTile rows; per tile and head it computes the scores of all the
// head's query rows (the G query heads of the GQA group times the Sq new tokens: every K/V row is read
// once per group), updates each row's online softmax (running max m, running sum l, unnormalised
// accumulator) and adds P @ V; while it works on a tile it software-prefetches the next tile's rows of
// its heads (the hardware prefetchers do not cross the 4 KiB pages that a strided head walk touches on
// every row). The hot loops (4 keys x D dot products, the D-wide axpy of P @ V) are written once with GCC
// vector types and compiled three times: AVX-512F (16 floats), AVX2+FMA (8) and the x86-64 / portable
// baseline (4), the path picked at run time by cpu::selected_isa() (FASTGEN_CPU_ISA caps it). 16-bit
// K/V rows are converted to float in registers (bfloat16: a 16-bit shift; float16: exact bit arithmetic,
// subnormals, inf and NaN included). Accumulation is float32. The keys of a sequence are split into
// items of at most kBlock keys (a float32 running sum stays exact enough), sized so that every thread
// gets several items of equal length whatever the ragged cache_seqlens; sequences with more than one
// item write (normalised out, log-sum-exp) partials that a second parallel pass merges. A row without a
// visible key gets zeros; NaN / inf among the visible keys, values or the query gives NaN as the
// reference does (exp(inf - inf), 0 * inf and NaN propagate through the same steps as the reference).
//
// float64 caches keep the portable kernel (`run_generic`): one task per (batch, KV head, split), float64
// accumulation, 16 independent partial sums per dot product.
#include "attention_decode/attention_decode.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"

namespace fastgen {
namespace decode {
namespace {

// =====================================================================================================
// Portable kernel (float64)
// =====================================================================================================

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
void run_generic(const DecodeArgs& a) {
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


// =====================================================================================================
// Vectorised kernel (float32, bfloat16, float16 caches; float32 accumulation)
// =====================================================================================================

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
// a * b + c on the vector types below becomes one FMA where the target has it (-std=c++17 sets
// -ffp-contract=off otherwise). Only this part of the file: the float64 kernel above keeps its rounding.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

namespace simd {

#define FASTGEN_DECODE_INLINE inline __attribute__((always_inline))

constexpr int64_t kTile = 16;        // key rows per tile (scores of a row stay in L1)
constexpr int64_t kItemKeys = 4096;  // at most this many keys per item: its float32 running sums stay exact
constexpr int64_t kMinItemKeys = 256;
constexpr int64_t kMaxItemFloats = 8192;  // heads of one item: their query rows x D accumulators <= 32 KiB

// W float lanes (GCC vector extensions; the width each ISA path instantiates).
template <int W>
struct Vec {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
  typedef int32_t i __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
};

// W elements at p as floats (unaligned loads; 16-bit formats widened in registers).
template <int W>
FASTGEN_DECODE_INLINE typename Vec<W>::f load(const float* p) {
  typename Vec<W>::f x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

template <int W>
FASTGEN_DECODE_INLINE typename Vec<W>::f load(const c10::BFloat16* p) {
  typename Vec<W>::h raw;
  std::memcpy(&raw, p, sizeof(raw));
  const typename Vec<W>::u bits = __builtin_convertvector(raw, typename Vec<W>::u) << 16;
  return (typename Vec<W>::f)bits;  // same-size vector cast: a bit cast
}

// IEEE binary16 -> binary32 exactly: normal numbers by re-biasing the exponent (+112), subnormals as
// (2^-14 (1 + m / 1024)) - 2^-14 = m 2^-24 (all normal floats, so a flush-to-zero / DAZ mode cannot touch
// them), inf / NaN with the exponent set to all ones and the mantissa (NaN payload) kept.
template <int W>
FASTGEN_DECODE_INLINE typename Vec<W>::f load(const c10::Half* p) {
  using F = typename Vec<W>::f;
  using U = typename Vec<W>::u;
  typename Vec<W>::h raw;
  std::memcpy(&raw, p, sizeof(raw));
  const U x = __builtin_convertvector(raw, U);
  const U sign = (x & 0x8000u) << 16;
  const U shifted = (x & 0x7fffu) << 13;  // exponent and mantissa in float position, exponent unbiased
  const U exp = x & 0x7c00u;
  const U normal = shifted + (112u << 23);
  const U sub = (U)((F)(shifted + (113u << 23)) - 0x1p-14f);
  const U special = shifted | 0x7f800000u;
  const U mag = exp == 0u ? sub : (exp == 0x7c00u ? special : normal);
  return (F)(mag | sign);
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

template <int W>
FASTGEN_DECODE_INLINE float hsum(typename Vec<W>::f x) {
  if constexpr (W == 16) {
    const typename Vec<8>::f lo = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7);
    const typename Vec<8>::f hi = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    return hsum<8>(lo + hi);
  } else if constexpr (W == 8) {
    const typename Vec<4>::f lo = __builtin_shufflevector(x, x, 0, 1, 2, 3);
    const typename Vec<4>::f hi = __builtin_shufflevector(x, x, 4, 5, 6, 7);
    return hsum<4>(lo + hi);
  } else {
    static_assert(W == 4, "W is 4, 8 or 16");
    return (x[0] + x[2]) + (x[1] + x[3]);
  }
}

// s[t] = q . k_t for N (1 or 4) key rows: q loaded once per W lanes, N independent FMA chains.
template <int W, int N, typename T>
FASTGEN_DECODE_INLINE void dots(const float* __restrict__ q, const T* const* k, int64_t D, float* s) {
  using F = typename Vec<W>::f;
  F acc[N] = {};
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    const F qv = load<W>(q + d);
#pragma GCC unroll 4
    for (int t = 0; t < N; ++t) acc[t] += qv * load<W>(k[t] + d);
  }
#pragma GCC unroll 4
  for (int t = 0; t < N; ++t) {
    float r = hsum<W>(acc[t]);
    for (int64_t e = d; e < D; ++e) r += q[e] * to_float(k[t][e]);
    s[t] = r;
  }
}

// a[d] = a[d] * corr + sum_{t < nv} p[t] v_t[d]: 4 vectors of d at a time (4 independent chains over t).
template <int W, typename T>
FASTGEN_DECODE_INLINE void axpy_rows(float* __restrict__ a, float corr, const float* p, const T* const* v,
                                     int64_t nv, int64_t D) {
  using F = typename Vec<W>::f;
  int64_t d = 0;
  for (; d + 4 * W <= D; d += 4 * W) {
    F a0 = load<W>(a + d) * corr, a1 = load<W>(a + d + W) * corr;
    F a2 = load<W>(a + d + 2 * W) * corr, a3 = load<W>(a + d + 3 * W) * corr;
    for (int64_t t = 0; t < nv; ++t) {
      const T* vr = v[t] + d;
      const float pt = p[t];
      a0 += pt * load<W>(vr);
      a1 += pt * load<W>(vr + W);
      a2 += pt * load<W>(vr + 2 * W);
      a3 += pt * load<W>(vr + 3 * W);
    }
    std::memcpy(a + d, &a0, sizeof(F));
    std::memcpy(a + d + W, &a1, sizeof(F));
    std::memcpy(a + d + 2 * W, &a2, sizeof(F));
    std::memcpy(a + d + 3 * W, &a3, sizeof(F));
  }
  for (; d + W <= D; d += W) {
    F a0 = load<W>(a + d) * corr;
    for (int64_t t = 0; t < nv; ++t) a0 += p[t] * load<W>(v[t] + d);
    std::memcpy(a + d, &a0, sizeof(F));
  }
  for (; d < D; ++d) {
    float x = a[d] * corr;
    for (int64_t t = 0; t < nv; ++t) x += p[t] * to_float(v[t][d]);
    a[d] = x;
  }
}

inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

// One work item: keys [j0, j1) of sequence b, KV heads [h0, h1). qf holds the scaled query rows of those
// heads ((h - h0) * R + r, D floats each, r = token * G + g); lim[r] the keys row r sees. Leaves the
// unnormalised accumulators in acc (same row order), the running max in m and the running sum in l.
template <int W, typename T>
FASTGEN_DECODE_INLINE void attend_item_body(const DecodeParams<T>& p, int64_t b, int64_t h0, int64_t h1,
                                            int64_t j0, int64_t j1, const float* qf, const int64_t* lim,
                                            float* acc, float* m, float* l, float* s) {
  const int64_t R = p.Sq * p.G, D = p.D, nh = h1 - h0;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < nh * R; ++r) {
    m[r] = neg_inf;
    l[r] = 0.f;
  }
  std::fill(acc, acc + nh * R * D, 0.f);
  int64_t jmax = 0;
  for (int64_t r = 0; r < R; ++r) jmax = std::max(jmax, lim[r]);
  j1 = std::min(j1, jmax);
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  const T* kb[kTile];  // rows of the current tile (head 0)
  const T* vb[kTile];
  const T* kn[kTile];  // rows of the next tile (prefetched)
  const T* vn[kTile];
  const T* kt[kTile];  // rows of the current tile, head h
  const T* vt[kTile];
  int64_t nn = 0;
  auto rows = [&](int64_t jb, int64_t n, const T** kr, const T** vr) {
    for (int64_t t = 0; t < n; ++t) {
      kr[t] = p.k + key_offset(p, b, jb + t, p.k_s0, p.k_s1);
      vr[t] = p.v + key_offset(p, b, jb + t, p.v_s0, p.v_s1);
    }
  };
  if (j0 < j1) {
    nn = std::min(kTile, j1 - j0);
    rows(j0, nn, kn, vn);
  }
  for (int64_t jb = j0; jb < j1; jb += kTile) {
    const int64_t nk = nn;
    std::copy(kn, kn + nk, kb);
    std::copy(vn, vn + nk, vb);
    nn = std::min(kTile, std::max<int64_t>(0, j1 - jb - kTile));
    rows(jb + kTile, nn, kn, vn);
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t t = 0; t < nn; ++t) {
        prefetch_row(kn[t] + h * p.k_s2, row_bytes);
        prefetch_row(vn[t] + h * p.v_s2, row_bytes);
      }
      for (int64_t t = 0; t < nk; ++t) {
        kt[t] = kb[t] + h * p.k_s2;
        vt[t] = vb[t] + h * p.v_s2;
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t nv = std::clamp<int64_t>(lim[r] - jb, 0, nk);
        if (nv == 0) continue;
        const int64_t row = (h - h0) * R + r;
        const float* qr = qf + row * D;
        int64_t t = 0;
        for (; t + 4 <= nv; t += 4) dots<W, 4, T>(qr, kt + t, D, s + t);
        for (; t < nv; ++t) dots<W, 1, T>(qr, kt + t, D, s + t);
        float mx = m[row];  // a NaN score is skipped here; exp(NaN - mu) below carries it into l
        for (t = 0; t < nv; ++t) mx = s[t] > mx ? s[t] : mx;
        // every score so far -inf: exponentiate against 0 (exp(-inf - -inf) would be NaN), as the reference
        const float mu = mx == neg_inf ? 0.f : mx;
        const float corr = std::exp(m[row] - mu);  // exp(-inf) = 0 on the first tile
        float sum = 0.f;
        for (t = 0; t < nv; ++t) {
          s[t] = std::exp(s[t] - mu);
          sum += s[t];
        }
        l[row] = l[row] * corr + sum;
        m[row] = mx;
        axpy_rows<W, T>(acc + row * D, corr, s, vt, nv, D);
      }
    }
  }
}

template <typename T>
using ItemFn = void (*)(const DecodeParams<T>&, int64_t, int64_t, int64_t, int64_t, int64_t, const float*,
                        const int64_t*, float*, float*, float*, float*);

#define FASTGEN_DECODE_ITEM_ARGS                                                                             \
  const DecodeParams<T>&p, int64_t b, int64_t h0, int64_t h1, int64_t j0, int64_t j1, const float* qf,    \
      const int64_t* lim, float* acc, float* m, float* l, float* s

template <typename T>
void attend_item_base(FASTGEN_DECODE_ITEM_ARGS) {
  attend_item_body<4, T>(p, b, h0, h1, j0, j1, qf, lim, acc, m, l, s);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTGEN_DECODE_X86 1
template <typename T>
__attribute__((target("avx2,fma"))) void attend_item_avx2(FASTGEN_DECODE_ITEM_ARGS) {
  attend_item_body<8, T>(p, b, h0, h1, j0, j1, qf, lim, acc, m, l, s);
}

template <typename T>
__attribute__((target("avx512f,fma"))) void attend_item_avx512(FASTGEN_DECODE_ITEM_ARGS) {
  attend_item_body<16, T>(p, b, h0, h1, j0, j1, qf, lim, acc, m, l, s);
}
#endif

template <typename T>
ItemFn<T> pick_kernel() {
#ifdef FASTGEN_DECODE_X86
  switch (cpu::selected_isa()) {
    case cpu::Isa::kAvx512:
      return &attend_item_avx512<T>;
    case cpu::Isa::kAvx2:
      return &attend_item_avx2<T>;
    default:
      break;
  }
#endif
  return &attend_item_base<T>;
}

struct Item {
  int64_t b, h0, h1, j0, j1;
  int64_t group;   // index of the (b, head block) pair
  int64_t first;   // its first item
  int64_t splits;  // its items
};

template <typename T>
void run(const DecodeArgs& a) {
  const DecodeParams<T> p = make_params<T>(a);
  const int64_t R = p.Sq * p.G, D = p.D;
  if (p.B * p.Hkv == 0 || R == 0) return;
  const ItemFn<T> kernel = pick_kernel<T>();
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t HB = std::clamp<int64_t>(kMaxItemFloats / (R * D), 1, p.Hkv);  // heads per item
  const int64_t nhb = (p.Hkv + HB - 1) / HB;

  // key chunk per item: the requested split count per sequence, or the same length for every item so
  // that the static schedule of at::parallel_for gives each thread equal work (ragged lengths included)
  int64_t total = 0;
  for (int64_t b = 0; b < p.B; ++b) total += std::max<int64_t>(1, seq_len(p, b)) * nhb;
  const int64_t want = threads == 1 ? 1 : 4 * threads;
  int64_t chunk = std::clamp<int64_t>((total + want - 1) / want, kMinItemKeys, kItemKeys);
  chunk = (chunk + kTile - 1) / kTile * kTile;
  std::vector<Item> items;
  int64_t groups = 0;
  bool any_split = false;
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t len = seq_len(p, b);
    int64_t c = chunk;
    if (a.num_splits > 0) c = std::min(kItemKeys, std::max<int64_t>(1, (len + a.num_splits - 1) / a.num_splits));
    const int64_t ns = std::max<int64_t>(1, (len + c - 1) / c);
    any_split |= ns > 1;
    for (int64_t hb = 0; hb < nhb; ++hb, ++groups) {
      const int64_t first = static_cast<int64_t>(items.size());
      for (int64_t sp = 0; sp < ns; ++sp) {
        const int64_t j0 = std::min(len, sp * c), j1 = std::min(len, j0 + c);
        items.push_back({b, hb * HB, std::min(p.Hkv, (hb + 1) * HB), j0, j1, groups, first, ns});
      }
    }
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t slot = HB * R;  // partial rows per item

  at::Tensor ws_o, ws_lse;
  float* wo = nullptr;
  float* wl = nullptr;
  if (any_split) {
    const auto opts = a.q.options().dtype(at::kFloat);
    ws_o = at::empty({n_items * slot * D}, opts);
    ws_lse = at::empty({n_items * slot}, opts);
    wo = ws_o.data_ptr<float>();
    wl = ws_lse.data_ptr<float>();
  }
  const float scale = static_cast<float>(a.scale);

  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * slot * D + 2 * slot + kTile);
    float* qf = buf.data();
    float* acc = qf + slot * D;
    float* m = acc + slot * D;
    float* l = m + slot;
    float* s = l + slot;
    std::vector<int64_t> lim(R);
    int64_t q_group = -1;  // the (b, head block) whose queries are in qf
    for (int64_t idx = begin; idx < end; ++idx) {
      const Item& it = items[idx];
      const int64_t len = seq_len(p, it.b), nh = it.h1 - it.h0;
      if (it.group != q_group) {
        for (int64_t r = 0; r < R; ++r) lim[r] = row_limit(p, len, r / p.G);
        for (int64_t hh = 0; hh < nh; ++hh) {
          for (int64_t r = 0; r < R; ++r) {
            const int64_t i = r / p.G, g = r % p.G;
            const T* qr = p.q + it.b * p.q_s0 + i * p.q_s1 + ((it.h0 + hh) * p.G + g) * p.q_s2;
            float* dst = qf + (hh * R + r) * D;
            for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(qr[d]) * scale;
          }
        }
        q_group = it.group;
      }
      kernel(p, it.b, it.h0, it.h1, it.j0, it.j1, qf, lim.data(), acc, m, l, s);
      for (int64_t hh = 0; hh < nh; ++hh) {
        for (int64_t r = 0; r < R; ++r) {
          const int64_t row = hh * R + r;
          const float inv = l[row] == 0.f ? 0.f : 1.f / l[row];  // no visible key: zeros; NaN stays NaN
          const float* ar = acc + row * D;
          if (it.splits == 1) {
            const int64_t i = r / p.G, g = r % p.G;
            T* o = p.out + ((it.b * p.Sq + i) * p.Hq + (it.h0 + hh) * p.G + g) * D;
            for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(ar[d] * inv);
          } else {
            float* o = wo + (idx * slot + row) * D;
            for (int64_t d = 0; d < D; ++d) o[d] = ar[d] * inv;
            wl[idx * slot + row] = l[row] == 0.f ? -std::numeric_limits<float>::infinity()
                                                 : m[row] + std::log(l[row]);  // NaN sum: NaN
          }
        }
      }
    }
  });
  if (!any_split) return;

  // merge the splits of every (group, head, row): out = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M)
  std::vector<int64_t> group_item(groups);
  for (int64_t idx = n_items - 1; idx >= 0; --idx) group_item[items[idx].group] = idx;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, groups * slot, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> o(D);
    for (int64_t task = begin; task < end; ++task) {
      const Item& it = items[group_item[task / slot]];
      const int64_t row = task % slot, hh = row / R, r = row % R;
      if (it.splits == 1 || it.h0 + hh >= it.h1) continue;  // written directly / no such head
      const int64_t i = r / p.G, g = r % p.G;
      float mx = neg_inf;  // std::max skips a NaN lse; its weight below is NaN and reaches den and o
      for (int64_t sp = 0; sp < it.splits; ++sp) mx = std::max(mx, wl[(it.first + sp) * slot + row]);
      const float mu = mx == neg_inf ? 0.f : mx;
      std::fill(o.begin(), o.end(), 0.f);
      float den = 0.f;
      for (int64_t sp = 0; sp < it.splits; ++sp) {
        const float lse = wl[(it.first + sp) * slot + row];
        if (lse == neg_inf) continue;  // a split without visible keys (its partial is all zeros)
        const float w = std::exp(lse - mu);
        den += w;
        const float* src = wo + ((it.first + sp) * slot + row) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * src[d];
      }
      const float inv = den == 0.f ? 0.f : 1.f / den;
      T* dst = p.out + ((it.b * p.Sq + i) * p.Hq + (it.h0 + hh) * p.G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d] * inv);
    }
  });
}

#undef FASTGEN_DECODE_ITEM_ARGS
#undef FASTGEN_DECODE_INLINE
}  // namespace simd

#pragma GCC pop_options
#pragma GCC diagnostic pop

}  // namespace

void attention_decode_cpu_impl(const DecodeArgs& a) {
  AT_DISPATCH_SWITCH(a.q.scalar_type(), "fastgen::attention_decode_cpu",
                     AT_DISPATCH_CASE(at::ScalarType::Float, [&] { simd::run<scalar_t>(a); })
                     AT_DISPATCH_CASE(at::ScalarType::Double, [&] { run_generic<scalar_t>(a); })
                     AT_DISPATCH_CASE(at::ScalarType::Half, [&] { simd::run<scalar_t>(a); })
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, [&] { simd::run<scalar_t>(a); }));
}

}  // namespace decode
}  // namespace fastgen
