// Nearest-codebook lookup: argument checks shared by the CPU and CUDA entry points, and the CPU kernel.
//
// CPU kernel. One task = RB rows of one head (at::parallel_for over tasks). A task packs its rows once,
// converted to the accumulation type, into panels of MR rows laid out [d][MR], with ||x||^2; then walks
// the codebook in tiles of KT codes, packing each into panels of NR codes laid out [d][NR]. An MR x NR
// register-blocked micro-kernel (AVX-512 / AVX2+FMA intrinsics picked at run time, portable loops
// otherwise) computes the MR x NR dot products over the whole D, each accumulated sequentially over d;
// D is walked in chunks of DC (the micro-kernel continues its sums, so the rounding is that of one pass);
// the epilogue folds the RB x KT dots into the running (min, argmin) of each row, codes in ascending order
// with a strict "<" so ties keep the lowest index. Exact mode instead keeps each row's best kRerank = 4
// (distance, index) candidates by that expanded form (a sorted insertion, ties by lower index), then
// re-ranks them with the direct form in fp32 (fp64 for fp64) from the original values, summed over D in
// order, and returns the lowest-index minimum of those and its direct distance. Extra memory per thread:
// (RB + KT) x D + RB x KT (+ RB x kRerank candidates in exact mode).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTGEN_VQ_X86 1
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "vq/vq.h"

