// Nearest-codebook lookup: argument checks shared by the CPU and CUDA entry points, and the CPU kernel.
//
// CPU kernel: a blocked candidate scan on BLAS. One task = RB rows of one head (at::parallel_for over
// tasks; a BLAS call inside the parallel region runs on its own thread). A task walks the codebook in
// blocks of KB codes; each (RB x KB) tile of dot products x.c comes from one sgemm (dgemm for float64)
// into a thread-local buffer that stays in L2, and an epilogue folds the tile into per-row state while it
// is hot. With the AVX-512 kernels (float32 compute) the BLAS is replaced by fastgen's own register-blocked
// kernel (12 rows x 32 codes per tile, the codebook packed once per call in 32-code panels): exact mode
// writes its tiles with it, fast mode folds the keys into the lanes straight from the registers (no tile).
// The epilogue ranks codes by the key
//     l2: ||c||^2 - 2 x.c        cosine (unit vectors): -x.c
// (||x||^2 is the same for every code of a row, so it is left out of the ranking: one rounding fewer, and
// 2 x.c is exact, so the key is one correctly rounded subtraction on every path, FMA or not).
// Fast mode keeps a running (min, argmin) per row in kLanes lanes (lane l sees the codes k = l mod
// kLanes in ascending order, a strict "<": each lane keeps its lowest index on ties), reduced at the end
// (the lowest index among the lanes holding the minimum): the argmin with ties -> the lowest index, the
// same result whatever the lane width. dist = max(0, ||x||^2 + key) (cosine: 1 + key, clamped to [0, 2]).
// Exact mode keeps each row's best kRerank (key, index) candidates, ties by lower index: per tile row, a
// first pass writes the keys and the min of each lane, from which a bound (group_bound) admits only a few
// codes to the second pass's sorted insertion (branch-free: the insertions of a row's first block are
// too irregular to predict). Then it re-ranks the candidates by the direct form from the original values
// (l2 sum((x - c)^2), cosine 1 - x.c) in the accumulation type and returns the lowest-index minimum and
// its direct distance. The direct sums use 16 partial sums (coordinate d goes to partial d mod 16) added
// in a fixed tree, so every SIMD path (and the portable one) gives the same bits: FMA contraction is off
// for this file (the pragma below; GCC would contract a * b + c under target("avx2,fma") otherwise).
//
// NaN / inf: the SIMD epilogues use ordered compares, right only when no key is NaN. A row whose ||x||^2
// is not finite, or a head with a non-finite code value or ||c||^2, takes the portable epilogue instead,
// whose `better` ranks a NaN first (torch.argmin's rule: the first NaN wins). Finite x and c with finite
// norms give no NaN key (|x.c| <= |x| |c|; an overflow gives +-inf, which orders).
//
// SIMD paths (cpu::selected_isa(), FASTGEN_CPU_ISA): AVX-512F / AVX2 intrinsics for the float32 epilogues
// and the re-rank, portable loops otherwise (and for float64). The BLAS picks its own instructions; the
// candidate re-rank makes exact mode independent of how it rounds. 16-bit inputs are converted to
// float32 (the codebook once, the rows per task: exact conversions). Extra memory: a float32 copy of a
// 16-bit codebook, with AVX-512 a packed float32 copy of the codebook, O(H K) norms, per thread
// RB x (D + KB + kLanes) values (kept across calls, ~1 MB), and when rows are too few to give every
// thread a task, splits x H x N partial results: never N x K.
//
// Measured (AMD EPYC Zen 4, 1 thread, float32, interleaved medians of the public call's thread CPU time
// against faiss-cpu 1.15.1 IndexFlatL2 on the same data, a shared machine at load ~5): with the BLAS tiles
// (MKL) N x K x D = 2048 x 512 x 64: fast 0.98x faiss, exact 0.96x; 4096 x 1024 x 256: 0.99x / 0.96x;
// 4096 x 8192 x 256: 0.94x / 0.92x; MKL's sgemm alone runs at ~0.9x the speed of faiss's OpenBLAS one on
// this CPU. With the own kernel: 1.18x / 1.05x; 1.11x / 1.05x; 1.12x / 1.08x. 1.4-1.9x cdist + argmin,
// 1.4-2.7x the expanded mm.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTGEN_VQ_X86 1
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "vq/vq.h"

// The Fortran BLAS that torch links (MKL, OpenBLAS; LP64, as torch's own CPUBlas declares them). Weak: a
// torch build that does not export them leaves these null and the kernel calls at::mm_out instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace fastgen {
namespace vq {
namespace {

constexpr int kLanes = 32;   // fast mode: running (min, argmin) lanes per row; code blocks are multiples
constexpr int kRerank = 4;   // exact mode: candidates per row kept by the scan (RERANK in fastgen/ops/vq.py)
constexpr int kParts = 16;   // partial sums of the direct forms (coordinate d -> partial d mod 16)
constexpr int64_t kOwnMinRows = 64;  // rows a head from which the AVX-512 kernels pack the codebook

// out[r * ldo + j] = sum_d xs[r * D + d] * cs[j * D + d] for r < rows, j < kb (row-major out; BLAS is
// column-major, so this is out^T = cs^T' * xs with cs transposed).
template <typename acc_t>
void tile_dots(const acc_t* xs, int64_t rows, const acc_t* cs, int64_t kb, int64_t D, acc_t* out, int64_t ldo) {
  const int m = static_cast<int>(kb), n = static_cast<int>(rows), k = static_cast<int>(D);
  const int ld = static_cast<int>(D), ldc = static_cast<int>(ldo);
  const acc_t one = 1, zero = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (sgemm_ != nullptr) {
      sgemm_("T", "N", &m, &n, &k, &one, cs, &ld, xs, &ld, &zero, out, &ldc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_("T", "N", &m, &n, &k, &one, cs, &ld, xs, &ld, &zero, out, &ldc);
      return;
    }
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor o = at::from_blob(out, {rows, kb}, {ldo, 1}, opts);
  at::mm_out(o, at::from_blob(const_cast<acc_t*>(xs), {rows, D}, opts),
             at::from_blob(const_cast<acc_t*>(cs), {kb, D}, opts).t());
}

template <typename acc_t>
inline bool better(acc_t d, acc_t best) {  // codes arrive in ascending order: "<" keeps the lowest on ties
  return d < best || (std::isnan(d) && !std::isnan(best));
}

// Exact mode: insert (dd, code) into a row's candidate list cd / ci (kRerank slots, best first by
// `better`, empty slots (index -1) last). Codes arrive in ascending order, so an equal distance never
// displaces a kept one: ties keep the lowest index.
template <typename acc_t>
inline void insert_candidate(acc_t* cd, int64_t* ci, acc_t dd, int64_t code) {
  if (ci[kRerank - 1] >= 0 && !better(dd, cd[kRerank - 1])) return;
  int pos = kRerank - 1;
  while (pos > 0 && (ci[pos - 1] < 0 || better(dd, cd[pos - 1]))) {
    cd[pos] = cd[pos - 1];
    ci[pos] = ci[pos - 1];
    --pos;
  }
  cd[pos] = dd;
  ci[pos] = code;
}

// insert_candidate for keys that are never NaN, without data-dependent branches (the insertions of a row's
// first blocks are too irregular to predict): the position is the number of kept candidates with a key
// <= dd (they all have lower indices), and the tail shifts by one with selects.
template <typename acc_t>
inline void insert_ordered(acc_t* cd, int64_t* ci, acc_t dd, int64_t code) {
  int pos = 0;
  for (int i = 0; i < kRerank; ++i) pos += (ci[i] >= 0) & (cd[i] <= dd);
  if (pos == kRerank) return;
  for (int i = kRerank - 1; i > 0; --i) {
    const bool up = i > pos;
    cd[i] = up ? cd[i - 1] : cd[i];
    ci[i] = up ? ci[i - 1] : ci[i];
  }
  cd[pos] = dd;
  ci[pos] = code;
}

// Adds the kParts partial sums p in a fixed tree (tree16 does the same additions in registers).
template <typename acc_t>
inline acc_t tree_sum(acc_t* p) {
  for (int w = kParts / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) p[l] += p[l + w];
  }
  return p[0];
}

// sum_d x[d]^2 in the partial-sum order (||x||^2 of a row: the fast mode's dist and the finiteness test).
template <typename acc_t>
acc_t sumsq(const acc_t* x, int64_t D) {
  acc_t p[kParts] = {};
  int64_t d0 = 0;
  for (; d0 + kParts <= D; d0 += kParts) {
    for (int l = 0; l < kParts; ++l) p[l] += x[d0 + l] * x[d0 + l];
  }
  for (int l = 0; d0 + l < D; ++l) p[l] += x[d0 + l] * x[d0 + l];
  return tree_sum(p);
}

// ---- portable epilogues (any acc_t; every row the SIMD ones may not take) -------------------------------

// Fast mode: fold n keys (n a multiple of kLanes; padded codes have key +inf) into the lanes lb / li.
template <typename acc_t>
void scan_min_generic(const acc_t* dots, const acc_t* cn, int64_t n, acc_t scale, int32_t k0, acc_t* lb,
                      int32_t* li) {
  for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t key = cn[j0 + l] - scale * dots[j0 + l];
      if (better(key, lb[l])) {
        lb[l] = key;
        li[l] = k0 + static_cast<int32_t>(j0 + l);
      }
    }
  }
}

