r"""A fine-tuning loop for any ``nn.Module`` and a user loss function.

``finetune(model, train_data, loss_fn, config)`` is ``Trainer(...).fit()``. One *step* is one optimizer
update over ``config.grad_accum`` micro-batches drawn from ``train_data`` (any re-iterable: a
``DataLoader``, a list of batches); epochs roll over when it is exhausted.

* **Freezing**: ``freeze`` / ``unfreeze`` are ``fnmatch`` globs over parameter names (``"encoder.*"``);
  a pattern that names a module (``"encoder.0"``) covers its parameters. ``unfreeze`` wins over ``freeze``.
* **Parameter groups**: trainable parameters matching ``new_params`` get ``lr``, the other (pretrained)
  ones ``lr * pretrained_lr_scale`` (with no ``new_params`` every parameter gets ``lr``). Biases, 1-d
  parameters, parameters of normalisation modules and ``no_decay`` matches get weight decay 0.
* **Optimisation**: AdamW; lr multiplier (optimizer step ``s``, 0-based, ``W`` warm-up steps, ``T`` =
  ``max_steps``, ``r`` = ``min_lr_ratio``)::

      m(s) = (s + 1) / W                                            s < W
      m(s) = r + (1 - r) * (1 + cos(pi * (s - W) / max(1, T - W))) / 2   otherwise (cosine; "constant": 1)

  gradient clipping by global norm after unscaling (``grad_clip``; the logged ``grad_norm`` is the norm
  before clipping); the loss is divided by ``grad_accum`` so accumulated gradients equal the gradient of
  the mean loss.
* **Mixed precision**: ``precision`` "fp32" | "bf16" | "fp16" → ``torch.autocast(device.type, dtype)``;
  fp16 adds ``torch.amp.GradScaler``. bf16 runs on CPU too.
* **Non-finite loss or gradients** (an inf input, a NaN target, a diverging lr) never reach the weights:
  the loss of each micro-batch and the total gradient norm (values the loop already reads) are checked
  before ``optimizer.step()``. ``on_nonfinite="raise"`` (default) stops with a ``FloatingPointError``
  naming the step and what was non-finite; ``"skip"`` skips the step (gradients dropped, weights,
  optimizer state and EMA untouched, a warning, ``skipped`` in the history row) and raises after more
  than ``max_consecutive_skips`` skipped steps in a row. Under fp16 an inf / NaN gradient is the
  GradScaler's to handle (it skips the step and lowers the scale; those skips count towards the same
  limit), but a non-finite loss is handled as above. Skipped steps count as steps.
* **EMA** (``ema_decay``): ``ema = d * ema + (1 - d) * w`` after every step (buffers copied); validation
  and the best checkpoint use the EMA model.
* **Augmentation**: ``augment(batch) -> batch`` on the device, per micro-batch (see
  :class:`fastgen.train.RandomResizedCropFlip`).
* **Validation** every ``val_every`` steps and at the end: ``metric_fn(model) -> float`` if given, else the
  mean ``loss_fn`` over ``val_data``; ``mode`` "min" | "max"; early stopping after ``patience`` evaluations
  without an improvement larger than ``min_delta``; ``restore_best`` loads the best weights at the end.
* **Checkpoints** (:meth:`Trainer.save_checkpoint` / :meth:`Trainer.load_checkpoint`) hold model,
  optimizer, scheduler, grad scaler, EMA, early-stopping state, the history, the step and epoch position
  and the torch / CUDA / numpy / python RNG states, so that a resumed run is bit-identical to an
  uninterrupted one on CPU (the data order of the current epoch is replayed from the RNG state at its
  start, which is exact for loaders whose order and content derive from that RNG — e.g. a shuffling
  ``DataLoader`` with ``num_workers=0``). Each file carries a sha256 of every tensor (and one over the
  other entries), verified at load; the whole checkpoint is checked against the model, optimizer,
  scheduler, scaler and EMA before anything is restored, so a corrupt, truncated or mismatched file
  raises :class:`CheckpointError` naming the file and leaves the trainer untouched. Files are written
  to a tmp file in the same directory, fsynced and renamed over the target (then the directory is
  fsynced), so a crash leaves the old or the new file; stale tmp files are removed by the next save.
  Checkpoints are pickles: load only files you trust.
* **Logs** (``out_dir``): ``log.csv`` and ``log.json`` (losses, lr, grad norm, validation metrics),
  ``loss_curve.png`` (matplotlib, Agg backend, imported lazily), ``last.pt`` every ``checkpoint_every``
  steps; a tqdm progress bar (plain prints when tqdm is missing or ``progress=False``).
* **Distributed** (``torchrun``; :mod:`fastgen.train.distributed`): the trainer joins the process group
  the environment describes (env://; nccl on CUDA, gloo on CPU; a group initialised by the caller is
  used as is) and applies ``strategy``: "ddp" (the default with more than one rank) wraps the model in
  ``DistributedDataParallel``; "fsdp" applies FSDP2 ``fully_shard`` to each block (``fsdp_blocks`` globs,
  default the items of the outermost ``nn.ModuleList``\ s) and to the root, with a
  ``MixedPrecisionPolicy`` (bf16 parameters, fp32 gradient reduction) under ``precision="bf16"``; "none"
  is one process. ``loss_fn`` receives the wrapped model (call its forward). Data: every rank iterates the
  same ``train_data`` / ``val_data`` with rank 0's RNG state (broadcast at start) and takes its contiguous
  ``1 / world`` of every batch (``shard_data``; batch sizes must be divisible by the world size), so the
  ranks see distinct samples, the global batch is the single-process one and exact resume holds on any
  world size. Non-final micro-steps of ``grad_accum`` skip the gradient all-reduce (``no_sync`` /
  ``set_requires_gradient_sync``). Logged losses, validation losses and ``metric_fn`` values are the
  means over the ranks (one float64 all-reduce, rank 0's result broadcast), so early stopping and the
  non-finite guard decide identically everywhere. Rank 0 alone prints, shows the progress bar and writes
  the logs. Checkpoints are ``torch.distributed.checkpoint`` directories (``last/`` under
  ``out_dir``; ``save_checkpoint(path, format="dcp")`` also from one process): every rank writes its
  shards, rank 0 the trainer state with the sha256 of every shard file, to ``<path>.tmp`` renamed over
  ``path`` when complete; loading verifies the checksums and every tensor's name and global shape first
  and reshards, so a checkpoint resumes on another world size or strategy (2 -> 1, 1 -> 2, DDP -> FSDP).
  Not supported with "fsdp": ``ema_decay`` and fp16.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import random
import re
import secrets
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastgen.train import distributed as _dist
from fastgen.train.distributed import STRATEGIES

PRECISIONS = ("fp32", "bf16", "fp16")
NONFINITE_POLICIES = ("raise", "skip")
CHECKPOINT_VERSION = 2
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)


@dataclass
class FineTuneConfig:
    """Settings of :func:`finetune` (see the module docstring for the math)."""

    max_steps: int = 1000
    lr: float = 1e-3
    pretrained_lr_scale: float = 0.1
    new_params: Sequence[str] = ()
    freeze: Sequence[str] = ()
    unfreeze: Sequence[str] = ()
    weight_decay: float = 0.01
    no_decay: Sequence[str] = ("*.bias", "*norm*", "*.embed")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" | "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    precision: str = "fp32"
    device: str | None = None  # None: the model's device
    ema_decay: float | None = None
    augment: Callable[[Any], Any] | None = None
    val_every: int = 0  # 0: validate only at the end
    mode: str = "min"
    patience: int | None = None
    min_delta: float = 0.0
    restore_best: bool = True
    out_dir: str | None = None
    checkpoint_every: int = 0
    log_every: int = 50
    progress: bool = True
    plot: bool = True
    verbose: bool = True
    on_nonfinite: str = "raise"  # "raise" | "skip"
    max_consecutive_skips: int = 20
    strategy: str | None = None  # "ddp" | "fsdp" | "none"; None: "ddp" when the world size is > 1
    shard_data: bool = True  # split every train / val batch over the ranks (False: data is rank-specific)
    fsdp_blocks: Sequence[str] | None = None  # module-name globs sharded one by one (None: ModuleList items)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"FineTuneConfig: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"FineTuneConfig: mode must be 'min' or 'max', got {self.mode!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(
                f"FineTuneConfig: schedule must be 'cosine' or 'constant', got {self.schedule!r}"
            )
        if self.grad_accum < 1 or self.max_steps < 0:
            raise ValueError(
                f"FineTuneConfig: grad_accum must be >= 1 and max_steps >= 0, "
                f"got grad_accum={self.grad_accum}, max_steps={self.max_steps}"
            )
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"FineTuneConfig: ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"FineTuneConfig: on_nonfinite must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r}"
            )
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(
                f"FineTuneConfig: strategy must be one of {STRATEGIES} or None, got {self.strategy!r}"
            )
        if not isinstance(self.max_consecutive_skips, int) or self.max_consecutive_skips < 0:
            raise ValueError(
                "FineTuneConfig: max_consecutive_skips must be an int >= 0, "
                f"got {self.max_consecutive_skips!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["augment"] = repr(self.augment) if self.augment is not None else None
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass
class FineTuneResult:
    """What :meth:`Trainer.fit` returns. ``eval_model`` is the EMA model when EMA is on, else ``model``."""

    model: nn.Module
    ema_model: nn.Module | None
    steps: int
    history: list[dict[str, float]]
    val_history: list[dict[str, float]]
    best_metric: float | None
    best_step: int | None
    stopped_early: bool
    param_summary: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    skipped_steps: int = 0

    @property
    def eval_model(self) -> nn.Module:
        return self.ema_model if self.ema_model is not None else self.model

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]


# ---- parameter selection ------------------------------------------------------------------------


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)


def apply_freeze(model: nn.Module, freeze: Sequence[str] = (), unfreeze: Sequence[str] = ()) -> list[str]:
    """Set ``requires_grad`` by glob patterns (``unfreeze`` wins); returns the frozen parameter names.

    Raises ValueError for a pattern that matches no parameter (a typo would otherwise freeze nothing)."""
    names = [n for n, _ in model.named_parameters()]
    for kind, pats in (("freeze", freeze), ("unfreeze", unfreeze)):
        for p in pats:
            if not any(_matches(n, [p]) for n in names):
                raise ValueError(f"{kind} pattern {p!r} matches no parameter of {type(model).__name__}")
    frozen = []
    for n, p in model.named_parameters():
        if _matches(n, freeze) and not _matches(n, unfreeze):
            p.requires_grad_(False)
            frozen.append(n)
        elif _matches(n, unfreeze):
            p.requires_grad_(True)
    return frozen


def _norm_param_names(model: nn.Module) -> set[str]:
    out = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, _NORM_TYPES) or "Norm" in type(mod).__name__:
            for pname, _ in mod.named_parameters(recurse=False):
                out.add(f"{mname}.{pname}" if mname else pname)
    return out


def param_groups(model: nn.Module, config: FineTuneConfig) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters: {new, pretrained} x {decay, no_decay}, empty ones dropped.

    Each group carries ``name``, ``lr``, ``weight_decay`` and ``param_names``."""
    norm_names = _norm_param_names(model)
    groups: dict[tuple[bool, bool], dict[str, Any]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        new = not config.new_params or _matches(n, config.new_params)
        decay = p.ndim > 1 and n not in norm_names and not _matches(n, config.no_decay)
        g = groups.setdefault(
            (new, decay),
            {
                "name": f"{'new' if new else 'pretrained'}/{'decay' if decay else 'no_decay'}",
                "lr": config.lr * (1.0 if new else config.pretrained_lr_scale),
                "weight_decay": config.weight_decay if decay else 0.0,
                "params": [],
                "param_names": [],
            },
        )
        g["params"].append(p)
        g["param_names"].append(n)
    return [groups[k] for k in sorted(groups, key=lambda k: (not k[0], not k[1]))]


def param_summary(model: nn.Module, groups: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Parameter counts: total, trainable, frozen, per top-level module, and per optimizer group."""
    total = trainable = 0
    per_module: dict[str, list[int]] = {}
    for n, p in model.named_parameters():
        k = p.numel()
        total += k
        trainable += k if p.requires_grad else 0
        top = per_module.setdefault(n.split(".")[0], [0, 0])
        top[0] += k
        top[1] += k if p.requires_grad else 0
    out: dict[str, Any] = {
        "total": total,
        "trainable": trainable,
        "frozen": total - trainable,
        "modules": {m: {"total": t, "trainable": tr} for m, (t, tr) in per_module.items()},
    }
    if groups is not None:
        out["groups"] = {
            g["name"]: {"params": sum(p.numel() for p in g["params"]), "lr": g["lr"], "wd": g["weight_decay"]}
            for g in groups
        }
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"parameters: {s['total']:,} total, {s['trainable']:,} trainable, {s['frozen']:,} frozen"]
    for m, c in s["modules"].items():
        lines.append(f"  {m:<20} {c['trainable']:>10,} / {c['total']:>10,} trainable")
    for g, c in s.get("groups", {}).items():
        lines.append(f"  group {g:<20} {c['params']:>10,} params  lr={c['lr']:.3g}  wd={c['wd']:g}")
    return "\n".join(lines)


# ---- schedule -----------------------------------------------------------------------------------


def lr_multiplier(
    step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0, schedule: str = "cosine"
) -> float:
    """The lr multiplier of optimizer step ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable ``lr_lambda`` for ``LambdaLR`` (its attributes go into the scheduler's state dict)."""

    def __init__(self, warmup_steps: int, max_steps: int, min_lr_ratio: float, schedule: str):
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.min_lr_ratio, self.schedule = min_lr_ratio, schedule

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, self.warmup_steps, self.max_steps, self.min_lr_ratio, self.schedule)


# ---- augmentation -------------------------------------------------------------------------------


class RandomResizedCropFlip:
    """Random crop + horizontal flip + resize of an image batch to one of ``sizes`` (one size per batch).

    images: (B, C, H, W) float -> (B, C, s, s) (or (s_h, s_w) for tuple sizes), s drawn uniformly from
    ``sizes``; each image gets its own crop (area fraction in ``scale``, aspect ratio in ``ratio``, log-
    uniform) and flip (probability ``flip_p``), done in one ``grid_sample`` (bilinear). Uses the torch
    RNG, so checkpoints restore it. A batch that is a tuple / list has its first element transformed (the
    image), the rest (labels, ...) passed through; a dict has its ``key`` entry transformed.
    """

    def __init__(
        self,
        sizes: Sequence[int | tuple[int, int]],
        scale: tuple[float, float] = (0.6, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        key: str = "image",
    ):
        if not sizes:
            raise ValueError("RandomResizedCropFlip: sizes must not be empty")
        self.sizes = [(s, s) if isinstance(s, int) else tuple(s) for s in sizes]
        self.scale, self.ratio, self.flip_p, self.key = scale, ratio, flip_p, key

    def __repr__(self) -> str:
        return f"RandomResizedCropFlip(sizes={self.sizes}, scale={self.scale}, ratio={self.ratio}, flip_p={self.flip_p})"

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(
                f"RandomResizedCropFlip: images must be (B, C, H, W) float, got {tuple(x.shape)}"
            )
        b = x.shape[0]
        size = self.sizes[int(torch.randint(len(self.sizes), ()).item())]
        area = torch.empty(b).uniform_(*self.scale)
        logr = torch.empty(b).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        r = torch.exp(logr)
        sw = torch.sqrt(area * r).clamp(max=1.0)  # crop width / image width, in normalised coordinates
        sh = torch.sqrt(area / r).clamp(max=1.0)
        tx = (torch.rand(b) * 2 - 1) * (1 - sw)
        ty = (torch.rand(b) * 2 - 1) * (1 - sh)
        flip = torch.where(torch.rand(b) < self.flip_p, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = sw * flip, tx
        theta[:, 1, 1], theta[:, 1, 2] = sh, ty
        grid = F.affine_grid(theta.to(x), [b, x.shape[1], *size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return self.transform(batch)
        if isinstance(batch, (tuple, list)):
            return type(batch)([self.transform(batch[0]), *batch[1:]])
        if isinstance(batch, dict):
            return {**batch, self.key: self.transform(batch[self.key])}
        raise TypeError(f"RandomResizedCropFlip: unsupported batch type {type(batch).__name__}")


# ---- helpers ------------------------------------------------------------------------------------


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _split_loss(out: Any) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(out, tuple):
        loss, logs = out
        return loss, {k: float(v) for k, v in logs.items()}
    return out, {}


def get_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and python RNG states."""
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _state_to_cpu(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in sd.items()}


# ---- checkpoint files ---------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, is corrupt, or does not fit the trainer it is loaded into."""


def _to_cpu_nested(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu_nested(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu_nested(v) for v in obj)
    return obj


def _checksums(obj: Any) -> dict[str, Any]:
    """sha256 of every tensor / ndarray (its dtype, shape and bytes), keyed by its path in ``obj``, and one
    sha256 over all other leaves (ints, floats, strings: step, history, RNG states) in traversal order."""
    tensors: dict[str, str] = {}
    other = hashlib.sha256()

    def walk(x: Any, path: str) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous().reshape(-1)
            h = hashlib.sha256(f"{t.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().data)
            tensors[path] = h.hexdigest()
        elif isinstance(x, np.ndarray):
            h = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)
            tensors[path] = h.hexdigest()
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}/{i}")
        elif x is None or isinstance(x, (bool, int, float, str, bytes)):
            other.update(f"{path}={x!r};".encode())
        else:  # objects without a canonical byte form: their type only
            other.update(f"{path}:{type(x).__qualname__};".encode())

    walk(obj, "")
    return {"algorithm": "sha256", "tensors": tensors, "other": other.hexdigest()}


def _verify_checksums(sd: dict[str, Any], path: str) -> None:
    stored = sd.get("checksum")
    if stored is None:
        version = sd.get("version", 1)
        if not isinstance(version, int) or version >= 2:
            raise CheckpointError(f"load_checkpoint: {path}: the checksum entry is missing (corrupt file)")
        warnings.warn(
            f"load_checkpoint: {path} has no checksum (saved by an older fastgen); it is not verified",
            stacklevel=3,
        )
        return
    got = _checksums({k: v for k, v in sd.items() if k != "checksum"})
    want = stored.get("tensors", {}) if isinstance(stored, dict) else {}
    bad = sorted(k for k in want.keys() | got["tensors"].keys() if want.get(k) != got["tensors"].get(k))
    if not isinstance(stored, dict) or stored.get("other") != got["other"]:
        bad.append("(non-tensor entries: step, history, RNG state, ...)")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(
            f"load_checkpoint: {path} is corrupt: sha256 checksum mismatch in "
            f"{', '.join(k.lstrip('/') for k in bad[:5])}{more} (a flipped bit or a partial write); "
            "nothing was loaded"
        )


def _fsync_dir(d: str) -> None:
    if os.name != "posix":
        return
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the file itself is synced
        pass
    finally:
        os.close(fd)


def _atomic_save(obj: Any, path: str) -> None:
    """torch.save to a tmp file next to ``path``, fsync, rename over ``path``, fsync the directory: a crash
    leaves the old file or the new one, never a torn one. Stale tmp files of ``path`` (from a crashed
    run) are removed first; one writer per path is assumed."""
    d, base = os.path.split(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    stale = re.compile(re.escape(base) + r"(\.\d+\.[0-9a-f]{8})?\.tmp")
    for name in os.listdir(d):
        if stale.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(d, name))
    tmp = os.path.join(d, f"{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(d, base))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(d)


def _read_checkpoint(path: str) -> dict[str, Any]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=False)
    except OSError as e:
        if e.filename is not None:  # FileNotFoundError & co. already name the file
            raise
        raise CheckpointError(f"load_checkpoint: cannot read {path}: {e} (truncated or corrupt file?)") from e
    except Exception as e:
        raise CheckpointError(
            f"load_checkpoint: cannot read {path}: {type(e).__name__}: {e} (truncated or corrupt file?)"
        ) from e
    if not isinstance(sd, dict) or "model" not in sd or "optimizer" not in sd:
        raise CheckpointError(
            f"load_checkpoint: {path} is not a fastgen.train checkpoint "
            f"(expected a dict with model / optimizer / ... entries, got {type(sd).__name__})"
        )
    return sd


DCP_META = "fastgen_trainer.pt"


@contextlib.contextmanager
def _quiet_single_process_dcp():
    """DCP warns when used without a process group; a single-process DCP checkpoint is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        yield


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_meta(path: str) -> dict[str, Any]:
    try:
        meta = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(
            f"load_checkpoint: cannot read {path}: {type(e).__name__}: {e} (truncated or corrupt file?)"
        ) from e
    if not isinstance(meta, dict) or meta.get("format") != "dcp":
        raise CheckpointError(f"load_checkpoint: {path} is not the trainer state of a fastgen DCP checkpoint")
    return meta


def _clone_tree(obj: Any) -> Any:
    """Fresh tensors (DTensors keep their sharding) for DCP to load into, so that a failed load leaves the
    live weights untouched."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tree(v) for v in obj]
    return obj


def _flatten(obj: Any) -> dict[str, Any]:
    """The keys DCP stores a nested state dict under."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    return flatten_state_dict(obj)[0]


def _module_state_problems(what: str, module: nn.Module, sd: Any) -> list[str]:
    if not isinstance(sd, dict):
        return [f"{what}: expected a state dict, got {type(sd).__name__}"]
    own = module.state_dict()
    out = []
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing:
        out.append(
            f"{what}: keys missing from the checkpoint: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    if unexpected:
        out.append(
            f"{what}: unexpected keys in the checkpoint: {unexpected[:5]}"
            + (" ..." if len(unexpected) > 5 else "")
        )
    for k, v in own.items():
        if isinstance(v, torch.Tensor) and k in sd:
            c = sd[k]
            if not isinstance(c, torch.Tensor) or c.shape != v.shape:
                shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
                out.append(f"{what}.{k}: checkpoint {shape} vs {tuple(v.shape)}")
    return out


# ---- the trainer --------------------------------------------------------------------------------


class Trainer:
    """The loop behind :func:`finetune`; use it directly for checkpoints or for stopping at a given step.

    loss_fn(model, batch) -> loss (scalar tensor) or (loss, {name: float}) (extra values are logged).
    metric_fn(model) -> float, called under ``torch.no_grad()`` with the model in eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Iterable[Any],
        loss_fn: Callable[[nn.Module, Any], Any],
        config: FineTuneConfig | None = None,
        *,
        val_data: Iterable[Any] | None = None,
        metric_fn: Callable[[nn.Module], float] | None = None,
    ):
        self.config = cfg = config or FineTuneConfig()
        self.model, self.train_data, self.loss_fn = model, train_data, loss_fn
        self.val_data, self.metric_fn = val_data, metric_fn
        if cfg.val_every and val_data is None and metric_fn is None:
            raise ValueError("Trainer: val_every > 0 needs val_data or metric_fn")
        if cfg.patience is not None and val_data is None and metric_fn is None:
            raise ValueError("Trainer: early stopping (patience) needs val_data or metric_fn")
        if cfg.device is not None:
            self.device = _dist.local_device(torch.device(cfg.device))
            model.to(self.device)
        else:
            p = next(model.parameters(), None)
            self.device = p.device if p is not None else torch.device("cpu")
        self._setup_distributed()
        self.frozen = apply_freeze(model, cfg.freeze, cfg.unfreeze)
        self.ddp: nn.Module | None = None
        self.fsdp_blocks: list[str] = []
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=ids)
        elif self.strategy == "fsdp":
            self.fsdp_blocks = _dist.apply_fsdp(model, cfg.precision, cfg.fsdp_blocks)
        groups = param_groups(model, cfg)
        if not groups:
            raise ValueError("Trainer: no trainable parameters (everything is frozen)")
        self.summary = param_summary(model, groups)
        self.params = [p for g in groups for p in g["params"]]
        self.param_names = [n for g in groups for n in g["param_names"]]
        opt_groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
        self.optimizer = torch.optim.AdamW(opt_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.schedule)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.ema_model: nn.Module | None = None
        if cfg.ema_decay is not None:
            self.ema_model = copy.deepcopy(model).eval()
            self.ema_model.requires_grad_(False)
        self.step = 0
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.val_history: list[dict[str, float]] = []
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.best_state: dict[str, Any] | None = None
        self.bad_evals = 0
        self.stopped_early = False
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self._iter = None
        self._batch_in_epoch = 0
        self._epoch_rng: dict[str, Any] | None = None
        self._replay = False
        if cfg.verbose and self.is_main:
            print(format_summary(self.summary))

    # -- distributed ---------------------------------------------------------------------------

    def _setup_distributed(self) -> None:
        """Join the torchrun process group if the environment describes one, pick the strategy, and give
        every rank rank 0's RNG state (sharded data needs the same order on every rank)."""
        cfg = self.config
        up = _dist.init_distributed(self.device)
        self.world, self.rank = (_dist.world_size(), _dist.rank()) if up else (1, 0)
        self.strategy = cfg.strategy or ("ddp" if self.world > 1 else "none")
        if self.strategy != "none" and not up:
            raise ValueError(
                f"FineTuneConfig: strategy={self.strategy!r} needs a torch.distributed process group "
                "(launch with torchrun, or call torch.distributed.init_process_group first); "
                "use strategy='none' for a single process"
            )
        if self.strategy == "none" and self.world > 1:
            raise ValueError(
                f"FineTuneConfig: strategy='none' in a process group of {self.world} ranks would train "
                f"{self.world} unsynchronised copies; use 'ddp' or 'fsdp'"
            )
        if self.strategy == "fsdp":
            for what, bad in (
                ("ema_decay", cfg.ema_decay is not None),
                ("precision='fp16'", cfg.precision == "fp16"),
            ):
                if bad:
                    raise ValueError(
                        f"FineTuneConfig: {what} is not supported with strategy='fsdp' "
                        "(use bf16 / no EMA, or strategy='ddp')"
                    )
        if self.world > 1:
            _dist.broadcast_rng_state()

    @property
    def is_main(self) -> bool:
        """True on rank 0 (or without a process group): the rank that logs, prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.strategy != "none"

    def _shard(self, batch: Any, what: str) -> Any:
        if self.world == 1 or not self.config.shard_data:
            return batch
        return _dist.shard_batch(batch, self.rank, self.world, what)

    def _sync_context(self, final: bool):
        """No gradient all-reduce / reduce-scatter on the non-final micro-steps of an accumulated step."""
        if self.ddp is not None and not final:
            return self.ddp.no_sync()
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(final)
        return contextlib.nullcontext()

    # -- data ----------------------------------------------------------------------------------

    def _open_epoch(self):
        # a DistributedSampler (rank-specific data, shard_data=False) reshuffles only when told the epoch
        sampler = getattr(self.train_data, "sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(self.epoch)
        return iter(self.train_data)

    def _next_batch(self) -> Any:
        if self._replay:  # after load_checkpoint: replay the epoch's order, then restore the RNG
            self._replay = False
            now = get_rng_state()
            set_rng_state(self._epoch_rng)
            self._iter = self._open_epoch()
            for _ in range(self._batch_in_epoch):
                next(self._iter)
            set_rng_state(now)
        while True:
            if self._iter is None:
                self._epoch_rng = get_rng_state()
                self._iter = self._open_epoch()
                self._batch_in_epoch = 0
            try:
                batch = next(self._iter)
            except StopIteration:
                if self._batch_in_epoch == 0:
                    raise ValueError("Trainer: train_data yielded no batches") from None
                self._iter = None
                self.epoch += 1
                continue
            self._batch_in_epoch += 1
            return batch

    def _autocast(self):
        p = self.config.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    # -- one step ------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches. A non-finite loss or gradient norm never
        reaches the weights: it raises (``on_nonfinite="raise"``) or the step is skipped (``"skip"``; and
        under fp16 a non-finite gradient is the GradScaler's to skip, as usual). Skipped steps count as
        steps (schedule and data move on), leave weights, optimizer state and EMA untouched, and are
        marked ``skipped`` in the history."""
        cfg = self.config
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, extra = 0.0, {}
        bad: tuple[str, float, str] | None = None  # (what, value, where)
        fwd = self.ddp if self.ddp is not None else self.model
        for i in range(cfg.grad_accum):
            batch = self._next_batch()
            # the step is skipped: only keep the data position in step (every rank must run every
            # micro-batch under a process group, or the gradient collectives would not pair up)
            if bad is not None and not self.distributed:
                continue
            batch = _to_device(self._shard(batch, "train_data"), self.device)
            if cfg.augment is not None:
                batch = cfg.augment(batch)
            with self._sync_context(final=i == cfg.grad_accum - 1):
                with self._autocast():
                    loss, logs = _split_loss(self.loss_fn(fwd, batch))
                self.scaler.scale(loss.float() / cfg.grad_accum).backward()
            value = float(loss.detach())  # the sync the loop always had: checking it is free
            loss_sum += value / cfg.grad_accum
            for k, v in logs.items():
                extra[k] = extra.get(k, 0.0) + v / cfg.grad_accum
            if not math.isfinite(value) and bad is None:
                bad = ("loss", value, f"micro-batch {i + 1}/{cfg.grad_accum}")
                if not self.distributed:
                    self._on_nonfinite(*bad)
        if self.distributed:  # the logged loss is the global one; a NaN on one rank is seen by all
            keys = sorted(extra)
            reduced = _dist.all_reduce_mean([loss_sum, *(extra[k] for k in keys)], self.device)
            loss_sum, extra = reduced[0], dict(zip(keys, reduced[1:]))
            bad = None if math.isfinite(loss_sum) else ("loss", loss_sum, "mean over the ranks")
            if bad is not None:
                self._on_nonfinite(*bad)
        grad_norm = float("nan")
        scaler_skip = False
        if bad is None:
            self.scaler.unscale_(self.optimizer)
            max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            if hasattr(norm, "full_tensor"):  # FSDP2: a replicated DTensor
                norm = norm.full_tensor()
            grad_norm = float(norm)
            if not math.isfinite(grad_norm):
                if self.scaler.is_enabled():
                    scaler_skip = True  # normal under fp16: scaler.step skips, scaler.update lowers the scale
                else:
                    bad = ("gradient norm", grad_norm, "after backward")
                    self._on_nonfinite(*bad)
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        if bad is None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        skipped = bad is not None or scaler_skip
        if skipped:
            self._count_skip(bad)
            with warnings.catch_warnings():  # a skipped first step is not the user's scheduler misuse
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                self.scheduler.step()
        else:
            self._consecutive_skips = 0
            self.scheduler.step()
            self._update_ema()
        self.step += 1
        row = {"step": self.step, "loss": loss_sum, "lr": max(lrs.values()), "grad_norm": grad_norm, **extra}
        if skipped:
            row["skipped"] = 1.0
        if len(lrs) > 1:
            row.update({f"lr/{k}": v for k, v in lrs.items()})
        self.history.append(row)
        return row

    def _on_nonfinite(self, what: str, value: float, where: str) -> None:
        if self.config.on_nonfinite == "raise":
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"Trainer: non-finite {what} ({value}) at step {self.step + 1} ({where}); the optimizer step "
                "was not taken, so the weights, optimizer state and EMA are unchanged. Look for inf / NaN in "
                "that batch's inputs or targets, or lower the lr; FineTuneConfig(on_nonfinite='skip') skips "
                "such steps instead"
            )
        warnings.warn(
            f"Trainer: skipped step {self.step + 1}: non-finite {what} ({value}, {where})",
            RuntimeWarning,
            stacklevel=3,
        )

    def _count_skip(self, bad: tuple[str, float, str] | None) -> None:
        self.skipped_steps += 1
        self._consecutive_skips += 1
        limit = self.config.max_consecutive_skips
        if self._consecutive_skips > limit:
            why = (
                f"non-finite {bad[0]}"
                if bad is not None
                else f"inf / NaN fp16 gradients at every loss scale down to {self.scaler.get_scale():g}"
            )
            raise FloatingPointError(
                f"Trainer: {self._consecutive_skips} consecutive steps skipped (up to step {self.step + 1}; "
                f"max_consecutive_skips={limit}), the last for {why}; the weights are unchanged by them. "
                "The data or the model produces inf / NaN at every step"
            )

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema_model is None:
            return
        d = self.config.ema_decay
        ema_p = [p for p in self.ema_model.parameters()]
        src_p = [p for p in self.model.parameters()]
        floats = [(e, s) for e, s in zip(ema_p, src_p) if e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [s.detach() for _, s in floats], 1.0 - d)
        for e, s in zip(self.ema_model.buffers(), self.model.buffers()):
            e.copy_(s)

    # -- validation ----------------------------------------------------------------------------

    @property
    def eval_model(self) -> nn.Module:
        return self.ema_model if self.ema_model is not None else self.model

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model = self.eval_model
        was = model.training
        model.eval()
        row: dict[str, float] = {"step": self.step}
        try:
            if self.val_data is not None:
                tot, n = 0.0, 0
                for batch in self.val_data:
                    batch = _to_device(self._shard(batch, "val_data"), self.device)
                    with self._autocast():
                        loss, _ = _split_loss(self.loss_fn(model, batch))
                    tot, n = tot + float(loss), n + 1
                row["val_loss"] = tot / max(n, 1)
            if self.metric_fn is not None:
                with self._autocast():
                    row["metric"] = float(self.metric_fn(model))
            else:
                row["metric"] = row["val_loss"]
        finally:
            model.train(was)
        if self.distributed:  # mean over the ranks, bit-identical everywhere: early stopping agrees
            keys = [k for k in row if k != "step"]
            row.update(zip(keys, _dist.all_reduce_mean([row[k] for k in keys], self.device)))
        return row

    def _validate(self) -> None:
        cfg = self.config
        row = self.evaluate()
        m = row["metric"]
        if math.isnan(m):  # NaN compares false both ways: taken as the first best it would never be beaten
            warnings.warn(
                f"Trainer: validation metric is NaN at step {self.step}; not an improvement",
                RuntimeWarning,
                stacklevel=3,
            )
        better = not math.isnan(m) and (
            self.best_metric is None
            or (
                m < self.best_metric - cfg.min_delta
                if cfg.mode == "min"
                else m > self.best_metric + cfg.min_delta
            )
        )
        if better:
            self.best_metric, self.best_step, self.bad_evals = m, self.step, 0
            self.best_state = {
                "model": _state_to_cpu(self.model.state_dict()),
                "ema": _state_to_cpu(self.ema_model.state_dict()) if self.ema_model is not None else None,
            }
        else:
            self.bad_evals += 1
        row["best"] = float(self.best_metric) if self.best_metric is not None else float("nan")
        self.val_history.append(row)
        if cfg.patience is not None and self.bad_evals >= cfg.patience:
            self.stopped_early = True

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, until: int | None = None) -> FineTuneResult:
        """Train to ``max_steps`` (or to step ``until``, leaving the schedule as for ``max_steps``), early
        stopping, then (at the real end) validate, restore the best weights and write the logs."""
        cfg = self.config
        stop = cfg.max_steps if until is None else min(until, cfg.max_steps)
        has_val = self.val_data is not None or self.metric_fn is not None
        bar = None
        if cfg.progress and self.step < stop and self.is_main:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=stop, initial=self.step, desc="finetune", dynamic_ncols=True, leave=False)
            except ImportError:
                bar = None
        t0 = time.perf_counter()
        while self.step < stop and not self.stopped_early:
            row = self.train_step()
            if has_val and cfg.val_every and self.step % cfg.val_every == 0:
                self._validate()
            if bar is not None:
                post = {"loss": f"{row['loss']:.4g}", "lr": f"{row['lr']:.2g}"}
                if self.val_history:
                    post["val"] = f"{self.val_history[-1]['metric']:.4g}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            elif cfg.verbose and self.is_main and cfg.log_every and self.step % cfg.log_every == 0:
                val = f" val {self.val_history[-1]['metric']:.4g}" if self.val_history else ""
                print(f"step {self.step}/{stop} loss {row['loss']:.4g} lr {row['lr']:.3g}{val}", flush=True)
            if cfg.out_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint(os.path.join(cfg.out_dir, "last" if self.distributed else "last.pt"))
        if bar is not None:
            bar.close()
        finished = self.stopped_early or self.step >= cfg.max_steps
        last_val = self.val_history[-1]["step"] if self.val_history else None
        if finished and has_val and not self.stopped_early and last_val != self.step:
            self._validate()
        if finished and cfg.restore_best and self.best_state is not None:
            self.model.load_state_dict(self.best_state["model"])
            if self.ema_model is not None:
                self.ema_model.load_state_dict(self.best_state["ema"])
        if cfg.verbose and finished and self.is_main:
            msg = f"finetune: {self.step} steps in {time.perf_counter() - t0:.1f}s"
            if self.best_metric is not None:
                msg += f", best metric {self.best_metric:.5g} at step {self.best_step}"
            if self.stopped_early:
                msg += " (early stop)"
            if self.skipped_steps:
                msg += f", {self.skipped_steps} steps skipped (non-finite loss or gradients)"
            print(msg, flush=True)
        files = self.write_logs(cfg.out_dir) if cfg.out_dir and finished and self.is_main else {}
        return FineTuneResult(
            model=self.model,
            ema_model=self.ema_model,
            steps=self.step,
            history=self.history,
            val_history=self.val_history,
            best_metric=self.best_metric,
            best_step=self.best_step,
            stopped_early=self.stopped_early,
            param_summary=self.summary,
            files=files,
            skipped_steps=self.skipped_steps,
        )

    # -- logs ----------------------------------------------------------------------------------

    def write_logs(self, out_dir: str, prefix: str = "") -> dict[str, str]:
        """``log.csv`` (one row per step; validation columns on validation steps), ``log.json`` and
        ``loss_curve.png`` under ``out_dir``; returns {kind: path}."""
        os.makedirs(out_dir, exist_ok=True)
        val_by_step = {int(v["step"]): v for v in self.val_history}
        rows = []
        for h in self.history:
            r = dict(h)
            v = val_by_step.get(int(h["step"]))
            if v is not None:
                r.update({k: v[k] for k in v if k != "step"})
            rows.append(r)
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        files = {
            "csv": os.path.join(out_dir, f"{prefix}log.csv"),
            "json": os.path.join(out_dir, f"{prefix}log.json"),
        }
        with open(files["csv"], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        with open(files["json"], "w") as f:
            json.dump(
                {
                    "config": self.config.to_dict(),
                    "param_summary": self.summary,
                    "train": self.history,
                    "val": self.val_history,
                    "best_metric": self.best_metric,
                    "best_step": self.best_step,
                    "stopped_early": self.stopped_early,
                    "steps": self.step,
                },
                f,
                indent=1,
            )
        if self.config.plot:
            png = os.path.join(out_dir, f"{prefix}loss_curve.png")
            if plot_history(self.history, self.val_history, png):
                files["png"] = png
        return files

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "param_names": list(self.param_names),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema_model.state_dict() if self.ema_model is not None else None,
            **self._progress_state({"best_state": self.best_state}),
        }

    def _progress_state(self, best: dict[str, Any]) -> dict[str, Any]:
        """Where the run stands (step, data position, RNG, early stopping, non-finite skips, history), the
        part shared by the .pt and the DCP formats; ``best``: how each format records the best weights."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self._batch_in_epoch,
            "iter_open": self._iter is not None or self._replay,
            "epoch_rng": self._epoch_rng,
            "rng": get_rng_state(),
            "early_stopping": {
                "best_metric": self.best_metric,
                "best_step": self.best_step,
                **best,
                "bad_evals": self.bad_evals,
                "stopped_early": self.stopped_early,
            },
            "nonfinite": {"skipped_steps": self.skipped_steps, "consecutive_skips": self._consecutive_skips},
            "history": self.history,
            "val_history": self.val_history,
        }

    def _state_problems(self, sd: dict[str, Any]) -> list[str]:
        """Everything that would make :meth:`load_state_dict` fail or restore a different run, found
        before anything is changed."""
        version = sd.get("version")
        if version not in range(1, CHECKPOINT_VERSION + 1):
            return [
                f"unsupported checkpoint version {version!r} (this fastgen reads 1..{CHECKPOINT_VERSION})"
            ]
        required = ["model", "optimizer", "scheduler", "scaler", "ema", "step", "epoch", "batch_in_epoch",
                    "iter_open", "epoch_rng", "rng", "early_stopping", "history", "val_history"]  # fmt: skip
        missing = [k for k in required if k not in sd]
        if missing:
            return [f"entries missing: {missing}"]
        out = _module_state_problems("model", self.model, sd["model"])
        for key in ("rng", "epoch_rng"):
            rng = sd[key]
            if not (rng is None and key == "epoch_rng") and not (
                isinstance(rng, dict) and {"torch", "numpy", "python"} <= rng.keys()
            ):
                out.append(f"{key}: not an RNG state (expected a dict with torch / numpy / python entries)")
        names = sd.get("param_names")
        if names is not None and list(names) != self.param_names:
            diff = sorted(set(names) ^ set(self.param_names))[:5]
            out.append(
                f"trainable parameters differ ({len(names)} in the checkpoint vs "
                f"{len(self.param_names)} here; "
                f"e.g. {diff or 'same names, another grouping'}): check freeze / unfreeze / new_params"
            )
        out += self._optimizer_problems(sd["optimizer"])
        base_lrs = sd["scheduler"].get("base_lrs", []) if isinstance(sd["scheduler"], dict) else None
        if base_lrs is None or len(base_lrs) != len(self.optimizer.param_groups):
            out.append(
                f"scheduler: {len(base_lrs) if base_lrs is not None else 'no'} parameter groups in the "
                f"checkpoint vs {len(self.optimizer.param_groups)} here"
            )
        if self.scaler.is_enabled() and not sd["scaler"]:
            out.append("scaler: precision='fp16' here, but the checkpoint has no GradScaler state (not fp16)")
        if (sd["ema"] is None) != (self.ema_model is None):
            out.append(
                f"EMA: {'off' if sd['ema'] is None else 'on'} in the checkpoint, "
                f"{'off' if self.ema_model is None else 'on'} here (ema_decay)"
            )
        elif self.ema_model is not None:
            out += _module_state_problems("ema", self.ema_model, sd["ema"])
        best = sd["early_stopping"].get("best_state") if isinstance(sd["early_stopping"], dict) else None
        if best is not None:
            out += _module_state_problems("best_state.model", self.model, best.get("model"))
            if self.ema_model is not None and best.get("ema") is not None:
                out += _module_state_problems("best_state.ema", self.ema_model, best["ema"])
        return out

    def _optimizer_problems(self, osd: Any) -> list[str]:
        groups = self.optimizer.param_groups
        saved = osd.get("param_groups") if isinstance(osd, dict) else None
        if not isinstance(saved, list) or not isinstance(osd.get("state"), dict):
            return ["optimizer: not an optimizer state dict"]
        if len(saved) != len(groups):
            return [f"optimizer: {len(saved)} parameter groups in the checkpoint vs {len(groups)} here"]
        out, index = [], {}
        for s, g in zip(saved, groups):
            if s.get("name") != g.get("name") or len(s.get("params", ())) != len(g["params"]):
                out.append(
                    f"optimizer: group {s.get('name')!r} with {len(s.get('params', ()))} parameters in the "
                    f"checkpoint vs {g.get('name')!r} with {len(g['params'])} here"
                )
            index.update(zip(s.get("params", ()), g["params"]))
        names = dict(zip(map(id, self.params), self.param_names))
        for pid, st in osd["state"].items():
            p = index.get(pid)
            if p is None:
                out.append(f"optimizer: state for parameter {pid!r}, which no group holds")
                continue
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                    out.append(
                        f"optimizer: {k} of {names.get(id(p), pid)}: "
                        f"checkpoint {tuple(v.shape)} vs {tuple(p.shape)}"
                    )
        return out

    def load_state_dict(self, sd: dict[str, Any], *, source: str = "load_state_dict") -> None:
        """Restore :meth:`state_dict`; the whole state is checked first, so a checkpoint that does not fit
        raises :class:`CheckpointError` with the trainer untouched."""
        problems = self._state_problems(sd) if isinstance(sd, dict) else [f"not a dict: {type(sd).__name__}"]
        if problems:
            raise CheckpointError(
                f"{source}: the checkpoint does not fit this trainer (nothing was loaded):\n  "
                + "\n  ".join(problems[:20])
                + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
            )
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        if self.ema_model is not None:
            self.ema_model.load_state_dict(sd["ema"])
        self._restore_rest(sd)

    def _restore_rest(self, sd: dict[str, Any]) -> None:
        """Everything but the model and optimizer weights (shared by the .pt and DCP formats)."""
        self.scheduler.load_state_dict(sd["scheduler"])
        self.scaler.load_state_dict(sd["scaler"])
        self.step, self.epoch = sd["step"], sd["epoch"]
        self._batch_in_epoch, self._epoch_rng = sd["batch_in_epoch"], sd["epoch_rng"]
        self._iter, self._replay = None, bool(sd["iter_open"])
        es = sd["early_stopping"]
        self.best_metric, self.best_step, self.best_state = (
            es["best_metric"],
            es["best_step"],
            es["best_state"],
        )
        self.bad_evals, self.stopped_early = es["bad_evals"], es["stopped_early"]
        nf = sd.get("nonfinite", {})
        self.skipped_steps, self._consecutive_skips = (
            nf.get("skipped_steps", 0),
            nf.get("consecutive_skips", 0),
        )
        self.history, self.val_history = list(sd["history"]), list(sd["val_history"])
        set_rng_state(sd["rng"])

    def save_checkpoint(self, path: str, format: str | None = None) -> str:
        """Everything needed to resume exactly (see the module docstring), with a sha256 checksum of every
        tensor; written atomically (tmp file, fsync, rename). Refuses to save non-finite parameters, so a
        diverged model never replaces a good checkpoint.

        ``format``: "pt" (one file) or "dcp" (a ``torch.distributed.checkpoint`` directory, see
        :meth:`_save_dcp`); None: "dcp" under DDP / FSDP, else "pt". Under a process group every rank
        must call this (it is collective)."""
        fmt = format or ("dcp" if self.distributed else "pt")
        if fmt not in ("pt", "dcp"):
            raise ValueError(f"save_checkpoint: format must be 'pt', 'dcp' or None, got {format!r}")
        if fmt == "dcp":
            return self._save_dcp(path)
        if self.strategy == "fsdp":
            raise ValueError("save_checkpoint: strategy='fsdp' shards the weights: use format='dcp'")
        if self.world > 1:  # DDP replicas are identical: rank 0 writes, the others wait for the file
            if self.is_main:
                self._save_pt(path)
            torch.distributed.barrier()
            return path
        return self._save_pt(path)

    def _save_pt(self, path: str) -> str:
        sd = _to_cpu_nested(self.state_dict())
        for what, module in (("model", self.model), ("ema", self.ema_model)):
            if module is None:
                continue
            state = sd[what]  # CPU copies: checking them adds no device sync
            bad = [
                n
                for n, _ in module.named_parameters()
                if n in state and state[n].is_floating_point() and not bool(torch.isfinite(state[n]).all())
            ]
            if bad:
                raise FloatingPointError(
                    f"save_checkpoint: {what} parameters {bad[:5]} hold inf / NaN; {path} was not written"
                )
        sd["checksum"] = _checksums(sd)
        _atomic_save(sd, path)
        return path

    def load_checkpoint(self, path: str) -> None:
        """Restore a :meth:`save_checkpoint` file into this trainer (same model / config / data). The file's
        checksums and its fit to this trainer are verified before anything changes; any problem raises
        :class:`CheckpointError` naming the file. A DCP directory may come from another world size."""
        if os.path.isdir(path):
            return self._load_dcp(path)
        if self.strategy == "fsdp":
            raise CheckpointError(
                f"load_checkpoint({path}): strategy='fsdp' loads DCP checkpoint directories only "
                "(save_checkpoint(path, format='dcp') from a single process writes one)"
            )
        sd = _read_checkpoint(path)
        _verify_checksums(sd, path)
        self.load_state_dict(sd, source=f"load_checkpoint({path})")

    # -- DCP checkpoints (DDP / FSDP, resharded on load) ----------------------------------------------

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def _dcp_tensors(self) -> tuple[dict[str, Any], bool]:
        """The sharded / replicated tensor state (FQN-keyed, as ``get_state_dict`` gives it) and whether
        the optimizer had no state yet (``get_state_dict`` materialises it with a zero-lr step: that
        state must not be saved, nor kept)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        fresh = not self.optimizer.state
        msd, osd = get_state_dict(self.model, self.optimizer)
        if fresh:
            self.optimizer.state.clear()
        out: dict[str, Any] = {"model": msd}
        if not fresh:
            out["optim"] = osd
        if self.ema_model is not None:
            out["ema"] = self.ema_model.state_dict()
        if self.best_state is not None:
            out["best_model"] = self.best_state["model"]
            if self.best_state.get("ema") is not None:
                out["best_ema"] = self.best_state["ema"]
        return out, fresh

    def _dcp_meta(self, fresh: bool) -> dict[str, Any]:
        return _to_cpu_nested(
            {
                "version": CHECKPOINT_VERSION,
                "format": "dcp",
                "world_size": self.world,
                "strategy": self.strategy,
                "param_names": list(self.param_names),
                "optimizer_fresh": fresh,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema": self.ema_model is not None,
                # the best weights are DCP shards: the metadata only says which exist
                **self._progress_state(
                    {
                        "best_state": self.best_state is not None,
                        "best_ema": self.best_state is not None and self.best_state.get("ema") is not None,
                    }
                ),
            }
        )

    def _save_dcp(self, path: str) -> str:
        """A ``torch.distributed.checkpoint`` directory: the model / optimizer / EMA / best weights as DCP
        shards (each rank writes its own; loadable on another world size and strategy) plus
        ``fastgen_trainer.pt`` from rank 0 (step, data position, RNG, scheduler, scaler, early stopping,
        history, and the sha256 of every DCP file). Written to ``<path>.tmp`` and renamed over ``path``
        once complete, so a crash leaves the old or the new checkpoint. Collective: every rank calls it;
        ``path`` must be on a file system that every rank sees."""
        import shutil

        import torch.distributed.checkpoint as dcp

        path = os.path.abspath(path)
        state, fresh = self._dcp_tensors()
        bad = [
            f"{what}.{n}"
            for what in ("model", "ema")
            for n, v in state.get(what, {}).items()
            if isinstance(v, torch.Tensor)
            and v.is_floating_point()
            and not bool(torch.isfinite(_local(v)).all())
        ]
        nbad = len(bad)
        if self.world > 1:  # FSDP shards are checked where they live: every rank must agree to stop
            t = torch.tensor([nbad], device=self.device)
            torch.distributed.all_reduce(t)
            nbad = int(t)
        if nbad:
            raise FloatingPointError(
                f"save_checkpoint: parameters {bad[:5] or '(on another rank)'} hold inf / NaN; "
                f"{path} was not written"
            )
        tmp = path + ".tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self._barrier()
        with _quiet_single_process_dcp():
            dcp.save(state, checkpoint_id=tmp)
        self._barrier()
        if self.is_main:
            meta = self._dcp_meta(fresh)
            meta["files"] = {f: _sha256_file(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
            meta["checksum"] = _checksums(meta)
            _atomic_save(meta, os.path.join(tmp, DCP_META))
            old = path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            if os.path.exists(path):
                os.replace(path, old)
            os.replace(tmp, path)
            _fsync_dir(os.path.dirname(path))
            shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return path

    def _load_dcp(self, path: str) -> None:
        """Restore a :meth:`_save_dcp` directory, possibly written by another world size or strategy (DCP
        reshards). Checksums and the fit of every tensor's name and global shape are verified first; any
        problem raises :class:`CheckpointError` with the trainer untouched. Collective."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        src = f"load_checkpoint({path})"
        meta_path = os.path.join(path, DCP_META)
        problems: list[str] = []
        meta: dict[str, Any] = {}
        if not os.path.isfile(meta_path):
            problems.append(f"no {DCP_META}: not a fastgen DCP checkpoint, or its save did not finish")
        else:
            meta = _read_meta(meta_path)
            _verify_checksums(meta, meta_path)
            if self.is_main:  # rank 0 hashes the shards once for everybody
                for f, want in meta.get("files", {}).items():
                    fp = os.path.join(path, f)
                    got = _sha256_file(fp) if os.path.isfile(fp) else "missing"
                    if got != want:
                        problems.append(
                            f"{f}: {'missing' if got == 'missing' else 'sha256 mismatch (corrupt)'}"
                        )
        if self.world > 1:
            box = [problems]
            torch.distributed.broadcast_object_list(box, src=0)
            problems = box[0]
        fresh_before = not self.optimizer.state
        try:
            if not problems:
                template, _ = self._dcp_tensors()
                if meta["optimizer_fresh"]:
                    template.pop("optim", None)
                elif "optim" not in template:
                    from torch.distributed.checkpoint.state_dict import get_state_dict

                    template["optim"] = get_state_dict(self.model, self.optimizer)[1]
                if meta["early_stopping"]["best_state"]:
                    template["best_model"] = template["model"]
                    if meta["early_stopping"]["best_ema"] and "ema" in template:
                        template["best_ema"] = template["ema"]
                else:
                    template.pop("best_model", None)
                    template.pop("best_ema", None)
                template = _clone_tree(template)
                problems = self._dcp_problems(meta, path, template)
            if problems:
                raise CheckpointError(
                    f"{src}: the checkpoint does not fit this trainer (nothing was loaded):\n  "
                    + "\n  ".join(problems[:20])
                    + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
                )
            with _quiet_single_process_dcp():
                dcp.load(template, checkpoint_id=path)
        except BaseException:
            if fresh_before:  # the template materialised optimizer state: the trainer stays untouched
                self.optimizer.state.clear()
            raise
        set_model_state_dict(self.model, template["model"])
        if "optim" in template:
            set_optimizer_state_dict(self.model, self.optimizer, template["optim"])
        else:  # saved before the first step: no optimizer state, as in an uninterrupted run
            self.optimizer.state.clear()
        if self.ema_model is not None:
            self.ema_model.load_state_dict(template["ema"])
        self.best_state = None
        if "best_model" in template:
            self.best_state = {"model": _state_to_cpu(template["best_model"]), "ema": None}
            if "best_ema" in template:
                self.best_state["ema"] = _state_to_cpu(template["best_ema"])
        es = dict(meta["early_stopping"])
        es["best_state"] = self.best_state
        self._restore_rest({**meta, "early_stopping": es})

    def _dcp_problems(self, meta: dict[str, Any], path: str, template: dict[str, Any]) -> list[str]:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        out = []
        if meta.get("version") not in range(2, CHECKPOINT_VERSION + 1) or meta.get("format") != "dcp":
            return [
                f"{DCP_META}: unsupported version / format {meta.get('version')!r} / {meta.get('format')!r}"
            ]
        if list(meta["param_names"]) != self.param_names:
            diff = sorted(set(meta["param_names"]) ^ set(self.param_names))[:5]
            out.append(
                f"trainable parameters differ ({len(meta['param_names'])} in the checkpoint vs "
                f"{len(self.param_names)} here; e.g. {diff or 'same names, another grouping'})"
            )
        if meta["ema"] != (self.ema_model is not None):
            out.append(
                f"EMA: {'on' if meta['ema'] else 'off'} in the checkpoint, {'on' if self.ema_model is not None else 'off'} here"
            )
        if self.scaler.is_enabled() and not meta["scaler"]:
            out.append("scaler: precision='fp16' here, but the checkpoint has no GradScaler state (not fp16)")
        if len(meta["scheduler"].get("base_lrs", [])) != len(self.optimizer.param_groups):
            out.append("scheduler: another number of parameter groups")
        saved = FileSystemReader(path).read_metadata().state_dict_metadata
        flat = _flatten(template)
        for k, v in flat.items():
            if not isinstance(v, torch.Tensor):
                continue
            md = saved.get(k)
            if md is None:
                out.append(f"{k}: missing from the checkpoint")
            elif not isinstance(md, TensorStorageMetadata) or tuple(md.size) != tuple(v.shape):
                got = tuple(md.size) if isinstance(md, TensorStorageMetadata) else type(md).__name__
                out.append(f"{k}: checkpoint {got} vs {tuple(v.shape)}")
        for k in saved:
            if k.startswith("model.") and k not in flat:
                out.append(f"{k}: unexpected in the checkpoint (not a tensor of this model)")
        return out


def save_checkpoint(trainer: Trainer, path: str) -> str:
    """``trainer.save_checkpoint(path)``."""
    return trainer.save_checkpoint(path)


def load_checkpoint(trainer: Trainer, path: str) -> Trainer:
    """``trainer.load_checkpoint(path)``; returns the trainer."""
    trainer.load_checkpoint(path)
    return trainer


def finetune(
    model: nn.Module,
    train_data: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Any],
    config: FineTuneConfig | None = None,
    *,
    val_data: Iterable[Any] | None = None,
    metric_fn: Callable[[nn.Module], float] | None = None,
    resume: str | None = None,
) -> FineTuneResult:
    """Fine-tune ``model`` in place (see the module docstring); ``resume``: a checkpoint path to continue."""
    trainer = Trainer(model, train_data, loss_fn, config, val_data=val_data, metric_fn=metric_fn)
    if resume is not None:
        trainer.load_checkpoint(resume)
    return trainer.fit()


def plot_history(history: list[dict[str, float]], val_history: list[dict[str, float]], path: str) -> bool:
    """Train loss (raw and smoothed), validation loss / metric and lr against the step; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    if loss:
        ax.plot(steps, loss, alpha=0.3, color="C0", label="train loss")
        k = max(1, len(loss) // 50)
        sm = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], sm, color="C0", label=f"train loss (mean of {k})")
    if val_history:
        vs = [v["step"] for v in val_history]
        if "val_loss" in val_history[0]:
            ax.plot(vs, [v["val_loss"] for v in val_history], "o-", color="C1", label="val loss")
        if any(v.get("metric") != v.get("val_loss") for v in val_history):
            ax.plot(vs, [v["metric"] for v in val_history], "s--", color="C2", label="val metric")
    ax.set_yscale("log" if loss and min(loss) > 0 else "linear")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(steps, [h["lr"] for h in history], color="C3")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
