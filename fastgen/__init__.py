"""fastgen: fused kernels for generative and vision models behind drop-in PyTorch modules.

Public API
----------
* ``fastgen.ops``: functional ops, each with a plain-PyTorch ``<op>_ref`` next to it.
* ``fastgen.nn``: drop-in modules (``MultiheadAttention``) and ``swap_attention`` / ``unswap_attention``.
* ``fastgen.diffusion``: noise schedules and samplers built on the fused sampling steps.
* ``fastgen.use_backend`` / ``FASTGEN_BACKEND``: force a backend (cuda / triton / cpp / torch).
* ``python -m fastgen.info``: what is built and usable here; ``python -m fastgen.bench``: benchmarks.
"""

from fastgen import _ext  # noqa: F401  (warns once if the extension is missing)
from fastgen._backend import BACKEND_ORDER, BackendUnavailableError, registered_ops, use_backend

__version__ = "0.1.0"

from fastgen import (
    diffusion,
    metrics,
    nn,
    ops,
)
from fastgen.nn import (
    MultiheadAttention,
    ResidualVQ,
    Top2MoE,
    VectorQuantize,
    swap_attention,
    unswap_attention,
)
from fastgen.ops.attention import flash_attention, flash_attn_varlen, scaled_dot_product_attention
from fastgen.ops.attention_decode import attention_decode, attention_decode_paged, kv_cache_append
from fastgen.ops.diffusion_step import (
    ddim_step,
    ddpm_step,
    dpm_solver_2m_step,
    euler_ancestral_step,
    euler_step,
    sampler_step,
)
from fastgen.ops.grouped_mm import grouped_mm
from fastgen.ops.moe_gating import top2_gating
from fastgen.ops.moe_permute import moe_permute, moe_route, moe_unpermute
from fastgen.ops.vq import vq_nearest
from fastgen.ops.vq_ema import vq_ema_update

__all__ = [
    "BACKEND_ORDER",
    "BackendUnavailableError",
    "MultiheadAttention",
    "ResidualVQ",
    "Top2MoE",
    "VectorQuantize",
    "__version__",
    "attention_decode",
    "attention_decode_paged",
    "ddim_step",
    "ddpm_step",
    "diffusion",
    "dpm_solver_2m_step",
    "euler_ancestral_step",
    "euler_step",
    "flash_attention",
    "flash_attn_varlen",
    "grouped_mm",
    "kv_cache_append",
    "metrics",
    "moe_permute",
    "moe_route",
    "moe_unpermute",
    "nn",
    "ops",
    "registered_ops",
    "sampler_step",
    "scaled_dot_product_attention",
    "swap_attention",
    "top2_gating",
    "unswap_attention",
    "use_backend",
    "vq_ema_update",
    "vq_nearest",
]
