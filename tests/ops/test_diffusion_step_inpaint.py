"""Inpainting (known-region x0 replacement) and CLIP-guided mean shift in the fused diffusion step."""

import pytest
import torch

import fastgen
from fastgen import _ext
from fastgen.ops import diffusion_step as D

needs_cpp = pytest.mark.skipif(_ext.C is None, reason="fastgen._C not built")


@needs_cpp
def test_cpp_entry_passes_a_nan_threshold_and_refuses_non_positive_ones():
    """The C++ entry lets a NaN threshold through (that sample becomes NaN) and refuses <= 0 ones."""
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    coeffs = torch.zeros(D.NUM_COEFFS)
    coeffs[D.AX], coeffs[D.AM], coeffs[D.CX0] = 1.0, 1.0, 1.0  # x' = x0 = x + m, thresholded
    args = (x, cond, None, 0, coeffs, None, None, None)
    tail = (1.0, 0.0, 0, 0, 0, 0, True, False)
    out, x0 = _ext.C.sampler_step_cpu(*args, torch.tensor([float("nan"), 2.0]), *tail)
    assert out[0].isnan().all() and x0[0].isnan().all()
    want = (x[1] + cond[1]).clamp(-2, 2) / 2
    torch.testing.assert_close(out[1], want)
    for bad in (0.0, -1.0, float("-inf")):
        with pytest.raises(RuntimeError, match="thresh must be > 0"):
            _ext.C.sampler_step_cpu(*args, torch.tensor([bad, 2.0]), *tail)


BACKENDS = ["torch", "triton"] + (["cpp"] if _ext.C is not None else [])
if torch.cuda.is_available():
    BACKENDS.append("cuda")


def _device(backend):
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


def _schedule():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)[torch.linspace(0, 999, 40).round().long()]


def _case(seed=0, shape=(2, 3, 5, 7), learned=False, guided=False):
    g = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    x = torch.randn(shape, generator=g) * 2
    mo = torch.randn(((2 if guided else 1) * b, (2 if learned else 1) * c, *shape[2:]), generator=g)
    if learned:
        mo[:, c:] = mo[:, c:].clamp(-1, 1)
    image = torch.rand(shape, generator=g) * 2 - 1
    keep = (torch.rand((b, 1, *shape[2:]), generator=g) > 0.4).float()
    grad = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    return x, mo, image, keep, grad, noise


