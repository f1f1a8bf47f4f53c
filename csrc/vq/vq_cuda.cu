// Nearest-codebook lookup, CUDA kernels (math: vq.h). fp32 SIMT tiles; the fast and exact modes share the scan.
//
// vq_tile_kernel: grid (row blocks of BM rows, heads, code splits). A block owns BM = 128 rows of one head
// and a contiguous range of code tiles (BN = 128 codes each); it streams (BM x BK) slices of x and (BN x BK)
// slices of the tile's codes through shared memory (converted to fp32, k-major so each thread reads float4
// runs), the next slice prefetched into registers while the current one is multiplied. Each of the 256
// threads holds an 8 x 8 fp32 accumulator (rows ty*4 + {0..3, 64..67}, codes tx*4 + {0..3, 64..67}); every
// dot accumulates sequentially over d with fmaf. After a tile, each thread folds its 64 distances into its
// 8 running (min, argmin) pairs (kept in shared memory), codes ascending; at the end the 16 threads sharing a row
// reduce with shuffles ((d, k) lexicographic, NaN first: ties -> lowest k) and write one partial per split.
// vq_combine_kernel: one thread per row merges the splits in order, writes indices / dist, and counts with
// 64-bit atomics. Extra memory: splits x H x N (float, int); the N x K matrix is never formed.
// Exact mode (kExact): instead of one running min, each row keeps its best kRerank = 4 (d, k) candidates by
// the expanded form, (d, k) lexicographic with NaN first (= the CPU's sorted insertion, codes ascending).
// After a tile, each thread sorts its 8 codes of a row into a 4-list (compare-exchange chain), the 16
// threads of the row merge their lists with half-warp shuffles (top-4 of two sorted 4-lists: a bitonic
// merge, static indices so nothing goes to local memory) and lane tx == 0, the row's owner, merges the
// result into the row's running list in shared memory (reusing sbest / sbk: 4 x BM slots). Per split the
// lists go to a splits x H x N x 4 workspace; vq_rerank_kernel (one warp per row) merges them in split
// order and re-ranks the 4 candidates with the direct form (L2 sum((x - c)^2), cosine 1 - x.c, clamped to
// [0, 2]) in fp32 from the original values in global memory: lanes stride over D, then a fixed
// shuffle-down tree, so the sums are deterministic; ties (and NaNs) -> the lowest index, as vq_cpu.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "vq/vq.h"

