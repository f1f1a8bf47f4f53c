r"""One model, many sizes: which way should a model trained at one grid serve another? Measured on real digits.

    python -m fastgen.train.examples.sizes [--out sizes_out] [--quick] [--only classifier|autoencoder]

Data: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download), scaled to [0, 1] and
upsampled (bilinear) to S x S pixels for each grid size S; a fixed stratified 80 / 20 train / test split.
Every size shows the same 8x8 content, so resizing to the trained size loses little here: a friendly
setting for ``resize``.

Classifier half: a small ViT, fastgen's CLIP image tower (:class:`fastgen.models.clip.VisionTransformer`,
patch size 1, so the S x S image is an S x S token grid; its ``embed_dim`` outputs are the 10 class
logits). It is trained at the 16 x 16 grid, then evaluated at 12 x 12 and 24 x 24 (and 16 x 16); ``--quick``
uses the same ratios at half the size (trained at 8 x 8, evaluated at 6 x 6 and 12 x 12) and a smaller model:

* zero-shot with each ``size_strategy``: ``interpolate`` (the positional embedding resampled to the new
  grid, bicubic + antialias), ``adaptive_pool`` (the token grid pooled to 16 x 16 by
  :func:`fastgen.ops.adaptive_grid_pool`, trained positional embedding), ``resize`` (the image resized to
  16 x 16 before the model);
* after a short low-learning-rate fine-tune at the new size (``interpolate`` and ``adaptive_pool``), on
  the new size only or with multi-size augmentation (each batch at a random size of 12, 16, 20, 24).

Reports test accuracy and encode throughput (images/s, batch 256, inference) per (size, strategy, run).

Autoencoder half: :class:`VQAutoencoder`, fully convolutional (conv encoder, :class:`fastgen.nn.VectorQuantize`
on the H/4 x W/4 latent grid, conv decoder), trained at 16 x 16 and evaluated at 12 x 12 and 24 x 24 (also
in ``--quick``, which only shrinks the steps and the width: SSIM's 11x11 window needs >= 11 pixels):

* zero-shot ``native`` (fully convolutional: the image runs at its own size, nothing to do) and
  ``resize`` (the image resized to 16 x 16, coded, the reconstruction resized back);
* after a short low-learning-rate fine-tune at the new size (native), on the new size only or with
  multi-size augmentation (each batch at a random size of 12, 16, 20, 24);
* a ``mean image`` baseline row per size (the per-pixel mean of the training images, for every input).

Reports MSE (per pixel), SSIM (:func:`fastgen.metrics.ssim`, 11x11 Gaussian window), FID
(:class:`fastgen.metrics.fid.FID` with a *fixed random conv net* as the feature extractor, see
:func:`make_fid_features`: it ranks strategies at one size on this data and is not comparable with
published Inception FIDs) of the reconstructions of the test split, and encode throughput (image -> code
indices, images/s, batch 256).

Writes ``results.json`` (``{"meta": {..., "classifier": {...}, "autoencoder": {...}}, "classifier": [rows],
"autoencoder": [rows]}``), ``results.md`` (the two tables) and ``sizes.png`` (two panels) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.metrics.fid import FID
from fastgen.metrics.ssim import ssim
from fastgen.models.clip import SIZE_STRATEGIES, CLIPConfig, VisionTransformer
from fastgen.nn import VectorQuantize

# (train size, eval sizes, multi-size augmentation sizes); --quick runs the same ratios at half the size
SIZES = {False: (16, (12, 16, 24), (12, 16, 20, 24)), True: (8, (6, 8, 12), (6, 8, 10, 12))}
FT_STRATEGIES = ("interpolate", "adaptive_pool")
# the autoencoder: (train size, eval sizes, multi-size augmentation sizes), quick or not
AE_SIZES = (16, (12, 16, 24), (12, 16, 20, 24))
AE_STRATEGIES = ("native", "resize")


def load_digits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """8x8 images (N, 1, 8, 8) in [0, 1] and labels, split 80 / 20 per class with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = int(0.8 * len(idx))
        train.append(idx[:n])
        test.append(idx[n:])
    tr, te = torch.cat(train), torch.cat(test)
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te])}


