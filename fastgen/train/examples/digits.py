r"""Fine-tuning a VQ-VAE to a held-out domain of real handwritten digits (scikit-learn's ``load_digits``).

    python -m fastgen.train.examples.digits [--out digits_out] [--quick]
    torchrun --nproc-per-node 2 -m fastgen.train.examples.digits --quick --strategy ddp   # or fsdp

Under ``torchrun`` every run is data parallel (``--strategy``; each batch is split over the ranks, so the
global batch and the results match one process); rank 0 prints and writes ``--out``.

Data: 1797 8x8 grayscale digits (bundled with scikit-learn, no download), scaled to [0, 1] and upsampled
to 16x16 (bilinear). Base domain: digits 0-6; held-out domain: digits 7-9, split (fixed seed) into a small
training split (``--n-train``), a validation split and a test split.

Model: a fully convolutional VQ-VAE (16x16 -> 4x4 grid of codes from a :class:`fastgen.nn.VectorQuantize`
EMA codebook -> 16x16). Base training uses :class:`fastgen.train.RandomResizedCropFlip`, so the model sees
12x12, 16x16 and 20x20 crops.

1. train the base model on the base domain; save it (``base_model/``, ``save_pretrained``);
2. (a) fine-tune from ``base_model/`` on the held-out training split: encoder stem frozen (``encoder.0``,
   ``encoder.2``), the rest of the encoder at 0.1x the lr, the decoder at the full lr; early stopping on
   the validation reconstruction MSE, best weights restored;
   (b) the same model trained from scratch on the same data for the same number of steps (same
   validation / early stopping);
   (c) the base model as is;
3. evaluate on the held-out test split: reconstruction MSE; SSIM (:func:`fastgen.metrics.ssim` on the
   16x16 images with ``window_size=7``); FID (:class:`fastgen.metrics.FID`) between reconstructions and
   the real test images, on the 64-d penultimate features of a small CNN classifier trained here on the
   base-domain digits; and that classifier's Inception Score. The IS is reported for completeness only:
   the classifier knows digits 0-6, so on digits 7-9 its class probabilities do not measure quality.

Writes to ``--out``: the three models (``base_model/``, ``finetune_model/``, ``scratch_model/``: fastgen's
format, config.json + model.safetensors; ``VQAutoencoder.from_pretrained(dir)`` reads them), per-run logs (``<run>/log.csv``, ``log.json``, ``loss_curve.png``),
``loss_curves.png`` (fine-tune vs scratch), ``reconstructions.png`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fastgen.models import hub
from fastgen.nn import VectorQuantize
from fastgen.train import FineTuneConfig, RandomResizedCropFlip, finetune
from fastgen.train import distributed as tdist

# FineTuneConfig.strategy for every run of the example (set by --strategy); batches split over the ranks
STRATEGY: str | None = None

BASE_CLASSES = tuple(range(7))
HELD_CLASSES = (7, 8, 9)


def load_digits_16(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """images (1797, 1, size, size) float32 in [0, 1], labels (1797,) int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(d.target, dtype=torch.int64)