namespace fastgen {
namespace vq {
namespace {

constexpr int BM = 128, BN = 128, BK = 16, kThreads = 256;
constexpr int kPad = 4;  // keeps float4 alignment, spreads the transposed stores over banks
constexpr int kLoads = BM * BK / kThreads;  // elements of each operand a thread moves per slice (8)
static_assert(BM == BN, "one load mapping serves both operands");

// (d1, k1) before (d2, k2): NaN first, then smaller distance, then lower index.
__device__ __forceinline__ bool better(float d1, int k1, float d2, int k2) {
  const bool n1 = isnan(d1), n2 = isnan(d2);
  if (n1 || n2) return n1 && (!n2 || k1 < k2);
  return d1 < d2 || (d1 == d2 && k1 < k2);
}

constexpr int kRerank = 4;  // exact mode: candidates per row (RERANK in fastgen/ops/vq.py)
static_assert(kRerank == 4, "merge4 is written for 4-lists");

__device__ __forceinline__ void cswap(float& d1, int& k1, float& d2, int& k2) {  // (1, 2) into order
  if (better(d2, k2, d1, k1)) {
    const float td = d1;
    const int tk = k1;
    d1 = d2;
    k1 = k2;
    d2 = td;
    k2 = tk;
  }
}

// Insert (d, k) into the sorted 4-list (ld, lk); the worst of the five falls off.
__device__ __forceinline__ void insert4(float (&ld)[kRerank], int (&lk)[kRerank], float d, int k) {
#pragma unroll
  for (int s = 0; s < kRerank; ++s) cswap(ld[s], lk[s], d, k);
}

// (ad, ak) <- the best 4 of the sorted 4-lists a and b (sorted): min(a[i], b[3 - i]) holds them as a
// bitonic sequence, two compare-exchange stages sort it. `better` is a strict total order (codes are
// distinct), so both lanes of a shuffle pair get the same list.
__device__ __forceinline__ void merge4(float (&ad)[kRerank], int (&ak)[kRerank], const float (&bd)[kRerank],
                                       const int (&bk)[kRerank]) {
#pragma unroll
  for (int i = 0; i < kRerank; ++i) {
    if (better(bd[kRerank - 1 - i], bk[kRerank - 1 - i], ad[i], ak[i])) {
      ad[i] = bd[kRerank - 1 - i];
      ak[i] = bk[kRerank - 1 - i];
    }
  }
  cswap(ad[0], ak[0], ad[2], ak[2]);
  cswap(ad[1], ak[1], ad[3], ak[3]);
  cswap(ad[0], ak[0], ad[1], ak[1]);
  cswap(ad[2], ak[2], ad[3], ak[3]);
}

template <typename T>
__device__ __forceinline__ void load_slice(const T* __restrict__ base, int rows_left, int D, int d0, float* reg) {
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    const int e = threadIdx.x + i * kThreads, r = e / BK, k = e % BK;
    reg[i] = (r < rows_left && d0 + k < D) ? static_cast<float>(base[static_cast<long long>(r) * D + d0 + k]) : 0.f;
  }
}

__device__ __forceinline__ void store_slice(float (*s)[BM + kPad], const float* reg) {
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    const int e = threadIdx.x + i * kThreads;
    s[e % BK][e / BK] = reg[i];
  }
}

template <typename T, bool kExact>
__global__ void __launch_bounds__(kThreads, 2)
    vq_tile_kernel(const T* __restrict__ x, const T* __restrict__ cb, const float* __restrict__ cn, int N, int K,
                   int D, int tiles_per_split, bool cosine, float* __restrict__ ws_d, int* __restrict__ ws_k) {
  __shared__ __align__(16) float xs[BK][BM + kPad];
  __shared__ __align__(16) float cs[BK][BN + kPad];
  __shared__ float xsq[BM];
  // Each thread's 8 running (min, argmin) pairs live here between tiles (touched once per tile), which
  // leaves the registers to the 8 x 8 accumulator and the prefetched slices.
  __shared__ float sbest[8][kThreads];
  __shared__ int sbk[8][kThreads];
  const int h = blockIdx.y, split = blockIdx.z, row0 = blockIdx.x * BM;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int ntiles = (K + BN - 1) / BN;
  const int tile0 = split * tiles_per_split, tile1 = min(ntiles, tile0 + tiles_per_split);
  const T* xh = x + (static_cast<long long>(h) * N + row0) * D;
  const T* ch = cb + static_cast<long long>(h) * K * D;
  const float* cnh = cn + static_cast<long long>(h) * K;
  const int rows_left = N - row0;
  // Exact mode: the running 4-list of row r lives in slots [s * BM + r] (the sbest / sbk storage, which the
  // exact path does not otherwise use), touched only by the row's owner (tx == 0): no barrier needed.
  float* const rowd = &sbest[0][0];
  int* const rowk = &sbk[0][0];

  // ||x||^2 of the block's rows: one warp per row at a time.
  {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int r = warp; r < BM; r += kThreads / 32) {
      float s = 0.f;
      if (r < rows_left) {
        for (int d = lane; d < D; d += 32) {
          const float v = static_cast<float>(xh[static_cast<long long>(r) * D + d]);
          s = fmaf(v, v, s);
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane == 0) xsq[r] = s;
    }
  }

#pragma unroll
  for (int i = 0; i < 8; ++i) {
    sbest[i][threadIdx.x] = INFINITY;
    sbk[i][threadIdx.x] = INT_MAX;
  }
  static_assert(kRerank * BM <= 8 * kThreads, "the exact-mode lists fit in sbest / sbk");
  if (kExact) __syncthreads();  // the exact lists alias slots other threads just initialised
  if (kExact && tx == 0) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int r = (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
#pragma unroll
      for (int s = 0; s < kRerank; ++s) {
        rowd[s * BM + r] = INFINITY;
        rowk[s * BM + r] = INT_MAX;
      }
    }
  }
  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