// scan_min_generic for keys that are never NaN: branch-free selects, which the compiler vectorizes.
template <typename acc_t>
void scan_min_ordered(const acc_t* __restrict__ dots, const acc_t* __restrict__ cn, int64_t n, acc_t scale,
                      int32_t k0, acc_t* __restrict__ lb, int32_t* __restrict__ li) {
  acc_t b[kLanes];
  int32_t bi[kLanes];
  std::copy_n(lb, kLanes, b);
  std::copy_n(li, kLanes, bi);
  for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t key = cn[j0 + l] - scale * dots[j0 + l];
      const int32_t lt = -static_cast<int32_t>(key < b[l]);  // all ones where key wins (written as masks:
      bi[l] = (bi[l] & ~lt) | ((k0 + static_cast<int32_t>(j0) + l) & lt);  // GCC vectorizes these, not ?:)
      b[l] = std::min(b[l], key);
    }
  }
  std::copy_n(b, kLanes, lb);
  std::copy_n(bi, kLanes, li);
}

// Exact mode: insert the n keys (the real codes only) into the candidate list.
template <typename acc_t>
void scan_topr_generic(const acc_t* dots, const acc_t* cn, int64_t n, acc_t scale, int32_t k0, acc_t* cd,
                       int64_t* ci) {
  bool open = ci[kRerank - 1] < 0;  // an empty slot admits anything (a NaN too, which `better` ranks first)
  acc_t worst = cd[kRerank - 1];
  for (int64_t j = 0; j < n; ++j) {
    const acc_t key = cn[j] - scale * dots[j];
    if (open || better(key, worst)) {
      insert_candidate(cd, ci, key, k0 + j);
      open = ci[kRerank - 1] < 0;
      worst = cd[kRerank - 1];
    }
  }
}

// Direct-form distances of row x to the nc <= kRerank codes c[s]: l2 sum((x - c)^2), cosine 1 - x.c.
template <typename acc_t>
void direct_generic(const acc_t* x, const acc_t* const* c, int nc, int64_t D, bool cosine, acc_t* out) {
  for (int s = 0; s < nc; ++s) {
    acc_t p[kParts] = {};
    const acc_t* cs = c[s];
    int64_t d0 = 0;
    for (; d0 + kParts <= D; d0 += kParts) {  // whole chunks: a loop over the partials, which vectorizes
      for (int l = 0; l < kParts; ++l) {
        const acc_t df = x[d0 + l] - cs[d0 + l];
        p[l] += cosine ? x[d0 + l] * cs[d0 + l] : df * df;
      }
    }
    for (int l = 0; d0 + l < D; ++l) {
      const acc_t df = x[d0 + l] - cs[d0 + l];
      p[l] += cosine ? x[d0 + l] * cs[d0 + l] : df * df;
    }
    const acc_t t = tree_sum(p);
    out[s] = cosine ? acc_t(1) - t : t;
  }
}

// A bound on the kRerank-th smallest key of a block from its kLanes lane minima: the largest of the minima
// of kRerank disjoint lane groups (lane l in group l mod kRerank) is at or above kRerank distinct codes'
// keys. Looser than the kRerank-th smallest lane min, but a few vector mins instead of a sorting network.
template <typename acc_t>
inline acc_t group_bound(const acc_t* m) {
  acc_t g[kRerank];
  for (int i = 0; i < kRerank; ++i) g[i] = m[i];
  for (int l = kRerank; l < kLanes; ++l) g[l % kRerank] = std::min(g[l % kRerank], m[l]);
  acc_t t = g[0];
  for (int i = 1; i < kRerank; ++i) t = std::max(t, g[i]);
  return t;
}

// Exact mode, rows without NaN keys: the same list as scan_topr_generic's in two cheap passes. Pass 1
// writes the keys over the dots (n padded to whole lanes, padding +inf) and takes the min of each of
// kLanes lanes; group_bound of those bounds the block's kRerank-th smallest key, so pass 2 offers
// insert_candidate only the (few) real codes at or under it (and under the list's worst), in ascending order.
template <typename acc_t>
void scan_topr_clean_generic(acc_t* dots, const acc_t* cn, int64_t n, int64_t kb, acc_t scale, int32_t k0,
                             acc_t* cd, int64_t* ci, int32_t*) {
  acc_t m[kLanes];
  for (int l = 0; l < kLanes; ++l) m[l] = std::numeric_limits<acc_t>::infinity();
  for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t key = cn[j0 + l] - scale * dots[j0 + l];
      dots[j0 + l] = key;
      m[l] = std::min(m[l], key);
    }
  }
  const acc_t t = std::min(group_bound(m), cd[kRerank - 1]);  // an open list's last slot is +inf
  for (int64_t j = 0; j < kb; ++j) {
    if (dots[j] <= t) insert_ordered(cd, ci, dots[j], int64_t{k0} + j);
  }
}

