"""Benchmark: DALL-E image-token generation and dVAE decoding (``fastgen.models.dalle``).

Generation: one call samples every image token (grid**2 of them) for a batch of texts, seeded, so every
implementation draws the same tokens. tokens/s = batch * grid**2 / time (``tokens_per_call`` is in the
params). FLOPs counted (the useful work, the same for every row): ``2 * trunk_params * batch * S`` for the
linear layers plus ``2 * batch * n_layers * d_model * S**2`` for causal attention (QK^T and PV over half
the square), S = text_seq_len + grid**2. Implementations, on the same weights:

* ``recompute (torch sdpa)`` (the oracle): the whole sequence again at every step with
  ``torch.nn.functional.scaled_dot_product_attention`` — what a model without a cache runs;
* ``kv-cache (torch sdpa)``: plain PyTorch with a KV cache (index assignment, SDPA over the cache);
* ``fastgen``: slice-copy appends + ``fastgen.attention_decode`` (and fastgen's fused attention
  for the prompt).

Correctness: in float32 the tokens must equal the oracle's exactly. In bf16 the paths round differently,
and a near-tie in one draw makes every later token of that row differ, so the gate is the first 8 tokens
(the prompt pass and the first decode steps, where a cache bug shows at once) of at least 3/4 of the rows;
the detail reports the fraction of all tokens that agree.

dVAE decode: tokens (B, grid, grid) -> images (B, 3, 8 grid, 8 grid); the release's one-hot input and
1x1 conv over K = 8192 channels vs fastgen's gather (``fastgen.nn.vq.decode_tokens``). images/s =
batch / time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgen.bench import Case, Impl, main, register, token_agreement_check
from fastgen.models.dalle import DALLE, DALLEConfig, DiscreteVAE, DVAEConfig, count_parameters, unmap_pixels

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# (label, batch, text_seq_len, grid, d_model, n_layers, n_heads)
def gen_shapes(device: torch.device, quick: bool):
    if device.type != "cuda":
        if quick:
            return [("tiny", 2, 16, 8, 64, 2, 4)]
        return [("tiny", 2, 16, 8, 64, 2, 4), ("small", 2, 32, 16, 128, 4, 4)]
    if quick:
        return [("small", 8, 64, 16, 1024, 12, 16)]
    return [("small", 8, 64, 16, 1024, 12, 16), ("dalle-small", 8, 256, 32, 1024, 12, 16)]


# (label, batch, grid, n_hid, n_init, n_blk_per_group)
def dvae_shapes(device: torch.device, quick: bool):
    if device.type != "cuda":
        return (
            [("tiny", 2, 8, 16, 16, 1)] if quick else [("tiny", 2, 8, 16, 16, 1), ("small", 2, 16, 32, 32, 1)]
        )
    if quick:
        return [("release", 8, 32, 256, 128, 2)]
    return [("release", 8, 32, 256, 128, 2), ("release", 32, 32, 256, 128, 2)]


@register(op="dalle", description="DALL-E generation (KV cache vs recompute) and dVAE token decoding")
def dalle_cases(device: torch.device, quick: bool):
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32]
    if device.type == "cuda" and not quick:
        dtypes.append(torch.float32)  # the exact-token gate on the GPU
    for shape in gen_shapes(device, quick):
        for dtype in dtypes:
            yield generation_case(device, dtype, *shape)
    for shape in dvae_shapes(device, quick):
        yield dvae_case(device, dtypes[0], *shape)


def generation_case(device, dtype, label, b, text_len, grid, d, layers, heads) -> Case:
    cfg = DALLEConfig(text_vocab_size=16384, text_seq_len=text_len, image_vocab_size=8192, image_grid=grid,
                      d_model=d, n_layers=layers, n_heads=heads, dvae=None)  # fmt: skip
    torch.manual_seed(0)
    model = DALLE(cfg).to(device, dtype).eval()
    text = torch.randint(1, cfg.text_vocab_size, (b, text_len), device=device)

    def gen(impl: str, use_cache: bool):
        def run():
            model.attention_impl = impl
            return model.generate_images(text, seed=0, use_cache=use_cache, progress=False)

        return run

    s = text_len + grid * grid
    flops = 2 * count_parameters(model) * b * s + 2 * b * layers * d * s * s
    impls = [
        Impl("recompute (torch sdpa)", gen("torch", False), baseline=True),
        Impl("kv-cache (torch sdpa)", gen("torch", True), baseline=True),
        Impl("fastgen", gen("fastgen", True)),
    ]
    name = f"generate {label} B{b} text{text_len} grid{grid} d{d} L{layers} {DTYPE_NAMES[dtype]}"
    params = {"kind": "generate", "batch": b, "text_seq_len": text_len, "grid": grid, "d_model": d,
              "n_layers": layers, "n_heads": heads, "dtype": DTYPE_NAMES[dtype],
              "tokens_per_call": b * grid * grid,
              "flop_rule": "2*trunk_params*B*S + 2*B*layers*d*S^2 (S = text + grid^2)"}  # fmt: skip
    return Case(name, impls, flops=flops, bound="compute", flop_dtype=dtype, params=params,
                check=token_agreement_check(exact=dtype == torch.float32))  # fmt: skip


def dvae_case(device, dtype, label, b, grid, n_hid, n_init, n_blk) -> Case:
    torch.manual_seed(0)
    cfg = DVAEConfig(vocab_size=8192, n_hid=n_hid, n_init=n_init, n_blk_per_group=n_blk)
    vae = DiscreteVAE(cfg).to(device, dtype).eval()
    tokens = torch.randint(0, cfg.vocab_size, (b, grid, grid), device=device)

    def one_hot_conv():  # the release: decoder(one_hot(z).permute(0, 3, 1, 2).float())
        with torch.no_grad():
            z = F.one_hot(tokens, cfg.vocab_size).permute(0, 3, 1, 2).to(dtype)
            return unmap_pixels(torch.sigmoid(vae.decoder(z)[:, :3].float()))

    impls = [
        Impl("one-hot conv (release)", one_hot_conv, baseline=True),
        Impl("fastgen", lambda: vae.decode(tokens)),
    ]
    low = dtype != torch.float32
    name = f"dvae decode {label} B{b} grid{grid} n_hid{n_hid} K8192 {DTYPE_NAMES[dtype]}"
    params = {"kind": "dvae_decode", "batch": b, "grid": grid, "image_side": 8 * grid, "n_hid": n_hid,
              "n_init": n_init, "n_blk_per_group": n_blk, "vocab": 8192, "dtype": DTYPE_NAMES[dtype],
              "images_per_call": b}  # fmt: skip
    return Case(name, impls, params=params, atol=2e-2 if low else 1e-5, rtol=2e-2 if low else 1e-5)


if __name__ == "__main__":
    raise SystemExit(main(only=["dalle"]))
