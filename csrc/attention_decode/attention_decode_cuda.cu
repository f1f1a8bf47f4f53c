// KV-cache decoding attention, CUDA kernel: split-K flash-decoding (Dao et al., "Flash-Decoding for
// long-context inference", 2023) for contiguous and paged caches.
//
// Grid (1-D): one block per (batch * kv_head, split, row tile). A block owns one KV head of one sequence,
// a contiguous chunk of its cache (split s of num_splits) and up to kRows query rows of the head's group
// (rows r = i * G + g: query token i, query head h * G + g), so each K/V row is read from HBM once per
// group. The block's kThreads threads form NG key groups of TPK threads; a key group reads one K row and
// one V row per step with 16-byte loads (TPK threads x 16 B cover a head_dim of up to HD), kUnroll keys
// in flight per thread. Scores are reduced across the TPK lanes with warp shuffles and every key group
// keeps its own online softmax (running max m, sum l, float32 accumulator over its D slice) per row,
// folded every kFoldKeys keys into the group's slot of shared memory (a long split stays accurate); the
// NG groups are merged through shared memory at the end. With one split the block writes the output;
// with several it writes the normalised partial out and its log2-sum-exp to float32 workspaces and
// decode_combine_kernel merges the splits. Exponentials are exp2 of log2(e)-prescaled scores.
//
// Templated on the element type and the head-dim bucket HD (64, 128, 256): 9 instantiations. The paged
// cache is a run-time branch in the address computation (uniform over the launch, memory-bound kernel).
// Requirements checked by the launcher: head_dim % (16 / sizeof(T)) == 0, K/V 16-byte aligned rows.
#include <ATen/Dispatch.h>
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

#include "attention_decode/attention_decode.h"

namespace fastgen {
namespace decode {
namespace {

constexpr int kThreads = 128;
constexpr int kRows = 8;  // query rows per block (e.g. a GQA group of 8 at seq_q = 1)
// Keys a key group adds to its running (m, l, acc) before folding them into its slot of shared memory:
// a float32 running sum grown one key at a time over millions of keys loses the small terms (over 2^24
// keys it stalls outright), as in the C++ kernel's kBlock.
constexpr int kFoldKeys = 4096;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int HD>
struct Cfg {
  static constexpr int VEC = 16 / sizeof(T);                       // elements per 16-byte load
  static constexpr int TPK = (HD / VEC) < 32 ? (HD / VEC) : 32;    // threads per key row (<= a warp)
  static constexpr int EPT = HD / TPK;                             // elements per thread
  static constexpr int PACKS = EPT / VEC;                          // 16-byte loads per row per thread
  static constexpr int NG = kThreads / TPK;                        // key groups per block
  static constexpr int UNROLL = PACKS == 1 ? 4 : 2;                // keys in flight per key group
  static constexpr int STEP = NG * UNROLL;                         // keys per block iteration
  static_assert(EPT % VEC == 0 && TPK * EPT == HD, "head-dim bucket must split into 16-byte packs");
};

template <typename T>
struct alignas(16) Pack16 {
  T v[16 / sizeof(T)];
};

template <typename T>
__device__ __forceinline__ Pack16<T> load16(const T* ptr) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(ptr));
  Pack16<T> out;
  static_assert(sizeof(out) == sizeof(raw), "a pack is 16 bytes");
  memcpy(&out, &raw, sizeof(raw));
  return out;
}

template <typename T>
__device__ __forceinline__ Pack16<T> zero16() {
  Pack16<T> out;
#pragma unroll
  for (int e = 0; e < 16 / static_cast<int>(sizeof(T)); ++e) out.v[e] = static_cast<T>(0.0f);
  return out;
}

template <typename T, int HD>
__global__ void __launch_bounds__(kThreads, 2)
    decode_kernel(const DecodeParams<T> p, int S, int tiles, float* __restrict__ ws_o, float* __restrict__ ws_lse) {
  using C = Cfg<T, HD>;
  constexpr int VEC = C::VEC, TPK = C::TPK, EPT = C::EPT, PACKS = C::PACKS, NG = C::NG, UNROLL = C::UNROLL;
  __shared__ float sm_m[NG][kRows];
  __shared__ float sm_l[NG][kRows];
  __shared__ float sm_acc[NG][kRows][HD];

  int64_t blk = blockIdx.x;
  const int tile = static_cast<int>(blk % tiles);
  blk /= tiles;
  const int split = static_cast<int>(blk % S);
  const int64_t bh = blk / S;
  const int64_t b = bh / p.Hkv, h = bh % p.Hkv;
  const int grp = threadIdx.x / TPK, lane = threadIdx.x % TPK;
  const int R = static_cast<int>(p.Sq * p.G);
  const int r0 = tile * kRows;
  const int nr = min(kRows, R - r0);
  const int D = static_cast<int>(p.D);
  const int len = static_cast<int>(seq_len(p, b));

  // this split's keys: an equal share of the sequence, rounded up to whole block iterations (in int64: len
  // may be close to 2^31)
  const int64_t chunk = ((len + int64_t{S} - 1) / S + C::STEP - 1) / C::STEP * C::STEP;
  const int j0 = static_cast<int>(min(int64_t{len}, split * chunk));
  const int j1 = static_cast<int>(min(int64_t{len}, j0 + chunk));

  float q[kRows][EPT];
  int lim[kRows];
  int jend = j0;
  const float qscale = p.scale * kLog2e;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    lim[r] = 0;
#pragma unroll
    for (int e = 0; e < EPT; ++e) q[r][e] = 0.0f;
    if (r < nr) {
      const int row = r0 + r;
      const int64_t i = row / p.G, g = row % p.G;
      lim[r] = static_cast<int>(row_limit(p, len, i));
      jend = max(jend, min(j1, lim[r]));
      const T* qp = p.q + b * p.q_s0 + i * p.q_s1 + (h * p.G + g) * p.q_s2;
#pragma unroll
      for (int c = 0; c < PACKS; ++c) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int d = (c * TPK + lane) * VEC + e;
          q[r][c * VEC + e] = d < D ? static_cast<float>(qp[d]) * qscale : 0.0f;
        }
      }
    }
  }
  jend = min(jend, j1);

  // (m, l, acc): the running softmax of the current kFoldKeys keys, in registers; (sm_m, sm_l, sm_acc)[grp]:
  // the earlier ones folded together, in shared memory (no extra registers). Every lane of a key group
  // holds the same m / l (the scores are reduced across the group) and only its own D slice of sm_acc.
  float m[kRows], l[kRows], acc[kRows][EPT];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < EPT; ++e) acc[r][e] = 0.0f;