// Fast mode: the lanes' (min, argmin) -> the row's, ties -> the lowest index (NaN-aware: the first NaN).
template <typename acc_t>
void finish_min_generic(const acc_t* lb, const int32_t* li, acc_t* best, int64_t* bi) {
  acc_t b = lb[0];
  int64_t i = li[0];
  for (int s = 1; s < kLanes; ++s) {
    if (better(lb[s], b) || (li[s] < i && (lb[s] == b || (std::isnan(lb[s]) && std::isnan(b))))) {
      b = lb[s];
      i = li[s];
    }
  }
  *best = b;
  *bi = i;
}

template <typename acc_t>
struct Epilogue {
  void (*scan_min)(const acc_t*, const acc_t*, int64_t, acc_t, int32_t, acc_t*, int32_t*);
  // the last argument: scratch for kb + 16 code offsets
  void (*scan_topr)(acc_t*, const acc_t*, int64_t, int64_t, acc_t, int32_t, acc_t*, int64_t*, int32_t*);
  void (*direct)(const acc_t*, const acc_t* const*, int, int64_t, bool, acc_t*);
  void (*finish_min)(const acc_t*, const int32_t*, acc_t*, int64_t*);
  // fast mode from packed code panels (rows, D, panels, panel count, key offsets, scale, k0, lanes), or null
  void (*fused_min)(const acc_t*, int64_t, int64_t, const acc_t*, int64_t, const acc_t*, acc_t, int32_t, acc_t*,
                    int32_t*) = nullptr;
  // the dots of rows x panels into a row-major tile (rows, D, panels, panel count, out, ldo), or null
  void (*fused_dots)(const acc_t*, int64_t, int64_t, const acc_t*, int64_t, acc_t*, int64_t) = nullptr;
};

#ifdef FASTGEN_VQ_X86
// tree_sum of the 16 partials lo (0..7), hi (8..15) in registers: the same additions in the same order.
__attribute__((target("avx2"))) inline float tree16(__m256 lo, __m256 hi) {
  const __m256 v8 = _mm256_add_ps(lo, hi);
  const __m128 v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
  const __m128 v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
  return _mm_cvtss_f32(_mm_add_ss(v2, _mm_shuffle_ps(v2, v2, 1)));
}

// The smallest of the 4 group minima g: the block's smallest key.
__attribute__((target("avx2"))) inline float block_min(__m128 g) {
  const __m128 g2 = _mm_min_ps(g, _mm_movehl_ps(g, g));
  return _mm_cvtss_f32(_mm_min_ss(g2, _mm_shuffle_ps(g2, g2, 1)));
}

// insert_ordered on a candidate list held in registers (keys d, indices i, `filled`: all-ones in kept
// slots), with no memory round trip between the insertions of one tile row: slots with a key <= dd stay
// (a prefix), dd goes right after them, the rest shift up by one (the last one drops).
__attribute__((target("avx2"))) inline void insert_reg(__m128& d, __m256i& i, __m128& filled, float dd,
                                                        int64_t code) {
  const __m128 kv = _mm_set1_ps(dd);
  const __m128 keep = _mm_and_ps(_mm_cmple_ps(d, kv), filled);
  const __m128i first = _mm_setr_epi32(-1, 0, 0, 0);
  const __m128 keep_prev = _mm_castsi128_ps(_mm_or_si128(_mm_slli_si128(_mm_castps_si128(keep), 4), first));
  const __m128 shifted = _mm_castsi128_ps(_mm_slli_si128(_mm_castps_si128(d), 4));
  d = _mm_blendv_ps(_mm_blendv_ps(shifted, kv, keep_prev), d, keep);
  const __m256i keep64 = _mm256_cvtepi32_epi64(_mm_castps_si128(keep));
  const __m256i prev64 = _mm256_cvtepi32_epi64(_mm_castps_si128(keep_prev));
  const __m256i ishift = _mm256_permute4x64_epi64(i, _MM_SHUFFLE(2, 1, 0, 0));
  i = _mm256_blendv_epi8(_mm256_blendv_epi8(ishift, _mm256_set1_epi64x(code), prev64), i, keep64);
  filled = _mm_castsi128_ps(_mm_or_si128(_mm_slli_si128(_mm_castps_si128(filled), 4), first));
}

__attribute__((target("avx2"))) inline void insert_hits(float* cd, int64_t* ci, const float* keys,
                                                         const int32_t* hits, int nh, int32_t k0) {
  if (nh == 0) return;
  __m128 d = _mm_loadu_ps(cd);
  __m256i i = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ci));
  __m128 filled = _mm_castsi128_ps(_mm_setr_epi32(-(ci[0] >= 0), -(ci[1] >= 0), -(ci[2] >= 0), -(ci[3] >= 0)));
  for (int h = 0; h < nh; ++h) insert_reg(d, i, filled, keys[hits[h]], int64_t{k0} + hits[h]);
  _mm_storeu_ps(cd, d);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(ci), i);
}

// GCC 12 flags the undefined pass-through operand of its own _mm512_min_ps / _mm512_min_epi32 wrappers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// ---- AVX-512F (float32, rows whose keys are all ordered) -------------------------------------------------

__attribute__((target("avx512f"))) void scan_min_avx512(const float* dots, const float* cn, int64_t n, float scale,
                                                         int32_t k0, float* lb, int32_t* li) {
  __m512 b0 = _mm512_loadu_ps(lb), b1 = _mm512_loadu_ps(lb + 16);
  __m512i i0 = _mm512_loadu_si512(li), i1 = _mm512_loadu_si512(li + 16);
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(k0),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i c1 = _mm512_add_epi32(c0, _mm512_set1_epi32(16));
  const __m512i step = _mm512_set1_epi32(kLanes);
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < n; j += kLanes) {
    const __m512 k_0 = _mm512_sub_ps(_mm512_loadu_ps(cn + j), _mm512_mul_ps(s, _mm512_loadu_ps(dots + j)));
    const __m512 k_1 =
        _mm512_sub_ps(_mm512_loadu_ps(cn + j + 16), _mm512_mul_ps(s, _mm512_loadu_ps(dots + j + 16)));
    const __mmask16 m0 = _mm512_cmp_ps_mask(k_0, b0, _CMP_LT_OQ), m1 = _mm512_cmp_ps_mask(k_1, b1, _CMP_LT_OQ);
    b0 = _mm512_mask_mov_ps(b0, m0, k_0);
    b1 = _mm512_mask_mov_ps(b1, m1, k_1);
    i0 = _mm512_mask_mov_epi32(i0, m0, c0);
    i1 = _mm512_mask_mov_epi32(i1, m1, c1);
    c0 = _mm512_add_epi32(c0, step);
    c1 = _mm512_add_epi32(c1, step);
  }
  _mm512_storeu_ps(lb, b0);
  _mm512_storeu_ps(lb + 16, b1);
  _mm512_storeu_si512(li, i0);
  _mm512_storeu_si512(li + 16, i1);
}