CLIPS = {"none": {}, "static": {"clip_sample": 1.0}, "dynamic": {"dynamic_threshold": 0.9}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("t", [0, 17])
def test_ddpm_inpaint_and_grad_equal_the_float64_reference(backend, clip, t):
    """known-region x0 replacement before clipping + mean shift, fused, vs the plain float64 formulas."""
    dev = _device(backend)
    x, mo, image, keep, grad, noise = _case(t, learned=True, guided=True)
    abar = _schedule()
    kw = dict(variance_type="learned_range", guidance_scale=3.0, known_image=image, known_mask=keep,
              cond_grad=grad, cond_grad_scale=0.7, **CLIPS[clip])  # fmt: skip
    with fastgen.use_backend(backend):
        out, x0 = D.ddpm_step(*(a.to(dev) for a in (x, mo)), abar.to(dev), t, noise=noise.to(dev),
                              **{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})  # fmt: skip
    ref, ref0 = D.ddpm_step_ref(x.double(), mo.double(), abar, t, noise=noise.double(),
                                compute_dtype=torch.float64, **kw)  # fmt: skip
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(x0.cpu().double(), ref0, atol=2e-5, rtol=2e-5)
    kept = keep.expand_as(x).bool()
    if clip != "dynamic":  # the known region is x0 exactly (a threshold > 1 would rescale it)
        assert torch.equal(x0.cpu()[kept], image[kept])
    if t == 0 and clip != "dynamic":  # without a shift the last step's mean is x0: the known pixels exactly
        kw.pop("cond_grad")
        with fastgen.use_backend(backend):
            out, _ = D.ddpm_step(*(a.to(dev) for a in (x, mo)), abar.to(dev), t, noise=noise.to(dev),
                                 **{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})  # fmt: skip
        assert torch.equal(out.cpu()[kept], image[kept])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddim_inpaint_re_derives_eps_from_the_replaced_x0(backend, pred):
    dev = _device(backend)
    x, mo, image, keep, _, _ = _case(3)
    abar = _schedule()
    with fastgen.use_backend(backend):
        out, x0 = D.ddim_step(x.to(dev), mo.to(dev), abar.to(dev), 25, 15, prediction_type=pred,
                              known_image=image.to(dev), known_mask=keep.bool().to(dev))  # fmt: skip
    ref, ref0 = D.ddim_step_ref(x.double(), mo.double(), abar, 25, 15, prediction_type=pred,
                                known_image=image.double(), known_mask=keep.double(), compute_dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(x0.cpu().double(), ref0, atol=2e-5, rtol=2e-5)
    plain, _ = D.ddim_step_ref(x.double(), mo.double(), abar, 25, 15, prediction_type=pred,
                               compute_dtype=torch.float64)  # fmt: skip
    assert not torch.allclose(plain, ref)  # the replacement changes eps too, not only x0


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_shift_uses_sigma_squared_and_nan_propagates(backend):
    dev = _device(backend)
    x, mo, image, keep, grad, noise = _case(5)
    abar = _schedule()
    mo[0, 1, 2, 3] = float("nan")  # a NaN model output stays a NaN element, even under the known region
    keep[0, 0, 2, 3] = 1.0
    kw = dict(
        variance_type="fixed_large", cond_grad=grad, cond_grad_scale=-2.0, known_image=image, known_mask=keep
    )
    with fastgen.use_backend(backend):
        out, _ = D.ddpm_step(x.to(dev), mo.to(dev), abar.to(dev), 9, noise=noise.to(dev),
                             **{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})  # fmt: skip
    ref, _ = D.ddpm_step_ref(
        x.double(), mo.double(), abar, 9, noise=noise.double(), compute_dtype=torch.float64, **kw
    )
    assert torch.equal(out.cpu().isnan(), ref.isnan()) and out.isnan().sum() == 1
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=2e-5, equal_nan=True)


def test_inpaint_and_grad_argument_errors():
    x, mo, image, keep, grad, _ = _case(1)
    abar = _schedule()
    with pytest.raises(ValueError, match="known_image and known_mask go together"):
        D.ddim_step(x, mo, abar, 5, 4, known_image=image)
    with pytest.raises(ValueError, match=r"known_mask has shape \(2, 5, 7\)"):
        D.ddim_step(x, mo, abar, 5, 4, known_image=image, known_mask=keep[:, 0, :, :])
    with pytest.raises(ValueError, match=r"known_image has shape \(2, 3, 5, 6\)"):
        D.ddim_step(x, mo, abar, 5, 4, known_image=image[..., :6], known_mask=keep)
    with pytest.raises(TypeError, match="known_mask must be a float or bool tensor"):
        D.ddim_step(x, mo, abar, 5, 4, known_image=image, known_mask=keep.long())
    with pytest.raises(ValueError, match=r"cond_grad has shape \(1, 3, 5, 7\)"):
        D.ddpm_step(x, mo, abar, 5, cond_grad=grad[:1])
    with pytest.raises(ValueError, match="cond_grad_scale must be finite"):
        D.ddpm_step(x, mo, abar, 5, cond_grad=grad, cond_grad_scale=float("inf"))
    with pytest.raises(TypeError, match="cond_grad_scale must be a real number"):
        D.ddpm_step(x, mo, abar, 5, cond_grad=grad, cond_grad_scale="2")


@needs_cpp
def test_cpp_entry_refuses_half_an_inpainting_pair():
    x = torch.randn(2, 6)
    coeffs = torch.zeros(D.NUM_COEFFS)
    with pytest.raises(RuntimeError, match=r"known .* and keep .* go together"):
        _ext.C.sampler_step_cpu(x, x, None, 0, coeffs, None, None, None, None, 1.0, 0.0, 0, 0, 0, 0, True, False,
                                known=x)  # fmt: skip
    with pytest.raises(RuntimeError, match="grad has shape"):
        _ext.C.sampler_step_cpu(x, x, None, 0, coeffs, None, None, None, None, 1.0, 0.0, 0, 0, 0, 0, True, False,
                                grad=x[:1])  # fmt: skip


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_opcheck_with_known_region_and_grad(backend):
    dev = _device(backend)
    x, mo, image, keep, grad, _ = _case(7, learned=True)
    coeffs = D.ddpm_coeffs(_schedule(), 12, "epsilon", "learned_range").float()
    b = x.shape[0]
    rows = [t.reshape(b, -1).contiguous().to(dev) for t in (x, mo, image, keep.expand_as(x), grad)]
    with fastgen.use_backend(backend):
        torch.library.opcheck(
            D._sampler_step_op,
            (rows[0], rows[1], None, 0, coeffs.to(dev), None, None, None, None, 1.0, 1.0, 1, 2, 5, 0, True, False,
             rows[2], rows[3], rows[4], 0.5),
        )  # fmt: skip
