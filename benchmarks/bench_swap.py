"""Benchmark: whole models before and after ``fastgen.swap_attention`` (rule 11: never slower).

Each case times the SAME weights twice: ``unswapped`` (baseline, the correctness oracle: the model as its
library ships it, torch's SDPA) and ``swapped`` (a deep copy after ``fastgen.swap_attention``: fastgen's
``MultiheadAttention``, diffusers processors in a fastgen scope, or transformers'
``attn_implementation="fastgen"``), forward (inference, no_grad) and forward + backward (training step
without the optimizer; the output returned is the forward's). Models: ``nn.TransformerEncoder``,
transformers BERT / GPT-2 / ViT / CLIP, a diffusers ``UNet2DConditionModel`` and a timm ViT where those
import, at small CPU sizes or attention-heavy GPU sizes (seq >= 1k).

FLOPs are not counted (whole models): read the ms and the ratio against ``unswapped``.

``python benchmarks/bench_swap.py --interleaved [--control]`` instead times the pairs interleaved (A, B, A,
B, ..., 1 thread on CPU) and prints the medians: what the ratios in RESULTS.md come from on a shared
machine. ``--control`` adds an unswapped deep copy to each round: its A/A ratio is the noise floor.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
from torch import nn

import fastgen
from fastgen.bench import Case, Impl, main, register


def _encoder(device, big):
    d, layers, seq, batch = (1024, 4, 2048, 4) if big else (256, 4, 128, 4)
    layer = nn.TransformerEncoderLayer(d, d // 64, 4 * d, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    x = torch.randn(batch, seq, d)
    return model, (x,), {}, lambda out: out


def _hf(kind):
    def build(device, big):
        import transformers

        import fastgen.integrations.transformers  # noqa: F401  (registers "fastgen")

        h, layers, seq, batch = (1024, 4, 2048, 2) if big else (256, 4, 128, 4)
        common = dict(hidden_size=h, num_hidden_layers=layers, num_attention_heads=h // 64,
                      intermediate_size=4 * h)  # fmt: skip
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 1000, (batch, seq), generator=g)
        if kind == "bert":
            cfg = transformers.BertConfig(vocab_size=1000, max_position_embeddings=seq, **common)
            return transformers.BertModel(cfg), (), {"input_ids": ids}, lambda o: o.last_hidden_state
        if kind == "gpt2":
            cfg = transformers.GPT2Config(vocab_size=1000, n_embd=h, n_layer=layers, n_head=h // 64,
                                          n_positions=seq)  # fmt: skip
            return transformers.GPT2Model(cfg), (), {"input_ids": ids}, lambda o: o.last_hidden_state
        img, patch = (512, 16) if big else (128, 16)  # 1024 / 64 patches
        px = torch.randn(batch, 3, img, img, generator=g)
        if kind == "vit":
            cfg = transformers.ViTConfig(image_size=img, patch_size=patch, **common)
            return transformers.ViTModel(cfg), (), {"pixel_values": px}, lambda o: o.last_hidden_state
        cfg = transformers.CLIPConfig(
            text_config=dict(vocab_size=1000, max_position_embeddings=77, **common),
            vision_config=dict(image_size=img, patch_size=patch, **common),
        )
        inputs = {"input_ids": ids[:, :77], "pixel_values": px}
        return transformers.CLIPModel(cfg), (), inputs, lambda o: o.logits_per_image

    return build


def _unet(device, big):
    import diffusers

    size, ctx = (64, 77) if big else (32, 16)
    model = diffusers.UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
        norm_num_groups=32,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=g)
    enc = torch.randn(2, ctx, 64, generator=g)
    return model, (x, torch.tensor([10, 500]), enc), {}, lambda o: o.sample


def _timm_vit(device, big):
    import timm

    name = "vit_base_patch16_224" if big else "vit_tiny_patch16_224"
    return timm.create_model(name, pretrained=False), (torch.randn(2, 3, 224, 224),), {}, lambda o: o


MODELS = {
    "nn.TransformerEncoder": _encoder,
    "hf BERT": _hf("bert"),
    "hf GPT-2": _hf("gpt2"),
    "hf ViT": _hf("vit"),
    "hf CLIP": _hf("clip"),
    "diffusers UNet2DCondition": _unet,
    "timm ViT": _timm_vit,
}


def pair(name: str, device: torch.device, big: bool = False):
    """(unswapped, swapped, args, kwargs, pick) on ``device``; the swapped model is a deep copy."""
    torch.manual_seed(0)
    model, args, kwargs, pick = MODELS[name](device, big)
    model = model.to(device)
    args = tuple(a.to(device) for a in args)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    swapped = copy.deepcopy(model)
    report = fastgen.swap_attention(swapped)
    if not report.replaced:
        raise RuntimeError(f"{name}: nothing swapped:\n{report}")
    return model, swapped, args, kwargs, pick


def _fn(model, args, kwargs, pick, backward: bool):
    if not backward:

        def fwd():
            with torch.no_grad():
                return pick(model(*args, **kwargs))

        return fwd

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        out = pick(model(*args, **kwargs))
        out.float().square().mean().backward()
        return out.detach()

    return fwd_bwd


@register(op="swap", description="whole models before / after swap_attention: forward and forward+backward")
def swap_cases(device: torch.device, quick: bool):
    big = device.type == "cuda"
    names = ["nn.TransformerEncoder", "hf BERT"] if quick else list(MODELS)
    for name in names:
        for backward in (False,) if quick else (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            try:
                base, swapped, args, kwargs, pick = pair(name, device, big)
            except ImportError as e:
                yield Case(
                    f"{name} {mode}", [Impl.skipped("unswapped", f"does not import: {e}", baseline=True)]
                )
                continue
            for m in (base, swapped):
                m.train(backward)
            yield Case(
                f"{name} {mode}",
                [
                    Impl("unswapped", _fn(base, args, kwargs, pick, backward), baseline=True),
                    Impl("swapped", _fn(swapped, args, kwargs, pick, backward)),
                ],
                params={"model": name, "mode": mode, "device_size": "gpu" if big else "cpu"},
                atol=2e-4,
                rtol=2e-4,
            )


def interleaved(
    names=None, rounds: int = 15, threads: int = 1, control: bool = False
) -> list[tuple[str, str, float, float]]:
    """Median ms of unswapped and swapped, timed alternately (one call each per round, after a warm-up)
    with ``threads`` CPU threads: a shared machine's drift hits both alike. ``control``: also time a
    second unswapped deep copy in the same rounds (an A/A pair: its ratio is the measurement's own noise,
    the yardstick for a swapped ratio near 1)."""
    torch.set_num_threads(threads)
    rows = []
    for name in names or MODELS:
        try:
            base, swapped, args, kwargs, pick = pair(name, torch.device("cpu"))
        except ImportError as e:
            print(f"{name}: skipped ({e})", flush=True)
            continue
        models = (base, swapped, copy.deepcopy(base)) if control else (base, swapped)
        for backward in (False, True):
            fns = []
            for m in models:
                m.train(backward)
                fns.append(_fn(m, args, kwargs, pick, backward))
            times: list[list[float]] = [[] for _ in models]
            for f in fns:
                f()
            for _ in range(rounds):
                for i, f in enumerate(fns):
                    t0 = time.perf_counter()
                    f()
                    times[i].append((time.perf_counter() - t0) * 1e3)
            a, b = statistics.median(times[0]), statistics.median(times[1])
            mode = "fwd+bwd" if backward else "fwd"
            rows.append((name, mode, a, b))
            aa = f"  A/A control {a / statistics.median(times[2]):5.2f}x" if control else ""
            print(
                f"{name:28s} {mode:8s} unswapped {a:9.2f} ms  swapped {b:9.2f} ms  ratio {a / b:5.2f}x{aa}",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    if "--interleaved" in sys.argv:
        flags = ("--interleaved", "--control")
        interleaved([a for a in sys.argv[1:] if a not in flags] or None, control="--control" in sys.argv)
        raise SystemExit(0)
    raise SystemExit(main(only=["swap"]))
