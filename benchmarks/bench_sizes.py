"""Benchmark: encode throughput of one model at its trained 16x16 grid and at a 24x24 grid, per size strategy.

The models are the ones of ``python -m fastgen.train.examples.sizes`` at their full-run configuration,
randomly initialised (throughput does not depend on the trained weights), in eval mode, no grad:

* ``vit``: the ViT classifier (fastgen's CLIP image tower, patch size 1, width 64, 4 layers, trained grid
  16x16; a 24x24 image is a 24x24 token grid). Rows: ``interpolate`` (the baseline: the positional
  embedding resampled, cached after the first call), ``adaptive_pool`` (the token grid pooled to 16x16),
  ``resize`` (the image resized to 16x16 first).
* ``vq-ae``: the fully convolutional VQ autoencoder (width 32, codebook 64 x 16, latent grid H/4 x W/4),
  encode = image -> code indices. Rows: ``native`` (the baseline: run at the image's own size) and
  ``resize`` (resized to 16x16, so always a 4x4 code grid).

images/s = batch / the harness's time per call. Correctness: at the trained 16x16 every strategy is the
same computation, so every row must equal the baseline (the harness's element-wise comparison); at 24x24
the strategies compute different things by design, so the check is the output's shape (and finite logits,
or code indices in range).
"""

from __future__ import annotations

import torch

from fastgen.bench import Case, Check, Impl, main, register
from fastgen.models.clip import SIZE_STRATEGIES
from fastgen.train.examples.sizes import AE_STRATEGIES, VQAutoencoder, make_model

TRAIN = 16


def batches(device: torch.device, quick: bool) -> int:
    if device.type == "cuda":
        return 1024 if quick else 4096
    return 64 if quick else 256


@register(op="sizes", description="encode images/s at the trained 16x16 vs a 24x24 grid, per size strategy")
def sizes_cases(device: torch.device, quick: bool):
    b = batches(device, quick)
    for model in ("vit", "vq-ae"):
        for size in (TRAIN, 24):
            yield make_case(device, model, b, size)


def make_case(device: torch.device, model: str, b: int, size: int) -> Case:
    torch.manual_seed(0)
    x = torch.rand(b, 1, size, size, device=device)
    if model == "vit":
        net = make_model(TRAIN, width=64, layers=4, seed=0).to(device).eval()
        strategies, call = SIZE_STRATEGIES, net
    else:
        net = VQAutoencoder(TRAIN, width=32).to(device).eval()
        strategies, call = AE_STRATEGIES, net.encode

    def run(strategy: str):
        @torch.no_grad()
        def fn():
            net.size_strategy = strategy
            return call(x)

        return fn

    def shape_check(out) -> Check:
        """The 24x24 oracle (called right after the row's call, so ``net.size_strategy`` names the row)."""
        strategy = net.size_strategy
        if model == "vit":
            ok = tuple(out.shape) == (b, 10) and bool(torch.isfinite(out).all())
            return Check(ok, None, f"{strategy}: logits {tuple(out.shape)}")
        grid = size // 4 if strategy == "native" else TRAIN // 4
        ok = (
            tuple(out.shape) == (b, grid, grid)
            and int(out.min()) >= 0
            and int(out.max()) < net.vq.codebook_size
        )
        return Check(ok, None, f"{strategy}: codes {tuple(out.shape)}")

    impls = [Impl(s, run(s), baseline=i == 0) for i, s in enumerate(strategies)]
    check = None if size == TRAIN else shape_check
    params = {"model": model, "batch": b, "size": size, "trained": TRAIN, "dtype": "fp32"}
    name = f"{model} encode {size}x{size} (trained {TRAIN}x{TRAIN}) B{b}"
    return Case(name, impls, bytes=x.nbytes, params=params, atol=1e-5, rtol=1e-5, check=check)


if __name__ == "__main__":
    raise SystemExit(main(only=["sizes"]))