namespace fastgen {
namespace vq {
namespace {

// out[r * NR + j] (+)= sum_{d < D} xp[d * MR + r] * cp[d * NR + j], sequentially over d; with `accumulate`
// the sums continue from out, so a dot split into D chunks rounds exactly as one uninterrupted pass.
template <typename acc_t>
using TileFn = void (*)(const acc_t*, const acc_t*, int64_t, acc_t*, bool);

// Portable micro-kernel: GCC / clang vector extensions (16-byte vectors: SSE2, NEON), NR = 2 vectors.
template <typename acc_t, int MR>
void tile_generic(const acc_t* __restrict__ xp, const acc_t* __restrict__ cp, int64_t D, acc_t* __restrict__ out,
                  bool accumulate) {
  constexpr int L = 16 / sizeof(acc_t), NR = 2 * L;
  typedef acc_t vec __attribute__((vector_size(16)));
  vec acc[MR][2] = {};
  if (accumulate) std::memcpy(&acc[0][0], out, sizeof(acc));
  for (int64_t d = 0; d < D; ++d) {
    vec b0, b1;
    std::memcpy(&b0, cp + d * NR, 16);
    std::memcpy(&b1, cp + d * NR + L, 16);
    for (int r = 0; r < MR; ++r) {
      const acc_t xv = xp[d * MR + r];
      acc[r][0] += xv * b0;
      acc[r][1] += xv * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    std::memcpy(out + r * NR, &acc[r][0], 16);
    std::memcpy(out + r * NR + L, &acc[r][1], 16);
  }
}

#ifdef FASTGEN_VQ_X86
constexpr int kMR2 = 6, kNR2 = 16;  // AVX2: 12 ymm accumulators + 2 code vectors + 1 broadcast
__attribute__((target("avx2,fma"))) void tile_avx2(const float* __restrict__ xp, const float* __restrict__ cp,
                                                    int64_t D, float* __restrict__ out, bool accumulate) {
  __m256 acc[kMR2][2];
#pragma GCC unroll 6
  for (int r = 0; r < kMR2; ++r) {
    acc[r][0] = accumulate ? _mm256_loadu_ps(out + r * kNR2) : _mm256_setzero_ps();
    acc[r][1] = accumulate ? _mm256_loadu_ps(out + r * kNR2 + 8) : _mm256_setzero_ps();
  }
  for (int64_t d = 0; d < D; ++d) {
    const __m256 b0 = _mm256_loadu_ps(cp + d * kNR2), b1 = _mm256_loadu_ps(cp + d * kNR2 + 8);
#pragma GCC unroll 6
    for (int r = 0; r < kMR2; ++r) {
      const __m256 xv = _mm256_broadcast_ss(xp + d * kMR2 + r);
      acc[r][0] = _mm256_fmadd_ps(xv, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xv, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < kMR2; ++r) {
    _mm256_storeu_ps(out + r * kNR2, acc[r][0]);
    _mm256_storeu_ps(out + r * kNR2 + 8, acc[r][1]);
  }
}

constexpr int kMR5 = 12, kNR5 = 32;  // AVX-512: 24 zmm accumulators + 2 code vectors
__attribute__((target("avx512f"))) void tile_avx512(const float* __restrict__ xp, const float* __restrict__ cp,
                                                     int64_t D, float* __restrict__ out, bool accumulate) {
  __m512 acc[kMR5][2];
#pragma GCC unroll 12
  for (int r = 0; r < kMR5; ++r) {
    acc[r][0] = accumulate ? _mm512_loadu_ps(out + r * kNR5) : _mm512_setzero_ps();
    acc[r][1] = accumulate ? _mm512_loadu_ps(out + r * kNR5 + 16) : _mm512_setzero_ps();
  }
  for (int64_t d = 0; d < D; ++d) {
    const __m512 b0 = _mm512_loadu_ps(cp + d * kNR5), b1 = _mm512_loadu_ps(cp + d * kNR5 + 16);
#pragma GCC unroll 12
    for (int r = 0; r < kMR5; ++r) {
      const __m512 xv = _mm512_set1_ps(xp[d * kMR5 + r]);
      acc[r][0] = _mm512_fmadd_ps(xv, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xv, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < kMR5; ++r) {
    _mm512_storeu_ps(out + r * kNR5, acc[r][0]);
    _mm512_storeu_ps(out + r * kNR5 + 16, acc[r][1]);
  }
}
#endif

template <typename acc_t>
inline bool better(acc_t d, acc_t best) {  // codes arrive in ascending order: "<" keeps the lowest on ties
  return d < best || (std::isnan(d) && !std::isnan(best));
}

// dst[d * W + i] = src[i * D + d] for the n <= W rows of src, 0 for the rest: the [d][W] panel layout.
template <int W, typename scalar_t, typename acc_t>
void pack(const scalar_t* src, int64_t n, int64_t D, acc_t* dst) {
  for (int64_t d = 0; d < D; ++d) {
    acc_t* o = dst + d * W;
    for (int64_t i = 0; i < n; ++i) o[i] = static_cast<acc_t>(src[i * D + d]);
    for (int64_t i = n; i < W; ++i) o[i] = 0;
  }
}

constexpr int kRerank = 4;  // exact mode: candidates per row kept by the scan (RERANK in fastgen/ops/vq.py)

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

// Exact mode: the direct-form distance of row xr to code cr in acc_t from the original values, summed
// over d in order: L2 sum((x - c)^2), cosine (unit vectors) 1 - x.c.
template <typename scalar_t, typename acc_t>
inline acc_t direct_distance(const scalar_t* xr, const scalar_t* cr, int64_t D, bool cosine) {
  acc_t s = 0;
  if (cosine) {
    for (int64_t d = 0; d < D; ++d) s += static_cast<acc_t>(xr[d]) * static_cast<acc_t>(cr[d]);
    return acc_t(1) - s;
  }
  for (int64_t d = 0; d < D; ++d) {
    const acc_t df = static_cast<acc_t>(xr[d]) - static_cast<acc_t>(cr[d]);
    s += df * df;
  }
  return s;
}

template <typename scalar_t, typename acc_t, int MR, int NR>
void nearest(const VqArgs& a, TileFn<acc_t> tile) {
  const int64_t H = a.x.size(0), N = a.x.size(1), D = a.x.size(2), K = a.codebook.size(1);
  const scalar_t* xg = a.x.data_ptr<scalar_t>();
  const scalar_t* cg = a.codebook.data_ptr<scalar_t>();
  const acc_t* cn = a.code_sqnorm.data_ptr<acc_t>();
  int64_t* out_i = a.indices.data_ptr<int64_t>();
  float* out_d = a.dist.data_ptr<float>();
  const bool cosine = a.cosine, exact = a.exact;
  constexpr int64_t KT = 4 * NR;
  constexpr int64_t DC = 128;  // D chunk: one MR x DC row panel + one NR x DC code panel stay in L1
  // Rows per task: many (each code tile is packed once per task), while the packed rows stay in L2
  // (<= 1 MB), and every thread gets work.
  auto round_mr = [](int64_t v) { return (v + MR - 1) / MR * MR; };
  const int64_t l2_rows = (1024 * 1024 / static_cast<int64_t>(sizeof(acc_t))) / D;
  int64_t RB = std::clamp<int64_t>(round_mr(l2_rows), MR, 512 / MR * MR);
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  RB = std::max<int64_t>(MR, std::min<int64_t>(RB, round_mr((H * N + nth - 1) / nth)));
  const int64_t nblk = (N + RB - 1) / RB;
  at::parallel_for(0, H * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> xpack(static_cast<size_t>(RB * D)), cpack(static_cast<size_t>(KT * D));
    std::vector<acc_t> xn(RB), best(RB), dots(static_cast<size_t>(RB * KT));
    std::vector<int64_t> bidx(RB);
    std::vector<acc_t> cand_d(exact ? static_cast<size_t>(RB * kRerank) : 0);
    std::vector<int64_t> cand_i(exact ? static_cast<size_t>(RB * kRerank) : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t / nblk, r0 = (t % nblk) * RB, rows = std::min(RB, N - r0);
      const int64_t panels = (rows + MR - 1) / MR;
      const scalar_t* xb = xg + (h * N + r0) * D;
      for (int64_t row = 0; row < rows; ++row) {
        acc_t s = 0;
        for (int64_t d = 0; d < D; ++d) {
          const acc_t v = static_cast<acc_t>(xb[row * D + d]);
          s += v * v;
        }
        xn[row] = s;
        best[row] = std::numeric_limits<acc_t>::infinity();
        bidx[row] = 0;
      }
      if (exact) {
        std::fill(cand_d.begin(), cand_d.end(), std::numeric_limits<acc_t>::infinity());
        std::fill(cand_i.begin(), cand_i.end(), int64_t{-1});
      }
      for (int64_t p = 0; p < panels; ++p) {
        pack<MR>(xb + p * MR * D, std::min<int64_t>(MR, rows - p * MR), D, xpack.data() + p * D * MR);
      }
      for (int64_t k0 = 0; k0 < K; k0 += KT) {
        const int64_t kc = std::min(KT, K - k0), qpanels = (kc + NR - 1) / NR;
        const scalar_t* cb = cg + (h * K + k0) * D;
        for (int64_t q = 0; q < qpanels; ++q) {
          pack<NR>(cb + q * NR * D, std::min<int64_t>(NR, kc - q * NR), D, cpack.data() + q * D * NR);
        }
        const acc_t* cnk = cn + h * K + k0;
        // dots of panel pair (p, q) at ((p * qpanels) + q) * MR * NR, [r][j]
        for (int64_t d0 = 0; d0 < D; d0 += DC) {
          const int64_t dc = std::min(DC, D - d0);
          for (int64_t q = 0; q < qpanels; ++q) {
            for (int64_t p = 0; p < panels; ++p) {
              tile(xpack.data() + p * D * MR + d0 * MR, cpack.data() + q * D * NR + d0 * NR, dc,
                   dots.data() + (p * qpanels + q) * MR * NR, d0 > 0);
            }
          }
        }
        for (int64_t p = 0; p < panels; ++p) {
          const int64_t rmax = std::min<int64_t>(MR, rows - p * MR);
          for (int64_t q = 0; q < qpanels; ++q) {
            const int64_t jmax = std::min<int64_t>(NR, kc - q * NR);
            for (int64_t r = 0; r < rmax; ++r) {
              const int64_t row = p * MR + r;
              const acc_t* dr = dots.data() + (p * qpanels + q) * MR * NR + r * NR;
              if (exact) {  // keep the best kRerank by the expanded form, re-ranked below
                acc_t* cd = cand_d.data() + row * kRerank;
                int64_t* ci = cand_i.data() + row * kRerank;
                const acc_t x2 = xn[row];
                // an empty slot admits anything (-inf would refuse a NaN, which `better` ranks first)
                bool open = ci[kRerank - 1] < 0;
                acc_t worst = cd[kRerank - 1];
                for (int64_t j = 0; j < jmax; ++j) {
                  const int64_t code = q * NR + j;
                  const acc_t dd = cosine ? acc_t(1) - dr[j] : (x2 - acc_t(2) * dr[j]) + cnk[code];
                  if (open || better(dd, worst)) {
                    insert_candidate(cd, ci, dd, k0 + code);
                    open = ci[kRerank - 1] < 0;
                    worst = cd[kRerank - 1];
                  }
                }
                continue;
              }
              acc_t b = best[row];
              int64_t bi = bidx[row];
              for (int64_t j = 0; j < jmax; ++j) {
                const int64_t code = q * NR + j;
                const acc_t dd = cosine ? acc_t(1) - dr[j] : (xn[row] - acc_t(2) * dr[j]) + cnk[code];
                if (better(dd, b)) {
                  b = dd;
                  bi = k0 + code;
                }
              }
              best[row] = b;
              bidx[row] = bi;
            }
          }
        }
      }
      if (exact) {  // re-rank: direct form from the original values; ties (and NaNs) -> the lowest index
        for (int64_t row = 0; row < rows; ++row) {
          const int64_t* ci = cand_i.data() + row * kRerank;
          const scalar_t* xr = xb + row * D;
          acc_t b = std::numeric_limits<acc_t>::infinity();
          int64_t bi = -1;
          for (int s = 0; s < kRerank && ci[s] >= 0; ++s) {
            const acc_t dd = direct_distance<scalar_t, acc_t>(xr, cg + (h * K + ci[s]) * D, D, cosine);
            if (bi < 0 || better(dd, b) || (ci[s] < bi && (dd == b || (std::isnan(dd) && std::isnan(b))))) {
              b = dd;
              bi = ci[s];
            }
          }
          if (cosine && b < 0) b = 0;
          if (cosine && b > 2) b = 2;
          best[row] = b;
          bidx[row] = bi < 0 ? 0 : bi;
        }
      }
      for (int64_t row = 0; row < rows; ++row) {
        const acc_t b = best[row];
        out_i[h * N + r0 + row] = bidx[row];
        out_d[h * N + r0 + row] = static_cast<float>(!cosine && b < 0 ? acc_t(0) : b);
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
    nearest<double, double, 6, 4>(a, &tile_generic<double, 6>);
  } else {
    // Read before any work: a bad FASTGEN_CPU_ISA is an error, raised before the kernel runs.
    const cpu::Isa isa = cpu::selected_isa();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "vq_nearest_cpu", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        switch (isa) {
#ifdef FASTGEN_VQ_X86
          case cpu::Isa::kAvx512:
            nearest<scalar_t, float, kMR5, kNR5>(a, &tile_avx512);
            return;
          case cpu::Isa::kAvx2:
            nearest<scalar_t, float, kMR2, kNR2>(a, &tile_avx2);
            return;
#endif
          default:
            nearest<scalar_t, float, 6, 8>(a, &tile_generic<float, 6>);
        }
      }
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