// scan_topr_clean_generic's two passes (the same list).
__attribute__((target("avx512f"))) void scan_topr_avx512(float* dots, const float* cn, int64_t n, int64_t kb,
                                                          float scale, int32_t k0, float* cd, int64_t* ci,
                                                          int32_t* hits) {
  const __m512 s = _mm512_set1_ps(scale);
  __m512 m0 = _mm512_set1_ps(std::numeric_limits<float>::infinity()), m1 = m0;
  for (int64_t j = 0; j < n; j += kLanes) {
    const __m512 k_0 = _mm512_sub_ps(_mm512_loadu_ps(cn + j), _mm512_mul_ps(s, _mm512_loadu_ps(dots + j)));
    const __m512 k_1 =
        _mm512_sub_ps(_mm512_loadu_ps(cn + j + 16), _mm512_mul_ps(s, _mm512_loadu_ps(dots + j + 16)));
    _mm512_storeu_ps(dots + j, k_0);
    _mm512_storeu_ps(dots + j + 16, k_1);
    m0 = _mm512_min_ps(m0, k_0);
    m1 = _mm512_min_ps(m1, k_1);
  }
  // group_bound: lanes l mod 4 of the 32 are the 4 lanes of the 128-bit min of the quarters
  const __m512 m16 = _mm512_min_ps(m0, m1);
  const __m256 m8 = _mm256_min_ps(_mm512_castps512_ps256(m16),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(m16), 1)));
  const __m128 g = _mm_min_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  const __m128 g2 = _mm_max_ps(g, _mm_movehl_ps(g, g));
  const float bound = _mm_cvtss_f32(_mm_max_ss(g2, _mm_shuffle_ps(g2, g2, 1)));
  const float tf = std::min(bound, cd[kRerank - 1]);
  if (block_min(g) > tf) return;  // nothing in this block can enter the list (most blocks of a large K)
  const __m512 t = _mm512_set1_ps(tf);
  // The hits' offsets are compressed into `hits` without a branch per vector (a data-dependent branch
  // there mispredicts on most rows of the first block), then inserted in order.
  __m512i jv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i sixteen = _mm512_set1_epi32(16);
  int nh = 0;
  for (int64_t j = 0; j < kb; j += 16) {
    const __mmask16 valid = kb - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (kb - j)) - 1);
    const __mmask16 m = _mm512_mask_cmp_ps_mask(valid, _mm512_loadu_ps(dots + j), t, _CMP_LE_OQ);
    _mm512_storeu_si512(hits + nh, _mm512_maskz_compress_epi32(m, jv));
    nh += __builtin_popcount(m);
    jv = _mm512_add_epi32(jv, sixteen);
  }
  insert_hits(cd, ci, dots, hits, nh, k0);
}

// finish_min_generic for lanes without NaN: the min, then the lowest index among the lanes holding it.
__attribute__((target("avx512f"))) void finish_min_avx512(const float* lb, const int32_t* li, float* best,
                                                           int64_t* bi) {
  const __m512 b0 = _mm512_loadu_ps(lb), b1 = _mm512_loadu_ps(lb + 16);
  alignas(64) float v[16];
  _mm512_store_ps(v, _mm512_min_ps(b0, b1));
  float b = v[0];
  for (int l = 1; l < 16; ++l) b = std::min(b, v[l]);
  const __m512 bv = _mm512_set1_ps(b);
  const __m512i big = _mm512_set1_epi32(std::numeric_limits<int32_t>::max());
  const __m512i i0 = _mm512_mask_mov_epi32(big, _mm512_cmp_ps_mask(b0, bv, _CMP_EQ_OQ), _mm512_loadu_si512(li));
  const __m512i i1 =
      _mm512_mask_mov_epi32(big, _mm512_cmp_ps_mask(b1, bv, _CMP_EQ_OQ), _mm512_loadu_si512(li + 16));
  alignas(64) int32_t iv[16];
  _mm512_store_si512(iv, _mm512_min_epi32(i0, i1));
  int32_t i = iv[0];
  for (int l = 1; l < 16; ++l) i = std::min(i, iv[l]);
  *best = b;
  *bi = i;
}

__attribute__((target("avx512f"))) void direct_avx512(const float* x, const float* const* c, int nc, int64_t D,
                                                       bool cosine, float* out) {
  __m512 acc[kRerank];
  for (int s = 0; s < kRerank; ++s) acc[s] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 valid = D - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (D - d)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(valid, x + d);
    for (int s = 0; s < nc; ++s) {  // masked-off coordinates add +0: the partial sums are unchanged
      const __m512 cv = _mm512_maskz_loadu_ps(valid, c[s] + d);
      if (cosine) {
        acc[s] = _mm512_add_ps(acc[s], _mm512_mul_ps(xv, cv));
      } else {
        const __m512 df = _mm512_sub_ps(xv, cv);
        acc[s] = _mm512_add_ps(acc[s], _mm512_mul_ps(df, df));
      }
    }
  }
  for (int s = 0; s < nc; ++s) {
    const float t = tree16(_mm512_castps512_ps256(acc[s]),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[s]), 1)));
    out[s] = cosine ? 1.0f - t : t;
  }
}

// ---- AVX-512F fused fast mode (float32, rows whose keys are all ordered) ---------------------------------
// The dot products come from a register-blocked kernel instead of the BLAS, and go straight from registers
// into the lanes: no tile written and re-read. The codebook is packed per head in panels of kLanes codes,
// coordinate-major (panel p, coordinate d: codes 32p .. 32p + 31, zeros past K, whose key offset is +inf),
// so one coordinate of a panel is two vectors; a micro-tile of MR rows x 32 codes keeps 2 MR accumulators
// in registers and each x value is broadcast once per coordinate. Each dot is the sum over d in ascending
// order (one FMA per term); the key and the lane update are scan_min_avx512's.
constexpr int kFusedRows = 12;  // 24 accumulators + 2 code vectors + 1 broadcast: within the 32 registers

// kStore: write the MR x 32 dots to lb (row stride ldo) instead (exact mode's tile, in place of the sgemm).
template <int MR, bool kStore>
__attribute__((target("avx512f"))) inline void fused_tile(const float* x, int64_t D, const float* panel,
                                                          const float* cn, __m512 s, __m512i c0, float* lb,
                                                          int32_t* li, int64_t ldo) {
  __m512 acc[MR][2];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 b0 = _mm512_loadu_ps(panel + d * kLanes), b1 = _mm512_loadu_ps(panel + d * kLanes + 16);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * D + d]);
      acc[r][0] = _mm512_fmadd_ps(xv, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xv, b1, acc[r][1]);
    }
  }
  if constexpr (kStore) {
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      _mm512_storeu_ps(lb + r * ldo, acc[r][0]);
      _mm512_storeu_ps(lb + r * ldo + 16, acc[r][1]);
    }
    return;
  }
  const __m512 n0 = _mm512_loadu_ps(cn), n1 = _mm512_loadu_ps(cn + 16);
  const __m512i c1 = _mm512_add_epi32(c0, _mm512_set1_epi32(16));
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    float* b = lb + r * kLanes;
    int32_t* i = li + r * kLanes;
    const __m512 k_0 = _mm512_sub_ps(n0, _mm512_mul_ps(s, acc[r][0]));
    const __m512 k_1 = _mm512_sub_ps(n1, _mm512_mul_ps(s, acc[r][1]));
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
    const __mmask16 m0 = _mm512_cmp_ps_mask(k_0, b0, _CMP_LT_OQ), m1 = _mm512_cmp_ps_mask(k_1, b1, _CMP_LT_OQ);
    _mm512_storeu_ps(b, _mm512_mask_mov_ps(b0, m0, k_0));
    _mm512_storeu_ps(b + 16, _mm512_mask_mov_ps(b1, m1, k_1));
    _mm512_storeu_si512(i, _mm512_mask_mov_epi32(_mm512_loadu_si512(i), m0, c0));
    _mm512_storeu_si512(i + 16, _mm512_mask_mov_epi32(_mm512_loadu_si512(i + 16), m1, c1));
  }
}

