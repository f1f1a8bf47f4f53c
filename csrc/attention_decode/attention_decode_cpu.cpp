// KV-cache decoding attention, C++ CPU kernels (at::parallel_for over (batch, KV-head block, key split)).
//
// float32 / bfloat16 / float16 caches (the vectorised kernel, `simd` below). A work item is one key range
// [j0, j1) of one sequence b and a block of consecutive KV heads [h0, h1): all the heads of a key row
// when their query rows fit 32 KiB of accumulators, so that the item reads the cache in its own layout
// (in a (B, S, H, D) cache the heads of a key row are one run of H*D elements and the next row follows;
// a head-by-head walk would jump H*D elements per row, onto a new 4 KiB page every row for H*D*4 >= 4 KiB,
// where the hardware prefetchers stop). Each item handles every query row of its heads (the G query
// heads of the GQA group times the Sq new tokens: each K/V row is read once per group) and walks its keys
// in tiles of kTile rows: (1) the scores of every (key, query row) pair, the key rows in cache order and
// four dot products at a time; (2) each row's online softmax update (running max m, running sum l,
// accumulator rescale); (3) P @ V, the V rows in cache order. The rows kPrefetchRows ahead are
// software-prefetched into L2. The dot products and the D-wide axpy / scale loops are written once with
// GCC vector types and compiled three times: AVX-512F (16 floats), AVX2+FMA (8) and the x86-64 / portable
// baseline (4 floats, SSE2), picked at run time by cpu::selected_isa() (FASTGEN_CPU_ISA caps it). 16-bit
// K/V rows are converted to float in registers (bfloat16: a 16-bit shift; float16: exact bit arithmetic,
// subnormals, inf and NaN included). Accumulation is float32.
//
// Work split: the keys of each (sequence, head block) pair are cut into items of one common length
// (<= kItemKeys keys, so a float32 running sum stays accurate), about kItemsPerThread items per thread,
// so that ragged cache_seqlens still give every thread equal work (num_splits > 0 asks for that many
// splits per sequence instead). The calling thread and at::get_num_threads() - 1 helper tasks on ATen's
// inter-op pool take items from a shared counter; the caller waits (sleeping) only for helpers that took
// an item, never for one the OS has not started yet (an OpenMP region's closing barrier would, spinning
// on the core that helper needs: on a busy 2-core machine that made 2 threads slower than 1). Called
// inside an intra-op parallel region, the caller does all the items. Pairs with several items write
// (normalised out, log-sum-exp) partials; the thread that finishes a pair's last item merges them, in
// split order, so the result does not depend on the threads. A row without a visible key gets zeros; a
// NaN / inf among the visible keys, values or the query gives NaN, as the reference (exp(inf - inf),
// 0 * inf and NaN flow through the same steps).
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
#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
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
constexpr int64_t kItemsPerThread = 16;  // items handed out dynamically: a late thread delays one item
constexpr int64_t kPrefetchRows = 8;
constexpr int64_t kMaxItemFloats = 8192;  // heads of one item: their query rows x D accumulators <= 32 KiB
constexpr int64_t kMaxItemRows = 256;     // and at most this many rows (scores: rows x kTile floats)

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

// out[n] = q_n . k_n for N (q, k) pairs at once: N independent FMA chains over D.
template <int W, int N, typename T>
FASTGEN_DECODE_INLINE void dots(const float* const* q, const T* const* k, int64_t D, float* out) {
  using F = typename Vec<W>::f;
  F acc[N] = {};
  int64_t d = 0;
  for (; d + W <= D; d += W) {
#pragma GCC unroll 4
    for (int n = 0; n < N; ++n) acc[n] += load<W>(q[n] + d) * load<W>(k[n] + d);
  }
#pragma GCC unroll 4
  for (int n = 0; n < N; ++n) {
    float r = hsum<W>(acc[n]);
    for (int64_t e = d; e < D; ++e) r += q[n][e] * to_float(k[n][e]);
    out[n] = r;
  }
}

// a[d] *= c
template <int W>
FASTGEN_DECODE_INLINE void scale_row(float* __restrict__ a, float c, int64_t D) {
  using F = typename Vec<W>::f;
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    const F x = load<W>(a + d) * c;
    std::memcpy(a + d, &x, sizeof(F));
  }
  for (; d < D; ++d) a[d] *= c;
}

