// The one Python module for fastgen's C++/CUDA ops (fastgen._C). The input checks live here, shared by
// the CPU and CUDA entry points, and run before any kernel; the kernels only see validated arguments.
// This is the only translation unit that includes torch/extension.h.
#include <torch/extension.h>

#include "attention_decode/attention_decode.h"
#include "cpu_isa.h"
#include "diffusion_step/diffusion_step.h"
#include "grouped_gemm/grouped_gemm.h"
#include "moe_permute/moe_permute.h"
#include "swiglu/swiglu.h"
#include "vq/vq.h"

namespace fastgen {
namespace diffusion {
namespace {

using OptTensor = std::optional<at::Tensor>;

// A (rows, elements) operand in the dtype and on the device of x, with at least min_rows x min_cols.
void check_rows(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t min_rows, int64_t min_cols) {
  TORCH_CHECK(t.dim() == 2, "sampler_step: ", name, " must be 2-D (rows, elements), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "sampler_step: ", name, " has dtype ", t.scalar_type(),
              ", expected ", x.scalar_type(), " like x");
  TORCH_CHECK(t.device() == x.device(), "sampler_step: ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.is_contiguous(), "sampler_step: ", name, " must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), ")");
  TORCH_CHECK(t.size(0) >= min_rows && t.size(1) >= min_cols, "sampler_step: ", name, " has shape ", t.sizes(),
              ", needs at least (", min_rows, ", ", min_cols, ")");
}

// An operand of exactly x's shape, dtype and device.
void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_rows(t, name, x, x.size(0), x.size(1));
  TORCH_CHECK(t.sizes() == x.sizes(), "sampler_step: ", name, " has shape ", t.sizes(), ", expected ", x.sizes(),
              " like x");
}

// A float32 (B,) per-sample scalar.
void check_per_sample(const OptTensor& t, const char* name, const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat, "sampler_step: ", name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(0), "sampler_step: ", name, " must have shape (", x.size(0),
              ",), got ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), "sampler_step: ", name, " must be contiguous");
  TORCH_CHECK(t->device() == x.device(), "sampler_step: ", name, " is on ", t->device(), " but x is on ",
              x.device());
}

std::tuple<at::Tensor, at::Tensor> sampler_step(bool cuda, const at::Tensor& x, const at::Tensor& cond,
                                                const OptTensor& uncond, int64_t uncond_row_offset,
                                                const at::Tensor& coeffs, const OptTensor& prev_x0,
                                                const OptTensor& noise, const OptTensor& row_scale,
                                                const OptTensor& thresh, double guidance_scale, double clip,
                                                int64_t var_mode, int64_t noise_mode, int64_t seed,
                                                int64_t sample_offset, bool want_x0, bool x0_only,
                                                const OptTensor& known, const OptTensor& keep,
                                                const OptTensor& grad, double grad_scale) {
  const char* entry = cuda ? "sampler_step_cuda" : "sampler_step_cpu";
  TORCH_CHECK(x.defined() && x.dim() == 2, "sampler_step: x must be 2-D (batch, elements), got ",
              x.defined() ? x.sizes() : at::IntArrayRef{});
  TORCH_CHECK(cuda ? x.is_cuda() : x.is_cpu(), entry, ": x must be on ", cuda ? "a CUDA device" : "the CPU",
              ", got ", x.device());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "sampler_step: x must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(x.is_contiguous(), "sampler_step: x must be contiguous (shape ", x.sizes(), ", strides ", x.strides(),
              ")");
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK(N < (int64_t{1} << 31), "sampler_step: at most 2^31 - 1 elements per sample, got ", N);
  TORCH_CHECK(var_mode == VAR_SIGMA || var_mode == VAR_LEARNED_RANGE, "sampler_step: var_mode must be 0 or 1, got ",
              var_mode);
  TORCH_CHECK(noise_mode >= NOISE_NONE && noise_mode <= NOISE_COUNTER,
              "sampler_step: noise_mode must be 0 (none), 1 (tensor) or 2 (generator), got ", noise_mode);
  check_rows(cond, "cond", x, B, var_mode == VAR_LEARNED_RANGE ? 2 * N : N);
  if (uncond.has_value()) {
    TORCH_CHECK(uncond_row_offset >= 0, "sampler_step: uncond_row_offset must be >= 0, got ", uncond_row_offset);
    check_rows(*uncond, "uncond", x, B + uncond_row_offset, N);
  }
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat, "sampler_step: coeffs must be float32, got ", coeffs.scalar_type());
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.size(0) == NUM_COEFFS, "sampler_step: coeffs must have shape (",
              static_cast<int>(NUM_COEFFS), ",), got ", coeffs.sizes());
  TORCH_CHECK(coeffs.is_contiguous(), "sampler_step: coeffs must be contiguous");
  TORCH_CHECK(coeffs.device() == x.device(), "sampler_step: coeffs is on ", coeffs.device(), " but x is on ",
              x.device());
  if (prev_x0.has_value()) check_like_x(*prev_x0, "prev_x0", x);
  if (noise_mode == NOISE_TENSOR) {
    TORCH_CHECK(noise.has_value(), "sampler_step: noise_mode 1 needs a noise tensor");
    check_like_x(*noise, "noise", x);
  }
  check_per_sample(row_scale, "row_scale", x);
  check_per_sample(thresh, "thresh", x);
  TORCH_CHECK(!(clip > 0 && thresh.has_value()), "sampler_step: clip (", clip,
              ") and thresh are exclusive: pass clip <= 0 with thresh");
  if (thresh.has_value() && thresh->is_cpu()) {  // on a GPU this would need a host sync: documented only
    // A NaN threshold (a NaN in that sample's x0) passes: the kernel turns it into a NaN sample.
    TORCH_CHECK(!thresh->le(0).any().item<bool>(), "sampler_step: thresh must be > 0 (or NaN) everywhere");
  }

  TORCH_CHECK(known.has_value() == keep.has_value(),
              "sampler_step: known (image) and keep (mask) go together: pass both or neither");
  if (known.has_value()) {
    check_like_x(*known, "known", x);
    check_like_x(*keep, "keep", x);
  }
  if (grad.has_value()) check_like_x(*grad, "grad", x);
  TORCH_CHECK(std::isfinite(grad_scale), "sampler_step: grad_scale must be finite, got ", grad_scale);

  StepArgs a;
  a.x = x;
  a.cond = cond;
  a.uncond = uncond;
  a.uoff = uncond.has_value() ? uncond_row_offset : 0;
  a.coeffs = coeffs;
  a.prev = prev_x0;
  a.noise = noise_mode == NOISE_TENSOR ? noise : std::nullopt;
  a.row_scale = row_scale;
  a.thresh = thresh;
  a.known = known;
  a.keep = keep;
  a.grad = grad;
  a.grad_scale = grad.has_value() ? grad_scale : 0.0;
  a.g = uncond.has_value() ? guidance_scale : 1.0;
  a.clip = clip;
  a.var_mode = var_mode;
  a.noise_mode = noise_mode;
  a.seed = static_cast<uint64_t>(seed);
  a.sample_offset = static_cast<uint32_t>(sample_offset);
  a.x0_only = x0_only;
  const at::Tensor empty = at::empty({0}, x.options());
  if (x0_only) {
    a.out = empty;
    a.x0 = at::empty({B, N}, x.options().dtype(at::kFloat));
  } else {
    a.out = at::empty_like(x);
    a.x0 = want_x0 ? at::empty_like(x) : empty;
  }
  if (B > 0 && N > 0) {
    if (cuda) {
#ifdef FASTGEN_WITH_CUDA
      sampler_step_cuda_impl(a);
#else
      TORCH_CHECK(false, "fastgen._C was built without CUDA");
#endif
    } else {
      sampler_step_cpu_impl(a);
    }
  }
  return {a.out, a.x0};
}