#pragma unroll
    for (int c = 0; c < PACKS; ++c) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) sm_acc[grp][r][(c * TPK + lane) * VEC + e] = 0.0f;
    }
    if (lane == 0) {
      sm_m[grp][r] = -INFINITY;
      sm_l[grp][r] = 0.0f;
    }
  }
  __syncwarp();  // a key group lies within one warp (TPK divides 32)
  // log-sum-exp fold of the running state into the folded one (a NaN sum stays NaN), then a fresh start.
  // Called by every thread of the block together; the group's lanes read sm_m / sm_l before lane 0
  // rewrites them.
  auto fold = [&]() {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float fm = sm_m[grp][r];
      const float mx = fmaxf(fm, m[r]);
      const float mu = mx == -INFINITY ? 0.0f : mx;
      const float ca = exp2f(fm - mu), cb = exp2f(m[r] - mu);
      const float fl = sm_l[grp][r] * ca + l[r] * cb;
      __syncwarp();
      if (lane == 0) {
        sm_m[grp][r] = mx;
        sm_l[grp][r] = fl;
      }
      m[r] = -INFINITY;
      l[r] = 0.0f;
#pragma unroll
      for (int c = 0; c < PACKS; ++c) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          float& f = sm_acc[grp][r][(c * TPK + lane) * VEC + e];
          f = f * ca + acc[r][c * VEC + e] * cb;
          acc[r][c * VEC + e] = 0.0f;
        }
      }
    }
    __syncwarp();
  };
  constexpr int kFoldIters = kFoldKeys / UNROLL;  // block iterations between folds
  int since_fold = 0;

  const T* kbase = p.k + h * p.k_s2;
  const T* vbase = p.v + h * p.v_s2;
  for (int jb = j0; jb < jend; jb += C::STEP) {  // block-uniform bounds: every lane reaches the shuffles
    if (++since_fold > kFoldIters) {
      fold();
      since_fold = 1;
    }
    Pack16<T> kp[UNROLL][PACKS], vp[UNROLL][PACKS];
    int jj[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      jj[u] = jb + u * NG + grp;
      if (jj[u] < jend) {
        const T* kr = kbase + key_offset(p, b, jj[u], p.k_s0, p.k_s1);
        const T* vr = vbase + key_offset(p, b, jj[u], p.v_s0, p.v_s1);
#pragma unroll
        for (int c = 0; c < PACKS; ++c) {
          const int d0 = (c * TPK + lane) * VEC;
          kp[u][c] = d0 < D ? load16(kr + d0) : zero16<T>();
          vp[u][c] = d0 < D ? load16(vr + d0) : zero16<T>();
        }
      } else {
#pragma unroll
        for (int c = 0; c < PACKS; ++c) {
          kp[u][c] = zero16<T>();
          vp[u][c] = zero16<T>();
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= nr) continue;  // uniform over the block
      float s[UNROLL];
      float mnew = m[r];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < PACKS; ++c) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) dot = fmaf(q[r][c * VEC + e], static_cast<float>(kp[u][c].v[e]), dot);
        }