def split_domains(x, y, n_train: int, n_val: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.nonzero(y < len(BASE_CLASSES)).flatten()
    held = torch.nonzero(y >= len(BASE_CLASSES)).flatten()
    base = base[torch.randperm(len(base), generator=g)]
    held = held[torch.randperm(len(held), generator=g)]
    nb = int(0.85 * len(base))
    parts = {
        "base_train": base[:nb],
        "base_val": base[nb:],
        "held_train": held[:n_train],
        "held_val": held[n_train : n_train + n_val],
        "held_test": held[n_train + n_val :],
    }
    return {k: (x[i], y[i]) for k, i in parts.items()}


@dataclass
class VQAutoencoderConfig:
    """Widths of :class:`VQAutoencoder`: ``ch`` (first conv), ``latent`` (code dim), ``codebook`` (codes)."""

    ch: int = 32
    latent: int = 16
    codebook: int = 64


class VQAutoencoder(nn.Module):
    """x (B, 1, H, W), H, W divisible by 4 -> (reconstruction (B, 1, H, W) in [0, 1], commitment loss).

    Encoder: two stride-2 convs to a (B, latent, H/4, W/4) map, quantised per position by a
    ``VectorQuantize`` EMA codebook (``codebook`` codes); the decoder mirrors the encoder.
    ``save_pretrained(dir)`` / ``VQAutoencoder.from_pretrained(dir)``: fastgen's format (config.json +
    model.safetensors, the EMA codebook state included)."""

    MODEL_TYPE = "digits_vq_autoencoder"

    def __init__(self, ch: int = 32, latent: int = 16, codebook: int = 64):
        super().__init__()
        self.config = VQAutoencoderConfig(ch, latent, codebook)
        self.encoder = nn.Sequential(
            nn.Conv2d(1, ch, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * ch, 2 * ch, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * ch, latent, 1),
        )
        self.vq = VectorQuantize(
            latent, codebook, channel_last=False, decay=0.9, kmeans_init=True, dead_code_threshold=0.5
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent, 2 * ch, 3, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * ch, 2 * ch, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * ch, ch, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(ch, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, _, commit = self.vq(self.encoder(x))
        return torch.sigmoid(self.decoder(q)), commit

    def save_pretrained(self, directory: str) -> None:
        hub.save_fastgen_dir(directory, self.MODEL_TYPE, self.config, self.state_dict())

    @classmethod
    def from_pretrained(cls, directory: str) -> VQAutoencoder:
        meta, state = hub.load_fastgen_dir(directory, cls.MODEL_TYPE)
        cfg = hub.config_from_dict(VQAutoencoderConfig, meta["config"])
        model = cls(cfg.ch, cfg.latent, cfg.codebook)
        model.load_state_dict(state)
        return model


class DigitClassifier(nn.Module):
    """Small CNN on (B, 1, 16, 16): ``features`` (B, 64) (penultimate, for FID) and ``forward`` logits."""

    def __init__(self, n_classes: int = len(BASE_CLASSES)):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 16, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def ae_loss(model: nn.Module, x: torch.Tensor):
    recon, commit = model(x)
    rec = F.mse_loss(recon, x)
    return rec + commit, {"recon_mse": float(rec.detach()), "commit": float(commit.detach())}


@torch.no_grad()
def reconstruct(model: nn.Module, x: torch.Tensor, bs: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + bs])[0] for i in range(0, len(x), bs)])


def recon_mse(x: torch.Tensor):
    return lambda model: float(F.mse_loss(reconstruct(model, x), x))


def _plain(model: nn.Module, ctor) -> nn.Module:
    """An FSDP-trained model as a plain one (FSDP2 gathers its sharded weights only inside forward, and the
    evaluation calls submodules too); other models are returned as they are."""
    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return model
    plain = ctor()
    plain.load_state_dict(_full_state_dict(model))
    return plain


def _loader(data, batch_size: int) -> DataLoader:
    # every batch is split evenly over the ranks: a ragged last batch is dropped under torchrun
    return DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=tdist.world_size() > 1)


