"""Fine-tuning loop: freezing by patterns, parameter groups, AdamW + warm-up / cosine, clipping,
accumulation, mixed precision, a guard against non-finite losses / gradients, EMA, augmentation hooks,
validation with early stopping, exact-resume checkpoints (checksummed, validated before loading, written
atomically), CSV / JSON / PNG logs, and under ``torchrun`` DDP / FSDP2 with sharded data and DCP
checkpoints (:mod:`fastgen.train.distributed`). See :mod:`fastgen.train.finetune`."""

from fastgen.train.finetune import (
    CheckpointError,
    FineTuneConfig,
    FineTuneResult,
    RandomResizedCropFlip,
    Trainer,
    apply_freeze,
    finetune,
    format_summary,
    get_rng_state,
    load_checkpoint,
    lr_multiplier,
    param_groups,
    param_summary,
    plot_history,
    save_checkpoint,
    set_rng_state,
)

__all__ = [
    "CheckpointError",
    "FineTuneConfig",
    "FineTuneResult",
    "RandomResizedCropFlip",
    "Trainer",
    "apply_freeze",
    "finetune",
    "format_summary",
    "get_rng_state",
    "load_checkpoint",
    "lr_multiplier",
    "param_groups",
    "param_summary",
    "plot_history",
    "save_checkpoint",
    "set_rng_state",
]