template <int MR, bool kStore>
__attribute__((target("avx512f"))) void fused_rows(const float* x, int64_t D, const float* panels, int64_t np,
                                                   const float* cn, float scale, int32_t k0, float* lb,
                                                   int32_t* li, int64_t ldo) {
  const __m512 s = _mm512_set1_ps(scale);
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(k0),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512i step = _mm512_set1_epi32(kLanes);
  for (int64_t p = 0; p < np; ++p) {
    if constexpr (kStore) {
      fused_tile<MR, true>(x, D, panels + p * D * kLanes, cn, s, c0, lb + p * kLanes, li, ldo);
    } else {
      fused_tile<MR, false>(x, D, panels + p * D * kLanes, cn + p * kLanes, s, c0, lb, li, ldo);
    }
    c0 = _mm512_add_epi32(c0, step);
  }
}

using FusedFn = void (*)(const float*, int64_t, const float*, int64_t, const float*, float, int32_t, float*,
                         int32_t*, int64_t);

template <bool kStore, int... R>
constexpr std::array<FusedFn, sizeof...(R)> fused_table(std::integer_sequence<int, R...>) {
  return {(R == 0 ? nullptr : &fused_rows<(R == 0 ? 1 : R), kStore>)...};
}

// Over `rows` rows (row-major, stride D) and the np panels from code k0 (a multiple of kLanes): the fast
// mode's lanes (lb, li: kLanes per row), or (kStore) the dots, row r at lb + r * ldo.
template <bool kStore>
__attribute__((target("avx512f"))) void fused_avx512(const float* x, int64_t rows, int64_t D, const float* panels,
                                                      int64_t np, const float* cn, float scale, int32_t k0,
                                                      float* lb, int32_t* li, int64_t ldo) {
  static constexpr auto tail = fused_table<kStore>(std::make_integer_sequence<int, kFusedRows>{});
  const int64_t step = kStore ? ldo : kLanes;
  int64_t r = 0;
  for (; r + kFusedRows <= rows; r += kFusedRows) {
    fused_rows<kFusedRows, kStore>(x + r * D, D, panels, np, cn, scale, k0, lb + r * step, li + r * kLanes, ldo);
  }
  if (r < rows) tail[rows - r](x + r * D, D, panels, np, cn, scale, k0, lb + r * step, li + r * kLanes, ldo);
}

void fused_min_avx512(const float* x, int64_t rows, int64_t D, const float* panels, int64_t np, const float* cn,
                      float scale, int32_t k0, float* lb, int32_t* li) {
  fused_avx512<false>(x, rows, D, panels, np, cn, scale, k0, lb, li, kLanes);
}

void fused_dots_avx512(const float* x, int64_t rows, int64_t D, const float* panels, int64_t np, float* out,
                       int64_t ldo) {
  fused_avx512<true>(x, rows, D, panels, np, nullptr, 1.0f, 0, out, nullptr, ldo);
}

#pragma GCC diagnostic pop

// ---- AVX2 (float32) ----------------------------------------------------------------------------------

__attribute__((target("avx2"))) void scan_min_avx2(const float* dots, const float* cn, int64_t n, float scale,
                                                    int32_t k0, float* lb, int32_t* li) {
  __m256 b[4];
  __m256i bi[4], ci[4];
  const __m256i step = _mm256_set1_epi32(kLanes);
  for (int q = 0; q < 4; ++q) {
    b[q] = _mm256_loadu_ps(lb + 8 * q);
    bi[q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(li + 8 * q));
    ci[q] = _mm256_add_epi32(_mm256_set1_epi32(k0 + 8 * q), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < n; j += kLanes) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const __m256 key =
          _mm256_sub_ps(_mm256_loadu_ps(cn + j + 8 * q), _mm256_mul_ps(s, _mm256_loadu_ps(dots + j + 8 * q)));
      const __m256 m = _mm256_cmp_ps(key, b[q], _CMP_LT_OQ);
      b[q] = _mm256_blendv_ps(b[q], key, m);
      bi[q] = _mm256_castps_si256(
          _mm256_blendv_ps(_mm256_castsi256_ps(bi[q]), _mm256_castsi256_ps(ci[q]), m));
      ci[q] = _mm256_add_epi32(ci[q], step);
    }
  }
  for (int q = 0; q < 4; ++q) {
    _mm256_storeu_ps(lb + 8 * q, b[q]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(li + 8 * q), bi[q]);
  }
}

__attribute__((target("avx2"))) inline __m256i tail_mask8(int64_t left) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(left, 8))), lane);
}

__attribute__((target("avx2"))) void scan_topr_avx2(float* dots, const float* cn, int64_t n, int64_t kb,
                                                     float scale, int32_t k0, float* cd, int64_t* ci,
                                                     int32_t* hits) {
  const __m256 s = _mm256_set1_ps(scale);
  __m256 m[4];
  for (int q = 0; q < 4; ++q) m[q] = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += kLanes) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const __m256 key =
          _mm256_sub_ps(_mm256_loadu_ps(cn + j + 8 * q), _mm256_mul_ps(s, _mm256_loadu_ps(dots + j + 8 * q)));
      _mm256_storeu_ps(dots + j + 8 * q, key);
      m[q] = _mm256_min_ps(m[q], key);
    }
  }
  const __m256 m8 = _mm256_min_ps(_mm256_min_ps(m[0], m[1]), _mm256_min_ps(m[2], m[3]));
  const __m128 g = _mm_min_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));  // group_bound
  const __m128 g2 = _mm_max_ps(g, _mm_movehl_ps(g, g));
  const float bound = _mm_cvtss_f32(_mm_max_ss(g2, _mm_shuffle_ps(g2, g2, 1)));
  const float tf = std::min(bound, cd[kRerank - 1]);
  if (block_min(g) > tf) return;
  const __m256 t = _mm256_set1_ps(tf);
  int nh = 0;
  for (int64_t j = 0; j < kb; j += 8) {
    const __m256 hit = _mm256_and_ps(_mm256_cmp_ps(_mm256_loadu_ps(dots + j), t, _CMP_LE_OQ),
                                     _mm256_castsi256_ps(tail_mask8(kb - j)));
    for (unsigned bits = static_cast<unsigned>(_mm256_movemask_ps(hit)); bits != 0; bits &= bits - 1) {
      hits[nh++] = static_cast<int32_t>(j) + __builtin_ctz(bits);
    }
  }
  insert_hits(cd, ci, dots, hits, nh, k0);
}

__attribute__((target("avx2"))) void finish_min_avx2(const float* lb, const int32_t* li, float* best, int64_t* bi) {
  __m256 b = _mm256_min_ps(_mm256_min_ps(_mm256_loadu_ps(lb), _mm256_loadu_ps(lb + 8)),
                           _mm256_min_ps(_mm256_loadu_ps(lb + 16), _mm256_loadu_ps(lb + 24)));
  alignas(32) float v[8];
  _mm256_store_ps(v, b);
  float m = v[0];
  for (int l = 1; l < 8; ++l) m = std::min(m, v[l]);
  int32_t i = std::numeric_limits<int32_t>::max();
  for (int l = 0; l < kLanes; ++l) i = lb[l] == m ? std::min(i, li[l]) : i;
  *best = m;
  *bi = i;
}

