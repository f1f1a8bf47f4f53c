"""Functional ops. One file per op; each has a plain-PyTorch ``*_ref`` next to its kernels."""

from fastgen.ops.attention import (
    attention_ref,
    flash_attention,
    flash_attn_varlen,
    flash_attn_varlen_ref,
    scaled_dot_product_attention,
)
from fastgen.ops.attention_decode import (  # the function attention_decode is fastgen.attention_decode
    attention_decode_paged,
    attention_decode_paged_ref,
    attention_decode_ref,
    kv_cache_append,
)
from fastgen.ops.diffusion_step import (
    counter_normal,
    counter_normal_ref,
    ddim_step,
    ddim_step_ref,
    ddpm_step,
    ddpm_step_ref,
    dpm_solver_2m_step,
    dpm_solver_2m_step_ref,
    euler_ancestral_step,
    euler_ancestral_step_ref,
    euler_step,
    euler_step_ref,
    sampler_step,
)
from fastgen.ops.grouped_mm import activation_ref, grouped_mm_ref  # grouped_mm: fastgen.grouped_mm
from fastgen.ops.moe_gating import Gating, capacity_for, top2_gating, top2_gating_ref
from fastgen.ops.moe_permute import (  # moe_permute: fastgen.moe_permute
    Routing,
    moe_permute_ref,
    moe_route,
    moe_route_ref,
    moe_unpermute,
    moe_unpermute_ref,
)
from fastgen.ops.ssim import ssim_ref, ssim_stats
from fastgen.ops.vq import VQNearest, VQNearestCounts, vq_nearest, vq_nearest_ref
from fastgen.ops.vq_ema import vq_codebook_from_ema, vq_ema_update, vq_ema_update_ref

__all__ = [
    "Gating",
    "Routing",
    "VQNearest",
    "VQNearestCounts",
    "activation_ref",
    "attention_decode_paged",
    "attention_decode_paged_ref",
    "attention_decode_ref",
    "attention_ref",
    "capacity_for",
    "counter_normal",
    "counter_normal_ref",
    "ddim_step",
    "ddim_step_ref",
    "ddpm_step",
    "ddpm_step_ref",
    "dpm_solver_2m_step",
    "dpm_solver_2m_step_ref",
    "euler_ancestral_step",
    "euler_ancestral_step_ref",
    "euler_step",
    "euler_step_ref",
    "flash_attention",
    "flash_attn_varlen",
    "flash_attn_varlen_ref",
    "grouped_mm_ref",
    "kv_cache_append",
    "moe_permute_ref",
    "moe_route",
    "moe_route_ref",
    "moe_unpermute",
    "moe_unpermute_ref",
    "sampler_step",
    "scaled_dot_product_attention",
    "ssim_ref",
    "ssim_stats",
    "top2_gating",
    "top2_gating_ref",
    "vq_codebook_from_ema",
    "vq_ema_update",
    "vq_ema_update_ref",
    "vq_nearest",
    "vq_nearest_ref",
]

from fastgen.ops.adaptive_pool import adaptive_grid_pool, adaptive_grid_pool_ref, adaptive_grid_pool_tokens

__all__ += ["adaptive_grid_pool", "adaptive_grid_pool_ref", "adaptive_grid_pool_tokens"]