def train_classifier(data, steps: int, out: str, progress: bool) -> DigitClassifier:
    torch.manual_seed(1)
    xt, yt = data["base_train"]
    xv, yv = data["base_val"]
    clf = DigitClassifier()
    aug = RandomResizedCropFlip(sizes=[16], scale=(0.8, 1.0), flip_p=0.0)

    def ce(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    def acc(model):
        return float((model(xv).argmax(1) == yv).float().mean())

    cfg = FineTuneConfig(max_steps=steps, lr=3e-3, warmup_steps=steps // 10, val_every=max(steps // 5, 1),
                         mode="max", augment=aug, out_dir=os.path.join(out, "classifier"), progress=progress,
                         verbose=False, strategy=STRATEGY)  # fmt: skip
    res = finetune(clf, _loader(list(zip(xt, yt)), 64), ce, cfg, metric_fn=acc)
    print(f"feature classifier (digits 0-6): val accuracy {res.best_metric:.3f}")
    return _plain(clf, DigitClassifier).eval()


def evaluate(model: nn.Module, x: torch.Tensor, clf: DigitClassifier) -> dict[str, float]:
    from fastgen.metrics import FID, inception_score, ssim

    rec = reconstruct(model, x)
    fid = FID(feature_extractor=clf.features)
    fid.update(x, real=True)
    fid.update(rec, real=False)
    with torch.no_grad():
        probs = F.softmax(clf(rec), dim=1)
    return {
        "mse": float(F.mse_loss(rec, x)),
        "ssim": float(ssim(rec, x, data_range=1.0, window_size=7)),
        "fid": fid.compute(),
        "is": inception_score(probs, splits=5)[0],
    }


def plot_runs(runs: dict[str, object], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, res) in enumerate(runs.items()):
        steps = [h["step"] for h in res.history]
        ax.plot(
            steps, [h["recon_mse"] for h in res.history], color=f"C{i}", alpha=0.35, label=f"{name} train"
        )
        vs = [v["step"] for v in res.val_history]
        ax.plot(vs, [v["metric"] for v in res.val_history], "o-", color=f"C{i}", label=f"{name} val")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("reconstruction MSE (digits 7-9)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reconstructions(x: torch.Tensor, models: dict[str, nn.Module], path: str, n: int = 12) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"real": x[:n], **{k: reconstruct(m, x[:n]) for k, m in models.items()}}
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.8, len(rows) * 0.9))
    for r, (name, imgs) in enumerate(rows.items()):
        for c in range(n):
            axes[r, c].imshow(imgs[c, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain full tensors also from an FSDP-sharded model (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # not cpu_offload: that option leaves the other ranks an empty dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu() for k, v in sd.items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Parses ``argv``; under torchrun rank 0 prints and writes ``--out``, the other ranks run silently
    into a temporary directory (every rank must run every forward of a sharded model)."""
    global STRATEGY
    p = _parser()
    a = p.parse_args(argv)
    STRATEGY = a.strategy
    tdist.init_distributed()
    if tdist.rank() == 0:
        return _main(a)
    a.out = tempfile.mkdtemp(prefix="digits_rank")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return _main(a)
    finally:
        shutil.rmtree(a.out, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="digits_out")
    p.add_argument("--quick", action="store_true", help="fewer steps (CI smoke run, < 40 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=60, help="held-out training images (digits 7-9)")
    p.add_argument("--n-val", type=int, default=60)
    p.add_argument("--base-steps", type=int, default=None)
    p.add_argument("--ft-steps", type=int, default=None)
    p.add_argument("--clf-steps", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (small convs: 1 is fastest on a busy CPU)"
    )
    p.add_argument(
        "--strategy", choices=["ddp", "fsdp", "none"], default=None,
        help="under torchrun: ddp (the default with several processes) or fsdp (FSDP2)",
    )  # fmt: skip
    return p


def _main(a: argparse.Namespace) -> dict[str, dict[str, float]]:
    torch.set_num_threads(a.threads)
    base_steps = a.base_steps or (200 if a.quick else 1500)
    ft_steps = a.ft_steps or (80 if a.quick else 400)
    clf_steps = a.clf_steps or (80 if a.quick else 400)
    progress = not a.no_progress
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()

    x, y = load_digits_16()
    data = split_domains(x, y, a.n_train, a.n_val, a.seed)
    print("splits: " + ", ".join(f"{k} {len(v[0])}" for k, v in data.items()))
    clf = train_classifier(data, clf_steps, a.out, progress)

    # 1. base model on digits 0-6 (several image sizes via the augmentation)
    torch.manual_seed(a.seed)
    base = VQAutoencoder()
    xb, xbv = data["base_train"][0], data["base_val"][0]
    base_cfg = FineTuneConfig(
        max_steps=base_steps, lr=2e-3, warmup_steps=base_steps // 20, val_every=max(base_steps // 5, 1),
        augment=RandomResizedCropFlip(sizes=[12, 16, 20], scale=(0.8, 1.0), flip_p=0.5),
        out_dir=os.path.join(a.out, "base"), progress=progress, verbose=False, strategy=STRATEGY,
    )  # fmt: skip
    print(f"[1] base model on digits 0-6 ({len(xb)} images, {base_steps} steps)")
    finetune(base, _loader(xb, 64), ae_loss, base_cfg, metric_fn=recon_mse(xbv))
    base = _plain(base, VQAutoencoder)
    base_path = os.path.join(a.out, "base_model")
    base.save_pretrained(base_path)

    # 2a. fine-tune from the checkpoint; 2b. from scratch, same data, same steps and stopping rule
    xt, xv, xtest = data["held_train"][0], data["held_val"][0], data["held_test"][0]
    runs, models = {}, {"base": base}
    for name in ("finetune", "scratch"):
        torch.manual_seed(a.seed + 1)
        model = VQAutoencoder()
        if name == "finetune":
            model.load_state_dict(VQAutoencoder.from_pretrained(base_path).state_dict())
            extra = dict(freeze=["encoder.0", "encoder.2"], new_params=["decoder.*"], pretrained_lr_scale=0.1)
        else:
            extra = {}
        cfg = FineTuneConfig(
            max_steps=ft_steps, lr=2e-3, warmup_steps=ft_steps // 20, val_every=max(ft_steps // 20, 1),
            patience=6, out_dir=os.path.join(a.out, name), progress=progress, verbose=False, strategy=STRATEGY,
            **extra,
        )  # fmt: skip
        print(f"[2] {name}: {len(xt)} images of digits 7-9, up to {ft_steps} steps")
        dl = _loader(xt, 32)
        runs[name] = finetune(model, dl, ae_loss, cfg, metric_fn=recon_mse(xv))
        r = runs[name]
        s = r.param_summary
        print(f"    trainable {s['trainable']:,}/{s['total']:,} params; {r.steps} steps, best val MSE "
              f"{r.best_metric:.5f} at step {r.best_step}{' (early stop)' if r.stopped_early else ''}")  # fmt: skip
        models[name] = _plain(model, VQAutoencoder)
        models[name].save_pretrained(os.path.join(a.out, f"{name}_model"))

    # 3. evaluation on the held-out test split
    results = {name: evaluate(m, xtest, clf) for name, m in models.items()}
    from fastgen.metrics import inception_score

    with torch.no_grad():
        real_is = inception_score(F.softmax(clf(xtest), dim=1), splits=5)[0]
    plot_runs(runs, os.path.join(a.out, "loss_curves.png"))
    plot_reconstructions(xtest, models, os.path.join(a.out, "reconstructions.png"))

    print(f"\nheld-out test split: {len(xtest)} images of digits 7-9 (16x16); SSIM window 7; FID on the")
    print("64-d features of a CNN trained on digits 0-6; IS from the same 7-class classifier (not a quality")
    print(f"score on digits it has never seen; real test images: IS {real_is:.3f})")
    print(f"{'model':<10} {'steps':>6} {'MSE':>9} {'SSIM':>7} {'FID':>8} {'IS':>6}")
    steps = {"base": 0, "finetune": runs["finetune"].steps, "scratch": runs["scratch"].steps}
    for name, r in results.items():
        print(
            f"{name:<10} {steps[name]:>6} {r['mse']:>9.5f} {r['ssim']:>7.4f} {r['fid']:>8.3f} {r['is']:>6.3f}"
        )
    better = {"mse": min, "ssim": max, "fid": min}
    wins = {}
    for k, pick in better.items():
        wins[k] = pick(results, key=lambda n, k=k: results[n][k])
        print(f"best {k.upper()}: {wins[k]}")
    ft_wins = all(w == "finetune" for w in wins.values())
    print(f"fine-tuned beats base and from-scratch on MSE, SSIM and FID: {'yes' if ft_wins else 'no'}")
    print(f"total time {time.perf_counter() - t0:.1f}s; outputs in {a.out}/")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"results": results, "steps": steps, "wins": wins, "finetune_wins": ft_wins,
                   "real_test_is": real_is, "args": vars(a)}, f, indent=1)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
