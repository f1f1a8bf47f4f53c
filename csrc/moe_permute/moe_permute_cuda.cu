// CUDA MoE routing: a stable counting sort of the T*k assignments by expert id, in the j-major priority
// order (see fastgen/ops/moe_permute.py). Four small kernels, no one-hot tensor, no host synchronisation:
//   1. hist:    one block per chunk of kChunk priority positions -> per-chunk expert counts (shared-memory
//               atomics: counts only, order does not matter here);
//   2. scan:    one block per expert -> exclusive prefix over chunks (each chunk's base rank) and totals;
//   3. offsets: one block -> offsets = exclusive prefix over experts of min(total, capacity);
//   4. rank:    one block per chunk; each warp takes a contiguous segment, counts it, the block turns the
//               counts into per-warp bases, then every warp walks its segment 32 positions at a time and
//               ranks equal keys with __match_any_sync + popc of the lower lanes: the ranks follow the
//               priority order exactly (stable), so the output equals the sequential reference bit for bit.
#include "moe_permute/moe_permute.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

namespace fastgen {
namespace moe {
namespace {

constexpr int kChunk = 1024;  // priority positions per block in kernels 1 and 4
constexpr int kScanThreads = 256;
constexpr int kOffsetThreads = 1024;

template <typename idx_t>
__device__ __forceinline__ int load_key(const idx_t* __restrict__ idx, const bool* __restrict__ valid, int p, int T,
                                        int k, int E, int* a_out) {
  const int t = p % T, j = p / T, a = t * k + j;
  *a_out = a;
  if (valid != nullptr && !valid[a]) return E;
  const long long e = static_cast<long long>(idx[a]);
  return (e >= 0 && e < E) ? static_cast<int>(e) : E;  // out of range: never trusted (Python asserts it)
}

template <typename idx_t>
__global__ void hist_kernel(const idx_t* __restrict__ idx, const bool* __restrict__ valid, int n, int T, int k,
                            int E, int* __restrict__ chunk_counts) {
  extern __shared__ int h[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) h[e] = 0;
  __syncthreads();
  const int base = blockIdx.x * kChunk;
  for (int i = threadIdx.x; i < kChunk; i += blockDim.x) {
    const int p = base + i;
    if (p >= n) break;
    int a;
    const int e = load_key(idx, valid, p, T, k, E, &a);
    if (e < E) atomicAdd(&h[e], 1);
  }
  __syncthreads();
  int* out = chunk_counts + static_cast<long long>(blockIdx.x) * E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) out[e] = h[e];
}

// In place: chunk_counts[c, e] -> sum_{c' < c} chunk_counts[c', e]; counts[e] = the total.
__global__ void scan_chunks_kernel(int* __restrict__ chunk_counts, int nchunks, int E, int* __restrict__ counts) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int carry;
  const int e = blockIdx.x;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int c0 = 0; c0 < nchunks; c0 += kScanThreads) {
    const int c = c0 + threadIdx.x;
    const int v = c < nchunks ? chunk_counts[static_cast<long long>(c) * E + e] : 0;
    int excl, total;
    Scan(tmp).ExclusiveSum(v, excl, total);
    if (c < nchunks) chunk_counts[static_cast<long long>(c) * E + e] = carry + excl;
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) counts[e] = carry;
}

// one block of kOffsetThreads threads: the bound lets ptxas budget registers for 1,024 threads (a launch with
// more registers per thread than 64 would fail with "too many resources requested")
__global__ void __launch_bounds__(kOffsetThreads) offsets_kernel(const int* __restrict__ counts, int E, int capacity,
                                                                 int* __restrict__ offsets) {
  using Scan = cub::BlockScan<int, kOffsetThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int e0 = 0; e0 < E; e0 += kOffsetThreads) {
    const int e = e0 + threadIdx.x;
    int v = e < E ? counts[e] : 0;
    if (capacity >= 0) v = min(v, capacity);
    int excl, total;
    Scan(tmp).ExclusiveSum(v, excl, total);
    if (e < E) offsets[e] = carry + excl;
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) offsets[E] = carry;
}