// a[d] += p v[d]
template <int W, typename T>
FASTGEN_DECODE_INLINE void axpy(float* __restrict__ a, float p, const T* __restrict__ v, int64_t D) {
  using F = typename Vec<W>::f;
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    const F x0 = load<W>(a + d) + p * load<W>(v + d);
    const F x1 = load<W>(a + d + W) + p * load<W>(v + d + W);
    std::memcpy(a + d, &x0, sizeof(F));
    std::memcpy(a + d + W, &x1, sizeof(F));
  }
  for (; d + W <= D; d += W) {
    const F x = load<W>(a + d) + p * load<W>(v + d);
    std::memcpy(a + d, &x, sizeof(F));
  }
  for (; d < D; ++d) a[d] += p * to_float(v[d]);
}

// Software prefetch of [p, p + bytes) into L2 (prefetcht1): the rows kPrefetchRows ahead of the one being
// read. Measured on a 2-core AVX-512 EPYC: 8 rows ahead into L2 beats none, 1-4 rows, and L1 (prefetcht0).
inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

// One work item: keys [j0, j1) of sequence b, KV heads [h0, h1). Its X = (h1 - h0) * R rows x = (h - h0) * R
// + r (r = token * G + g) have their scaled queries in qf (X x D) and see lim[r] keys. Leaves the
// unnormalised accumulators in acc (X x D), the running max in m and the running sum in l (X each); s holds
// X x kTile scores, nv X counts.
//
// The keys are walked in tiles of kTile rows, each tile in the cache's own order: phase 1 takes the rows
// one after the other and, within a row, the heads in order (contiguous when the heads of a row are), and
// computes every (key, row) score, four at a time; phase 2 updates each row's online softmax over the tile
// (exactly the reference's steps: scores of invisible keys are never used) and rescales its accumulator;
// phase 3 walks the V rows in the same order and adds p * v to every row that sees the key.
template <int W, typename T>
FASTGEN_DECODE_INLINE void attend_item_body(const DecodeParams<T>& p, int64_t b, int64_t h0, int64_t h1,
                                            int64_t j0, int64_t j1, const float* qf, const int64_t* lim,
                                            float* acc, float* m, float* l, float* s, int64_t* nv) {
  const int64_t R = p.Sq * p.G, D = p.D, X = (h1 - h0) * R;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t x = 0; x < X; ++x) {
    m[x] = neg_inf;
    l[x] = 0.f;
  }
  std::fill(acc, acc + X * D, 0.f);
  int64_t jmax = 0;
  for (int64_t r = 0; r < R; ++r) jmax = std::max(jmax, lim[r]);
  j1 = std::min(j1, jmax);
  // bytes of a key row that the item reads: heads h0..h1-1 (one run when the heads are contiguous)
  const int64_t k_span = ((h1 - h0 - 1) * p.k_s2 + D) * static_cast<int64_t>(sizeof(T));
  const int64_t v_span = ((h1 - h0 - 1) * p.v_s2 + D) * static_cast<int64_t>(sizeof(T));
  const float* qs[4];
  const T* ks[4];
  float sc[4];
  for (int64_t jb = j0; jb < j1; jb += kTile) {
    const int64_t nk = std::min(kTile, j1 - jb);
    // phase 1: scores, rows in cache order
    for (int64_t t = 0; t < nk; ++t) {
      const T* krow = p.k + key_offset(p, b, jb + t, p.k_s0, p.k_s1) + h0 * p.k_s2;
      if (jb + t + kPrefetchRows < j1)
        prefetch_l2(p.k + key_offset(p, b, jb + t + kPrefetchRows, p.k_s0, p.k_s1) + h0 * p.k_s2, k_span);
      int64_t x = 0;
      for (; x + 4 <= X; x += 4) {
#pragma GCC unroll 4
        for (int n = 0; n < 4; ++n) {
          qs[n] = qf + (x + n) * D;
          ks[n] = krow + ((x + n) / R) * p.k_s2;
        }
        dots<W, 4, T>(qs, ks, D, sc);
#pragma GCC unroll 4
        for (int n = 0; n < 4; ++n) s[(x + n) * kTile + t] = sc[n];
      }
      for (; x < X; ++x) {
        qs[0] = qf + x * D;
        ks[0] = krow + (x / R) * p.k_s2;
        dots<W, 1, T>(qs, ks, D, sc);
        s[x * kTile + t] = sc[0];
      }
    }
    // phase 2: online softmax of every row over the keys of the tile it sees
    for (int64_t x = 0; x < X; ++x) {
      const int64_t n = std::clamp<int64_t>(lim[x % R] - jb, 0, nk);
      nv[x] = n;
      if (n == 0) continue;
      float* sx = s + x * kTile;
      float mx = m[x];  // a NaN score is skipped here; exp(NaN - mu) below carries it into l
      for (int64_t t = 0; t < n; ++t) mx = sx[t] > mx ? sx[t] : mx;
      // every score so far -inf: exponentiate against 0 (exp(-inf - -inf) would be NaN), as the reference
      const float mu = mx == neg_inf ? 0.f : mx;
      const float corr = std::exp(m[x] - mu);  // exp(-inf) = 0 on the first tile
      float sum = 0.f;
      for (int64_t t = 0; t < n; ++t) {
        sx[t] = std::exp(sx[t] - mu);
        sum += sx[t];
      }
      l[x] = l[x] * corr + sum;
      m[x] = mx;
      scale_row<W>(acc + x * D, corr, D);
    }
    // phase 3: P @ V, rows in cache order
    for (int64_t t = 0; t < nk; ++t) {
      const T* vrow = p.v + key_offset(p, b, jb + t, p.v_s0, p.v_s1) + h0 * p.v_s2;
      if (jb + t + kPrefetchRows < j1)
        prefetch_l2(p.v + key_offset(p, b, jb + t + kPrefetchRows, p.v_s0, p.v_s1) + h0 * p.v_s2, v_span);
      for (int64_t x = 0; x < X; ++x) {
        if (t < nv[x]) axpy<W, T>(acc + x * D, s[x * kTile + t], vrow + (x / R) * p.v_s2, D);
      }
    }
  }
}

