"""Benchmark: the EMA codebook update (vq_ema_update) and the dVAE token decode, against their one-hot forms.

EMA update of ``cluster_size (K,)`` / ``embed_sum (K, D)`` from N rows ``x (N, D)`` and their codes:

* ``one-hot-einsum`` (the reference, what popular VQ-VAE code does): ``F.one_hot(idx, K).float()`` (N x K)
  and ``einsum("nk,nd->kd")``: O(N K D) FLOPs and an N x K fp32 tensor (2 GiB at N=65536, K=8192).
* ``fastgen[<backend>]``: :func:`fastgen.ops.vq_ema.vq_ema_update`, O(N D) (fp32 atomics on Triton), and
  the same with ``deterministic=True`` (sorted rows, fixed-order segment sums).
  Bytes counted: x + indices read, statistics read and written. Every implementation updates its own
  copy of the statistics; the first call (checked against the reference) starts from the same state.

dVAE decode (DALL-E): the decoder's first 1x1 conv (K=8192 -> C_out) on the one-hot token map:

* ``one-hot-conv`` (reference): ``F.conv2d(one_hot(tokens).permute(0, 3, 1, 2).float(), w, b)``;
* ``fastgen-gather``: :func:`fastgen.nn.vq.decode_tokens`, an embedding gather (bytes: tokens read, the
  gathered weight columns read, the output written).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgen._backend import Call
from fastgen.bench import Case, Impl, backend_impls, main, register
from fastgen.nn.vq import decode_tokens
from fastgen.ops.vq_ema import vq_ema_update, vq_ema_update_ref

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
ONEHOT_MAX_ELEMENTS = 2**31


def ema_shapes(device: torch.device, quick: bool):
    """(heads, N, K, D)."""
    if device.type != "cuda":
        return [(1, 2048, 256, 32)] if quick else [(1, 8192, 1024, 64), (4, 2048, 512, 32)]
    if quick:
        return [(1, 65536, 8192, 256)]
    return [(1, 65536, 8192, 256), (1, 16384, 1024, 256), (1, 65536, 1024, 64), (4, 16384, 1024, 64)]


def dvae_shapes(device: torch.device, quick: bool):
    """(batch, H, W, K, C_out)."""
    if device.type != "cuda":
        return [(1, 8, 8, 8192, 128)] if quick else [(2, 16, 16, 8192, 128)]
    return [(8, 32, 32, 8192, 128)] if quick else [(8, 32, 32, 8192, 128), (32, 32, 32, 8192, 128)]


@register(
    op="vq_ema", description="EMA codebook statistics update (index_add) + dVAE one-hot conv as a gather"
)
def vq_ema_cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for h, n, k, d in ema_shapes(device, quick):
        yield make_ema_case(device, dtype, h, n, k, d)
    for b, hh, ww, k, c_out in dvae_shapes(device, quick):
        yield make_dvae_case(device, b, hh, ww, k, c_out)


def make_ema_case(device, dtype, h, n, k, d):
    torch.manual_seed(0)
    lead = (h,) if h > 1 else ()
    x = torch.randn(*lead, n, d, device=device, dtype=dtype)
    idx = torch.randint(0, k, (*lead, n), device=device)
    cs0 = torch.rand(*lead, k, device=device)
    es0 = torch.randn(*lead, k, d, device=device)
    decay = 0.99

    def fastgen_fn(deterministic):
        def make(_backend):
            cs, es = cs0.clone(), es0.clone()  # this implementation's own statistics

            def run():
                vq_ema_update(x, idx, cs, es, decay, deterministic=deterministic)
                return cs, es

            return run

        return make

    onehot = h * n * k
    if onehot > ONEHOT_MAX_ELEMENTS:
        impls = [
            Impl.skipped("one-hot-einsum", f"the one-hot has {onehot / 2**30:.1f} Gi elements", baseline=True)
        ]
    else:
        impls = [Impl("one-hot-einsum", lambda: vq_ema_update_ref(x, idx, cs0, es0, decay), baseline=True)]
    call = Call(device, dtype, {"heads": h, "rows": n, "dim": d, "codes": k})
    impls += backend_impls("vq_ema", call, fastgen_fn(False))
    impls += backend_impls("vq_ema", call, fastgen_fn(True), label="fastgen[{}] deterministic")
    nbytes = x.numel() * x.element_size() + idx.numel() * 8 + 2 * (cs0.numel() + es0.numel()) * 4
    name = f"ema H{h} N{n} K{k} D{d} {DTYPE_NAMES[dtype]}"
    params = {"kind": "ema_update", "heads": h, "N": n, "K": k, "D": d, "dtype": DTYPE_NAMES[dtype],
              "onehot_flops": 2 * h * n * k * d,
              "byte_rule": "x + int64 indices read, fp32 cluster_size / embed_sum read + written"}  # fmt: skip
    return Case(name, impls, bytes=nbytes, params=params, atol=1e-4, rtol=1e-4)


def make_dvae_case(device, b, hh, ww, k, c_out):
    torch.manual_seed(0)
    tokens = torch.randint(0, k, (b, hh, ww), device=device)
    conv = torch.nn.Conv2d(k, c_out, 1).to(device)
    w, bias = conv.weight.detach(), conv.bias.detach()

    def one_hot_conv():
        return F.conv2d(F.one_hot(tokens, k).permute(0, 3, 1, 2).float(), w, bias)

    impls = [
        Impl("one-hot-conv", one_hot_conv, baseline=True),
        Impl("fastgen-gather", lambda: decode_tokens(tokens, w, bias)),
    ]
    pixels = b * hh * ww
    nbytes = pixels * 8 + 2 * pixels * c_out * 4
    params = {"kind": "dvae_decode", "batch": b, "H": hh, "W": ww, "K": k, "C_out": c_out,
              "conv_flops": 2 * pixels * k * c_out}  # fmt: skip
    # cuDNN may run the reference conv in TF32 (torch.backends.cudnn.allow_tf32): compare loosely there
    tol = 5e-3 if device.type == "cuda" else 1e-5
    return Case(f"dvae decode B{b} {hh}x{ww} K{k} C{c_out} fp32", impls, bytes=nbytes, params=params,
                atol=tol * 0.02, rtol=tol)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main(only=["vq_ema"]))