__attribute__((target("avx2"))) void direct_avx2(const float* x, const float* const* c, int nc, int64_t D,
                                                  bool cosine, float* out) {
  __m256 acc[kRerank][2];
  for (int s = 0; s < kRerank; ++s) acc[s][0] = acc[s][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    for (int h = 0; h < 2; ++h) {
      const __m256i valid = tail_mask8(D - d - 8 * h);
      if (D - d - 8 * h <= 0) break;
      const __m256 xv = _mm256_maskload_ps(x + d + 8 * h, valid);
      for (int s = 0; s < nc; ++s) {
        const __m256 cv = _mm256_maskload_ps(c[s] + d + 8 * h, valid);
        if (cosine) {
          acc[s][h] = _mm256_add_ps(acc[s][h], _mm256_mul_ps(xv, cv));
        } else {
          const __m256 df = _mm256_sub_ps(xv, cv);
          acc[s][h] = _mm256_add_ps(acc[s][h], _mm256_mul_ps(df, df));
        }
      }
    }
  }
  for (int s = 0; s < nc; ++s) {
    const float t = tree16(acc[s][0], acc[s][1]);
    out[s] = cosine ? 1.0f - t : t;
  }
}
#endif  // FASTGEN_VQ_X86

// Per-thread buffers kept across calls: a dot tile is 512 KB, and a fresh allocation that size is fresh
// pages, which the OS zeroes at every call (measured: ~8% of a call).
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> xbuf, dots, x2, lb, cd;
  std::vector<int32_t> li, hits;
  std::vector<int64_t> ci;
  std::vector<char> row_ok;
};

template <typename acc_t>
Scratch<acc_t>& scratch() {
  thread_local Scratch<acc_t> s;
  return s;
}

// True when no element of v[0..n) is inf or NaN (an exponent test on the bits: vectorizes, no FP compare).
template <typename acc_t>
bool all_finite(const acc_t* v, int64_t n) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  constexpr bits_t exp_mask = sizeof(acc_t) == 4 ? bits_t(0x7F800000u) : bits_t(0x7FF0000000000000ull);
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    bits_t b;
    std::memcpy(&b, v + i, sizeof(b));
    bad += (b & exp_mask) == exp_mask;
  }
  return bad == 0;
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

