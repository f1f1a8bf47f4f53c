"""Benchmark: fused attention (fastgen) vs every torch SDPA backend pinned one at a time, and flash-attn.

Providers, side by side in each case:

* ``sdpa[flash]``, ``sdpa[efficient]``, ``sdpa[cudnn]``, ``sdpa[math]``: ``F.scaled_dot_product_attention``
  inside ``torch.nn.attention.sdpa_kernel([SDPBackend.X])``. A backend that refuses the case (flash with a
  mask, cuDNN on CPU, ...) is probed once while the case is built and shows as ``skipped: unsupported:
  <torch's reasons>``. ``sdpa[math]`` is skipped where it would materialise more than 2**31 scores (its
  fp32 score matrix alone would pass 8 GiB).
* ``flash-attn``: ``flash_attn.flash_attn_func`` (``flash_attn_varlen_func`` for the packed case) on
  (B, S, H, D) copies of the inputs, when the package imports; it takes no mask / bias.
* ``fastgen[triton]`` (the GPU kernels) and ``fastgen[torch]`` (the fallback; timed on CPU only): the
  SDPA drop-in ``fastgen.scaled_dot_product_attention`` called exactly as torch's, and
  ``fastgen.flash_attn_varlen`` for the packed case.

Every provider is a baseline (a speed-up column each) and none is the oracle: each output is judged by the
flash-attention rule of the test suite (DESIGN.md rule 5) -- max |error| against ``attention_ref`` in
float64 at most 2x the error of ``attention_ref`` run in the inputs' dtype, + atol (fp16 2e-3, bf16
1e-2) -- on the output and on every gradient (dq, dk, dv and dbias). The check covers the first few
(batch, head) pairs only (at most 2**28 score elements), which attention keeps independent. A fastgen
row that breaks the rule is WRONG and the run exits 1; a baseline that does is flagged only.

Modes: ``fwd`` (inputs without grad), ``bwd`` (the backward alone: one forward kept with
``retain_graph=True`` outside the timed region -- only one provider's graph alive at a time -- and
``torch.autograd.grad`` timed with a fixed output gradient), ``fwd+bwd``.

FLOPs (the flash-attention papers' convention): forward ``4 * B * H * Sq * Sk * D`` (two matmuls),
halved when causal; backward 2.5x the forward (five matmuls), fwd+bwd 3.5x. Key-padding-masked cases
count every key (the kernels visit them); the packed varlen case counts only real tokens,
``4 * H * D * sum(L_i^2)``, for every provider, so the padded SDPA rows show the useful TFLOP/s. %roof is
against the dense fp16 / bf16 tensor-core peak of known GPUs (fastgen/bench/device.py).
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import fastgen
from fastgen._backend import Call
from fastgen.bench import Case, Check, Impl, backend_impls, headline_mode, main, register
from fastgen.ops.attention import attention_ref, flash_attention, flash_attn_varlen_ref

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - torch < 2.3
    SDPBackend = sdpa_kernel = None

try:
    import flash_attn

    FLASH_ATTN_ERR = None
except Exception as e:
    flash_attn = None
    FLASH_ATTN_ERR = f"flash_attn is not importable ({type(e).__name__}: {e})"

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 2e-5}
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
SDPA_ENUM = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}
SDPA_BACKENDS = tuple(SDPA_ENUM)
MATH_MAX_SCORES = 2**31  # sdpa[math] materialises B*H*Sq*Sk scores (fp32 on GPU)
CHECK_MAX_SCORES = 2**28  # the float64 oracle runs on (batch, head) pairs covering at most this many scores
TOKENS = 16384  # batch * seq of the sweep


# =====================================================================================================
# Problems: one set of inputs, shared by the three modes
# =====================================================================================================


@dataclass
class Problem:
    """Inputs in SDPA's layout: q (B, H, Sq, D), k / v (B, H, Sk, D), dout like the output.

    mask: bool key padding (B, 1, 1, Sk), True = attend; bias: float (1, H, Sq, Sk), gets a gradient;
    lens: the packed case's sequence lengths (q / k / v then hold the padded batch, B = len(lens)).
    """

    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    causal: bool = False
    mask: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    lens: list[int] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    _ref: dict[str, Any] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    def fwd_flops(self) -> float:
        b, h, sq, d = self.q.shape
        if self.lens is not None:
            return 4.0 * h * d * sum(n * n for n in self.lens)
        return 4.0 * b * h * sq * self.k.shape[2] * d / (2 if self.causal else 1)

    def check_heads(self) -> tuple[int, int]:
        """(batches, heads) the oracle covers: whole batches when a bias is shared across them."""
        b, h, sq, _ = self.q.shape
        per_head = sq * self.k.shape[2]
        nb = b if self.bias is not None or self.lens is not None else 1
        nh = max(1, min(h, CHECK_MAX_SCORES // (per_head * nb)))
        if nh == h and self.bias is None and self.lens is None:
            nb = max(1, min(b, CHECK_MAX_SCORES // (per_head * h)))
        return nb, nh

    # ---- the packed layout of the varlen case ----------------------------------------------------

    def valid(self) -> torch.Tensor:
        """(B, L) bool: which rows of the padded batch are real tokens."""
        pos = torch.arange(self.q.shape[2], device=self.q.device)
        return pos[None, :] < torch.tensor(self.lens, device=self.q.device)[:, None]

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, L, D) padded -> (total, H, D) packed (real tokens in sequence order)."""
        return t.transpose(1, 2)[self.valid()]

    def cu_seqlens(self) -> torch.Tensor:
        cu = [0, *itertools.accumulate(self.lens)]
        return torch.tensor(cu, dtype=torch.int32, device=self.q.device)

    # ---- the oracle --------------------------------------------------------------------------------

    def canonical(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """A provider's tensor in the oracle's layout and slice: (b, h, s, d), or packed (total, h, d)."""
        nb, nh = self.check_heads()
        if name == "dbias":
            return t[:, :nh]
        if self.lens is not None:
            return (self.pack(t) if t.dim() == 4 else t)[:, :nh]
        return t[:nb, :nh]

    def reference(self) -> dict[str, Any]:
        """{upcast: {name: tensor}} for the output and every gradient, float64 and the inputs' dtype."""
        if self._ref is None:
            self._ref = {True: self._run_ref(True), False: self._run_ref(False)}
        return self._ref

    def _run_ref(self, upcast: bool) -> dict[str, torch.Tensor]:
        nb, nh = self.check_heads()
        dt = torch.float64 if upcast else self.dtype
        names = ["dq", "dk", "dv"] + (["dbias"] if self.bias is not None else [])
        if self.lens is not None:
            src = [self.pack(t)[:, :nh] for t in (self.q, self.k, self.v)]
            dout = self.pack(self.dout)[:, :nh].to(dt)
        else:
            src = [t[:nb, :nh] for t in (self.q, self.k, self.v)]
            dout = self.dout[:nb, :nh].to(dt)
        if self.bias is not None:
            src.append(self.bias[:, :nh])
        leaves = [t.detach().to(dt).clone().requires_grad_() for t in src]
        with torch.enable_grad():
            if self.lens is not None:
                cu = self.cu_seqlens()
                out = flash_attn_varlen_ref(*leaves[:3], cu, cu, upcast=upcast)
            else:
                mask = leaves[3] if self.bias is not None else self.mask
                if mask is not None and mask.dtype == torch.bool:
                    mask = mask[:nb]
                out = attention_ref(*leaves[:3], attn_mask=mask, is_causal=self.causal, upcast=upcast)
            grads = torch.autograd.grad(out, leaves, dout)
        return {"out": out.detach(), **{n: g for n, g in zip(names, grads)}}

    def check(self, mode: str) -> Callable[[Any], Check]:
        names = (["out"] if mode != "bwd" else []) + (
            ["dq", "dk", "dv"] + (["dbias"] if self.bias is not None else []) if mode != "fwd" else []
        )

        def judge(out: Any) -> Check:
            got = [out] if isinstance(out, torch.Tensor) else list(out)
            if len(got) != len(names):
                return Check(False, None, f"expected {names}, got {len(got)} tensors")
            ref = self.reference()
            atol, low = ATOL[self.dtype], DTYPE_NAMES[self.dtype]
            worst, notes = 0.0, []
            for name, t in zip(names, got):
                a = self.canonical(t.detach(), name).double()
                want, same = ref[True][name], ref[False][name].double()
                if a.shape != want.shape:
                    return Check(False, None, f"{name}: shape {tuple(a.shape)} vs {tuple(want.shape)}")
                if not torch.isfinite(a).all():
                    return Check(False, None, f"{name}: non-finite values")
                err = float((a - want).abs().max())
                base = float((same - want).abs().max())
                worst = max(worst, err)
                if err > 2 * base + atol:
                    notes.append(f"{name}: error {err:.3g} > 2 x torch-{low}'s {base:.3g} + {atol:g}")
            return Check(not notes, worst, "; ".join(notes))

        return judge


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(
    shape: Sequence[int], g: torch.Generator, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=g).to(device, dtype)


def dense_problem(
    device: torch.device,
    dtype: torch.dtype,
    b: int,
    h: int,
    sq: int,
    d: int,
    *,
    sk: int | None = None,
    causal: bool = False,
    pad: bool = False,
    bias: bool = False,
    label: str = "",
) -> Problem:
    sk = sq if sk is None else sk
    g = _seeded(0)
    q = _randn((b, h, sq, d), g, device, dtype)
    k = _randn((b, h, sk, d), g, device, dtype)
    v = _randn((b, h, sk, d), g, device, dtype)
    dout = _randn((b, h, sq, d), g, device, dtype)
    mask = bias_t = None
    shape = f"b{b} h{h} s{sq}" + (f"x{sk}" if sk != sq else "") + f" d{d}"
    extras = []
    if pad:  # key padding: lengths spread over [Sk/2, Sk], ~25% of the keys are padding
        lens = [sk - (sk // 2) * i // max(1, b - 1) for i in range(b)] if b > 1 else [sk * 3 // 4]
        mask = (torch.arange(sk)[None, :] < torch.tensor(lens)[:, None]).to(device)[:, None, None, :]
        extras.append("keypad")
    if bias:
        bias_t = _randn((1, h, sq, sk), g, device, dtype)
        extras.append("bias")
    if causal:
        extras.append("causal")
    name = " ".join([label, shape, *extras, DTYPE_NAMES[dtype]]).strip()
    params = {"batch": b, "heads": h, "seq_q": sq, "seq_k": sk, "head_dim": d, "causal": causal,
              "key_padding": pad, "bias": bias, "dtype": DTYPE_NAMES[dtype], "label": label}  # fmt: skip
    return Problem(name, q, k, v, dout, causal=causal, mask=mask, bias=bias_t, params=params)


def varlen_problem(device: torch.device, dtype: torch.dtype, lens: list[int], h: int, d: int) -> Problem:
    """A padded (B, H, Lmax, D) batch whose real tokens are the packed sequences; dout is 0 on padding."""
    b, lmax = len(lens), max(lens)
    g = _seeded(1)
    q, k, v, dout = (_randn((b, h, lmax, d), g, device, dtype) for _ in range(4))
    valid = (torch.arange(lmax)[None, :] < torch.tensor(lens)[:, None]).to(device)
    dout = dout * valid[:, None, :, None]
    mask = valid[:, None, None, :]
    counts = {n: lens.count(n) for n in sorted(set(lens))}
    mix = "+".join(f"{c}x{n}" for n, c in counts.items())
    params = {"lens": counts, "heads": h, "head_dim": d, "tokens": sum(lens), "padded_to": lmax,
              "dtype": DTYPE_NAMES[dtype], "varlen": True}  # fmt: skip
    name = f"varlen {mix} h{h} d{d} {DTYPE_NAMES[dtype]}"
    return Problem(name, q, k, v, dout, mask=mask, lens=list(lens), params=params)


# =====================================================================================================
# Providers and modes
# =====================================================================================================


class _Live:
    """The one retained forward graph of the ``bwd`` mode (a new owner frees the previous one)."""

    owner: object = None
    out: Any = None

    @classmethod
    def clear(cls) -> None:
        cls.owner = cls.out = None


@dataclass
class Provider:
    """``fn(*inputs) -> out`` on its own layout; ``inputs``: q, k, v (+ bias); ``dout`` in out's layout;
    ``back(t)``: a view of one of its outputs / gradients in SDPA's layout (or packed)."""

    inputs: list[torch.Tensor]
    fn: Callable[..., torch.Tensor]
    dout: torch.Tensor
    back: Callable[[torch.Tensor], torch.Tensor] = lambda t: t


def make_runner(p: Provider, mode: str, grad_bias: bool) -> Callable[[], Any]:
    n_grad = len(p.inputs) if grad_bias else 3
    if mode == "fwd":
        xs = [t.detach() for t in p.inputs]
        return lambda: p.back(p.fn(*xs))
    xs = [t.detach().requires_grad_(i < n_grad) for i, t in enumerate(p.inputs)]
    leaves = xs[:n_grad]
    if mode == "fwd+bwd":

        def fwd_bwd() -> tuple[torch.Tensor, ...]:
            out = p.fn(*xs)
            grads = torch.autograd.grad(out, leaves, p.dout)
            return (p.back(out), *map(p.back, grads))

        return fwd_bwd
    key = object()

    def bwd() -> tuple[torch.Tensor, ...]:
        if _Live.owner is not key:  # first call (the harness's warm-up), outside any timed rep
            _Live.clear()
            _Live.owner, _Live.out = key, p.fn(*xs)
        return tuple(map(p.back, torch.autograd.grad(_Live.out, leaves, p.dout, retain_graph=True)))

    return bwd


def _to_bshd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).contiguous()


def _bhsd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2) if t.dim() == 4 else t


def sdpa_provider(prob: Problem, call: Callable[..., torch.Tensor], backend: str | None) -> Provider:
    """torch's (or fastgen's drop-in) SDPA on the padded / dense batch, optionally pinned to a backend."""
    attn = prob.bias if prob.bias is not None else prob.mask
    pinned = getattr(SDPBackend, SDPA_ENUM[backend]) if backend else None
    causal = prob.causal

    def fn(q, k, v, *bias):
        m = bias[0] if bias else attn
        if pinned is None:
            return call(q, k, v, attn_mask=m, is_causal=causal)
        with sdpa_kernel([pinned]):
            return call(q, k, v, attn_mask=m, is_causal=causal)

    inputs = [prob.q, prob.k, prob.v] + ([prob.bias] if prob.bias is not None else [])
    return Provider(inputs, fn, prob.dout)


def flash_attn_provider(prob: Problem) -> Provider:
    if prob.lens is not None:
        cu, lmax = prob.cu_seqlens(), max(prob.lens)
        q, k, v, dout = (prob.pack(t).contiguous() for t in (prob.q, prob.k, prob.v, prob.dout))
        return Provider(
            [q, k, v], lambda q, k, v: flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, lmax, lmax), dout
        )
    causal = prob.causal
    return Provider(
        [_to_bshd(t) for t in (prob.q, prob.k, prob.v)],
        lambda q, k, v: flash_attn.flash_attn_func(q, k, v, causal=causal),
        _to_bshd(prob.dout),
        _bhsd,
    )