def at_size(x8: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, 8, 8) -> (N, 1, size, size), bilinear (antialiased when shrinking), in [0, 1]."""
    return F.interpolate(x8, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(
        0, 1
    )


def make_model(train_size: int, width: int, layers: int, seed: int) -> VisionTransformer:
    cfg = CLIPConfig(
        embed_dim=10, image_size=train_size, patch_size=1, vision_width=width, vision_layers=layers,
        vision_heads=max(1, width // 16), in_channels=1, act="gelu",
    )  # fmt: skip
    torch.manual_seed(seed)
    m = VisionTransformer(cfg)
    with torch.no_grad():  # the tower alone: CLIP.reset_parameters would initialise these
        for p in (m.class_embedding, m.positional_embedding, m.proj):
            p.normal_(0, width**-0.5)
        for block in m.transformer.resblocks:
            block.attn.in_proj_weight.normal_(0, width**-0.5)
    return m


def _fit(
    model, params, loss_of, x8, n: int, steps: int, lr: float, wd: float, sizes, bs: int, seed: int
) -> float:
    """AdamW with a cosine schedule; each batch of ``bs`` indices into the ``n`` examples at a size drawn
    from ``sizes``; ``loss_of(images, idx)`` gives the loss. Returns the seconds."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    g = torch.Generator().manual_seed(seed)
    cache = {s: at_size(x8, s) for s in sizes}
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, n, (bs,), generator=g)
        s = sizes[int(torch.randint(0, len(sizes), (1,), generator=g))]
        loss = loss_of(cache[s][idx], idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - t0


def train(model, x8, y, steps: int, lr: float, sizes: tuple[int, ...], bs: int, seed: int) -> float:
    """AdamW (weight decay 0.05) with a cosine schedule on the cross-entropy; each batch at a size drawn
    from ``sizes``. Returns the seconds."""
    return _fit(model, model.parameters(), lambda x, idx: F.cross_entropy(model(x), y[idx]), x8, len(y), steps,
                lr, 0.05, sizes, bs, seed)  # fmt: skip


@torch.no_grad()
def evaluate(model, x8, y, size: int, strategy: str, bs: int = 256) -> tuple[float, float]:
    """(accuracy, images/s) at ``size`` with ``strategy`` (the tower's strategy is restored after)."""
    old = model.size_strategy
    model.size_strategy = strategy
    x = at_size(x8, size)
    try:
        model(x[:bs])  # warm-up (pos-embed cache, kernels)
        dt = float("inf")
        for _ in range(3):  # best of three passes: the test split is small, one pass is noisy
            t0 = time.perf_counter()
            pred = torch.cat([model(x[i : i + bs]).argmax(-1) for i in range(0, len(y), bs)])
            dt = min(dt, time.perf_counter() - t0)
    finally:
        model.size_strategy = old
    return (pred == y).float().mean().item(), len(y) / dt


# =====================================================================================================
# The autoencoder half: a fully convolutional VQ autoencoder
# =====================================================================================================


class VQAutoencoder(nn.Module):
    """A small fully convolutional VQ autoencoder for (N, 1, H, W) images in [0, 1], H and W multiples of 4.

    Encoder: 3x3 conv (1 -> width), two 4x4 stride-2 convs (each halves the grid), 1x1 conv to ``dim``
    (GELU between); :class:`fastgen.nn.VectorQuantize` (channel-first, EMA codebook of ``codebook_size``
    codes, k-means init, dead-code replacement) on the (N, dim, H / 4, W / 4) latent grid; decoder:
    1x1 conv (dim -> width), two 4x4 stride-2 transposed convs, 3x3 conv to one channel, sigmoid.
    Every layer is a convolution, so any H x W (multiple of 4) runs as is.

    ``size_strategy``: ``"native"`` runs the image at its own size (fully convolutional: nothing to do);
    ``"resize"`` resizes the input to ``train_size`` (bilinear, antialiased when shrinking), codes it
    there and resizes the reconstruction back. At ``train_size`` the two are the same computation.
    """

    def __init__(self, train_size: int, width: int = 32, dim: int = 16, codebook_size: int = 64):
        super().__init__()
        for arg, v in (("train_size", train_size), ("width", width), ("dim", dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"VQAutoencoder: {arg} must be a positive int, got {v!r}")
        if train_size % 4:
            raise ValueError(f"VQAutoencoder: train_size must be a multiple of 4, got {train_size}")
        self.train_size, self.size_strategy = train_size, "native"
        act = nn.GELU
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), act(),
            nn.Conv2d(width, width, 4, stride=2, padding=1), act(),
            nn.Conv2d(width, width, 4, stride=2, padding=1), act(),
            nn.Conv2d(width, dim, 1),
        )  # fmt: skip
        self.vq = VectorQuantize(dim, codebook_size, decay=0.9, commitment_weight=0.25, channel_last=False,
                                 kmeans_init=True, dead_code_threshold=0.5)  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, width, 1), act(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), act(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), act(),
            nn.Conv2d(width, 1, 3, padding=1),
        )  # fmt: skip

    def _check(self, x: torch.Tensor) -> None:
        if self.size_strategy not in AE_STRATEGIES:
            raise ValueError(
                f"VQAutoencoder: size_strategy must be one of {AE_STRATEGIES}, got {self.size_strategy!r}"
            )
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"VQAutoencoder: x must be (N, 1, H, W), got {getattr(x, 'shape', type(x))}")
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"VQAutoencoder: H and W must be multiples of 4, got {tuple(x.shape[-2:])}")

    def _to_trained(self, x: torch.Tensor) -> torch.Tensor:
        if self.size_strategy == "resize" and tuple(x.shape[-2:]) != (self.train_size,) * 2:
            return resize(x, self.train_size)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) -> code indices (N, h, w) (int64; h = H / 4 natively, train_size / 4 resized)."""
        self._check(x)
        return self.vq(self.encoder(self._to_trained(x)))[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, H, W) -> (reconstruction (N, 1, H, W) in [0, 1], the VQ commitment loss)."""
        self._check(x)
        q, _, commit = self.vq(self.encoder(self._to_trained(x)))
        y = torch.sigmoid(self.decoder(q))
        if y.shape[-2:] != x.shape[-2:]:
            y = resize(y, x.shape[-2], x.shape[-1])
        return y, commit