template <typename scalar_t, typename acc_t>
void nearest(const VqArgs& a, const Epilogue<acc_t>& ep) {
  const int64_t H = a.x.size(0), N = a.x.size(1), D = a.x.size(2), K = a.codebook.size(1);
  const bool cosine = a.cosine, exact = a.exact;
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  const scalar_t* xg = a.x.data_ptr<scalar_t>();
  at::Tensor cbuf = convert ? a.codebook.to(c10::CppTypeToScalarType<acc_t>::value) : a.codebook;
  const acc_t* cg = cbuf.data_ptr<acc_t>();
  const acc_t* cn = a.code_sqnorm.data_ptr<acc_t>();
  int64_t* out_i = a.indices.data_ptr<int64_t>();
  float* out_d = a.dist.data_ptr<float>();
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t scale = cosine ? acc_t(1) : acc_t(2);

  // Per head: the key offsets (l2 ||c||^2, cosine 0), +inf past K up to a whole number of lanes, and whether
  // every code value and norm is finite (the SIMD epilogues' condition).
  const int64_t Kp = round_up(K, kLanes);
  std::vector<acc_t> cnp(static_cast<size_t>(H * Kp), inf);
  std::vector<char> head_ok(static_cast<size_t>(H));
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      acc_t* o = cnp.data() + h * Kp;
      for (int64_t k = 0; k < K; ++k) o[k] = cosine ? acc_t(0) : cn[h * K + k];
      head_ok[h] = all_finite(cg + h * K * D, K * D) && all_finite(cn + h * K, K);
    }
  });

  // Rows per task: enough that every thread gets work, at most 256 (the rows and the dot tile then stay in
  // L2 next to the BLAS's own packing). Codes per block: a dot tile of ~128K values (512 KB in float32),
  // whole lanes; measured (1 thread, Zen 4, 1 MB L2): 64K-256K values within 2% in fast mode, exact mode
  // (whose first block of a row costs the most) 8% faster at 128K than at 64K for K = 512.
  // Fewer row tasks than threads (few rows): the codebook is split too (splits of >= 512 codes, whole
  // lanes), each split's result kept per row and merged in code order below. Every BLAS call then runs
  // inside the parallel region, on one thread: outside it, a multi-threaded BLAS on tiles this small
  // costs more in synchronisation than it computes (measured: 16 rows x 65536 codes, 2 busy cores).
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  const int64_t RB = std::clamp<int64_t>(round_up((H * N + nth - 1) / nth, 16), 16, 256);
  const int64_t nblk = (N + RB - 1) / RB;
  const int64_t want = std::clamp<int64_t>((nth + H * nblk - 1) / (H * nblk), 1, std::max<int64_t>(1, K / 512));
  const int64_t KS = round_up((K + want - 1) / want, kLanes);  // codes per split
  const int64_t splits = (K + KS - 1) / KS;                      // none empty
  const int64_t KB = std::min(KS, std::clamp<int64_t>((131072 / RB) / kLanes * kLanes, 128, 4096));
  // With the AVX-512 kernels the dots come from fastgen's own register-blocked kernel, not the BLAS
  // (measured, 1 thread, Zen 4: MKL's sgemm runs at ~0.9x the speed of faiss's OpenBLAS one, this kernel at
  // ~1.1x): the codebook is packed in panels once per call (H x K x D values). Fast mode takes the keys
  // from its registers (blocks of KBF codes: ~512 KB of panels, which stay in L2 while a task's rows pass
  // over them), exact mode writes its tiles with it. Below 64 rows a head the packing costs more than the
  // kernel gains (measured: 16 x 65536 x 256 1.45x slower than the BLAS tiles; 64 rows: 1.0-1.1x faster).
  const bool own = N >= kOwnMinRows;
  const bool fused = own && !exact && ep.fused_min != nullptr;
  const bool own_dots = own && exact && ep.fused_dots != nullptr;
  const int64_t KBF = std::min(KS, std::clamp<int64_t>((131072 / D) / kLanes * kLanes, kLanes, 8192));
  std::unique_ptr<acc_t[]> cpack;
  if (fused || own_dots) {
    cpack.reset(new acc_t[static_cast<size_t>(H * Kp * D)]);
    at::parallel_for(0, H * (Kp / kLanes), 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t h = p / (Kp / kLanes), kp = p % (Kp / kLanes) * kLanes;
        acc_t* o = cpack.get() + (h * Kp + kp) * D;
        const acc_t* src = cg + (h * K + kp) * D;
        const int64_t nk = std::min<int64_t>(kLanes, K - kp);
        for (int64_t d = 0; d < D; ++d) {
          for (int64_t l = 0; l < nk; ++l) o[d * kLanes + l] = src[l * D + d];
          for (int64_t l = nk; l < kLanes; ++l) o[d * kLanes + l] = acc_t(0);
        }
      }
    });
  }
  // splits > 1: per split and row, the fast mode's (key, index) or the exact mode's candidate list
  const int64_t part = splits > 1 ? splits * H * N : 0;
  std::vector<acc_t> part_d(static_cast<size_t>(part * (exact ? kRerank : 1)));
  std::vector<int64_t> part_i(static_cast<size_t>(part * (exact ? kRerank : 1)));

  // Exact mode: re-rank a candidate list by the direct form; ties (and NaNs) -> the lowest index.
  // (The direct forms are plain arithmetic, NaN or not: every path serves every row.)
  auto rerank = [&](const acc_t* xr, const acc_t* ch, const int64_t* cir) {
    const acc_t* cp[kRerank];
    int nc = 0;
    while (nc < kRerank && cir[nc] >= 0) {
      cp[nc] = ch + cir[nc] * D;
      ++nc;
    }
    acc_t dd[kRerank];
    ep.direct(xr, cp, nc, D, cosine, dd);
    acc_t b = inf;
    int64_t bi = -1;
    for (int s = 0; s < nc; ++s) {
      const bool tie = dd[s] == b || (std::isnan(dd[s]) && std::isnan(b));
      if (bi < 0 || better(dd[s], b) || (cir[s] < bi && tie)) {
        b = dd[s];
        bi = cir[s];
      }
    }
    return std::pair<acc_t, int64_t>(b, std::max<int64_t>(bi, 0));
  };
  auto store = [&](int64_t row, acc_t b, int64_t bi) {  // row: h * N + n
    if (b < 0) b = 0;  // comparisons: a NaN stays NaN
    if (cosine && b > 2) b = 2;
    out_i[row] = bi;
    out_d[row] = static_cast<float>(b);
  };

  at::parallel_for(0, H * nblk * splits, 1, [&](int64_t t0, int64_t t1) {
    Scratch<acc_t>& sc = scratch<acc_t>();
    auto& [xbuf, dots, x2, lb, cd, li, hits, ci, row_ok] = sc;
    if (convert) xbuf.resize(static_cast<size_t>(RB * D));
    dots.resize(static_cast<size_t>(RB * KB));
    x2.resize(RB);
    row_ok.resize(RB);
    (exact ? cd : lb).resize(static_cast<size_t>(RB * (exact ? kRerank : kLanes)));
    if (exact) {
      ci.resize(static_cast<size_t>(RB * kRerank));
      hits.resize(static_cast<size_t>(KB + 16));
    } else {
      li.resize(static_cast<size_t>(RB * kLanes));
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t sp = t % splits, h = t / splits / nblk, r0 = (t / splits % nblk) * RB;
      const int64_t rows = std::min(RB, N - r0), kbeg = sp * KS, kend = std::min(K, kbeg + KS);
      const acc_t* xs;
      if constexpr (convert) {
        const scalar_t* src = xg + (h * N + r0) * D;
        for (int64_t i = 0; i < rows * D; ++i) xbuf[i] = static_cast<acc_t>(src[i]);
        xs = xbuf.data();
      } else {
        xs = xg + (h * N + r0) * D;
      }
      for (int64_t r = 0; r < rows; ++r) {
        x2[r] = sumsq(xs + r * D, D);
        row_ok[r] = head_ok[h] && std::isfinite(x2[r]);
      }
      if (exact) {
        std::fill(cd.begin(), cd.begin() + rows * kRerank, inf);
        std::fill(ci.begin(), ci.begin() + rows * kRerank, int64_t{-1});
      } else {
        std::fill(lb.begin(), lb.begin() + rows * kLanes, inf);
        for (int64_t r = 0; r < rows; ++r) {  // all +inf: the lowest index wins
          for (int l = 0; l < kLanes; ++l) li[r * kLanes + l] = static_cast<int32_t>(kbeg) + l;
        }
      }
      const acc_t* ch = cg + h * K * D;
      // fused: every row of the task must be clean (else the portable epilogue takes the task's NaN rows)
      const bool fuse = fused && std::all_of(row_ok.begin(), row_ok.begin() + rows, [](char ok) { return ok != 0; });
      if (fuse) {
        for (int64_t k0 = kbeg; k0 < kend; k0 += KBF) {
          const int64_t kbp = round_up(std::min(KBF, kend - k0), kLanes);
          ep.fused_min(xs, rows, D, cpack.get() + (h * Kp + k0) * D, kbp / kLanes, cnp.data() + h * Kp + k0, scale,
                       static_cast<int32_t>(k0), lb.data(), li.data());
        }
      }
      for (int64_t k0 = kbeg; k0 < (fuse ? kbeg : kend); k0 += KB) {
        const int64_t kb = std::min(KB, kend - k0), kbp = round_up(kb, kLanes);
        if (own_dots) {
          ep.fused_dots(xs, rows, D, cpack.get() + (h * Kp + k0) * D, kbp / kLanes, dots.data(), KB);
        } else {
          tile_dots(xs, rows, ch + k0 * D, kb, D, dots.data(), KB);
        }
        const acc_t* cnk = cnp.data() + h * Kp + k0;
        const int32_t k0i = static_cast<int32_t>(k0);
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* dr = dots.data() + r * KB;
          std::fill(dr + kb, dr + kbp, acc_t(0));  // padded codes: key +inf - 0, never a NaN
          if (exact && row_ok[r]) {
            ep.scan_topr(dr, cnk, kbp, kb, scale, k0i, cd.data() + r * kRerank, ci.data() + r * kRerank,
                         hits.data());
          } else if (exact) {
            scan_topr_generic(dr, cnk, kb, scale, k0i, cd.data() + r * kRerank, ci.data() + r * kRerank);
          } else {
            (row_ok[r] ? ep.scan_min : &scan_min_generic<acc_t>)(dr, cnk, kbp, scale, k0i,
                                                                  lb.data() + r * kLanes, li.data() + r * kLanes);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = h * N + r0 + r;
        if (exact && splits > 1) {
          std::copy_n(cd.data() + r * kRerank, kRerank, part_d.data() + (sp * H * N + row) * kRerank);
          std::copy_n(ci.data() + r * kRerank, kRerank, part_i.data() + (sp * H * N + row) * kRerank);
        } else if (exact) {
          const auto [b, bi] = rerank(xs + r * D, ch, ci.data() + r * kRerank);
          store(row, b, bi);
        } else {
          acc_t b;
          int64_t bi;
          (row_ok[r] ? ep.finish_min : &finish_min_generic<acc_t>)(lb.data() + r * kLanes, li.data() + r * kLanes,
                                                                    &b, &bi);
          if (splits > 1) {  // the key; ||x||^2 is added after the merge
            part_d[sp * H * N + row] = b;
            part_i[sp * H * N + row] = bi;
          } else {
            store(row, cosine ? acc_t(1) + b : x2[r] + b, bi);
          }
        }
      }
    }
  });
  if (splits == 1) return;

  // Merge the splits in code order: an equal key never displaces an earlier split's (lower) index, so the
  // result is the one of a single scan.
  at::parallel_for(0, H * N, 1, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> xr(static_cast<size_t>(D));
    for (int64_t row = r0; row < r1; ++row) {
      const scalar_t* src = xg + row * D;
      for (int64_t d = 0; d < D; ++d) xr[d] = static_cast<acc_t>(src[d]);
      const acc_t* ch = cg + row / N * K * D;
      if (exact) {
        acc_t cdr[kRerank];
        int64_t cir[kRerank];
        std::fill_n(cdr, kRerank, inf);
        std::fill_n(cir, kRerank, int64_t{-1});
        for (int64_t sp = 0; sp < splits; ++sp) {
          const acc_t* pd = part_d.data() + (sp * H * N + row) * kRerank;
          const int64_t* pi = part_i.data() + (sp * H * N + row) * kRerank;
          for (int s = 0; s < kRerank && pi[s] >= 0; ++s) insert_candidate(cdr, cir, pd[s], pi[s]);
        }
        const auto [b, bi] = rerank(xr.data(), ch, cir);
        store(row, b, bi);
      } else {
        acc_t b = part_d[row];
        int64_t bi = part_i[row];
        for (int64_t sp = 1; sp < splits; ++sp) {
          if (better(part_d[sp * H * N + row], b)) {
            b = part_d[sp * H * N + row];
            bi = part_i[sp * H * N + row];
          }
        }
        store(row, cosine ? acc_t(1) + b : sumsq(xr.data(), D) + b, bi);
      }
    }
  });
}

