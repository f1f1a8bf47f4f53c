"""FID (streaming == one-shot numpy/scipy formula) and the Inception Score (== a direct numpy formula)."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from fastgen.metrics import FID, frechet_distance, inception_score, load_inception_features


def fid_numpy(real: np.ndarray, fake: np.ndarray) -> float:
    """pytorch-fid's formula: np.mean / np.cov and scipy.linalg.sqrtm."""
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def features(n, f, shift=0.0, seed=0):
    """Correlated Gaussian features; the mixing matrix (the distribution) depends on f only."""
    mix = torch.eye(f, dtype=torch.float64) + torch.randn(
        f, f, generator=torch.Generator().manual_seed(f), dtype=torch.float64
    ) / (2 * f**0.5)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, f, generator=g, dtype=torch.float64) @ mix + shift


@pytest.mark.parametrize("n,f", [(300, 16), (200, 64), (40, 64)])  # last: singular covariances (N < F)
def test_frechet_distance_matches_scipy(n, f):
    real, fake = features(n, f, seed=1), features(n + 7, f, shift=0.3, seed=2)
    r, g = real.numpy(), fake.numpy()
    want = fid_numpy(r, g)
    got = frechet_distance(r.mean(0), np.cov(r, rowvar=False), g.mean(0), np.cov(g, rowvar=False))
    tol = 1e-4 if n > f else 1e-3  # sqrtm itself is inaccurate on singular products
    assert got == pytest.approx(want, rel=tol)


@pytest.mark.parametrize("batches", [[300], [1, 99, 200], [128, 128, 44]])
def test_streaming_equals_one_shot(batches):
    real, fake = features(300, 32, seed=3), features(300, 32, shift=0.5, seed=4)
    want = fid_numpy(real.numpy(), fake.numpy())
    fid = FID()
    i = 0
    for b in batches:  # interleave real and generated batches
        fid.update(real[i : i + b].float(), real=True)
        fid.update(fake[i : i + b], real=False)
        i += b
    assert fid.compute() == pytest.approx(want, rel=1e-4)


def test_order_and_batching_invariance():
    real, fake = features(257, 24, seed=5), features(190, 24, shift=0.2, seed=6)
    a = FID()
    a.update(real, True)
    a.update(fake, False)
    b = FID()
    perm = torch.randperm(257)
    for chunk in torch.split(real[perm], 17):
        b.update(chunk, True)
    for chunk in torch.split(fake.flip(0), 50):
        b.update(chunk, False)
    assert b.compute() == pytest.approx(a.compute(), rel=1e-9)


def test_identical_distributions_near_zero_and_reset():
    x = features(500, 16, seed=7)
    fid = FID()
    fid.update(x, True)
    fid.update(x, False)
    assert abs(fid.compute()) < 1e-6
    fid.reset()
    with pytest.raises(ValueError, match=">= 2 real"):
        fid.compute()
    fid.update(features(2000, 8, seed=8), True)
    fid.update(features(2000, 8, seed=9), False)  # same distribution, fresh samples: small
    assert 0 <= fid.compute() < 0.05


def test_module_extractor():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.AdaptiveAvgPool2d(1))
    real = torch.rand(64, 3, 16, 16)
    fake = (torch.rand(64, 3, 16, 16) * 0.5).requires_grad_()  # no graph kept: update runs under no_grad
    fid = FID(net)
    for i in range(0, 64, 20):
        fid.update(real[i : i + 20], real=True)
        fid.update(fake[i : i + 20], real=False)
    with torch.no_grad():
        want = fid_numpy(net(real).flatten(1).double().numpy(), net(fake).flatten(1).double().numpy())
    assert fid.compute() == pytest.approx(want, rel=1e-4)
    fn = FID(lambda imgs: imgs.mean((2, 3)))  # a plain callable
    fn.update(real, True)
    fn.update(fake.detach(), False)
    assert fn.compute() > 0


def test_fid_errors():
    fid = FID()
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        fid.update(torch.randn(4, 3, 2), True)
    fid.update(torch.randn(4, 3), True)
    with pytest.raises(ValueError, match="feature size"):
        fid.update(torch.randn(4, 5), False)
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_load_inception_features(tmp_path):
    try:
        from torchvision.models import inception_v3
    except Exception as e:
        with pytest.raises(ImportError, match="torchvision"):
            load_inception_features(str(tmp_path / "missing.pt"))
        pytest.skip(f"torchvision not usable: {e}")
    path = tmp_path / "inception.pt"
    torch.save(inception_v3(weights=None, init_weights=False).state_dict(), path)
    net = load_inception_features(str(path))
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 2048)


# ---- Inception Score --------------------------------------------------------------------------------


def is_numpy(p: np.ndarray, splits: int) -> tuple[float, float]:
    """The improved-GAN definition: split k is rows k N // splits .. (k + 1) N // splits - 1."""
    n = p.shape[0]
    scores = []
    for k in range(splits):
        part = p[k * n // splits : (k + 1) * n // splits]
        py = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0)
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# N % splits != 0 (103/10, 10/3, 257/3): np.array_split's boundaries differ from the original's
@pytest.mark.parametrize(
    "n,c,splits", [(1000, 10, 10), (103, 10, 10), (10, 4, 3), (257, 37, 3), (50, 5, 1), (12, 6, 12)]
)
def test_inception_score_matches_numpy(n, c, splits):
    g = torch.Generator().manual_seed(n * 100 + splits)
    probs = torch.softmax(3 * torch.randn(n, c, dtype=torch.float64, generator=g), 1)
    mean, std = inception_score(probs, splits)
    want = is_numpy(probs.numpy(), splits)
    assert mean == pytest.approx(want[0], rel=1e-10) and std == pytest.approx(want[1], rel=1e-8, abs=1e-12)


def test_inception_score_limits():
    assert inception_score(torch.full((100, 10), 0.1), splits=5) == pytest.approx((1.0, 0.0))
    c = 16
    onehot = torch.eye(c).repeat(4, 1)  # every split sees each class once: KL = log C
    mean, std = inception_score(onehot, splits=4)
    assert mean == pytest.approx(c) and std == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="softmax"):
        inception_score(torch.randn(10, 3), 2)
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.full((4, 2), 0.5), 5)