template <typename T>
using ItemFn = void (*)(const DecodeParams<T>&, int64_t, int64_t, int64_t, int64_t, int64_t, const float*,
                        const int64_t*, float*, float*, float*, float*, int64_t*);

#define FASTGEN_DECODE_ITEM_ARGS                                                                             \
  const DecodeParams<T>&p, int64_t b, int64_t h0, int64_t h1, int64_t j0, int64_t j1, const float* qf,    \
      const int64_t* lim, float* acc, float* m, float* l, float* s, int64_t* nv

template <typename T>
void attend_item_base(FASTGEN_DECODE_ITEM_ARGS) {
  attend_item_body<4, T>(p, b, h0, h1, j0, j1, qf, lim, acc, m, l, s, nv);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTGEN_DECODE_X86 1
template <typename T>
__attribute__((target("avx2,fma"))) void attend_item_avx2(FASTGEN_DECODE_ITEM_ARGS) {
  attend_item_body<8, T>(p, b, h0, h1, j0, j1, qf, lim, acc, m, l, s, nv);
}

template <typename T>
__attribute__((target("avx512f,fma"))) void attend_item_avx512(FASTGEN_DECODE_ITEM_ARGS) {
  attend_item_body<16, T>(p, b, h0, h1, j0, j1, qf, lim, acc, m, l, s, nv);
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
  const int64_t HB = std::clamp<int64_t>(std::min(kMaxItemFloats / (R * D), kMaxItemRows / R), 1, p.Hkv);
  const int64_t nhb = (p.Hkv + HB - 1) / HB;

  // key chunk per item: the requested split count per sequence, or the same length for every item so
  // that the static schedule of at::parallel_for gives each thread equal work (ragged lengths included)
  int64_t total = 0;
  for (int64_t b = 0; b < p.B; ++b) total += std::max<int64_t>(1, seq_len(p, b)) * nhb;
  const int64_t want = threads == 1 ? 1 : kItemsPerThread * threads;
  int64_t chunk = std::clamp<int64_t>((total + want - 1) / want, kMinItemKeys, kItemKeys);
  chunk = (chunk + kTile - 1) / kTile * kTile;
  std::vector<Item> items;
  int64_t groups = 0;
  bool any_split = false;
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t len = seq_len(p, b);
    int64_t c = chunk;  // num_splits > 0: that many splits of this sequence (items stay <= kItemKeys)
    if (a.num_splits > 0) c = std::clamp<int64_t>((len + a.num_splits - 1) / a.num_splits, 1, kItemKeys);
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

  const float neg_inf = -std::numeric_limits<float>::infinity();
  // out rows of the (b, head block) pair of item `it` from its splits' (normalised out, lse) partials:
  // out = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M)
  auto merge = [&](const Item& it, float* o) {
    for (int64_t row = 0; row < (it.h1 - it.h0) * R; ++row) {
      const int64_t hh = row / R, r = row % R, i = r / p.G, g = r % p.G;
      float mx = neg_inf;  // std::max skips a NaN lse; its weight below is NaN and reaches den and o
      for (int64_t sp = 0; sp < it.splits; ++sp) mx = std::max(mx, wl[(it.first + sp) * slot + row]);
      const float mu = mx == neg_inf ? 0.f : mx;
      std::fill(o, o + D, 0.f);
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
  };

  // Work sharing without a barrier. The calling thread and up to threads - 1 helpers (tasks on ATen's
  // inter-op pool) take items from a shared counter; the caller then sleeps until the helpers that did
  // take an item are done, and never waits for a helper that has not started (on a busy machine the OS
  // may run it milliseconds late; an OpenMP region's closing barrier would wait for it, spinning on the
  // core it needs). A helper that starts after the last item was taken returns without touching anything
  // but the shared state. The thread finishing the last split of a (b, head block) pair merges that
  // pair's partials right away, so the result does not depend on which thread ran what.
  std::vector<std::atomic<int64_t>> pending(groups);
  for (const Item& it : items) pending[it.group].store(it.splits, std::memory_order_relaxed);
  struct Sharing {
    std::mutex mu;
    std::condition_variable done;
    int64_t next = 0, n = 0, active = 0;
    std::function<void(int64_t)> work;  // runs items from a claimed one on; refers to this frame
    bool claim(int64_t& idx) {
      std::lock_guard<std::mutex> lock(mu);
      if (next >= n) return false;
      idx = next++;
      return true;
    }
  };
  auto sh = std::make_shared<Sharing>();
  sh->n = n_items;
  sh->work = [&, sh_raw = sh.get()](int64_t first) {
    std::vector<float> buf(2 * slot * D + 2 * slot + slot * kTile + D);
    std::vector<int64_t> nv(slot);
    float* qf = buf.data();
    float* acc = qf + slot * D;
    float* m = acc + slot * D;
    float* l = m + slot;
    float* s = l + slot;
    float* merged = s + slot * kTile;
    std::vector<int64_t> lim(R);
    int64_t q_group = -1;  // the (b, head block) whose queries are in qf
    for (int64_t idx = first; idx >= 0; idx = sh_raw->claim(idx) ? idx : -1) {
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
      kernel(p, it.b, it.h0, it.h1, it.j0, it.j1, qf, lim.data(), acc, m, l, s, nv.data());
      for (int64_t row = 0; row < nh * R; ++row) {
        const float inv = l[row] == 0.f ? 0.f : 1.f / l[row];  // no visible key: zeros; NaN stays NaN
        const float* ar = acc + row * D;
        if (it.splits == 1) {
          const int64_t hh = row / R, r = row % R, i = r / p.G, g = r % p.G;
          T* o = p.out + ((it.b * p.Sq + i) * p.Hq + (it.h0 + hh) * p.G + g) * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(ar[d] * inv);
        } else {
          float* o = wo + (idx * slot + row) * D;
          for (int64_t d = 0; d < D; ++d) o[d] = ar[d] * inv;
          // log-sum-exp of the split: -inf without a visible key, NaN for a NaN sum (a NaN / inf input),
          // so that the merge propagates it rather than dropping the split as empty
          wl[idx * slot + row] = l[row] == 0.f ? neg_inf : m[row] + std::log(l[row]);
        }
      }
      // acq_rel: the last split's thread sees every other split's partials
      if (it.splits > 1 && pending[it.group].fetch_sub(1, std::memory_order_acq_rel) == 1) merge(it, merged);
    }
  };
  const bool nested = at::in_parallel_region();
  const int64_t helpers = nested ? 0 : std::min(threads, n_items) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    at::launch([sh] {
      {
        std::lock_guard<std::mutex> lock(sh->mu);
        if (sh->next >= sh->n) return;  // every item taken: the caller may have returned already
        ++sh->active;
      }
      int64_t first;
      if (sh->claim(first)) sh->work(first);
      std::lock_guard<std::mutex> lock(sh->mu);
      if (--sh->active == 0) sh->done.notify_all();
    });
  }
  int64_t first;
  if (sh->claim(first)) sh->work(first);
  std::unique_lock<std::mutex> lock(sh->mu);
  sh->done.wait(lock, [&] { return sh->active == 0; });
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