#pragma unroll
        for (int off = TPK / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        s[u] = (jj[u] < jend && jj[u] < lim[r]) ? dot : -INFINITY;
        mnew = fmaxf(mnew, s[u]);
      }
      const float mu = mnew == -INFINITY ? 0.0f : mnew;  // no visible key yet: keep everything at zero
      const float corr = exp2f(m[r] - mu);
      float psum = 0.0f;
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        s[u] = exp2f(s[u] - mu);
        psum += s[u];
      }
      l[r] = l[r] * corr + psum;
      m[r] = mnew;
#pragma unroll
      for (int c = 0; c < PACKS; ++c) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          float a = acc[r][c * VEC + e] * corr;
#pragma unroll
          for (int u = 0; u < UNROLL; ++u) a = fmaf(s[u], static_cast<float>(vp[u][c].v[e]), a);
          acc[r][c * VEC + e] = a;
        }
      }
    }
  }

  // merge the NG key groups of the block
  fold();
  __syncthreads();
  for (int idx = threadIdx.x; idx < nr * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int g = 0; g < NG; ++g) mx = fmaxf(mx, sm_m[g][r]);
    const float mu = mx == -INFINITY ? 0.0f : mx;
    float den = 0.0f, num = 0.0f;
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      const float w = exp2f(sm_m[g][r] - mu);
      den = fmaf(sm_l[g][r], w, den);
      num = fmaf(sm_acc[g][r][d], w, num);
    }
    // den == 0: no visible key (zeros); a NaN den (a NaN / inf input) must stay NaN, as the reference
    const float o = den == 0.0f ? 0.0f : num / den;
    const int row = r0 + r;
    if (S == 1) {
      const int64_t i = row / p.G, g = row % p.G;
      p.out[((b * p.Sq + i) * p.Hq + h * p.G + g) * p.D + d] = static_cast<T>(o);
    } else {
      const int64_t slot = (bh * S + split) * R + row;
      ws_o[slot * p.D + d] = o;
      if (d == 0) ws_lse[slot] = den == 0.0f ? -INFINITY : mu + log2f(den);  // NaN den: NaN lse
    }
  }
}

// One warp per (b, kv head, row): out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M).
constexpr int kCombineWarps = 4;