def resize(x: torch.Tensor, h: int, w: int | None = None) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) to (h, w) (w defaults to h), antialiased when shrinking."""
    return F.interpolate(x, size=(h, w or h), mode="bilinear", align_corners=False, antialias=True)


def make_fid_features(seed: int = 1234) -> nn.Module:
    """The FID feature extractor: a fixed random conv net (never trained; weights from ``seed``).

    3x3 conv (1 -> 32) + ReLU, 3x3 stride-2 conv (32 -> 64) + ReLU, then the spatial mean and standard
    deviation of the 64 channels: 128 features per image, for any image size. Its FIDs compare
    strategies at one size on this data; they are NOT comparable with published (Inception) FIDs.
    """
    g = torch.Generator().manual_seed(seed)
    c1, c2 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, stride=2, padding=1)
    with torch.no_grad():
        for conv in (c1, c2):
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)

    class _Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.net(x).flatten(2)
            return torch.cat([f.mean(-1), f.std(-1)], dim=1)

    return _Features().eval().requires_grad_(False)


def train_ae(
    model: VQAutoencoder, x8, steps: int, lr: float, sizes: tuple[int, ...], bs: int, seed: int
) -> float:
    """AdamW with a cosine schedule on MSE + the VQ commitment loss; each batch at a size drawn from
    ``sizes`` (native strategy). Returns the seconds."""
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of(x, idx):
        recon, commit = model(x)
        return F.mse_loss(recon, x) + commit

    return _fit(model, params, loss_of, x8, len(x8), steps, lr, 0.0, sizes, bs, seed)


@torch.no_grad()
def evaluate_ae(model, x8, size: int, strategy: str, features: nn.Module, bs: int = 256) -> dict:
    """MSE, SSIM, FID (vs the test images at ``size``) and encode images/s with ``strategy``."""
    old = model.size_strategy
    model.size_strategy = strategy
    x = at_size(x8, size)
    try:
        model.encode(x[:bs])  # warm-up
        dt = float("inf")
        for _ in range(3):  # encode throughput: best of three passes over the test split
            t0 = time.perf_counter()
            for i in range(0, len(x), bs):
                model.encode(x[i : i + bs])
            dt = min(dt, time.perf_counter() - t0)
        y = torch.cat([model(x[i : i + bs])[0] for i in range(0, len(x), bs)])
    finally:
        model.size_strategy = old
    out = recon_metrics(y, x, features)
    out["images_per_s"] = len(x) / dt
    return out


@torch.no_grad()
def recon_metrics(y: torch.Tensor, x: torch.Tensor, features: nn.Module) -> dict:
    """MSE (per pixel), SSIM (fastgen.metrics.ssim, 11x11 Gaussian window) and FID of ``y`` against ``x``."""
    fid = FID(features)
    fid.update(x, real=True)
    fid.update(y, real=False)
    return {"mse": F.mse_loss(y, x).item(), "ssim": ssim(y, x, data_range=1.0).item(), "fid": fid.compute()}


def run_autoencoder(args, data, quick: bool) -> tuple[list[dict], dict]:
    """Train the VQ autoencoder at 16x16, evaluate at 12, 16, 24: zero-shot and after fine-tunes."""
    train_size, eval_sizes, aug_sizes = AE_SIZES
    steps = args.ae_steps if args.ae_steps is not None else (400 if quick else 2000)
    ft_steps = args.ae_ft_steps if args.ae_ft_steps is not None else (40 if quick else 300)
    width, bs = (16, 32) if quick else (32, 64)
    width = args.ae_width or width
    (xtr, _), (xte, _) = data["train"], data["test"]
    features = make_fid_features()
    torch.manual_seed(args.seed)
    base = VQAutoencoder(train_size, width=width)
    secs = train_ae(base, xtr, steps, args.ae_lr, (train_size,), bs, args.seed)
    print(f"autoencoder: {steps} steps at {train_size}x{train_size} in {secs:.1f}s")
    rows = []
    for size in eval_sizes:
        mean_img = at_size(xtr, size).mean(0, keepdim=True)
        xs = at_size(xte, size)
        rows.append({"size": size, "run": "baseline", "strategy": "mean image", "images_per_s": None,
                     **recon_metrics(mean_img.expand_as(xs), xs, features)})  # fmt: skip
        for strategy in AE_STRATEGIES:
            rows.append({"size": size, "run": "zero-shot", "strategy": strategy,
                         **evaluate_ae(base, xte, size, strategy, features)})  # fmt: skip
    for size in (s for s in eval_sizes if s != train_size):
        for run, sizes in (("fine-tune", (size,)), ("fine-tune + multi-size", aug_sizes)):
            m = copy.deepcopy(base)
            train_ae(m, xtr, ft_steps, args.ae_ft_lr, sizes, bs, args.seed + 1)
            rows.append({"size": size, "run": run, "strategy": "native",
                         **evaluate_ae(m, xte, size, "native", features)})  # fmt: skip
    meta = {"train_size": train_size, "steps": steps, "ft_steps": ft_steps, "width": width, "dim": base.vq.dim,
            "codebook_size": base.vq.codebook_size, "lr": args.ae_lr, "ft_lr": args.ae_ft_lr,
            "fid_features": "fixed random conv net (seed 1234), mean + std of 64 channels"}  # fmt: skip
    return rows, meta


def plot(rows: list[dict], train_size: int, ae_rows: list[dict], ae_train_size: int, path: str) -> None:
    """Two panels: the classifier's test accuracy and the autoencoder's SSIM against the grid size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(rows, train_size, "accuracy", "test accuracy", "ViT classifier on digits", SIZE_STRATEGIES),
              (ae_rows, ae_train_size, "ssim", "test SSIM", "VQ autoencoder on digits",
               (*AE_STRATEGIES, "mean image"))]  # fmt: skip
    panels = [p for p in panels if p[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    markers = {"fine-tune": "s", "fine-tune + multi-size": "^"}
    for ax, (rs, trained, key, ylabel, title, strategies) in zip(axes[0], panels):
        color = {
            k: f"C{i}" for i, k in enumerate(strategies)
        }  # a fine-tune marker takes its strategy's colour
        for strategy in strategies:
            pts = sorted((r["size"], r[key]) for r in rs if r["run"] in ("zero-shot", "baseline")
                         and r["strategy"] == strategy)  # fmt: skip
            style = "--" if strategy == "mean image" else "-"
            label = strategy if strategy == "mean image" else f"zero-shot {strategy}"
            ax.plot(*zip(*pts), style, marker="o", label=label, color=color[strategy])
        for r in rs:
            if r["run"] in markers:
                ax.scatter(r["size"], r[key], marker=markers[r["run"]], s=60, facecolors="none", linewidths=1.5,
                           edgecolors=color[r["strategy"]], label=f"{r['run']} {r['strategy']}")  # fmt: skip
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
        ax.set_xlabel(f"grid size (trained at {trained})")
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted({r["size"] for r in rs}))
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    """The classifier's markdown table."""
    lines = ["| size | run | strategy | accuracy | images/s |", "|---:|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']}x{r['size']} | {r['run']} | {r['strategy']} | {r['accuracy']:.3f} | "
                     f"{r['images_per_s']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def ae_table(rows: list[dict]) -> str:
    """The autoencoder's markdown table (images/s: encode throughput; ``-`` for the baseline)."""
    lines = ["| size | run | strategy | MSE | SSIM | FID (random-conv features) | encode images/s |",
             "|---:|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        ips = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.0f}"
        lines.append(f"| {r['size']}x{r['size']} | {r['run']} | {r['strategy']} | {r['mse']:.4f} | "
                     f"{r['ssim']:.3f} | {r['fid']:.3g} | {ips} |")  # fmt: skip
    return "\n".join(lines)


def run_classifier(args, data, quick: bool) -> tuple[list[dict], dict]:
    """Train the ViT at the trained grid, evaluate zero-shot per strategy and after fine-tunes."""
    steps = args.steps if args.steps is not None else (300 if quick else 1000)
    ft_steps = args.ft_steps if args.ft_steps is not None else (20 if quick else 100)
    width, layers, bs = (32, 1, 32) if quick else (32, 2, 64)
    width, layers = args.width or width, args.layers or layers
    small = quick if args.train_size is None else args.train_size == 8
    train_size, eval_sizes, aug_sizes = SIZES[small]
    (xtr, ytr), (xte, yte) = data["train"], data["test"]

    base = make_model(train_size, width, layers, args.seed)
    secs = train(base, xtr, ytr, steps, args.lr, (train_size,), bs, args.seed)
    print(f"classifier: {steps} steps at {train_size}x{train_size} in {secs:.1f}s")
    rows = []
    for size in eval_sizes:
        for strategy in SIZE_STRATEGIES:
            acc, ips = evaluate(base, xte, yte, size, strategy)
            rows.append(
                {"size": size, "run": "zero-shot", "strategy": strategy, "accuracy": acc, "images_per_s": ips}
            )
    for size in (s for s in eval_sizes if s != train_size):
        for strategy in FT_STRATEGIES:
            for run, sizes in (("fine-tune", (size,)), ("fine-tune + multi-size", aug_sizes)):
                m = copy.deepcopy(base)
                m.size_strategy = strategy
                train(m, xtr, ytr, ft_steps, args.ft_lr, sizes, bs, args.seed + 1)
                acc, ips = evaluate(m, xte, yte, size, strategy)
                rows.append(
                    {"size": size, "run": run, "strategy": strategy, "accuracy": acc, "images_per_s": ips}
                )
    meta = {"train_size": train_size, "steps": steps, "ft_steps": ft_steps, "width": width, "layers": layers,
            "lr": args.lr, "ft_lr": args.ft_lr}  # fmt: skip
    return rows, meta


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    """Run the experiment; returns ``{"classifier": rows, "autoencoder": rows}`` (a skipped half: ``[]``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="sizes_out")
    p.add_argument("--quick", action="store_true", help="fewer steps, smaller models (CI smoke run, < 60 s)")
    p.add_argument("--only", choices=("classifier", "autoencoder"), default=None, help="run one half only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    g = p.add_argument_group("classifier (ViT)")
    g.add_argument(
        "--steps", type=int, default=None, help="base training steps (default 300 quick, 1000 full)"
    )
    g.add_argument(
        "--ft-steps", type=int, default=None, help="fine-tuning steps per run (20 quick, 100 full)"
    )
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--ft-lr", type=float, default=2e-4, help="the low fine-tuning learning rate")
    g.add_argument("--width", type=int, default=None, help="model width (default 32)")
    g.add_argument("--layers", type=int, default=None, help="transformer layers (default 1 quick, 2 full)")
    g.add_argument(
        "--train-size",
        type=int,
        choices=(8, 16),
        default=None,
        help="the trained grid: 8 (evaluated at 6, 12) or 16 (at 12, 24); default 8 quick, 16 full",
    )
    g = p.add_argument_group("autoencoder (VQ, trained at 16x16, evaluated at 12x12 and 24x24)")
    g.add_argument("--ae-steps", type=int, default=None, help="base training steps (400 quick, 2000 full)")
    g.add_argument(
        "--ae-ft-steps", type=int, default=None, help="fine-tuning steps per run (40 quick, 300 full)"
    )
    g.add_argument("--ae-lr", type=float, default=5e-3)
    g.add_argument("--ae-ft-lr", type=float, default=5e-4, help="the low fine-tuning learning rate")
    g.add_argument("--ae-width", type=int, default=None, help="conv width (default 16 quick, 32 full)")
    args = p.parse_args(argv)
    for name in ("steps", "ft_steps", "ae_steps", "ae_ft_steps"):
        v = getattr(args, name)
        if v is not None and v < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    for name in ("width", "layers", "ae_width", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    data = load_digits(args.seed)
    t0 = time.perf_counter()
    rows, meta = run_classifier(args, data, args.quick) if args.only != "autoencoder" else ([], {})
    ae_rows, ae_meta = run_autoencoder(args, data, args.quick) if args.only != "classifier" else ([], {})
    texts = []
    if rows:
        texts.append(f"Classifier (ViT, trained at {meta['train_size']}x{meta['train_size']}): test accuracy\n\n"
                     + table(rows))  # fmt: skip
    if ae_rows:
        texts.append(f"VQ autoencoder (trained at {ae_meta['train_size']}x{ae_meta['train_size']}): test "
                     "reconstructions (FID: random-conv features, not comparable with Inception FIDs)\n\n"
                     + ae_table(ae_rows))  # fmt: skip
    text = "\n\n".join(texts)
    print(text)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    info = {"threads": torch.get_num_threads(), "quick": args.quick, "seconds": time.perf_counter() - t0,
            "classifier": meta, "autoencoder": ae_meta}  # fmt: skip
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": info, "classifier": rows, "autoencoder": ae_rows}, f, indent=1)
    plot(
        rows,
        meta.get("train_size", 0),
        ae_rows,
        ae_meta.get("train_size", 0),
        os.path.join(args.out, "sizes.png"),
    )
    print(f"wrote {args.out}/results.json, results.md, sizes.png ({info['seconds']:.0f}s)")
    return {"classifier": rows, "autoencoder": ae_rows}


if __name__ == "__main__":
    main()
