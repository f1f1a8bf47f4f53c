"""Benchmark: CLIP inference (``fastgen.models.clip``): ``encode_image`` and ``encode_text``, plus a packed
batch of mixed image sizes, at the published ViT sizes (bf16, GPU) or tiny configs (fp32, CPU).

Implementations, all the SAME module and weights (only the attention call differs):

* ``plain-sdpa`` (baseline, the correctness oracle): every attention call is PyTorch's
  ``torch.nn.functional.scaled_dot_product_attention`` (``CLIP.set_attention_fn``), i.e. the model built
  on plain PyTorch ops.
* ``fastgen[torch]`` (baseline): ``fastgen.use_backend("torch")``, fastgen's plain-PyTorch fallback.
* ``fastgen``: default dispatch (the Triton flash-attention kernels on a GPU; the torch backend on CPU).

Mixed sizes (``mixed``): half the images at the trained size and half at 1.5x; ``plain-sdpa`` encodes each
size group as its own padded-free batch (two calls), ``fastgen`` packs all of them into one varlen batch
(``encode_image_list`` -> ``fastgen.flash_attn_varlen``).

Throughput: each case's params hold ``images`` (or ``tokens``) per call, so images/s = images / (ms / 1e3)
(tokens/s likewise); the table's TFLOP/s use the analytic count below.

FLOPs per call: per layer and sequence of L tokens with width w (MLP ratio 4): ``24 L w^2`` (qkv, out and
MLP GEMMs) + ``4 L^2 w`` (QK^T and PV; halved for the causal text tower), plus the patch convolution
``2 N w 3 p^2`` and the final projection. LayerNorms, softmax and activations are not counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastgen
from fastgen.bench import Case, Impl, main, register
from fastgen.models.clip import CLIP, from_name

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def configs(device: torch.device, quick: bool):
    """(preset, image batch, text batch)."""
    if device.type != "cuda":
        return [("tiny", 8, 16)] if quick else [("tiny", 32, 64), ("ViT-B/32", 2, 4)]
    if quick:
        return [("ViT-B/16", 32, 256)]
    return [("ViT-B/16", 64, 512), ("ViT-L/14", 32, 256), ("ViT-L/14@336", 16, 256)]


def tower_flops(tokens: int, width: int, layers: int, causal: bool, mlp_ratio: float = 4.0) -> int:
    gemm = 2 * tokens * width * width * (4 + 2 * mlp_ratio)
    attn = 4 * tokens * tokens * width // (2 if causal else 1)
    return int(layers * (gemm + attn))


def image_flops(model: CLIP, h: int, w: int) -> int:
    c = model.config
    n = (h // c.patch_size) * (w // c.patch_size)
    flops = tower_flops(n + 1, c.vision_width, c.vision_layers, False, c.vision_mlp_ratio)
    return flops + 2 * n * c.vision_width * c.in_channels * c.patch_size**2 + 2 * c.vision_width * c.embed_dim


@register(op="clip", description="CLIP encode_image / encode_text: fastgen attention vs plain PyTorch SDPA")
def clip_cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, n_img, n_txt in configs(device, quick):
        torch.manual_seed(0)
        model = from_name(name, device=device, dtype=dtype).eval()
        yield image_case(model, name, n_img, dtype, device)
        yield text_case(model, name, n_txt, dtype, device)
        if device.type == "cuda" or not quick:
            yield mixed_case(model, name, n_img, dtype, device)


def impls(model: CLIP, fn, plain_fn=None) -> list[Impl]:
    plain_fn = plain_fn or fn

    def plain():
        model.set_attention_fn(F.scaled_dot_product_attention)
        try:
            with torch.no_grad():
                return plain_fn()
        finally:
            model.set_attention_fn(None)

    def forced():
        with fastgen.use_backend("torch", op="attention"), torch.no_grad():
            return fn()

    def ours():
        with torch.no_grad():
            return fn()

    return [Impl("plain-sdpa", plain, baseline=True), Impl("fastgen[torch]", forced, baseline=True),
            Impl("fastgen", ours)]  # fmt: skip


def _tol(dtype):
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}


def image_case(model: CLIP, name: str, batch: int, dtype, device) -> Case:
    h, w = (
        model.config.image_size
        if isinstance(model.config.image_size, tuple)
        else (model.config.image_size,) * 2
    )
    x = torch.randn(batch, 3, h, w, device=device, dtype=dtype)
    params = {"model": name, "tower": "image", "images": batch, "size": f"{h}x{w}", "dtype": DTYPE_NAMES[dtype],
              "throughput": "images/s = images / (ms / 1e3)"}  # fmt: skip
    return Case(f"image {name} {h}x{w} B{batch} {DTYPE_NAMES[dtype]}", impls(model, lambda: model.encode_image(x)),
                flops=batch * image_flops(model, h, w), bound="compute", flop_dtype=dtype, params=params,
                **_tol(dtype))  # fmt: skip


def text_case(model: CLIP, name: str, batch: int, dtype, device) -> Case:
    c = model.config
    t = torch.randint(1, c.vocab_size - 1, (batch, c.context_length), device=device)
    t[:, -1] = c.vocab_size - 1  # eot last: every row uses the whole context
    flops = batch * (tower_flops(c.context_length, c.text_width, c.text_layers, True, c.text_mlp_ratio)
                     + 2 * c.text_width * c.embed_dim)  # fmt: skip
    params = {"model": name, "tower": "text", "texts": batch, "tokens": batch * c.context_length,
              "dtype": DTYPE_NAMES[dtype], "throughput": "tokens/s = tokens / (ms / 1e3)"}  # fmt: skip
    return Case(f"text  {name} L{c.context_length} B{batch} {DTYPE_NAMES[dtype]}",
                impls(model, lambda: model.encode_text(t)), flops=flops, bound="compute", flop_dtype=dtype,
                params=params, **_tol(dtype))  # fmt: skip


def mixed_case(model: CLIP, name: str, batch: int, dtype, device) -> Case:
    c = model.config
    s = c.image_size if isinstance(c.image_size, int) else c.image_size[0]
    big = (s * 3 // 2) // c.patch_size * c.patch_size
    half = max(batch // 2, 1)
    small_x = torch.randn(half, 3, s, s, device=device, dtype=dtype)
    big_x = torch.randn(half, 3, big, big, device=device, dtype=dtype)
    listed = [*small_x.unbind(0), *big_x.unbind(0)]
    with torch.no_grad():
        model.encode_image(big_x[:1])  # fills the pos-embed cache outside the timed region

    def grouped():
        return torch.cat([model.encode_image(small_x), model.encode_image(big_x)])

    flops = half * (image_flops(model, s, s) + image_flops(model, big, big))
    params = {"model": name, "tower": "image", "images": 2 * half, "sizes": f"{half}x{s}px + {half}x{big}px",
              "dtype": DTYPE_NAMES[dtype], "plain-sdpa": "one padded-free batch per size",
              "fastgen": "one packed varlen batch (encode_image_list)", "fastgen[torch]": "same, torch backend",
              "throughput": "images/s = images / (ms / 1e3)"}  # fmt: skip
    return Case(f"mixed {name} {s}+{big}px B{2 * half} {DTYPE_NAMES[dtype]}",
                impls(model, lambda: model.encode_image_list(listed), plain_fn=grouped),
                flops=flops, bound="compute", flop_dtype=dtype, params=params, **_tol(dtype))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main(only=["clip"]))