// An operand of more than two dims as the (rows, elements) matrix of its memory (it must be contiguous).
at::Tensor as_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "sampler_step: ", name, " must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), ")");
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return t.view({t.size(0), n});
}

template <bool CUDA>
std::tuple<at::Tensor, at::Tensor> sampler_step_entry(const at::Tensor& x, const at::Tensor& cond,
                                                      const OptTensor& uncond, int64_t uncond_row_offset,
                                                      const at::Tensor& coeffs, const OptTensor& prev_x0,
                                                      const OptTensor& noise, const OptTensor& row_scale,
                                                      const OptTensor& thresh, double guidance_scale, double clip,
                                                      int64_t var_mode, int64_t noise_mode, int64_t seed,
                                                      int64_t sample_offset, bool want_x0, bool x0_only,
                                                      const OptTensor& known, const OptTensor& keep,
                                                      const OptTensor& grad, double grad_scale) {
  if (!x.defined() || x.dim() <= 2) {
    return sampler_step(CUDA, x, cond, uncond, uncond_row_offset, coeffs, prev_x0, noise, row_scale, thresh,
                        guidance_scale, clip, var_mode, noise_mode, seed, sample_offset, want_x0, x0_only, known,
                        keep, grad, grad_scale);
  }
  // x of shape (B, ...): the Python fast lanes pass the caller's tensors as they are (a view costs ~1 us of
  // Python per operand, a tenth of a small step). Operands like x must have x's exact shape; cond and uncond
  // are the (rows, elements) matrices of theirs; the outputs take x's shape.
  const auto like = [&](const OptTensor& t, const char* name) -> OptTensor {
    if (!t.has_value()) return t;
    TORCH_CHECK(t->sizes() == x.sizes(), "sampler_step: ", name, " has shape ", t->sizes(), ", expected ", x.sizes(),
                " like x");
    return as_rows(*t, name);
  };
  const auto rows = [](const OptTensor& t, const char* name) -> OptTensor {
    return t.has_value() && t->dim() > 2 ? OptTensor(as_rows(*t, name)) : t;
  };
  // checked in argument order, as the 2-D path does
  const at::Tensor xf = as_rows(x, "x");
  const at::Tensor cf = *rows(cond, "cond");
  const OptTensor uf = rows(uncond, "uncond"), pf = like(prev_x0, "prev_x0");
  const OptTensor nf = noise_mode == NOISE_TENSOR ? like(noise, "noise") : OptTensor();
  const OptTensor kf = like(known, "known"), mf = like(keep, "keep"), gf = like(grad, "grad");
  auto [out, x0] = sampler_step(CUDA, xf, cf, uf, uncond_row_offset, coeffs, pf, nf, row_scale, thresh,
                                guidance_scale, clip, var_mode, noise_mode, seed, sample_offset, want_x0, x0_only, kf,
                                mf, gf, grad_scale);
  const auto back = [&](const at::Tensor& t) { return t.dim() == 2 && t.numel() == x.numel() ? t.view(x.sizes()) : t; };
  return {back(out), back(x0)};
}

