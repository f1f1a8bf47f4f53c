"""Benchmark: KV-cache decoding attention (one or a few new tokens against the cache), contiguous and paged.

Decoding is memory-bound: every valid K and V entry is read once per KV head group. Bytes per call
(analytic): the valid K + V cache bytes (sum of cache_seqlens x heads_kv x head_dim x 2 x element size) + q +
out. Baselines: the plain PyTorch reference (gather + masked softmax, in the input dtype: the correctness
oracle), ``torch.nn.functional.scaled_dot_product_attention`` with a padding + causal mask over the whole
cache (what a model without a decode kernel runs), and flash-attn's ``flash_attn_with_kvcache`` when it
is importable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgen._backend import Call
from fastgen.bench import Case, Impl, backend_impls, main, register
from fastgen.ops.attention_decode import (
    attention_decode,
    attention_decode_paged,
    attention_decode_paged_ref,
    attention_decode_ref,
)

try:
    from flash_attn import flash_attn_with_kvcache
except Exception:  # pragma: no cover - depends on the machine
    flash_attn_with_kvcache = None

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
PAGE = 256  # flash-attn 2 takes paged caches with page sizes that are multiples of 256


# (label, batch, seq_q, heads_q, heads_kv, head_dim, max_seqlen, paged)
def shapes(device: torch.device, quick: bool):
    if device.type == "cuda":
        if quick:
            return [("glam", 8, 1, 32, 32, 128, 4096, False)]
        return [
            ("glam", 8, 1, 32, 32, 128, 1024, False),
            ("glam", 32, 1, 32, 32, 128, 4096, False),
            ("glam", 64, 1, 16, 16, 128, 2048, False),
            ("glam", 8, 1, 32, 32, 128, 32768, False),
            ("glam-spec4", 16, 4, 32, 32, 128, 8192, False),
            ("dalle", 32, 1, 16, 16, 64, 1280, False),
            ("gqa", 16, 1, 32, 8, 128, 8192, False),
            ("paged", 16, 1, 32, 8, 128, 8192, True),
        ]
    if quick:
        return [("tiny", 2, 1, 8, 2, 64, 512, False)]
    return [
        ("glam", 4, 1, 16, 16, 128, 1024, False),
        ("dalle", 4, 1, 16, 16, 64, 1280, False),
        ("gqa", 2, 1, 16, 4, 128, 4096, False),
        ("paged", 2, 1, 16, 4, 128, 4096, True),
    ]


@register(
    op="attention_decode", description="KV-cache decoding attention (flash-decoding), contiguous and paged"
)
def attention_decode_cases(device: torch.device, quick: bool):
    if device.type == "cuda":
        dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]
        fills = [False]
    else:  # the CPU rows: fp32 and bf16, ragged and full caches (the 1- and 2-thread runs are separate runs)
        dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
        fills = [False] if quick else [False, True]
    for shape in shapes(device, quick):
        for dtype in dtypes:
            for full in fills:
                yield make_case(device, *shape, dtype, full=full)


def make_case(device, label, b, sq, hq, hkv, d, length, paged, dtype, full=False) -> Case:
    g = torch.Generator(device="cpu").manual_seed(0)
    # ragged lengths between half and all of the cache (>= seq_q: every query sees a key), or all full
    lens_list = torch.randint(length // 2, length + 1, (b,), generator=g).clamp(min=sq).tolist()
    if full:
        lens_list = [length] * b
    lens = torch.tensor(lens_list, dtype=torch.int32, device=device)
    q = torch.randn(b, sq, hq, d, generator=g).to(device, dtype)
    k = torch.randn(b, length, hkv, d, generator=g).to(device, dtype)
    v = torch.randn(b, length, hkv, d, generator=g).to(device, dtype)
    impls = []
    if paged:
        n_pages = b * (length // PAGE)  # the paged shapes hold whole pages
        perm = torch.randperm(n_pages, generator=g).reshape(b, -1).to(torch.int32).to(device)
        kp = torch.empty(n_pages, PAGE, hkv, d, device=device, dtype=dtype)
        vp = torch.empty_like(kp)
        kp[perm.long()] = k.reshape(b, -1, PAGE, hkv, d)
        vp[perm.long()] = v.reshape(b, -1, PAGE, hkv, d)
        del k, v
        impls.append(
            Impl(
                "reference",
                lambda: attention_decode_paged_ref(q, kp, vp, perm, lens, upcast=False),
                baseline=True,
            )
        )
        run = lambda: attention_decode_paged(q, kp, vp, perm, lens)
        fa = lambda: flash_attn_with_kvcache(q, kp, vp, cache_seqlens=lens, block_table=perm, causal=True)
    else:
        impls.append(
            Impl("reference", lambda: attention_decode_ref(q, k, v, lens, upcast=False), baseline=True)
        )
        impls.append(Impl("sdpa (padding mask)", sdpa_fn(q, k, v, lens), baseline=True))
        run = lambda: attention_decode(q, k, v, lens)
        fa = lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, causal=True)
    if device.type == "cuda":  # flash-attn is CUDA-only: no row on the CPU
        if flash_attn_with_kvcache is None:
            impls.append(
                Impl.skipped("flash_attn_with_kvcache", "flash-attn is not importable", baseline=True)
            )
        else:
            impls.append(Impl("flash_attn_with_kvcache", fa, baseline=True))
    call = Call(device, dtype, {"paged": paged, "head_dim": d, "aligned16": True})
    impls += backend_impls("attention_decode", call, lambda backend: run)
    elem = q.element_size()
    nbytes = sum(lens_list) * hkv * d * 2 * elem + 2 * q.numel() * elem
    low = dtype != torch.float32
    return Case(
        f"{label} b{b} sq{sq} h{hq}/{hkv} d{d} L{length}{' paged' if paged else ''}{' full' if full else ''} "
        f"{DTYPE_NAMES[dtype]}",
        impls,
        bytes=nbytes,
        params={
            "shape": label,
            "batch": b,
            "seq_q": sq,
            "heads_q": hq,
            "heads_kv": hkv,
            "head_dim": d,
            "max_seqlen": length,
            "mean_seqlen": sum(lens_list) / b,
            "paged": paged,
            "full": full,
            "page_size": PAGE if paged else None,
            "dtype": DTYPE_NAMES[dtype],
        },
        # the oracle runs in the input dtype; fastgen accumulates in float32 and rounds once
        atol=2e-2 if low else 1e-4,
        rtol=2e-2 if low else 1e-4,
    )


def sdpa_fn(q, k, v, lens):
    """SDPA over the whole cache with a (padding & bottom-right causal) mask, as a model without a decode
    kernel runs it."""
    sq, hq = q.shape[1:3]
    length, hkv = k.shape[1], k.shape[2]
    j = torch.arange(length, device=q.device)
    i = torch.arange(sq, device=q.device)
    mask = j[None, None, :] < (lens.long()[:, None, None] - sq + i[None, :, None] + 1)  # (B, Sq, L)
    mask = mask[:, None]  # (B, 1, Sq, L)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = {"enable_gqa": True} if hkv != hq else {}
    return lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, **gqa).transpose(1, 2)


if __name__ == "__main__":
    raise SystemExit(main(only=["attention_decode"]))
