"""Fine-tuning loop: freezing by patterns, parameter groups, AdamW + warm-up / cosine, clipping,
accumulation, mixed precision, EMA, augmentation hooks, validation with early stopping, exact-resume
checkpoints, CSV / JSON / PNG logs. See :mod:`fastgen.train.finetune`."""

from fastgen.train.finetune import (
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
