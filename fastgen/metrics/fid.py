r"""Frechet Inception Distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule").

With the feature means and covariances ``(mu_r, S_r)`` of real and ``(mu_g, S_g)`` of generated images::

    FID = |mu_r - mu_g|^2 + tr(S_r) + tr(S_g) - 2 tr( (S_r S_g)^(1/2) )

``tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2))`` (similar matrices), and the inner matrix is
symmetric positive semi-definite, so both square roots are ``eigh`` decompositions (float64, on the
inputs' device): no complex ``scipy.linalg.sqrtm`` and no host round trip on GPU.

:class:`FID` streams: per set it keeps only the running mean and the centred scatter matrix in float64,
merged batch by batch (Chan et al.'s pairwise update), so the result does not depend on the batching.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def _as64(t, device=None) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t.to(device=device if device is not None else t.device, dtype=torch.float64)


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def _trace_sqrt_product(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    return torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()


# Covariances are checked to this relative tolerance: float32-computed statistics of 2048 features
# round their eigenvalues by ~1e-6 of the largest; a covariance that is not one is off by O(1).
COV_RTOL = 1e-4


def _check_inputs(named: dict[str, torch.Tensor]) -> None:
    """ValueError unless every tensor is finite and every sigma symmetric PSD (up to COV_RTOL).

    One host read-back for the finiteness flags and one for the covariance checks (the result is read
    back anyway); the extra eigvalsh per covariance costs about as much as the square root itself."""
    finite = torch.stack([torch.isfinite(t).all() for t in named.values()]).tolist()
    bad = [name for name, ok in zip(named, finite) if not ok]
    if bad:
        raise ValueError(
            f"frechet_distance: NaN or inf entries in {', '.join(bad)} (were non-finite features added?)"
        )
    sigmas = {k: v for k, v in named.items() if k.startswith("sigma")}
    stats = []
    for s in sigmas.values():
        ev = torch.linalg.eigvalsh((s + s.T) / 2)
        scale = ev.abs().max()
        stats += [(s - s.T).abs().max(), s.abs().max(), -ev.min(), scale]
    stats = torch.stack(stats).tolist()
    for i, name in enumerate(sigmas):
        asym, amax, neg, scale = stats[4 * i : 4 * i + 4]
        if asym > COV_RTOL * amax:
            raise ValueError(
                f"frechet_distance: {name} must be a symmetric covariance matrix, got max |{name} - "
                f"{name}^T| = {asym:.3g} (max |{name}| = {amax:.3g})"
            )
        if neg > COV_RTOL * scale:
            raise ValueError(
                f"frechet_distance: {name} must be positive semi-definite (a covariance), got eigenvalue "
                f"{-neg:.3g} (largest magnitude {scale:.3g})"
            )


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
    """FID between Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``: means (F,), covariances (F, F).

    Tensors or arrays; computed in float64 on mu1's device (a tensor's device, else the CPU).
    Negative eigenvalues from round-off (singular covariances, e.g. fewer samples than features) are
    clamped to 0; ``eps``: added to both diagonals if the trace term is still not finite (as pytorch-fid).
    Agrees with pytorch-fid's ``scipy.linalg.sqrtm`` formula to ~1e-6 relative on well-conditioned input.
    Raises ValueError on NaN / inf entries and on a sigma that is not symmetric positive semi-definite
    (eigenvalues below ``-COV_RTOL`` times the largest magnitude): no covariance has them, and the
    square roots would silently clamp them to a wrong distance.
    """
    mu1 = _as64(mu1)
    dev = mu1.device
    mu2, s1, s2 = _as64(mu2, dev), _as64(sigma1, dev), _as64(sigma2, dev)
    if mu1.dim() != 1 or mu2.shape != mu1.shape:
        raise ValueError(
            f"frechet_distance: mu1, mu2 must be (F,) of equal size, got {tuple(mu1.shape)}, {tuple(mu2.shape)}"
        )
    f = mu1.shape[0]
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (f, f):
            raise ValueError(f"frechet_distance: {name} must be ({f}, {f}), got {tuple(s.shape)}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"frechet_distance: eps must be a finite number >= 0, got {eps!r}")
    _check_inputs({"mu1": mu1, "mu2": mu2, "sigma1": s1, "sigma2": s2})
    tr_covmean = _trace_sqrt_product(s1, s2)
    if not torch.isfinite(tr_covmean):  # as pytorch-fid: regularise, then retry
        offset = eps * torch.eye(f, dtype=torch.float64, device=dev)
        tr_covmean = _trace_sqrt_product(s1 + offset, s2 + offset)
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


class _Moments:
    """Running mean and centred scatter matrix sum_n (x_n - mean)(x_n - mean)^T, float64."""

    def __init__(self):
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0)
        xc = x - mb
        m2b = xc.T @ xc
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + torch.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    def cov(self) -> torch.Tensor:
        return self.m2 / (self.n - 1)  # unbiased, as numpy.cov


class FID:
    """Streaming FID: ``update(batch, real=True/False)`` any number of times, then ``compute()``.

    ``feature_extractor``: an ``nn.Module`` or callable mapping images to features ``(N, F)`` (outputs are
    flattened to (N, -1); run under ``torch.no_grad``; put a module in eval mode yourself), e.g.
    :func:`load_inception_features`; ``None``: ``update`` takes the features ``(N, F)`` directly.
    ``device``: where the float64 accumulators live (default: the first batch's device). Only the mean
    and scatter matrix (F + F^2 doubles) per set are kept, never the features.
    """

    def __init__(
        self,
        feature_extractor: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        device: torch.device | str | None = None,
    ):
        self.feature_extractor = feature_extractor
        self.device = torch.device(device) if device is not None else None
        self.reset()

    def reset(self) -> None:
        """Forget both sets' statistics."""
        self._stats = {True: _Moments(), False: _Moments()}

    @torch.no_grad()
    def update(self, images_or_features: torch.Tensor, real: bool) -> None:
        """Add a batch to the real (``real=True``) or generated set: images for the extractor, or (N, F)."""
        x = images_or_features
        if not isinstance(real, bool):  # the set is a dict key: 1 / "yes" would fail or mix sets
            raise TypeError(f"FID.update: real must be True or False, got {real!r}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FID.update: expected a torch.Tensor, got {type(x).__name__}")
        if self.feature_extractor is not None:
            x = self.feature_extractor(x)
            x = x.reshape(x.shape[0], -1)
        elif x.dim() != 2:
            raise ValueError(
                f"FID.update: without a feature_extractor, pass features (N, F); got {tuple(x.shape)}"
            )
        if self.device is None:
            self.device = x.device
        x = x.to(device=self.device, dtype=torch.float64)
        other = self._stats[not real].mean
        for st in (self._stats[real].mean, other):
            if st is not None and st.shape[0] != x.shape[1]:
                raise ValueError(
                    f"FID.update: feature size {x.shape[1]} differs from earlier batches ({st.shape[0]})"
                )
        self._stats[bool(real)].update(x)

    def compute(self) -> float:
        """The FID between everything added so far (needs >= 2 samples in each set)."""
        r, g = self._stats[True], self._stats[False]
        if r.n < 2 or g.n < 2:
            raise ValueError(f"FID.compute: needs >= 2 real and >= 2 generated samples, have {r.n} and {g.n}")
        # NaN / inf features reach the moments; name the set here rather than mu1 / sigma1 later
        finite = torch.stack([torch.isfinite(st.m2).all() & torch.isfinite(st.mean).all() for st in (r, g)])
        bad = [name for name, ok in zip(("real", "generated"), finite.tolist()) if not ok]
        if bad:
            raise ValueError(f"FID.compute: the {' and '.join(bad)} features contain NaN or inf")
        return frechet_distance(r.mean, r.cov(), g.mean, g.cov())


class _InceptionFeatures(nn.Module):
    """torchvision Inception-v3 trunk -> 2048-d pool features of images in [0, 1] (resized to 299x299)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"Inception features: expected (N, 3, H, W) images in [0, 1], got {tuple(images.shape)}"
            )
        x = images.float()
        if x.shape[-2:] != (299, 299):
            x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(2 * x - 1)  # fc is Identity: (N, 2048)


def load_inception_features(path: str, device: torch.device | str | None = None) -> nn.Module:
    """Inception-v3 pool features (N, 2048) for FID from a local weights file. Nothing is downloaded.

    ``path``: a ``torch.save``-d state_dict of ``torchvision.models.inception_v3`` (1000 classes, e.g.
    ``torch.save(inception_v3(weights="IMAGENET1K_V1").state_dict(), path)`` where downloads are allowed),
    ``AuxLogits.*`` keys optional. Requires torchvision (imported here, not by fastgen). The module takes
    images (N, 3, H, W) in [0, 1], resizes them to 299x299 (bilinear), maps to [-1, 1] and returns the
    final average pool (fc replaced by Identity), in eval mode. FID values from these weights are
    comparable with each other, not with the TF-Inception numbers of papers (pytorch-fid's
    ``pt_inception-2015-12-05`` weights use a modified architecture).
    """
    try:
        from torchvision.models import inception_v3
    except Exception as e:
        raise ImportError(
            f"load_inception_features needs torchvision (pip install torchvision matching your torch): {e}"
        ) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
    net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=num_classes)
    net.transform_input = False
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"load_inception_features: {path} is not a torchvision inception_v3 state_dict "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    net.fc = nn.Identity()
    return _InceptionFeatures(net).eval().to(device if device is not None else "cpu")
