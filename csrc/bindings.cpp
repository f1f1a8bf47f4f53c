// The one Python module for fastgen's C++/CUDA ops. Input checks live here, shared by the CPU and CUDA
// entry points, and run before any kernel.
#include <torch/extension.h>

#include "diffusion_step/diffusion_step.h"

namespace fastgen {
namespace diffusion {
namespace {

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t min_rows, int64_t min_cols) {
  TORCH_CHECK(t.dim() == 2, "sampler_step: ", name, " must be 2-D (rows, elements), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "sampler_step: ", name, " has dtype ", t.scalar_type(),
              ", expected ", x.scalar_type(), " like x");
  TORCH_CHECK(t.device() == x.device(), "sampler_step: ", name, " is on ", t.device(), ", x is on ", x.device());
  TORCH_CHECK(t.is_contiguous(), "sampler_step: ", name, " must be contiguous");
  TORCH_CHECK(t.size(0) >= min_rows && t.size(1) >= min_cols, "sampler_step: ", name, " has shape ", t.sizes(),
              ", needs at least (", min_rows, ", ", min_cols, ")");
}

void check_per_sample(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == x.size(0) && t->is_contiguous(),
              "sampler_step: ", name, " must be contiguous float32 (", x.size(0), ",), got ", t->scalar_type(), " ",
              t->sizes());
  TORCH_CHECK(t->device() == x.device(), "sampler_step: ", name, " is on ", t->device(), ", x is on ", x.device());
}

std::tuple<at::Tensor, at::Tensor> sampler_step(
    bool cuda, const at::Tensor& x, const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
    int64_t uncond_row_offset, const at::Tensor& coeffs, const c10::optional<at::Tensor>& prev_x0,
    const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& row_scale,
    const c10::optional<at::Tensor>& thresh, double guidance_scale, double clip, int64_t var_mode,
    int64_t noise_mode, int64_t seed, int64_t sample_offset, bool want_x0, bool x0_only) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "sampler_step: x must be contiguous 2-D (batch, elements), got ",
              x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "sampler_step: x must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(cuda ? x.is_cuda() : x.is_cpu(), "sampler_step_", cuda ? "cuda" : "cpu", ": x is on ", x.device());
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK(N < (int64_t{1} << 31), "sampler_step: at most 2^31 - 1 elements per sample, got ", N);
  TORCH_CHECK(var_mode == 0 || var_mode == 1, "sampler_step: var_mode must be 0 or 1, got ", var_mode);
  TORCH_CHECK(noise_mode >= 0 && noise_mode <= 2, "sampler_step: noise_mode must be 0, 1 or 2, got ", noise_mode);
  check_rows(cond, "cond", x, B, var_mode == 1 ? 2 * N : N);
  if (uncond.has_value()) {
    TORCH_CHECK(uncond_row_offset >= 0, "sampler_step: uncond_row_offset must be >= 0");
    check_rows(*uncond, "uncond", x, B + uncond_row_offset, N);
  }
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat && coeffs.dim() == 1 && coeffs.size(0) == NUM_COEFFS &&
                  coeffs.is_contiguous(),
              "sampler_step: coeffs must be contiguous float32 (", static_cast<int>(NUM_COEFFS), ",), got ",
              coeffs.scalar_type(), " ", coeffs.sizes());
  TORCH_CHECK(coeffs.device() == x.device(), "sampler_step: coeffs is on ", coeffs.device(), ", x is on ",
              x.device());
  if (prev_x0.has_value()) check_rows(*prev_x0, "prev_x0", x, B, N);
  if (noise_mode == NOISE_TENSOR) {
    TORCH_CHECK(noise.has_value(), "sampler_step: noise_mode 1 needs a noise tensor");
    check_rows(*noise, "noise", x, B, N);
    TORCH_CHECK(noise->size(0) == B && noise->size(1) == N, "sampler_step: noise must be (", B, ", ", N, ")");
  }
  check_per_sample(row_scale, "row_scale", x);
  check_per_sample(thresh, "thresh", x);
  TORCH_CHECK(!(clip > 0 && thresh.has_value()), "sampler_step: clip and thresh are exclusive");
  if (cuda) {
    TORCH_CHECK(B <= 65535, "sampler_step_cuda: at most 65535 samples per call, got ", B);
  }

  StepArgs a;
  a.x = x;
  a.cond = cond;
  a.uncond = uncond;
  a.uoff = uncond_row_offset;
  a.coeffs = coeffs;
  a.prev = prev_x0;
  a.noise = noise_mode == NOISE_TENSOR ? noise : c10::nullopt;
  a.row_scale = row_scale;
  a.thresh = thresh;
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

}  // namespace
}  // namespace diffusion
}  // namespace fastgen

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fastgen::diffusion;
  m.doc() = "fastgen C++/CUDA kernels";
  m.def("has_cuda", [] {
#ifdef FASTGEN_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  const char* doc =
      "sampler_step(x, cond, uncond, uncond_row_offset, coeffs, prev_x0, noise, row_scale, thresh, "
      "guidance_scale, clip, var_mode, noise_mode, seed, sample_offset, want_x0, x0_only) -> (x_prev, x0); "
      "see fastgen/ops/diffusion_step.py";
  auto cpu = [](const at::Tensor& x, const at::Tensor& cond, const c10::optional<at::Tensor>& uncond, int64_t uoff,
                const at::Tensor& coeffs, const c10::optional<at::Tensor>& prev, const c10::optional<at::Tensor>& noise,
                const c10::optional<at::Tensor>& rs, const c10::optional<at::Tensor>& th, double g, double clip,
                int64_t var_mode, int64_t noise_mode, int64_t seed, int64_t off, bool want_x0, bool x0_only) {
    return sampler_step(false, x, cond, uncond, uoff, coeffs, prev, noise, rs, th, g, clip, var_mode, noise_mode,
                        seed, off, want_x0, x0_only);
  };
  m.def("sampler_step_cpu", cpu, doc);
#ifdef FASTGEN_WITH_CUDA
  auto gpu = [](const at::Tensor& x, const at::Tensor& cond, const c10::optional<at::Tensor>& uncond, int64_t uoff,
                const at::Tensor& coeffs, const c10::optional<at::Tensor>& prev, const c10::optional<at::Tensor>& noise,
                const c10::optional<at::Tensor>& rs, const c10::optional<at::Tensor>& th, double g, double clip,
                int64_t var_mode, int64_t noise_mode, int64_t seed, int64_t off, bool want_x0, bool x0_only) {
    return sampler_step(true, x, cond, uncond, uoff, coeffs, prev, noise, rs, th, g, clip, var_mode, noise_mode,
                        seed, off, want_x0, x0_only);
  };
  m.def("sampler_step_cuda", gpu, doc);
#endif
}
