"""Benchmark: the GLaM language model (``fastgen.models.glam``), a training step and token generation.

Every implementation runs the same weights (bf16 on GPU, fp32 on CPU) and the same GShard routing rule:

* ``torch (sdpa + expert loop)`` (the oracle): ``model.impl = "torch"`` under ``fastgen.use_backend("torch")``
  — ``torch.nn.functional.scaled_dot_product_attention``, a Python loop over experts (index_select /
  index_add per expert), the router in plain PyTorch, and for generation an index-assignment KV cache
  with SDPA over the cache. What a PyTorch user writes.
* ``fastgen[torch]``: the fastgen model (grouped dispatch without a (T, E, C) one-hot, fused-attention
  API) with every op forced to its plain-PyTorch backend: the algorithmic part of the gain alone.
* ``fastgen``: default dispatch (CUDA / Triton kernels on GPU, C++ on CPU).

Generation also has ``recompute (torch sdpa + expert loop)``: no cache, the whole sequence again each step.

train (fwd+bwd): ``loss = model(tokens, targets)[1]; loss.backward()`` (LM + MoE aux losses), training
capacity factor 1.25. tokens/s = batch * seq / time (``tokens_per_call``). FLOPs: ``6 * N * B * S`` for
the matmuls (N = activated non-embedding parameters + the vocab projection) plus ``6 * B * L * d * S^2``
for causal attention. The output compared is the loss (fp32: 1e-4; bf16: 5e-2 relative, since the routing
of near-tied tokens may flip between paths).

generate: ``model.generate(prompt, new, seed=0)`` (eval: dropless MoE), batch * new tokens per call;
FLOPs ``2 * N * B * S + 2 * B * L * d * S^2`` (S = prompt + new). Correctness as in bench_dalle: fp32
tokens equal to the oracle's; bf16: the first 8 new tokens equal in at least 3/4 of the rows.
"""

from __future__ import annotations

import contextlib

import torch

import fastgen
from fastgen.bench import Case, Impl, main, register, token_agreement_check
from fastgen.models.glam import GLaM, GLaMConfig

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# (label, vocab, d_model, n_layers, n_heads, experts, batch, train_seq, prompt, new)
def shapes(device: torch.device, quick: bool):
    if device.type != "cuda":
        tiny = ("tiny", 512, 64, 2, 4, 4, 2, 32, 8, 8)
        return [tiny] if quick else [tiny, ("small", 2048, 128, 4, 4, 8, 4, 64, 16, 16)]
    small = ("small-8e", 32000, 1024, 8, 16, 8, 8, 1024, 128, 128)
    if quick:
        return [small]
    return [small, ("0.1b-64e", 32000, 768, 12, 12, 64, 8, 1024, 128, 128)]


@register(op="glam", description="GLaM LM: training step (fwd+bwd) and KV-cache generation")
def glam_cases(device: torch.device, quick: bool):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for shape in shapes(device, quick):
        yield train_case(device, dtype, *shape)
        yield generate_case(device, dtype, *shape)


def _model(device, dtype, vocab, d, layers, heads, experts, max_len) -> GLaM:
    cfg = GLaMConfig(vocab_size=vocab, max_seq_len=max_len, d_model=d, n_layers=layers, n_heads=heads,
                     d_ff=4 * d, num_experts=experts)  # fmt: skip
    torch.manual_seed(0)
    return GLaM(cfg).to(device, dtype)


def _matmul_params(model: GLaM) -> int:
    c = model.config.param_count()
    return c["activated_non_embedding"] + model.config.vocab_size * model.config.d_model


def _variant(model: GLaM, impl: str, backend: str | None):
    """Run ``fn`` with ``model.impl = impl`` and every fastgen op forced to ``backend`` (None: dispatch)."""

    def wrap(fn):
        def run():
            model.impl = impl
            ctx = fastgen.use_backend(backend) if backend else contextlib.nullcontext()
            with ctx:
                return fn()

        return run

    return wrap


VARIANTS = (("torch (sdpa + expert loop)", "torch", "torch"), ("fastgen[torch]", "fastgen", "torch"),
            ("fastgen", "fastgen", None))  # fmt: skip


def train_case(device, dtype, label, vocab, d, layers, heads, experts, b, s, _prompt, _new) -> Case:
    model = _model(device, dtype, vocab, d, layers, heads, experts, s).train()
    g = torch.Generator(device="cpu").manual_seed(1)
    batch = torch.randint(0, vocab, (b, s + 1), generator=g).to(device)
    tokens, targets = batch[:, :-1], batch[:, 1:]

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(tokens, targets)[1]
        loss.backward()
        return loss.detach().float()

    impls = [Impl(name, _variant(model, impl, be)(step), baseline=i < 2) for i, (name, impl, be) in
             enumerate(VARIANTS)]  # fmt: skip
    flops = 6 * _matmul_params(model) * b * s + 6 * b * layers * d * s * s
    low = dtype != torch.float32
    name = f"train {label} B{b} S{s} d{d} L{layers} E{experts} {DTYPE_NAMES[dtype]}"
    params = {"kind": "train", "batch": b, "seq": s, "d_model": d, "n_layers": layers, "n_heads": heads,
              "experts": experts, "vocab": vocab, "dtype": DTYPE_NAMES[dtype], "tokens_per_call": b * s,
              "capacity_factor": model.config.capacity_factor,
              "flop_rule": "6*N_act*B*S + 6*B*L*d*S^2 (N_act: activated non-embedding params + vocab*d)"}  # fmt: skip
    return Case(name, impls, flops=flops, bound="compute", flop_dtype=dtype, params=params,
                atol=5e-2 if low else 1e-4, rtol=5e-2 if low else 1e-4)  # fmt: skip


def generate_case(device, dtype, label, vocab, d, layers, heads, experts, b, _s, p, new) -> Case:
    model = _model(device, dtype, vocab, d, layers, heads, experts, p + new).eval()
    g = torch.Generator(device="cpu").manual_seed(2)
    prompt = torch.randint(0, vocab, (b, p), generator=g).to(device)

    def gen(use_cache: bool):
        return lambda: model.generate(prompt, new, seed=0, use_cache=use_cache)[:, p:]

    impls = [Impl("recompute (torch sdpa + expert loop)", _variant(model, "torch", "torch")(gen(False)),
                  baseline=True)]  # fmt: skip
    impls += [Impl(name.replace("torch (", "kv-cache (torch "), _variant(model, impl, be)(gen(True)),
                   baseline=i < 2) for i, (name, impl, be) in enumerate(VARIANTS)]  # fmt: skip
    total = p + new
    flops = 2 * _matmul_params(model) * b * total + 2 * b * layers * d * total * total
    name = f"generate {label} B{b} prompt{p} new{new} d{d} L{layers} E{experts} {DTYPE_NAMES[dtype]}"
    params = {"kind": "generate", "batch": b, "prompt": p, "new_tokens": new, "d_model": d,
              "n_layers": layers, "n_heads": heads, "experts": experts, "vocab": vocab,
              "dtype": DTYPE_NAMES[dtype], "tokens_per_call": b * new,
              "flop_rule": "2*N_act*B*S + 2*B*L*d*S^2 (S = prompt + new)"}  # fmt: skip
    return Case(name, impls, flops=flops, bound="compute", flop_dtype=dtype, params=params,
                check=token_agreement_check(exact=dtype == torch.float32))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main(only=["glam"]))