template <typename idx_t>
__global__ void rank_kernel(const idx_t* __restrict__ idx, const bool* __restrict__ valid, int n, int T, int k,
                            int E, int capacity, const int* __restrict__ chunk_base,
                            const int* __restrict__ offsets, int* __restrict__ dest, int* __restrict__ src) {
  extern __shared__ int wrank[];  // (warps, E): each warp's next rank per expert
  const int warps = blockDim.x / 32, w = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int seg = kChunk / warps;
  const int begin = blockIdx.x * kChunk + w * seg;
  for (int i = threadIdx.x; i < warps * E; i += blockDim.x) wrank[i] = 0;
  __syncthreads();
  int* mine = wrank + w * E;
  for (int i = lane; i < seg; i += 32) {
    const int p = begin + i;
    if (p >= n) break;
    int a;
    const int e = load_key(idx, valid, p, T, k, E, &a);
    if (e < E) atomicAdd(&mine[e], 1);
  }
  __syncthreads();
  const int* cb = chunk_base + static_cast<long long>(blockIdx.x) * E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int run = cb[e];
    for (int v = 0; v < warps; ++v) {
      const int c = wrank[v * E + e];
      wrank[v * E + e] = run;
      run += c;
    }
  }
  __syncthreads();
  const unsigned lower = (1u << lane) - 1u;
  for (int i = 0; i < seg; i += 32) {
    const int p = begin + i + lane;
    int a = 0, e = E + 1;  // E + 1: past the end, grouped apart from the invalid (E) positions
    if (p < n) e = load_key(idx, valid, p, T, k, E, &a);
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    int r = 0;
    if (e < E) r = mine[e] + __popc(peers & lower);
    __syncwarp();
    if (e < E && lane == __ffs(peers) - 1) mine[e] += __popc(peers);
    __syncwarp();
    if (p < n) {
      int d = -1;
      if (e < E && (capacity < 0 || r < capacity)) {
        d = offsets[e] + r;
        src[d] = a;
      }
      dest[a] = d;
    }
  }
}

}  // namespace

void moe_route_cuda_impl(RouteArgs& r) {
  const c10::cuda::CUDAGuard guard(r.expert_idx.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int T = static_cast<int>(r.expert_idx.size(0)), k = static_cast<int>(r.expert_idx.size(1));
  const int n = T * k, E = static_cast<int>(r.num_experts), cap = static_cast<int>(r.capacity);
  const int nchunks = (n + kChunk - 1) / kChunk;
  int* counts = r.counts.data_ptr<int>();
  int* offsets = r.offsets.data_ptr<int>();
  if (n == 0) {
    r.counts.zero_();
    r.offsets.zero_();
    return;
  }
  at::Tensor chunk = at::empty({nchunks, E}, r.expert_idx.options().dtype(at::kInt));
  const bool* valid = r.valid.has_value() ? r.valid->data_ptr<bool>() : nullptr;
  // 4 warps per rank block while their counters fit the default 48 KB of shared memory, else 1.
  const int warps = 4 * E * static_cast<int>(sizeof(int)) <= 48 * 1024 ? 4 : 1;
  AT_DISPATCH_INDEX_TYPES(r.expert_idx.scalar_type(), "moe_route_cuda", [&] {
    const index_t* idx = r.expert_idx.data_ptr<index_t>();
    hist_kernel<index_t><<<nchunks, 256, E * sizeof(int), stream>>>(idx, valid, n, T, k, E, chunk.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scan_chunks_kernel<<<E, kScanThreads, 0, stream>>>(chunk.data_ptr<int>(), nchunks, E, counts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    offsets_kernel<<<1, kOffsetThreads, 0, stream>>>(counts, E, cap, offsets);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    rank_kernel<index_t><<<nchunks, 32 * warps, warps * E * sizeof(int), stream>>>(
        idx, valid, n, T, k, E, cap, chunk.data_ptr<int>(), offsets, r.dest.data_ptr<int>(), r.src.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace moe
}  // namespace fastgen
