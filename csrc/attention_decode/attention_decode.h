// KV-cache decoding attention (flash-decoding): the argument bundle, the raw-pointer view the kernels
// take, and the cache addressing shared by the C++ CPU kernel and the CUDA kernel.
//
// For batch b, query token i < Sq and query head hq (KV head h = hq / G, G = Hq / Hkv):
//   len   = cache_seqlens[b]                       (valid keys, the Sq new tokens included)
//   lim_i = causal ? len - Sq + i + 1 : len        (bottom-right aligned causal mask), clamped to [0, len]
//   out   = softmax_j<lim_i(scale q.k_j) @ v_j,    zero when lim_i == 0
// Key j of sequence b lives at k[b, j, h] (contiguous cache) or at k[block_table[b, j / page], j % page, h]
// (paged cache). Both kernels split the keys of a (b, h) pair into chunks (num_splits of them when it is
// > 0; the CPU kernel also caps a chunk at 4096 keys and, for float32 / 16-bit caches, takes a block of
// KV heads per chunk), keep an online softmax (running max m, running sum l, unnormalised accumulator) per
// query row and merge the chunks with their log-sum-exp.
//
// This header is included by the CUDA translation unit, so it must not include torch/extension.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#ifndef FASTGEN_HD
#if defined(__CUDACC__)
#define FASTGEN_HD __host__ __device__ __forceinline__
#else
#define FASTGEN_HD inline
#endif
#endif

namespace fastgen {
namespace decode {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxSplits = 128;

// Validated arguments of one call, built and checked by the entry points in csrc/bindings.cpp (which also
// allocate `out`).
struct DecodeArgs {
  at::Tensor q;                           // (B, Sq, Hq, D), last dim contiguous
  at::Tensor k, v;                        // (B, L, Hkv, D) or paged (P, page, Hkv, D); last dim contiguous
  at::Tensor seqlens;                     // int32 (B,), contiguous
  std::optional<at::Tensor> block_table;  // int32 (B, max_pages), last dim contiguous; paged only
  at::Tensor out;                         // (B, Sq, Hq, D) contiguous, q's dtype
  double scale = 1.0;
  bool causal = true;
  int64_t num_splits = 0;  // 0: heuristic
};

// Raw pointers, sizes and element strides of one call; T is the element type.
template <typename T>
struct DecodeParams {
  const T* q;
  const T* k;
  const T* v;
  const int32_t* seqlens;
  const int32_t* block_table;  // nullptr: contiguous cache
  T* out;
  int64_t q_s0, q_s1, q_s2;  // q strides of (batch, token, head)
  int64_t k_s0, k_s1, k_s2;  // k strides of (batch or page, position, head)
  int64_t v_s0, v_s1, v_s2;
  int64_t bt_s0;
  int64_t B, Sq, Hq, Hkv, G, D;
  int64_t capacity;   // keys a sequence can hold: L, or max_pages * page
  int64_t page_size;  // 0 for a contiguous cache
  int64_t max_pages, num_pages;
  float scale;
  bool causal;
};

template <typename T>
DecodeParams<T> make_params(const DecodeArgs& a) {
  DecodeParams<T> p;
  p.q = a.q.data_ptr<T>();
  p.k = a.k.data_ptr<T>();
  p.v = a.v.data_ptr<T>();
  p.seqlens = a.seqlens.data_ptr<int32_t>();
  p.out = a.out.data_ptr<T>();
  p.q_s0 = a.q.stride(0);
  p.q_s1 = a.q.stride(1);
  p.q_s2 = a.q.stride(2);
  p.k_s0 = a.k.stride(0);
  p.k_s1 = a.k.stride(1);
  p.k_s2 = a.k.stride(2);
  p.v_s0 = a.v.stride(0);
  p.v_s1 = a.v.stride(1);
  p.v_s2 = a.v.stride(2);
  p.B = a.q.size(0);
  p.Sq = a.q.size(1);
  p.Hq = a.q.size(2);
  p.D = a.q.size(3);
  p.Hkv = a.k.size(2);
  p.G = p.Hq / p.Hkv;
  if (a.block_table.has_value()) {
    p.block_table = a.block_table->data_ptr<int32_t>();
    p.bt_s0 = a.block_table->stride(0);
    p.page_size = a.k.size(1);
    p.max_pages = a.block_table->size(1);
    p.num_pages = a.k.size(0);
    p.capacity = p.max_pages * p.page_size;
  } else {
    p.block_table = nullptr;
    p.bt_s0 = 0;
    p.page_size = 0;
    p.max_pages = 0;
    p.num_pages = 0;
    p.capacity = a.k.size(1);
  }
  p.scale = static_cast<float>(a.scale);
  p.causal = a.causal;
  return p;
}

// Valid keys of sequence b, clamped to the cache (the Python layer asserts 0 <= len <= capacity; the clamp
// keeps a bad value from reading out of bounds).
template <typename T>
FASTGEN_HD int64_t seq_len(const DecodeParams<T>& p, int64_t b) {
  const int64_t len = p.seqlens[b];
  return len < 0 ? 0 : (len > p.capacity ? p.capacity : len);
}

// Keys visible to query token i of a sequence holding len keys.
template <typename T>
FASTGEN_HD int64_t row_limit(const DecodeParams<T>& p, int64_t len, int64_t i) {
  if (!p.causal) return len;
  const int64_t lim = len - p.Sq + i + 1;
  return lim < 0 ? 0 : (lim > len ? len : lim);
}

// Element offset of (key j of sequence b) in a cache with strides (s0, s1), without the head offset.
template <typename T>
FASTGEN_HD int64_t key_offset(const DecodeParams<T>& p, int64_t b, int64_t j, int64_t s0, int64_t s1) {
  if (p.block_table == nullptr) return b * s0 + j * s1;
  int64_t page = p.block_table[b * p.bt_s0 + j / p.page_size];
  page = page < 0 ? 0 : (page >= p.num_pages ? p.num_pages - 1 : page);  // asserted in range by the caller
  return page * s0 + (j % p.page_size) * s1;
}

// Splits used by the CPU kernel's float64 path (the CUDA launcher and the CPU float32 / 16-bit path have
// their own heuristics): enough (b, h, split) tasks to keep every thread busy, each split at least 256
// keys of the cache.
inline int64_t clamp_splits(int64_t requested, int64_t heuristic) {
  const int64_t s = requested > 0 ? requested : heuristic;
  return s < 1 ? 1 : (s > kMaxSplits ? kMaxSplits : s);
}

void attention_decode_cpu_impl(const DecodeArgs& a);
#ifdef FASTGEN_WITH_CUDA
void attention_decode_cuda_impl(const DecodeArgs& a);
#endif

}  // namespace decode
}  // namespace fastgen