def fastgen_provider(prob: Problem, deterministic: bool | None = None) -> Provider:
    """deterministic=None: the default backward (atomic dQ); True: the two-pass bit-reproducible one."""
    if prob.lens is not None:
        cu, lmax = prob.cu_seqlens(), max(prob.lens)
        q, k, v, dout = (prob.pack(t).contiguous() for t in (prob.q, prob.k, prob.v, prob.dout))

        def varlen(q, k, v):
            return fastgen.flash_attn_varlen(q, k, v, cu, cu, lmax, lmax, deterministic=deterministic)

        return Provider([q, k, v], varlen, dout)

    def sdpa(q, k, v, attn_mask=None, is_causal=False):
        bias, mask = (
            (None, attn_mask)
            if attn_mask is not None and attn_mask.dtype == torch.bool
            else (attn_mask, None)
        )
        return flash_attention(q, k, v, bias=bias, mask=mask, causal=is_causal, deterministic=deterministic)

    return sdpa_provider(prob, fastgen.scaled_dot_product_attention if deterministic is None else sdpa, None)


def _triton_forced(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with fastgen.use_backend("triton", op="attention"):
            return fn()

    return run


def probe(run: Callable[[], Any]) -> str | None:
    """Run once; None when it works, else why the provider refuses the case (torch's warnings + error)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run()
            return None
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
            msgs = [
                re.sub(r"\s*\(Triggered internally at [^)]*\)", "", str(w.message)).strip() for w in caught
            ]
            msgs = [m.replace("\n", " ") for m in dict.fromkeys(msgs) if m]
            reason = "; ".join([*msgs, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"])
            kind = "out of memory" if isinstance(e, torch.OutOfMemoryError) else "unsupported"
            return f"{kind}: " + (reason if len(reason) <= 400 else reason[:397] + "...")
        finally:
            _Live.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def make_case(device: torch.device, prob: Problem, mode: str) -> Case:
    _Live.clear()  # the previous case's retained graph
    grad_bias = prob.bias is not None
    scores = prob.q.shape[0] * prob.q.shape[1] * prob.q.shape[2] * prob.k.shape[2]
    impls: list[Impl] = []
    for backend in SDPA_BACKENDS:
        name = f"sdpa[{backend}]"
        if sdpa_kernel is None:
            impls.append(
                Impl.skipped(name, "torch.nn.attention.sdpa_kernel is missing (torch < 2.3)", baseline=True)
            )
            continue
        if backend in ("efficient", "cudnn") and device.type != "cuda":
            impls.append(
                Impl.skipped(
                    name, f"unsupported: torch has no {backend} kernel for {device.type}", baseline=True
                )
            )
            continue
        if backend == "math" and device.type == "cuda" and scores > MATH_MAX_SCORES:
            why = (
                f"materialises {scores / 2**30:.0f} Gi scores (> 2 Gi, 8 GiB in fp32): "
                "left out to bound memory and time"
            )
            impls.append(Impl.skipped(name, why, baseline=True))
            continue
        run = make_runner(sdpa_provider(prob, F.scaled_dot_product_attention, backend), mode, grad_bias)
        why = probe(run)
        impls.append(Impl.skipped(name, why, baseline=True) if why else Impl(name, run, baseline=True))
    if flash_attn is None:
        impls.append(Impl.skipped("flash-attn", FLASH_ATTN_ERR, baseline=True))
    elif (prob.mask is not None and prob.lens is None) or prob.bias is not None:
        impls.append(
            Impl.skipped("flash-attn", "unsupported: flash_attn_func takes no mask or bias", baseline=True)
        )
    else:
        run = make_runner(flash_attn_provider(prob), mode, False)
        why = probe(run)
        impls.append(
            Impl.skipped("flash-attn", why, baseline=True) if why else Impl("flash-attn", run, baseline=True)
        )

    call = Call(device, prob.dtype, {"head_dim": prob.q.shape[-1], "head_dim_v": prob.v.shape[-1]})
    provider = fastgen_provider(prob)
    for impl in backend_impls("attention", call, lambda backend: make_runner(provider, mode, grad_bias)):
        if impl.name == "fastgen[torch]" and device.type == "cuda" and impl.skip is None:
            impl = Impl.skipped(impl.name, "the fallback path (scores materialised): timed on CPU only")
        impls.append(impl)
        if impl.name == "fastgen[triton]" and impl.skip is None and mode != "fwd":
            det = make_runner(fastgen_provider(prob, deterministic=True), mode, grad_bias)
            impls.append(Impl("fastgen[triton,det]", _triton_forced(det)))
    flops = prob.fwd_flops() * FLOP_FACTOR[mode]
    return Case(
        f"{mode:<7} {prob.name}",
        impls,
        flops=int(flops),
        bound="compute",
        flop_dtype=prob.dtype,
        params={
            **prob.params,
            "mode": mode,
            "flop_rule": "4*B*H*Sq*Sk*D fwd (/2 causal); bwd x2.5; fwd+bwd x3.5",
        },
        check=prob.check(mode),
    )


# =====================================================================================================
# The case list
# =====================================================================================================

VARLEN_LENS = [256, 576] * 20  # 16x16 and 24x24 patch grids, 16,640 tokens


def problems(device: torch.device, quick: bool):
    """Yields zero-argument problem builders (so that one problem's tensors are alive at a time) with the
    modes to run on each."""
    dense = lambda *a, **kw: lambda: dense_problem(device, *a, **kw)
    fp16, bf16 = torch.float16, torch.bfloat16
    if device.type != "cuda":  # CPU: small shapes; the torch backend and torch's CPU kernels
        yield dense(fp16, 2, 2, 128, 64, causal=True), MODES
        if not quick:
            yield dense(bf16, 4, 4, 256, 64), MODES
            yield dense(fp16, 2, 4, 64, 128, sk=80), MODES
        yield dense(bf16, 2, 2, 64, 32, pad=True), ("fwd",)
        yield dense(fp16, 1, 2, 64, 32, bias=True), ("fwd+bwd",)
        yield (lambda: varlen_problem(device, bf16, [16, 36, 36, 16], 2, 32)), ("fwd+bwd",)
        return
    if quick and headline_mode():  # the ratios the README quotes: seq 4k, bf16, hd 64 / 128, one masked case
        yield dense(bf16, TOKENS // 4096, 32, 4096, 64, causal=True), ("fwd", "fwd+bwd")
        yield dense(bf16, TOKENS // 4096, 16, 4096, 128, causal=True), ("fwd", "fwd+bwd")
        yield dense(bf16, TOKENS // 4096, 16, 4096, 128, pad=True), ("fwd+bwd",)
        return
    if quick:
        yield dense(bf16, 8, 16, 2048, 128, causal=True), MODES
        yield dense(fp16, 8, 16, 1024, 64, bias=True), ("fwd+bwd",)
        yield (lambda: varlen_problem(device, bf16, VARLEN_LENS, 16, 64)), ("fwd+bwd",)
        return
    for dtype, d, seq, causal in itertools.product(
        (fp16, bf16), (64, 128), (512, 1024, 2048, 4096, 8192, 16384), (False, True)
    ):
        yield dense(dtype, TOKENS // seq, 32 if d == 64 else 16, seq, d, causal=causal), MODES
    for dtype in (fp16, bf16):  # the shapes fastgen's models run
        yield dense(dtype, 256, 8, 77, 64, causal=True, label="CLIP-text"), MODES
        yield dense(dtype, 256, 16, 257, 64, label="ViT-L/14"), MODES
        yield dense(dtype, 8, 16, 1024, 64, sk=1024 + 128, label="GLIDE"), MODES
        yield dense(dtype, 8, 16, 1280, 64, causal=True, label="DALL-E"), MODES
    for seq in (1024, 2048):
        yield dense(bf16, TOKENS // seq, 16, seq, 128, pad=True), MODES
        yield dense(bf16, TOKENS // seq, 16, seq, 128, bias=True), MODES
    for dtype in (fp16, bf16):
        yield (lambda dtype=dtype: varlen_problem(device, dtype, VARLEN_LENS, 16, 64)), MODES


@register(
    op="attention", description="attention fwd / bwd / fwd+bwd: fastgen vs torch SDPA backends vs flash-attn"
)
def attention_cases(device: torch.device, quick: bool):
    for build, modes in problems(device, quick):
        yield from problem_cases(device, build, modes)


def problem_cases(device: torch.device, build: Callable[[], Problem], modes: Sequence[str]):
    prob = build()
    for mode in modes:
        yield make_case(device, prob, mode)
    _Live.clear()


if __name__ == "__main__":
    raise SystemExit(main(only=["attention"]))