  const int nd = (D + BK - 1) / BK;
  const int total = (tile1 - tile0) * nd;
  float rx[kLoads], rc[kLoads];
  if (total > 0) {
    load_slice(xh, rows_left, D, 0, rx);
    load_slice(ch + static_cast<long long>(tile0) * BN * D, K - tile0 * BN, D, 0, rc);
  }
  for (int c = 0; c < total; ++c) {
    store_slice(xs, rx);
    store_slice(cs, rc);
    __syncthreads();
    if (c + 1 < total) {
      const int tn = tile0 + (c + 1) / nd, dn = ((c + 1) % nd) * BK;
      load_slice(xh, rows_left, D, dn, rx);
      load_slice(ch + static_cast<long long>(tn) * BN * D, K - tn * BN, D, dn, rc);
    }
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      const float4 a0 = *reinterpret_cast<const float4*>(&xs[k][ty * 4]);
      const float4 a1 = *reinterpret_cast<const float4*>(&xs[k][64 + ty * 4]);
      const float4 b0 = *reinterpret_cast<const float4*>(&cs[k][tx * 4]);
      const float4 b1 = *reinterpret_cast<const float4*>(&cs[k][64 + tx * 4]);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
    if (kExact && c % nd == nd - 1) {  // tile done: merge its best 4 per row into the row's running list
      const int code0 = (tile0 + c / nd) * BN;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int r = (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
        const float xn = xsq[r];
        float ld[kRerank];
        int lk[kRerank];
#pragma unroll
        for (int s = 0; s < kRerank; ++s) {
          ld[s] = INFINITY;
          lk[s] = INT_MAX;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int code = code0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + j - 4);
          if (code < K) {
            const float d = cosine ? __fsub_rn(1.f, acc[i][j]) : __fadd_rn(__fsub_rn(xn, 2.f * acc[i][j]), cnh[code]);
            insert4(ld, lk, d, code);
          }
          acc[i][j] = 0.f;
        }
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) {  // the 16 threads of the row: lanes tx of one half-warp
          float od[kRerank];
          int ok[kRerank];
#pragma unroll
          for (int s = 0; s < kRerank; ++s) {
            od[s] = __shfl_xor_sync(0xffffffffu, ld[s], o);
            ok[s] = __shfl_xor_sync(0xffffffffu, lk[s], o);
          }
          merge4(ld, lk, od, ok);
        }
        if (tx == 0) {
          float rd[kRerank];
          int rk[kRerank];
#pragma unroll
          for (int s = 0; s < kRerank; ++s) {
            rd[s] = rowd[s * BM + r];
            rk[s] = rowk[s * BM + r];
          }
          merge4(rd, rk, ld, lk);
#pragma unroll
          for (int s = 0; s < kRerank; ++s) {
            rowd[s * BM + r] = rd[s];
            rowk[s * BM + r] = rk[s];
          }
        }
      }
    } else if (!kExact && c % nd == nd - 1) {  // tile done: fold its distances into the running minima, codes ascending
      const int code0 = (tile0 + c / nd) * BN;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int r = (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
        const float xn = xsq[r];
        float best = sbest[i][threadIdx.x];
        int bk = sbk[i][threadIdx.x];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int code = code0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + j - 4);
          if (code < K) {
            // (||x||^2 - 2 x.c) + ||c||^2 rounded step by step, as the fp32 reference does (no fma).
            const float d = cosine ? __fsub_rn(1.f, acc[i][j]) : __fadd_rn(__fsub_rn(xn, 2.f * acc[i][j]), cnh[code]);
            if (better(d, code, best, bk)) {
              best = d;
              bk = code;
            }
          }
          acc[i][j] = 0.f;
        }
        sbest[i][threadIdx.x] = best;
        sbk[i][threadIdx.x] = bk;
      }
    }
  }
  if constexpr (kExact) {  // each row's list to the workspace: [split][h * N + n][kRerank]
    if (tx == 0) {
      const long long out0 = (static_cast<long long>(split) * gridDim.y + h) * N + row0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int r = (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
        if (r < rows_left) {
#pragma unroll
          for (int s = 0; s < kRerank; ++s) {
            ws_d[(out0 + r) * kRerank + s] = rowd[s * BM + r];
            ws_k[(out0 + r) * kRerank + s] = rowk[s * BM + r];
          }
        }
      }
    }
  } else {
    // The 16 threads of a row group are lanes tx of one half-warp.
    float best[8];
    int bk[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      best[i] = sbest[i][threadIdx.x];
      bk[i] = sbk[i][threadIdx.x];
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) {
        const float d2 = __shfl_xor_sync(0xffffffffu, best[i], o);
        const int k2 = __shfl_xor_sync(0xffffffffu, bk[i], o);
        if (better(d2, k2, best[i], bk[i])) {
          best[i] = d2;
          bk[i] = k2;
        }
      }
    }
    if (tx == 0) {
      const long long out0 = (static_cast<long long>(split) * gridDim.y + h) * N + row0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int r = (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
        if (r < rows_left) {
          ws_d[out0 + r] = best[i];
          ws_k[out0 + r] = bk[i];
        }
      }
    }
  }
}