constexpr const char* kStepDoc = R"doc(Fused diffusion sampler step on (B, N)-flattened tensors.

sampler_step_{cpu,cuda}(x, cond, uncond, uncond_row_offset, coeffs, prev_x0, noise, row_scale, thresh,
                        guidance_scale, clip, var_mode, noise_mode, seed, sample_offset, want_x0, x0_only,
                        known, keep, grad, grad_scale)
    -> (x_prev, pred_x0)

x: (B, N) float32/float16/bfloat16; cond: (Bc >= B, Lc >= N, or >= 2N with var_mode 1); uncond: optional
(Bu, Lu >= N), row b + uncond_row_offset; coeffs: float32 (16,) on x's device; prev_x0, noise: optional
(B, N); row_scale, thresh: optional float32 (B,). x_prev has x's dtype; pred_x0 too when want_x0, else
empty. x0_only: x_prev is empty and the second output is float32 |x0|. known, keep: optional (B, N), x0 :=
x0 (1 - keep) + known keep before clipping (inpainting); grad: optional (B, N), x_prev += var grad_scale grad.
x may also be (B, ...) contiguous: then prev_x0, noise, known, keep and grad have x's shape, cond / uncond
are read as (rows, elements) matrices and the outputs have x's shape.
Math: fastgen/ops/diffusion_step.py.
)doc";

}  // namespace
}  // namespace diffusion
}  // namespace fastgen

namespace fastgen {
namespace decode {
namespace {

// A (.., .., heads, head_dim) operand: 4-D, last dim contiguous, on `device` in dtype `st`.
void check_bshd(const at::Tensor& t, const char* name, at::ScalarType st, const at::Device& device) {
  TORCH_CHECK(t.defined() && t.dim() == 4, "attention_decode: ", name, " must be 4-D, got shape ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(t.scalar_type() == st, "attention_decode: ", name, " has dtype ", t.scalar_type(), ", expected ", st,
              " like q");
  TORCH_CHECK(t.device() == device, "attention_decode: ", name, " is on ", t.device(), " but q is on ", device);
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "attention_decode: ", name,
              " must have a contiguous last dim, got strides ", t.strides());
}

bool is_index(const at::Tensor& t) {
  return t.defined() && (t.scalar_type() == at::kInt || t.scalar_type() == at::kLong);
}

// Element (i, j) of a CPU int32 / int64 tensor of up to 2 dims, read in its own type: an int64 value past
// 2^31 must be checked as itself, not as what it would wrap to in int32.
int64_t index_at(const at::Tensor& t, int64_t i, int64_t j = 0) {
  const int64_t off = i * t.stride(0) + (t.dim() > 1 ? j * t.stride(1) : 0);
  return t.scalar_type() == at::kLong ? t.const_data_ptr<int64_t>()[off] : t.const_data_ptr<int32_t>()[off];
}

// The int32 view the kernels take, last dim contiguous (a no-op for an int32 tensor already laid out so).
at::Tensor narrow_index(const at::Tensor& t) {
  at::Tensor n = t.to(at::kInt);
  return n.dim() > 0 && n.size(-1) > 1 && n.stride(-1) != 1 ? n.contiguous() : n;
}

at::Tensor attention_decode(bool cuda, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                            double scale, bool causal, int64_t num_splits) {
  const char* entry = cuda ? "attention_decode_cuda" : "attention_decode_cpu";
  TORCH_CHECK(q.defined() && q.dim() == 4, "attention_decode: q must be (batch, seq_q, heads_q, head_dim), got ",
              q.defined() ? q.sizes() : at::IntArrayRef{});
  TORCH_CHECK(cuda ? q.is_cuda() : q.is_cpu(), entry, ": q must be on ", cuda ? "a CUDA device" : "the CPU",
              ", got ", q.device());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (!cuda && st == at::kDouble),
              entry, ": q must be float32, float16 or bfloat16", cuda ? "" : " (or float64)", ", got ", st);
  check_bshd(q, "q", st, q.device());
  check_bshd(k, "k_cache", st, q.device());
  check_bshd(v, "v_cache", st, q.device());
  const int64_t B = q.size(0), Hq = q.size(2), D = q.size(3), Hkv = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes(), "attention_decode: v_cache has shape ", v.sizes(), ", expected ", k.sizes(),
              " like k_cache");
  TORCH_CHECK(k.size(3) == D, "attention_decode: k_cache head_dim ", k.size(3), " != q head_dim ", D);
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim, "attention_decode: head_dim must be in [1, ", kMaxHeadDim, "], got ", D);
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "attention_decode: heads_q (", Hq, ") must be a multiple of heads_kv (",
              Hkv, ")");
  TORCH_CHECK(is_index(cache_seqlens) && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B &&
                  cache_seqlens.device() == q.device(),
              "attention_decode: cache_seqlens must be an int32 or int64 (", B, ",) tensor on ", q.device(), ", got ",
              cache_seqlens.scalar_type(), " ", cache_seqlens.sizes(), " on ", cache_seqlens.device());
  int64_t capacity = k.size(1);
  if (block_table.has_value()) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK(is_index(bt) && bt.dim() == 2 && bt.size(0) == B && bt.device() == q.device(),
                "attention_decode: block_table must be int32 or int64 (", B, ", max_pages) on ", q.device(), ", got ",
                bt.scalar_type(), " ", bt.sizes(), " on ", bt.device());
    TORCH_CHECK(k.size(1) >= 1, "attention_decode: page_size must be >= 1");
    capacity = bt.size(1) * k.size(1);
  } else {
    TORCH_CHECK(k.size(0) == B, "attention_decode: k_cache batch ", k.size(0), " != q batch ", B);
  }
  // Values are checked in the tensors' own dtype, before the narrowing to int32 (which must not wrap).
  capacity = std::min<int64_t>(capacity, std::numeric_limits<int32_t>::max());
  if (!cuda) {  // cheap on the CPU
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = index_at(cache_seqlens, b);
      TORCH_CHECK(len >= 0 && len <= capacity, "attention_decode: cache_seqlens[", b, "] = ", len,
                  " out of range [0, ", capacity, "]");
      if (block_table.has_value()) {
        const int64_t pages = (len + k.size(1) - 1) / k.size(1);
        for (int64_t i = 0; i < pages; ++i) {
          const int64_t page = index_at(*block_table, b, i);
          TORCH_CHECK(page >= 0 && page < k.size(0), "attention_decode: block_table[", b, ", ", i, "] = ", page,
                      " out of range [0, ", k.size(0), ")");
        }
      }
    }
  } else if (cache_seqlens.scalar_type() == at::kLong ||
             (block_table.has_value() && block_table->scalar_type() == at::kLong)) {
    // On a GPU the Python layer asserts the values (in their own dtype) and passes int32, so this costs
    // its calls nothing; a direct int64 call gets the same sync-free asserts (they fail at the next sync).
    // The kernels clamp whatever reaches them, so a failed assert never reads out of bounds.
    const at::Tensor len = cache_seqlens.to(at::kLong);
    at::_assert_async(((len >= 0) & (len <= capacity)).all(),
                      "attention_decode: cache_seqlens out of range [0, capacity]");
    if (block_table.has_value() && block_table->numel() > 0) {
      const at::Tensor& bt = *block_table;
      const at::Tensor pages = (len.clamp(0, capacity) + k.size(1) - 1).div(k.size(1), "floor");
      const at::Tensor used = at::arange(bt.size(1), len.options()).unsqueeze(0) < pages.unsqueeze(1);
      at::_assert_async((((bt >= 0) & (bt < k.size(0))) | used.logical_not()).all(),
                        "attention_decode: block_table entries of used pages out of range [0, num_pages)");
    }
  }
  // int64 values that failed an async assert are clamped before the narrowing, so none wraps into range
  const at::Tensor seqlens = narrow_index(
      cache_seqlens.scalar_type() == at::kLong ? cache_seqlens.clamp(-1, capacity) : cache_seqlens);
  std::optional<at::Tensor> table;
  if (block_table.has_value()) {
    table = narrow_index(block_table->scalar_type() == at::kLong ? block_table->clamp(-1, k.size(0))
                                                                 : *block_table);
  }
  DecodeArgs a;
  a.q = q;
  a.k = k;
  a.v = v;
  a.seqlens = seqlens.is_contiguous() ? seqlens : seqlens.contiguous();
  a.block_table = table;
  a.out = at::empty({B, q.size(1), Hq, D}, q.options());
  a.scale = scale;
  a.causal = causal;
  a.num_splits = num_splits;
  if (a.out.numel() > 0) {
    if (cuda) {
#ifdef FASTGEN_WITH_CUDA
      attention_decode_cuda_impl(a);
#else
      TORCH_CHECK(false, "fastgen._C was built without CUDA");
#endif
    } else {
      attention_decode_cpu_impl(a);
    }
  }
  return a.out;
}