template <typename T>
__global__ void __launch_bounds__(kCombineWarps * 32)
    decode_combine_kernel(const DecodeParams<T> p, int S, const float* __restrict__ ws_o,
                          const float* __restrict__ ws_lse) {
  __shared__ float sm_w[kCombineWarps][kMaxSplits];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t R = p.Sq * p.G;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kCombineWarps + warp;
  if (task >= p.B * p.Hkv * R) return;  // whole warps leave together
  const int64_t bh = task / R, row = task % R;
  const int64_t b = bh / p.Hkv, h = bh % p.Hkv, i = row / p.G, g = row % p.G;
  float mx = -INFINITY;
  for (int s = lane; s < S; s += 32) mx = fmaxf(mx, ws_lse[(bh * S + s) * R + row]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  // fmaxf skips a NaN lse; its weight below is NaN and carries it into den and the output
  const float mu = mx == -INFINITY ? 0.0f : mx;
  float den = 0.0f;
  for (int s = lane; s < S; s += 32) {
    const float lse = ws_lse[(bh * S + s) * R + row];
    const float w = lse == -INFINITY ? 0.0f : exp2f(lse - mu);
    sm_w[warp][s] = w;
    den += w;
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) den += __shfl_xor_sync(0xffffffffu, den, off);
  __syncwarp();
  const float inv = den == 0.0f ? 0.0f : 1.0f / den;
  T* dst = p.out + ((b * p.Sq + i) * p.Hq + h * p.G + g) * p.D;
  for (int64_t d = lane; d < p.D; d += 32) {
    float o = 0.0f;
    for (int s = 0; s < S; ++s) {
      const float w = sm_w[warp][s];
      if (w != 0.0f) o = fmaf(w, ws_o[((bh * S + s) * R + row) * p.D + d], o);
    }
    dst[d] = static_cast<T>(o * inv);
  }
}

int sm_count(int device) {
  static int cache[64] = {0};
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device] = n;
  return n;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, int HD>
void launch(const DecodeArgs& a, const DecodeParams<T>& p, cudaStream_t stream) {
  const int64_t R = p.Sq * p.G, BH = p.B * p.Hkv;
  const int64_t tiles = (R + kRows - 1) / kRows;
  const int64_t base = BH * tiles;
  // Two resident blocks per SM (launch bounds): split until one wave is full, each split keeping at least
  // 256 keys of the cache (the cache capacity: the real lengths are on the device).
  const int64_t wave = 2 * static_cast<int64_t>(sm_count(a.q.get_device()));
  int64_t heuristic = base >= wave ? 1 : (wave + base - 1) / base;
  heuristic = std::min(heuristic, std::max<int64_t>(1, p.capacity / 256));
  const int64_t S = clamp_splits(a.num_splits, heuristic);
  const int64_t blocks = base * S;
  TORCH_CHECK(blocks <= INT_MAX, "attention_decode_cuda: too many blocks (", blocks, ")");
  at::Tensor ws_o, ws_lse;
  float* wo = nullptr;
  float* wl = nullptr;
  if (S > 1) {
    const auto opts = a.q.options().dtype(at::kFloat);
    ws_o = at::empty({BH * S * R * p.D}, opts);
    ws_lse = at::empty({BH * S * R}, opts);
    wo = ws_o.data_ptr<float>();
    wl = ws_lse.data_ptr<float>();
  }
  decode_kernel<T, HD><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, static_cast<int>(S),
                                                                               static_cast<int>(tiles), wo, wl);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (S > 1) {
    const int64_t rows = BH * R;
    const int64_t cblocks = (rows + kCombineWarps - 1) / kCombineWarps;
    TORCH_CHECK(cblocks <= INT_MAX, "attention_decode_cuda: too many rows (", rows, ")");
    decode_combine_kernel<T><<<static_cast<unsigned>(cblocks), kCombineWarps * 32, 0, stream>>>(
        p, static_cast<int>(S), wo, wl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void run(const DecodeArgs& a, cudaStream_t stream) {
  const DecodeParams<T> p = make_params<T>(a);
  constexpr int64_t V = 16 / sizeof(T);
  // 16-byte K/V loads: aligned bases, every stride and head_dim a whole number of packs (the Python cuda
  // backend refuses other layouts before this point; the check keeps a direct call from crashing)
  TORCH_CHECK(p.D % V == 0, "attention_decode_cuda: head_dim must be a multiple of ", V, " for ",
              a.q.scalar_type(), ", got ", p.D);
  TORCH_CHECK(aligned16(p.k) && aligned16(p.v) && p.k_s0 % V == 0 && p.k_s1 % V == 0 && p.k_s2 % V == 0 &&
                  p.v_s0 % V == 0 && p.v_s1 % V == 0 && p.v_s2 % V == 0,
              "attention_decode_cuda: k_cache / v_cache rows must be 16-byte aligned (strides ", a.k.strides(),
              ", ", a.v.strides(), ")");
  TORCH_CHECK(p.capacity < INT_MAX, "attention_decode_cuda: cache capacity ", p.capacity, " >= 2^31");
  if (p.D <= 64) {
    launch<T, 64>(a, p, stream);
  } else if (p.D <= 128) {
    launch<T, 128>(a, p, stream);
  } else {
    launch<T, 256>(a, p, stream);
  }
}

}  // namespace

void attention_decode_cuda_impl(const DecodeArgs& a) {
  const c10::cuda::CUDAGuard guard(a.q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_SWITCH(a.q.scalar_type(), "fastgen::attention_decode_cuda",
                     AT_DISPATCH_CASE(at::ScalarType::Float, [&] { run<scalar_t>(a, stream); })
                     AT_DISPATCH_CASE(at::ScalarType::Half, [&] { run<scalar_t>(a, stream); })
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, [&] { run<scalar_t>(a, stream); }));
}

}  // namespace decode
}  // namespace fastgen