__global__ void vq_combine_kernel(const float* __restrict__ ws_d, const int* __restrict__ ws_k, long long rows,
                                  int N, int K, int splits, bool cosine, int64_t* __restrict__ indices,
                                  float* __restrict__ dist, int64_t* __restrict__ counts) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  float d = ws_d[i];
  int k = ws_k[i];
  for (int s = 1; s < splits; ++s) {
    const float d2 = ws_d[s * rows + i];
    const int k2 = ws_k[s * rows + i];
    if (better(d2, k2, d, k)) {
      d = d2;
      k = k2;
    }
  }
  k = (k >= 0 && k < K) ? k : 0;  // only reachable if every split saw no code: K >= 1 excludes it
  indices[i] = k;
  dist[i] = d < 0.f ? 0.f : (cosine && d > 2.f ? 2.f : d);  // as the CPU, Triton and torch paths clamp
  if (counts != nullptr) {
    const long long h = i / N;
    atomicAdd(reinterpret_cast<unsigned long long*>(counts + h * K + k), 1ull);
  }
}

// Exact mode: one warp per row. Merges the splits' 4-lists in split order, re-ranks the candidates by the
// direct form in fp32 from the original values, writes the lowest-index minimum, its direct distance and
// the counts.
constexpr int kRerankWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kRerankWarps * 32)
    vq_rerank_kernel(const T* __restrict__ x, const T* __restrict__ cb, const float* __restrict__ ws_d,
                     const int* __restrict__ ws_k, long long rows, int N, int K, int D, int splits, bool cosine,
                     int64_t* __restrict__ indices, float* __restrict__ dist, int64_t* __restrict__ counts) {
  const long long i = static_cast<long long>(blockIdx.x) * kRerankWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= rows) return;  // whole warps leave together
  float cd[kRerank];
  int ck[kRerank];
#pragma unroll
  for (int s = 0; s < kRerank; ++s) {
    cd[s] = ws_d[i * kRerank + s];
    ck[s] = ws_k[i * kRerank + s];
  }
  for (int sp = 1; sp < splits; ++sp) {
    float od[kRerank];
    int ok[kRerank];
#pragma unroll
    for (int s = 0; s < kRerank; ++s) {
      od[s] = ws_d[(sp * rows + i) * kRerank + s];
      ok[s] = ws_k[(sp * rows + i) * kRerank + s];
    }
    merge4(cd, ck, od, ok);
  }
  const long long h = i / N;
  const T* xr = x + i * D;
  float b = INFINITY;
  int bi = -1;