void check_operand(const at::Tensor& t, const char* name, int64_t dim, const char* entry, bool cuda) {
  TORCH_CHECK(t.defined(), "vq_nearest: ", name, " is undefined");
  TORCH_CHECK(t.dim() == dim, "vq_nearest: ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(cuda ? t.is_cuda() : t.is_cpu(), entry, ": ", name, " must be on ", cuda ? "a CUDA device" : "the CPU",
              ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "vq_nearest: ", name, " must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), ")");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> vq_nearest(bool cuda, const at::Tensor& x, const at::Tensor& codebook,
                                                          const at::Tensor& code_sqnorm, bool cosine, bool exact,
                                                          bool with_counts) {
  const char* entry = cuda ? "vq_nearest_cuda" : "vq_nearest_cpu";
  check_operand(x, "x (H, N, D)", 3, entry, cuda);
  check_operand(codebook, "codebook (H, K, D)", 3, entry, cuda);
  check_operand(code_sqnorm, "code_sqnorm (H, K)", 2, entry, cuda);
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (!cuda && st == at::kDouble), entry,
              ": x must be float32, float16 or bfloat16", cuda ? "" : " or float64", ", got ", st);
  TORCH_CHECK(codebook.scalar_type() == st, "vq_nearest: codebook has dtype ", codebook.scalar_type(),
              ", expected ", st, " like x");
  const auto nst = code_sqnorm.scalar_type();
  TORCH_CHECK(nst == at::kFloat || (st == at::kDouble && nst == at::kDouble),
              "vq_nearest: code_sqnorm must be float32", st == at::kDouble ? " or float64" : "", ", got ", nst);
  TORCH_CHECK(codebook.device() == x.device() && code_sqnorm.device() == x.device(),
              "vq_nearest: x, codebook and code_sqnorm must be on one device, got ", x.device(), ", ",
              codebook.device(), ", ", code_sqnorm.device());
  const int64_t H = x.size(0), N = x.size(1), D = x.size(2), K = codebook.size(1);
  TORCH_CHECK(codebook.size(0) == H, "vq_nearest: codebook has ", codebook.size(0), " heads (shape ",
              codebook.sizes(), "), x has ", H, " (shape ", x.sizes(), ")");
  TORCH_CHECK(K > 0, "vq_nearest: the codebook must have K > 0 codes, got shape ", codebook.sizes());
  TORCH_CHECK(D > 0, "vq_nearest: the code dimension D must be > 0, got x shape ", x.sizes());
  TORCH_CHECK(codebook.size(2) == D, "vq_nearest: codebook dim D = ", codebook.size(2), " (shape ", codebook.sizes(),
              ") does not match x's D = ", D, " (shape ", x.sizes(), ")");
  TORCH_CHECK(code_sqnorm.size(0) == H && code_sqnorm.size(1) == K, "vq_nearest: code_sqnorm must have shape (", H,
              ", ", K, "), got ", code_sqnorm.sizes());
  TORCH_CHECK(K < (int64_t{1} << 31) && N < (int64_t{1} << 31) && D < (int64_t{1} << 31),
              "vq_nearest: N, K and D must each be < 2^31, got x ", x.sizes(), ", codebook ", codebook.sizes());
  VqArgs a;
  a.x = x;
  a.codebook = codebook;
  // The kernels read ||c||^2 in their accumulation type: fp64 for fp64 inputs on the CPU, else fp32.
  a.code_sqnorm = st == at::kDouble ? code_sqnorm.to(at::kDouble) : code_sqnorm;
  a.cosine = cosine;
  a.exact = exact;
  a.with_counts = with_counts;
  const auto opts = x.options();
  a.indices = at::empty({H, N}, opts.dtype(at::kLong));
  a.dist = at::empty({H, N}, opts.dtype(at::kFloat));
  a.counts = with_counts ? at::zeros({H, K}, opts.dtype(at::kLong)) : at::empty({0}, opts.dtype(at::kLong));
  if (H * N > 0) {
    if (cuda) {
#ifdef FASTGEN_WITH_CUDA
      vq_nearest_cuda_impl(a);
#else
      TORCH_CHECK(false, "fastgen._C was built without CUDA");
#endif
    } else {
      vq_nearest_cpu_impl(a);
    }
  }
  return {a.indices, a.dist, a.counts};
}

void vq_nearest_cpu_impl(const VqArgs& a) {
  const auto st = a.x.scalar_type();
  if (st == at::kDouble) {
    nearest<double, double>(a, Epilogue<double>{&scan_min_ordered<double>, &scan_topr_clean_generic<double>,
                                                &direct_generic<double>, &finish_min_generic<double>});
  } else {
    // Read before any work: a bad FASTGEN_CPU_ISA is an error, raised before the kernel runs.
    const cpu::Isa isa = cpu::selected_isa();
    Epilogue<float> ep{&scan_min_ordered<float>, &scan_topr_clean_generic<float>, &direct_generic<float>,
                       &finish_min_generic<float>};
#ifdef FASTGEN_VQ_X86
    if (isa == cpu::Isa::kAvx512) {
      ep = {&scan_min_avx512, &scan_topr_avx512, &direct_avx512, &finish_min_avx512, &fused_min_avx512,
            &fused_dots_avx512};
    }
    if (isa == cpu::Isa::kAvx2) ep = {&scan_min_avx2, &scan_topr_avx2, &direct_avx2, &finish_min_avx2};
#else
    (void)isa;
#endif
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "vq_nearest_cpu", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) nearest<scalar_t, float>(a, ep);
    });
  }
  if (a.with_counts) {
    const int64_t H = a.x.size(0), N = a.x.size(1), K = a.codebook.size(1);
    const int64_t* idx = a.indices.data_ptr<int64_t>();
    int64_t* counts = a.counts.data_ptr<int64_t>();
    at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t n = 0; n < N; ++n) ++counts[h * K + idx[h * N + n]];
      }
    });
  }
}

}  // namespace vq
}  // namespace fastgen