template <bool CUDA>
at::Tensor attention_decode_entry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                                  double scale, bool causal, int64_t num_splits) {
  return attention_decode(CUDA, q, k, v, cache_seqlens, block_table, scale, causal, num_splits);
}

constexpr const char* kDecodeDoc = R"doc(KV-cache decoding attention (flash-decoding, split-K).

attention_decode_{cpu,cuda}(q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, num_splits) -> out

q: (B, Sq, Hq, D); k_cache, v_cache: (B, L, Hkv, D), or (num_pages, page_size, Hkv, D) with block_table int32
or int64 (B, max_pages); last dims contiguous, Hq % Hkv == 0, D <= 256. cache_seqlens: int32 or int64 (B,),
valid keys per sequence including the Sq new tokens (values checked in their own dtype: on the CPU before any
kernel, on CUDA by sync-free asserts for int64 inputs; int32 CUDA values are the caller's to check). causal: query i sees keys j < cache_seqlens[b] - Sq + i + 1. num_splits:
chunks of the cache per (b, head), 0 = heuristic. out: (B, Sq, Hq, D) in q's dtype, zero where a query sees
no key. Math: fastgen/ops/attention_decode.py.
)doc";

}  // namespace
}  // namespace decode
}  // namespace fastgen

namespace fastgen {
namespace moe {
namespace {

using OptTensor = std::optional<at::Tensor>;

void check_int_table(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t dim) {
  TORCH_CHECK(t.defined() && t.scalar_type() == at::kInt && t.dim() == dim && t.is_contiguous(), "moe_permute: ",
              name, " must be a contiguous ", dim, "-D int32 tensor, got ", t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(t.device() == like.device(), "moe_permute: ", name, " is on ", t.device(), " but the data is on ",
              like.device());
}

void check_data(const at::Tensor& t, const char* name, const char* entry) {
  TORCH_CHECK(t.defined() && t.dim() == 2 && t.is_contiguous(), "moe_permute: ", name,
              " must be a contiguous 2-D tensor, got ", t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(t.is_cpu(), entry, ": ", name, " must be on the CPU, got ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, "moe_permute: ", name,
              " must be float16, bfloat16, float32 or float64, got ", st);
}

// Weights (gates / scale) in the accumulation type of `data` (float32; float64 for float64 data), numel n.
void check_weights(const OptTensor& w, const char* name, const at::Tensor& data, int64_t n) {
  if (!w.has_value()) return;
  const auto want = data.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(w->scalar_type() == want && w->is_contiguous() && w->numel() == n && w->device() == data.device(),
              "moe_permute: ", name, " must be a contiguous ", want, " tensor of ", n, " elements on ", data.device(),
              ", got ", w->scalar_type(), " ", w->sizes(), " on ", w->device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route(bool cuda, const at::Tensor& expert_idx,
                                                                     const OptTensor& valid, int64_t num_experts,
                                                                     int64_t capacity) {
  const char* entry = cuda ? "moe_route_cuda" : "moe_route_cpu";
  TORCH_CHECK(expert_idx.defined() && expert_idx.dim() == 2 && expert_idx.size(1) >= 1 &&
                  (expert_idx.scalar_type() == at::kInt || expert_idx.scalar_type() == at::kLong),
              "moe_route: expert_idx must be a 2-D (tokens, k >= 1) int32 / int64 tensor, got ",
              expert_idx.defined() ? expert_idx.sizes() : at::IntArrayRef{});
  TORCH_CHECK(cuda ? expert_idx.is_cuda() : expert_idx.is_cpu(), entry, ": expert_idx must be on ",
              cuda ? "a CUDA device" : "the CPU", ", got ", expert_idx.device());
  const at::Tensor idx = expert_idx.contiguous();
  const int64_t T = idx.size(0), k = idx.size(1);
  TORCH_CHECK(T * k < (int64_t{1} << 31), "moe_route: at most 2^31 - 1 assignments, got ", T, " x ", k);
  TORCH_CHECK(num_experts >= 1 && num_experts < (int64_t{1} << 30), "moe_route: num_experts must be >= 1, got ",
              num_experts);
#ifdef FASTGEN_WITH_CUDA
  TORCH_CHECK(!cuda || num_experts <= kMaxCudaExperts, "moe_route_cuda: num_experts must be <= ", kMaxCudaExperts,
              ", got ", num_experts);
#endif
  TORCH_CHECK(capacity >= -1 && capacity < (int64_t{1} << 31), "moe_route: capacity must be -1 (dropless) or >= 0, got ",
              capacity);
  OptTensor v;
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool && valid->sizes() == idx.sizes() && valid->device() == idx.device(),
                "moe_route: valid must be a bool tensor of shape ", idx.sizes(), " on ", idx.device(), ", got ",
                valid->scalar_type(), " ", valid->sizes(), " on ", valid->device());
    v = valid->contiguous();
  }
  const auto i32 = idx.options().dtype(at::kInt);
  RouteArgs a;
  a.expert_idx = idx;
  a.valid = v;
  a.num_experts = num_experts;
  a.capacity = capacity;
  a.dest = at::empty({T, k}, i32);
  a.src = at::full({T * k}, -1, i32);
  a.offsets = at::empty({num_experts + 1}, i32);
  a.counts = at::empty({num_experts}, i32);
  if (cuda) {
#ifdef FASTGEN_WITH_CUDA
    moe_route_cuda_impl(a);
#else
    TORCH_CHECK(false, "fastgen._C was built without CUDA");
#endif
  } else {
    moe_route_cpu_impl(a);
  }
  return {a.dest, a.src, a.offsets, a.counts};
}

at::Tensor moe_gather_cpu(const at::Tensor& x, const at::Tensor& src, const OptTensor& scale, int64_t k,
                          const OptTensor& out_opt) {
  check_data(x, "x", "moe_gather_cpu");
  check_int_table(src, "src", x, 1);
  TORCH_CHECK(k >= 1, "moe_permute: k must be >= 1, got ", k);
  // scale is indexed by the assignment a = t*k + j, so it has T*k entries whatever rows src selects
  check_weights(scale, "scale", x, x.size(0) * k);
  at::Tensor out;
  if (out_opt.has_value()) {
    out = *out_opt;
    TORCH_CHECK(out.is_contiguous() && out.scalar_type() == x.scalar_type() && out.device() == x.device() &&
                    out.dim() == 2 && out.size(0) == src.size(0) && out.size(1) == x.size(1),
                "moe_gather_cpu: out must be a contiguous ", x.scalar_type(), " tensor of shape (", src.size(0), ", ",
                x.size(1), "), got ", out.scalar_type(), " ", out.sizes());
  } else {
    out = at::empty({src.size(0), x.size(1)}, x.options());
  }
  if (out.numel() > 0) moe_gather_cpu_impl(x, src, scale, k, out);
  return out;
}

at::Tensor moe_combine_cpu(const at::Tensor& buf, const at::Tensor& dest, const OptTensor& gates) {
  check_data(buf, "buf", "moe_combine_cpu");
  check_int_table(dest, "dest", buf, 2);
  check_weights(gates, "gates", buf, dest.numel());
  at::Tensor out = at::empty({dest.size(0), buf.size(1)}, buf.options());
  if (out.numel() > 0) moe_combine_cpu_impl(buf, dest, gates, out);
  return out;
}

at::Tensor moe_gate_grad_cpu(const at::Tensor& dy, const at::Tensor& buf, const at::Tensor& dest) {
  check_data(buf, "buf", "moe_gate_grad_cpu");
  check_data(dy, "dy", "moe_gate_grad_cpu");
  check_int_table(dest, "dest", buf, 2);
  TORCH_CHECK(dy.scalar_type() == buf.scalar_type() && dy.size(0) == dest.size(0) && dy.size(1) == buf.size(1),
              "moe_permute: gate_grad shapes: dy ", dy.sizes(), " buf ", buf.sizes(), " dest ", dest.sizes());
  const auto acc = buf.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(dest.sizes(), buf.options().dtype(acc));
  if (out.numel() > 0) moe_gate_grad_cpu_impl(dy, buf, dest, out);
  return out;
}

// The host row offsets of a grouped GEMM: E + 1 values, non-decreasing, within [0, rows].
void check_offsets(const std::vector<int64_t>& off, int64_t experts, int64_t rows, const char* fn) {
  TORCH_CHECK(static_cast<int64_t>(off.size()) == experts + 1, fn, ": off must hold E + 1 = ", experts + 1,
              " offsets, got ", off.size());
  for (int64_t e = 0; e <= experts; ++e) {
    TORCH_CHECK(off[e] >= (e ? off[e - 1] : 0) && off[e] <= rows, fn, ": off must be non-decreasing within [0, ",
                rows, "], got off[", e, "] = ", off[e]);
  }
}

void check_gemm_operand(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t dim, const char* fn) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == dim && t.scalar_type() == like.scalar_type(), fn, ": ", name,
              " must be a ", dim, "-D CPU tensor of dtype ", like.scalar_type(), ", got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
}

void grouped_rows_cpu(const at::Tensor& a, const at::Tensor& b, const OptTensor& bias, const std::vector<int64_t>& off,
                      at::Tensor& out) {
  const char* fn = "grouped_rows_cpu";
  check_gemm_operand(a, "a", a, 2, fn);
  check_gemm_operand(b, "b", a, 3, fn);
  check_gemm_operand(out, "out", a, 2, fn);
  TORCH_CHECK(b.size(1) == a.size(1) && out.size(0) == a.size(0) && out.size(1) == b.size(2), fn,
              ": shapes a ", a.sizes(), " b ", b.sizes(), " out ", out.sizes(), " do not match (R, K) (E, K, N) (R, N)");
  if (bias.has_value()) {
    check_gemm_operand(*bias, "bias", a, 2, fn);
    TORCH_CHECK(bias->size(0) == b.size(0) && bias->size(1) == b.size(2), fn, ": bias must be (E, N), got ",
                bias->sizes());
  }
  check_offsets(off, b.size(0), a.size(0), fn);
  grouped_gemm::rows_cpu_impl(a, b, bias, off, out);
}

void grouped_wgrad_cpu(const at::Tensor& a, const at::Tensor& g, const std::vector<int64_t>& off, at::Tensor& out,
                       const OptTensor& dbias) {
  const char* fn = "grouped_wgrad_cpu";
  check_gemm_operand(a, "a", a, 2, fn);
  check_gemm_operand(g, "g", a, 2, fn);
  check_gemm_operand(out, "out", a, 3, fn);
  TORCH_CHECK(g.size(0) == a.size(0) && out.size(1) == a.size(1) && out.size(2) == g.size(1), fn, ": shapes a ",
              a.sizes(), " g ", g.sizes(), " out ", out.sizes(), " do not match (R, K) (R, N) (E, K, N)");
  if (dbias.has_value()) {
    check_gemm_operand(*dbias, "dbias", a, 2, fn);
    TORCH_CHECK(dbias->size(0) == out.size(0) && dbias->size(1) == out.size(2), fn, ": dbias must be (E, N), got ",
                dbias->sizes());
  }
  check_offsets(off, out.size(0), a.size(0), fn);
  grouped_gemm::wgrad_cpu_impl(a, g, off, out, dbias);
}

// A float32 CPU (rows, cols) operand of swiglu_*_cpu: unit column stride, any row stride >= cols.
void check_swiglu(const at::Tensor& t, const char* name, const char* fn, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2, fn, ": ", name,
              " must be a 2-D float32 CPU tensor, got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, fn, ": ", name, " has shape ", t.sizes(), ", expected (",
              rows, ", ", cols, ")");
  TORCH_CHECK((cols <= 1 || t.stride(1) == 1) && (rows <= 1 || t.stride(0) >= cols), fn, ": ", name,
              " needs unit column stride and rows >= ", cols, " elements apart (strides ", t.strides(), ")");
}

// The output must not share memory with an input: the kernel reads each row after writing others' (threads)
// and a row's second half after writing its first. Judged on the address ranges the rows span (conservative
// for interleaved views, which fastgen never passes).
void check_apart(const at::Tensor& out, const char* oname, const at::Tensor& in, const char* iname, const char* fn) {
  if (out.numel() == 0 || in.numel() == 0) return;
  const auto span = [](const at::Tensor& t) {
    const auto* p = static_cast<const char*>(t.data_ptr());
    return std::make_pair(p, p + ((t.size(0) - 1) * t.stride(0) + t.size(1)) * t.element_size());
  };
  const auto [o0, o1] = span(out);
  const auto [i0, i1] = span(in);
  TORCH_CHECK(o1 <= i0 || i1 <= o0, fn, ": ", oname, " must not overlap ", iname, " in memory");
}

void swiglu_fwd_cpu(const at::Tensor& h, at::Tensor& out) {
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0, "swiglu_fwd_cpu: h must be (R, 2F), got ", h.sizes());
  const int64_t r = h.size(0), f = h.size(1) / 2;
  check_swiglu(h, "h", "swiglu_fwd_cpu", r, 2 * f);
  check_swiglu(out, "out", "swiglu_fwd_cpu", r, f);
  check_apart(out, "out", h, "h", "swiglu_fwd_cpu");
  swiglu::swiglu_fwd_cpu_impl(h, out);
}

void swiglu_bwd_cpu(const at::Tensor& dout, const at::Tensor& h, at::Tensor& dh) {
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0, "swiglu_bwd_cpu: h must be (R, 2F), got ", h.sizes());
  const int64_t r = h.size(0), f = h.size(1) / 2;
  check_swiglu(h, "h", "swiglu_bwd_cpu", r, 2 * f);
  check_swiglu(dout, "dout", "swiglu_bwd_cpu", r, f);
  check_swiglu(dh, "dh", "swiglu_bwd_cpu", r, 2 * f);
  check_apart(dh, "dh", h, "h", "swiglu_bwd_cpu");
  check_apart(dh, "dh", dout, "dout", "swiglu_bwd_cpu");
  swiglu::swiglu_bwd_cpu_impl(dout, h, dh);
}

void moe_scatter_add_cpu(at::Tensor& out, const at::Tensor& rows, const at::Tensor& src, const OptTensor& scale,
                         int64_t k) {
  check_data(rows, "rows", "moe_scatter_add_cpu");
  check_data(out, "out", "moe_scatter_add_cpu");
  check_int_table(src, "src", rows, 1);
  const auto rt = rows.scalar_type(), ot = out.scalar_type();
  const bool half = rt == at::kHalf || rt == at::kBFloat16;
  TORCH_CHECK(ot == rt || (half && ot == at::kFloat), "moe_scatter_add_cpu: out must be ", rt,
              half ? " or float32" : "", ", got ", ot);
  TORCH_CHECK(k >= 1 && src.size(0) == rows.size(0) && out.size(1) == rows.size(1),
              "moe_scatter_add_cpu: shapes: out ", out.sizes(), " rows ", rows.sizes(), " src ", src.sizes(), " k ", k);
  check_weights(scale, "scale", rows, out.size(0) * k);
  if (rows.numel() > 0) moe_scatter_add_cpu_impl(out, rows, src, scale, k);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_top2_router_cpu(const at::Tensor& logits) {
  check_data(logits, "logits", "moe_top2_router_cpu");
  TORCH_CHECK(logits.size(1) >= 2, "moe_top2_router_cpu: logits must have at least 2 experts (columns), got ",
              logits.sizes());
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto stat = logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const auto i32 = logits.options().dtype(at::kInt);
  at::Tensor top = at::empty({T, 2}, stat), lse = at::empty({T}, stat), psum = at::zeros({E}, stat);
  at::Tensor idx = at::empty({T, 2}, i32), first = at::zeros({E}, i32);
  if (T > 0) moe_top2_router_cpu_impl(logits, top, lse, psum, idx, first);
  return {top, lse, psum, idx, first};
}

template <bool CUDA>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_entry(const at::Tensor& expert_idx,
                                                                           const OptTensor& valid,
                                                                           int64_t num_experts, int64_t capacity) {
  return moe_route(CUDA, expert_idx, valid, num_experts, capacity);
}

constexpr const char* kRouteDoc = R"doc(MoE routing: stable counting sort of the (token, slot) assignments by expert.

moe_route_{cpu,cuda}(expert_idx, valid, num_experts, capacity) -> (dest, src, offsets, counts)

expert_idx: (T, k) int32 / int64; valid: optional (T, k) bool; capacity: -1 (dropless) or >= 0. Priority:
j-major (all slot-0 assignments in token order, then slot 1, ...). dest: (T, k) int32 row or -1; src:
(T*k,) int32 assignment t*k+j per row or -1; offsets: (E+1,) int32; counts: (E,) int32 before dropping.
Math: fastgen/ops/moe_permute.py.
)doc";

}  // namespace
}  // namespace moe
}  // namespace fastgen

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace fastgen::diffusion;
  m.doc() = "fastgen C++/CUDA kernels";
  m.def(
      "has_cuda",
      [] {
#ifdef FASTGEN_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True iff fastgen._C was built with its CUDA sources");
  m.def(
      "cpu_isa", [] { return std::string(fastgen::cpu::isa_name(fastgen::cpu::selected_isa())); },
      "The SIMD path the C++ CPU kernels take now: the CPU's best, capped by FASTGEN_CPU_ISA=scalar|avx2|avx512");
  m.def(
      "cpu_isa_best", [] { return std::string(fastgen::cpu::isa_name(fastgen::cpu::best_isa())); },
      "The best SIMD path this CPU supports (scalar, avx2 = AVX2+FMA, avx512 = AVX-512F)");
  const auto args = std::make_tuple(
      py::arg("x"), py::arg("cond"), py::arg("uncond"), py::arg("uncond_row_offset"), py::arg("coeffs"),
      py::arg("prev_x0"), py::arg("noise"), py::arg("row_scale"), py::arg("thresh"), py::arg("guidance_scale"),
      py::arg("clip"), py::arg("var_mode"), py::arg("noise_mode"), py::arg("seed"), py::arg("sample_offset"),
      py::arg("want_x0"), py::arg("x0_only"), py::arg("known") = py::none(), py::arg("keep") = py::none(),
      py::arg("grad") = py::none(), py::arg("grad_scale") = 0.0);
  auto def = [&](const char* name, auto fn) {
    std::apply([&](const auto&... a) { m.def(name, fn, kStepDoc, a..., py::call_guard<py::gil_scoped_release>()); },
               args);
  };
  def("sampler_step_cpu", &sampler_step_entry<false>);
#ifdef FASTGEN_WITH_CUDA
  def("sampler_step_cuda", &sampler_step_entry<true>);
#endif

  const auto decode_args =
      std::make_tuple(py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_seqlens"),
                      py::arg("block_table"), py::arg("scale"), py::arg("causal"), py::arg("num_splits"));
  auto def_decode = [&](const char* name, auto fn) {
    std::apply(
        [&](const auto&... a) {
          m.def(name, fn, fastgen::decode::kDecodeDoc, a..., py::call_guard<py::gil_scoped_release>());
        },
        decode_args);
  };
  def_decode("attention_decode_cpu", &fastgen::decode::attention_decode_entry<false>);
#ifdef FASTGEN_WITH_CUDA
  def_decode("attention_decode_cuda", &fastgen::decode::attention_decode_entry<true>);
#endif

  {
    using namespace fastgen::moe;
    const auto nogil = py::call_guard<py::gil_scoped_release>();
    m.def("moe_route_cpu", &moe_route_entry<false>, kRouteDoc, py::arg("expert_idx"), py::arg("valid"),
          py::arg("num_experts"), py::arg("capacity"), nogil);
#ifdef FASTGEN_WITH_CUDA
    m.def("moe_route_cuda", &moe_route_entry<true>, kRouteDoc, py::arg("expert_idx"), py::arg("valid"),
          py::arg("num_experts"), py::arg("capacity"), nogil);
#endif
    m.def("moe_gather_cpu", &moe_gather_cpu,
          "out[row] = scale[a] * x[a / k] for a = src[row] >= 0, else 0 (into out when given)", py::arg("x"),
          py::arg("src"), py::arg("scale"), py::arg("k"), py::arg("out") = py::none(), nogil);
    m.def("moe_top2_router_cpu", &moe_top2_router_cpu,
          "logits (T, E) -> top (T, 2), lse (T,), psum (E,), idx (T, 2) int32, first (E,) int32", py::arg("logits"),
          nogil);
    m.def("moe_scatter_add_cpu", &moe_scatter_add_cpu,
          "out[a / k] += scale[a] * rows[r] for a = src[r] >= 0, in place (deterministic)", py::arg("out"),
          py::arg("rows"), py::arg("src"), py::arg("scale"), py::arg("k"), nogil);
    m.def("moe_combine_cpu", &moe_combine_cpu, "out[t] = sum_j gates[t, j] * buf[dest[t, j]] (dest >= 0)",
          py::arg("buf"), py::arg("dest"), py::arg("gates"), nogil);
    m.def("grouped_rows_cpu", &grouped_rows_cpu,
          "out[r] = a[r] @ b[e] (+ bias[e]) for r in [off[e], off[e + 1]), the experts' GEMMs spread over the "
          "threads in one parallel region; other rows untouched",
          py::arg("a"), py::arg("b"), py::arg("bias"), py::arg("off"), py::arg("out"), nogil);
    m.def("grouped_wgrad_cpu", &grouped_wgrad_cpu,
          "out[e] = a[rows of e]^T @ g[rows of e] (zeros without rows), dbias[e] = sum of g over them",
          py::arg("a"), py::arg("g"), py::arg("off"), py::arg("out"), py::arg("dbias") = py::none(), nogil);
    m.def("swiglu_fwd_cpu", &swiglu_fwd_cpu, "out = silu(h[:, :F]) * h[:, F:] (float32, in place into out)",
          py::arg("h"), py::arg("out"), nogil);
    m.def("swiglu_bwd_cpu", &swiglu_bwd_cpu,
          "dh = [dout * h[:, F:] * silu'(h[:, :F]) | dout * silu(h[:, :F])] (float32, in place into dh)",
          py::arg("dout"), py::arg("h"), py::arg("dh"), nogil);
    m.def("moe_gate_grad_cpu", &moe_gate_grad_cpu, "out[t, j] = <dy[t], buf[dest[t, j]]> (0 where dest < 0)",
          py::arg("dy"), py::arg("buf"), py::arg("dest"), nogil);
  }

  {
    const auto nogil = py::call_guard<py::gil_scoped_release>();
    auto vq_args = [](bool cuda) {
      return [cuda](const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& code_sqnorm,
                    bool cosine, bool exact, bool with_counts) {
        return fastgen::vq::vq_nearest(cuda, x, codebook, code_sqnorm, cosine, exact, with_counts);
      };
    };
    m.def("vq_nearest_cpu", vq_args(false), fastgen::vq::kVqDoc, py::arg("x"), py::arg("codebook"),
          py::arg("code_sqnorm"), py::arg("cosine"), py::arg("exact"), py::arg("with_counts"), nogil);
#ifdef FASTGEN_WITH_CUDA
    m.def("vq_nearest_cuda", vq_args(true), fastgen::vq::kVqDoc, py::arg("x"), py::arg("codebook"),
          py::arg("code_sqnorm"), py::arg("cosine"), py::arg("exact"), py::arg("with_counts"), nogil);
#endif
  }
}