#pragma unroll
  for (int s = 0; s < kRerank; ++s) {
    const int k = ck[s];
    if (k < 0 || k >= K) continue;  // an empty slot (K < 4 or a split without codes): the same on every lane
    const T* cr = cb + (h * K + k) * static_cast<long long>(D);
    float acc = 0.f;
    if (cosine) {
      for (int d = lane; d < D; d += 32) acc = fmaf(static_cast<float>(xr[d]), static_cast<float>(cr[d]), acc);
    } else {
      for (int d = lane; d < D; d += 32) {
        const float df = static_cast<float>(xr[d]) - static_cast<float>(cr[d]);
        acc = fmaf(df, df, acc);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    acc = __shfl_sync(0xffffffffu, acc, 0);  // lane 0's sum on every lane: one decision per warp
    const float dd = cosine ? 1.f - acc : acc;
    const bool dn = isnan(dd), bn = isnan(b);
    if (bi < 0 || (dn && !bn) || (!dn && !bn && dd < b) || (k < bi && (dd == b || (dn && bn)))) {
      b = dd;
      bi = k;
    }
  }
  if (lane != 0) return;
  if (cosine && b < 0.f) b = 0.f;
  if (cosine && b > 2.f) b = 2.f;
  const int k = bi < 0 ? 0 : bi;
  indices[i] = k;
  dist[i] = (!cosine && b < 0.f) ? 0.f : b;
  if (counts != nullptr) atomicAdd(reinterpret_cast<unsigned long long*>(counts + h * K + k), 1ull);
}

template <typename T>
void launch(const VqArgs& a, cudaStream_t stream) {
  const int H = static_cast<int>(a.x.size(0)), N = static_cast<int>(a.x.size(1)), D = static_cast<int>(a.x.size(2));
  const int K = static_cast<int>(a.codebook.size(1));
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int row_blocks = (N + BM - 1) / BM, ntiles = (K + BN - 1) / BN;
  // Split the codebook when the row blocks alone cannot fill two blocks per SM.
  const long long blocks = static_cast<long long>(row_blocks) * H;
  int splits = static_cast<int>(std::min<long long>(ntiles, std::max<long long>(1, (2LL * sms + blocks - 1) / blocks)));
  const int tiles_per_split = (ntiles + splits - 1) / splits;
  splits = (ntiles + tiles_per_split - 1) / tiles_per_split;
  const long long rows = static_cast<long long>(H) * N;
  const int per_row = a.exact ? kRerank : 1;
  at::Tensor ws_d = at::empty({splits, rows, per_row}, a.x.options().dtype(at::kFloat));
  at::Tensor ws_k = at::empty({splits, rows, per_row}, a.x.options().dtype(at::kInt));
  TORCH_CHECK(H <= 65535 && splits <= 65535, "vq_nearest_cuda: at most 65535 heads, got ", H);
  const dim3 grid(row_blocks, H, splits);
  const T* xp = reinterpret_cast<const T*>(a.x.data_ptr());
  const T* cp = reinterpret_cast<const T*>(a.codebook.data_ptr());
  int64_t* counts = a.with_counts ? a.counts.data_ptr<int64_t>() : nullptr;
  if (a.exact) {
    vq_tile_kernel<T, true><<<grid, kThreads, 0, stream>>>(xp, cp, a.code_sqnorm.data_ptr<float>(), N, K, D,
                                                           tiles_per_split, a.cosine, ws_d.data_ptr<float>(),
                                                           ws_k.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const long long rblocks = (rows + kRerankWarps - 1) / kRerankWarps;
    vq_rerank_kernel<T><<<static_cast<unsigned>(rblocks), kRerankWarps * 32, 0, stream>>>(
        xp, cp, ws_d.data_ptr<float>(), ws_k.data_ptr<int>(), rows, N, K, D, splits, a.cosine,
        a.indices.data_ptr<int64_t>(), a.dist.data_ptr<float>(), counts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  vq_tile_kernel<T, false><<<grid, kThreads, 0, stream>>>(xp, cp, a.code_sqnorm.data_ptr<float>(), N, K, D,
                                                          tiles_per_split, a.cosine, ws_d.data_ptr<float>(),
                                                          ws_k.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int threads = 256;
  const long long cblocks = (rows + threads - 1) / threads;
  vq_combine_kernel<<<static_cast<unsigned>(cblocks), threads, 0, stream>>>(
      ws_d.data_ptr<float>(), ws_k.data_ptr<int>(), rows, N, K, splits, a.cosine, a.indices.data_ptr<int64_t>(),
      a.dist.data_ptr<float>(), counts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void vq_nearest_cuda_impl(const VqArgs& a) {
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (a.x.scalar_type()) {
    case at::kFloat:
      launch<float>(a, stream);
      break;
    case at::kHalf:
      launch<c10::Half>(a, stream);
      break;
    case at::kBFloat16:
      launch<c10::BFloat16>(a, stream);
      break;
    default:
      TORCH_CHECK(false, "vq_nearest_cuda: unsupported dtype ", a.x.scalar_type());
  }
}

}  // namespace vq
}  // namespace fastgen
