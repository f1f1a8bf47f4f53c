r"""One model, many sizes: which way should a ViT trained at one grid serve another? Measured on real digits.

    python -m fastgen.train.examples.sizes [--out sizes_out] [--quick]

Data: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download), scaled to [0, 1] and
upsampled (bilinear) to S x S pixels for each grid size S; a fixed stratified 80 / 20 train / test split.

Model: a small ViT classifier, fastgen's CLIP image tower (:class:`fastgen.models.clip.VisionTransformer`,
patch size 1, so the S x S image is an S x S token grid; its ``embed_dim`` outputs are the 10 class
logits). It is trained at the 16 x 16 grid, then evaluated at 12 x 12 and 24 x 24 (and 16 x 16); ``--quick`` uses
the same ratios at half the size (trained at 8 x 8, evaluated at 6 x 6 and 12 x 12) and a smaller model:

* zero-shot with each ``size_strategy``: ``interpolate`` (the positional embedding resampled to the new
  grid, bicubic + antialias), ``adaptive_pool`` (the token grid pooled to 16 x 16 by
  :func:`fastgen.ops.adaptive_grid_pool`, trained positional embedding), ``resize`` (the image resized to
  16 x 16 before the model);
* after a short low-learning-rate fine-tune at the new size (``interpolate`` and ``adaptive_pool``), on
  the new size only or with multi-size augmentation (each batch at a random size of 12, 16, 20, 24).

Reports test accuracy and encode throughput (images/s, batch 256, inference) per (size, strategy, run).
Writes ``results.json``, ``results.md`` (the table) and ``sizes.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.nn.functional as F

from fastgen.models.clip import SIZE_STRATEGIES, CLIPConfig, VisionTransformer

# (train size, eval sizes, multi-size augmentation sizes); --quick runs the same ratios at half the size
SIZES = {False: (16, (12, 16, 24), (12, 16, 20, 24)), True: (8, (6, 8, 12), (6, 8, 10, 12))}
FT_STRATEGIES = ("interpolate", "adaptive_pool")


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


def train(model, x8, y, steps: int, lr: float, sizes: tuple[int, ...], bs: int, seed: int) -> float:
    """AdamW with a cosine schedule; each batch at a size drawn from ``sizes``. Returns the seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    g = torch.Generator().manual_seed(seed)
    cache = {s: at_size(x8, s) for s in sizes}
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (bs,), generator=g)
        s = sizes[int(torch.randint(0, len(sizes), (1,), generator=g))]
        loss = F.cross_entropy(model(cache[s][idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - t0


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


def plot(rows: list[dict], train_size: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for strategy in SIZE_STRATEGIES:
        pts = sorted(
            (r["size"], r["accuracy"]) for r in rows if r["run"] == "zero-shot" and r["strategy"] == strategy
        )
        ax.plot(*zip(*pts), marker="o", label=f"zero-shot {strategy}")
    markers = {"fine-tune": "s", "fine-tune + multi-size": "^"}
    for r in rows:
        if r["run"] in markers:
            ax.scatter(r["size"], r["accuracy"], marker=markers[r["run"]], s=50,
                       label=f"{r['run']} {r['strategy']}")  # fmt: skip
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    ax.set_xlabel(f"grid size (trained at {train_size})")
    ax.set_ylabel("test accuracy")
    ax.set_xticks(sorted({r["size"] for r in rows}))
    ax.set_title("ViT on digits: serving other grid sizes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = ["| size | run | strategy | accuracy | images/s |", "|---:|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']}x{r['size']} | {r['run']} | {r['strategy']} | {r['accuracy']:.3f} | "
                     f"{r['images_per_s']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="sizes_out")
    p.add_argument("--quick", action="store_true", help="fewer steps, a smaller model (CI smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="base training steps at 16x16")
    p.add_argument("--ft-steps", type=int, default=None, help="fine-tuning steps per run")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ft-lr", type=float, default=2e-4, help="the low fine-tuning learning rate")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--width", type=int, default=None, help="model width (default 32 quick, 64 full)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (default 1 quick, 4 full)")
    p.add_argument(
        "--train-size",
        type=int,
        choices=(8, 16),
        default=None,
        help="the trained grid: 8 (evaluated at 6, 12) or 16 (at 12, 24); default 8 quick, 16 full",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps if args.steps is not None else (150 if args.quick else 1500)
    ft_steps = args.ft_steps if args.ft_steps is not None else (15 if args.quick else 200)
    width, layers, bs = (32, 1, 32) if args.quick else (64, 4, 128)
    width, layers = args.width or width, args.layers or layers
    small = args.quick if args.train_size is None else args.train_size == 8
    train_size, eval_sizes, aug_sizes = SIZES[small]
    os.makedirs(args.out, exist_ok=True)
    data = load_digits(args.seed)
    (xtr, ytr), (xte, yte) = data["train"], data["test"]

    base = make_model(train_size, width, layers, args.seed)
    secs = train(base, xtr, ytr, steps, args.lr, (train_size,), bs, args.seed)
    print(f"base: {steps} steps at {train_size}x{train_size} in {secs:.1f}s")
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
    text = table(rows)
    print(text)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    meta = {"train_size": train_size, "steps": steps, "ft_steps": ft_steps, "width": width, "layers": layers,
            "lr": args.lr, "ft_lr": args.ft_lr, "threads": torch.get_num_threads(), "quick": args.quick}  # fmt: skip
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    plot(rows, train_size, os.path.join(args.out, "sizes.png"))
    print(f"wrote {args.out}/results.json, results.md, sizes.png")
    return rows


if __name__ == "__main__":
    main()
