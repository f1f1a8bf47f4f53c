"""Bad arguments of the metrics: clear errors naming the argument, never a NaN or a wrong number."""

import math

import numpy as np
import pytest
import torch

import fastgen
from fastgen.metrics import FID, frechet_distance, inception_score, ms_ssim, psnr, ssim


def _images(size=16):
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 1, size, size, generator=g), torch.rand(1, 1, size, size, generator=g)


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"k1": math.nan}, "k1"),
        ({"k1": -0.01}, "k1"),
        ({"k2": math.inf}, "k2"),
        ({"k2": math.nan}, "k2"),
        ({"sigma": math.nan}, "sigma"),
        ({"sigma": math.inf}, "sigma"),
        ({"data_range": math.nan}, "data_range"),
        ({"data_range": True}, "data_range"),
        ({"window_size": True}, "window_size"),
        ({"window_size": 7.0}, "window_size"),
    ],
)
@pytest.mark.parametrize("fn", [ssim, ms_ssim])
def test_ssim_rejects_bad_scalars(fn, kw, name):
    x, y = _images()
    extra = {"weights": [0.5, 0.5], "window_size": 7} if fn is ms_ssim else {}
    with pytest.raises(ValueError, match=name):
        fn(x, y, **{**extra, **kw})


def test_ssim_accepts_numpy_scalars():
    x, y = _images()
    want = ssim(x, y, data_range=1.0, sigma=1.5, window_size=11)
    got = ssim(x, y, data_range=np.float32(1.0), sigma=np.float64(1.5), window_size=np.int64(11))
    assert torch.equal(got, want)
    assert torch.isfinite(psnr(x, y, data_range=np.float32(1.0)))


@pytest.mark.parametrize("weights", [[0.5, math.nan], [1.5, -0.5]])
def test_ms_ssim_rejects_bad_weights(weights):
    x, y = _images()
    with pytest.raises(ValueError, match="weights"):
        ms_ssim(x, y, weights=weights, window_size=7)


@pytest.mark.parametrize(
    "s1,s2,match",
    [
        (-np.eye(3), np.eye(3), "sigma1 must be positive semi-definite"),
        (np.eye(3), np.diag([1.0, -1.0, 2.0]), "sigma2 must be positive semi-definite"),
        (np.eye(3), np.triu(np.ones((3, 3))), "sigma2 must be a symmetric"),
        (np.full((3, 3), math.nan), np.eye(3), "NaN or inf entries in sigma1"),
    ],
)
def test_frechet_distance_rejects_non_covariances(s1, s2, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(np.zeros(3), s1, np.zeros(3), s2)


def test_frechet_distance_accepts_singular_and_rejects_bad_eps():
    rank1 = np.outer([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])  # PSD, singular: tiny negative round-off is fine
    assert frechet_distance(np.zeros(3), rank1, np.zeros(3), rank1) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(np.zeros(3), np.zeros((3, 3)), np.ones(3), np.zeros((3, 3))) == 3.0
    with pytest.raises(ValueError, match="eps"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), eps=math.nan)
    with pytest.raises(ValueError, match="mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.array([0.0, math.inf, 0.0]), np.eye(3))


@pytest.mark.parametrize("real", [True, False])
def test_fid_names_non_finite_features(real):
    fid = FID()
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    bad = x.clone()
    bad[2, 1] = math.nan
    fid.update(bad if real else x, real=True)
    fid.update(x if real else bad, real=False)
    with pytest.raises(ValueError, match="real features" if real else "generated features"):
        fid.compute()


def test_inception_score_rejects_bool_splits():
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.full((4, 2), 0.5), True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ssim_empty_batch_is_an_empty_result(backend):
    x = torch.rand(0, 2, 16, 16, requires_grad=True)
    with fastgen.use_backend(backend, op="ssim"):
        per_image = ssim(x, torch.rand(0, 2, 16, 16), reduction="none")
        assert per_image.shape == (0,)
        assert ms_ssim(x, x.detach(), weights=[0.5, 0.5], window_size=7, reduction="none").shape == (0,)
    per_image.sum().backward()
    assert x.grad.shape == x.shape
    with pytest.raises(ValueError, match="at least one channel"):
        ssim(torch.rand(1, 0, 16, 16), torch.rand(1, 0, 16, 16))


def test_fid_update_requires_bool_real():
    with pytest.raises(TypeError, match="real must be True or False"):
        FID().update(torch.zeros(2, 3), real="yes")
