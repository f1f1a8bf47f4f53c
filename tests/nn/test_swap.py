"""swap_attention / unswap_attention: every kind of attention module, outputs equal before and after."""

import copy
import gc
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import scaled_dot_product_attention as sdpa_alias

import fastgen
import fastgen.ops.attention as fa
from fastgen.nn import MultiheadAttention, SwapReport, swap_attention, unswap_attention
from fastgen.nn.swap import sdpa_scope

TORCH_SDPA = F.scaled_dot_product_attention


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/nn/conftest.py


@pytest.fixture
def fastgen_calls(monkeypatch):
    """Counts calls of fastgen's attention: its fused op or, where torch's SDPA serves the call for it
    (CPU), fastgen's route to it (every fastgen attention path goes through one of them)."""
    calls = []
    for name in ("_attention_fwd_op", "_via_torch_sdpa", "_sdpa_direct"):
        real = getattr(fa, name)
        monkeypatch.setattr(fa, name, lambda *a, _real=real: calls.append(1) or _real(*a))
    return calls


class ViTBlock(nn.Module):
    """A ViT-style block calling F.scaled_dot_product_attention in its forward."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(o.transpose(1, 2).reshape(b, n, c))


class AliasAttention(nn.Module):
    """Uses the module-level name from `from torch.nn.functional import scaled_dot_product_attention as ...`."""

    def forward(self, x, mask=None):
        q = x.unflatten(-1, (2, -1)).transpose(1, 2)
        return sdpa_alias(q, q, q, attn_mask=mask).transpose(1, 2).flatten(-2)


class Sdpa2Processor:
    """A diffusers AttnProcessor2_0 stand-in: a plain object, called by the attention module."""

    def __call__(self, attn, hidden_states, attention_mask=None):
        b, n, c = hidden_states.shape
        q, k, v = (lin(hidden_states).view(b, n, attn.heads, -1).transpose(1, 2) for lin in attn.to_qkv)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return attn.to_out(o.transpose(1, 2).reshape(b, n, c))


class ClassicProcessor:
    """diffusers' AttnProcessor (no SDPA): wrapped too, harmlessly."""

    def __call__(self, attn, hidden_states, attention_mask=None):
        return attn.to_out(hidden_states)


class DiffusersAttention(nn.Module):
    def __init__(self, dim=16, heads=2, processor=None):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.ModuleList([nn.Linear(dim, dim) for _ in range(3)])
        self.to_out = nn.Linear(dim, dim)
        self.set_processor(processor or Sdpa2Processor())

    def set_processor(self, processor):
        self.processor = processor

    def forward(self, hidden_states, attention_mask=None):
        return self.processor(self, hidden_states, attention_mask=attention_mask)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.cross = nn.MultiheadAttention(16, 4, kdim=8, vdim=8)
        self.vit = ViTBlock()
        self.alias = AliasAttention()
        self.unet = nn.ModuleList([DiffusersAttention(), DiffusersAttention(processor=ClassicProcessor())])

    def forward(self, x, ctx, kpm=None):
        x = self.encoder(x, src_key_padding_mask=kpm)
        x = x + self.cross(x.transpose(0, 1), ctx, ctx, need_weights=False)[0].transpose(0, 1)
        x = self.alias(self.vit(x))
        for blk in self.unet:
            x = x + blk(x)
        return x


def data():
    x, ctx = torch.randn(2, 6, 16), torch.randn(4, 2, 8)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    return x, ctx, kpm


def test_swap_model_matches_and_reports(fastgen_calls):
    model = Model()
    x, ctx, kpm = data()
    ref = model(x, ctx, kpm)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    n_params = len(model.state_dict())

    report = swap_attention(model)
    assert isinstance(report, SwapReport)
    assert sorted(report.names("mha")) == [
        "cross",
        "encoder.layers.0.self_attn",
        "encoder.layers.1.self_attn",
    ]
    assert report.names("sdpa-forward") == ["vit", "alias"]
    assert report.names("processor") == ["unet.0", "unet.1"]
    assert "ClassicProcessor runs with fastgen SDPA (no SDPA call seen" in str(report)
    text = str(report)
    assert "[mha] cross" in text and "[processor] unet.0" in text and "[sdpa-forward] vit" in text
    assert isinstance(model.cross, MultiheadAttention) and len(model.state_dict()) == n_params
    # F's SDPA is fastgen's dispatcher while the model is swapped (torch's outside swapped calls)
    assert getattr(F.scaled_dot_product_attention, "__wrapped__", None) is TORCH_SDPA

    out = model(x, ctx, kpm)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # 2 encoder layers + cross + vit + alias + processor
    assert len(fastgen_calls) == 6
    out.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], atol=1e-4, rtol=1e-4, msg=n)

    assert unswap_attention(model) > 0
    assert type(model.cross) is nn.MultiheadAttention
    assert isinstance(model.unet[0].processor, Sdpa2Processor)
    assert "forward" not in vars(model.vit) and model.encoder.use_nested_tensor
    assert not model.encoder.layers[0].self_attn._forward_pre_hooks
    fastgen_calls.clear()
    torch.testing.assert_close(model(x, ctx, kpm), ref)
    assert not fastgen_calls
    assert unswap_attention(model) == 0
    assert F.scaled_dot_product_attention is TORCH_SDPA


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_transformer_encoder_eval_fast_path_is_replaced(fastgen_calls):
    # eval + no_grad: torch's layer/encoder fast paths would skip self_attn.forward entirely
    model = Model().eval()
    x, ctx, kpm = data()
    keep = ~kpm[..., None]  # torch's nested-tensor path zeroes padded positions: compare the others
    with torch.no_grad(), fastgen.use_backend("torch"):  # forced: fastgen is asked to serve every call
        ref_enc = model.encoder(x, src_key_padding_mask=kpm)
        ref = model(x, ctx)
        swap_attention(model)
        enc = model.encoder(x, src_key_padding_mask=kpm)
        assert len(fastgen_calls) == 2
        torch.testing.assert_close(enc * keep, ref_enc * keep, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x, ctx), ref, atol=1e-5, rtol=1e-5)
        assert len(fastgen_calls) == 8
    assert not model.training and not model.cross.training  # modes preserved


def test_transformer_encoder_fast_path_kept_where_torch_sdpa_would_serve(fastgen_calls):
    # rule 11: on CPU fastgen would run torch's SDPA anyway; torch's fused inference fast path is faster
    model = Model().eval()
    x, _, kpm = data()
    report = swap_attention(model)
    assert "fast path kept" in str(report) and model.encoder.use_nested_tensor
    with torch.no_grad():
        model.encoder(x, src_key_padding_mask=kpm)
    assert not fastgen_calls  # torch's fast path served inference
    model.encoder(x, src_key_padding_mask=kpm)  # with grad: fastgen's module serves
    assert len(fastgen_calls) == 2


def test_include_exclude_and_pinning(fastgen_calls):
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ViTBlock()
            self.other = ViTBlock()

        def forward(self, x):
            return F.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None])[:, 0] + self.inner(x)

    m = Outer()
    x = torch.randn(2, 5, 16)
    ref = m(x)
    report = swap_attention(m, exclude="inner")
    assert report.names() == ["", "other"]
    assert any(n == "inner" and "exclude" in why for n, why in report.skipped)
    assert any("pinned" in note for note in report.notes)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    assert len(fastgen_calls) == 1  # the outer call only: inner keeps torch's SDPA
    unswap_attention(m)
    report = swap_attention(m, include=["other"])
    assert report.names() == ["other"]
    report = swap_attention(m, include=lambda name, mod: name == "inner")  # second swap adds to the first
    assert report.names() == ["inner"]
    unswap_attention(m)
    assert not any("forward" in vars(mod) for mod in m.modules())


def test_patch_is_scoped_reentrant_threadsafe_and_exception_safe(fastgen_calls):
    gc.collect()  # swapped modules of earlier tests hold F's dispatcher until they are collected
    q = torch.randn(1, 2, 4, 8)
    seen, inside, release = {}, threading.Event(), threading.Event()

    def call(name):
        before = len(fastgen_calls)
        out = F.scaled_dot_product_attention(q, q, q)
        seen[name] = len(fastgen_calls) > before
        torch.testing.assert_close(out, TORCH_SDPA(q, q, q), atol=1e-5, rtol=1e-5)

    def other_thread():
        inside.wait()
        call("other")
        release.set()

    th = threading.Thread(target=other_thread)
    th.start()
    with sdpa_scope():
        with sdpa_scope():
            assert F.scaled_dot_product_attention is not TORCH_SDPA
        inside.set()
        release.wait(5)
        call("here")
        with sdpa_scope(False):
            call("off")
    th.join()
    assert seen == {"other": False, "here": True, "off": False}
    assert F.scaled_dot_product_attention is TORCH_SDPA

    class Boom(nn.Module):
        def forward(self, x):
            F.scaled_dot_product_attention(x, x, x)
            raise KeyError("boom")

    b = Boom()
    swap_attention(b)
    with pytest.raises(KeyError):
        b(q)
    before = len(fastgen_calls)
    F.scaled_dot_product_attention(q, q, q)  # the dispatcher stays while b is swapped, serving torch's
    assert len(fastgen_calls) == before + 0
    unswap_attention(b)
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert globals()["sdpa_alias"] is TORCH_SDPA


def test_module_processor_and_deepcopy(fastgen_calls):
    class ModuleProcessor(nn.Module):  # a processor with weights (IP-adapter style) stays in the tree
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(0.5))

        def forward(self, attn, hidden_states, attention_mask=None):
            return self.scale * Sdpa2Processor()(attn, hidden_states, attention_mask)

    m = DiffusersAttention(processor=ModuleProcessor())
    x = torch.randn(2, 5, 16)
    ref = m(x)
    keys = list(m.state_dict())
    report = swap_attention(m)
    assert report.names("processor") == [""] and list(m.state_dict()) == keys
    m2 = copy.deepcopy(m)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m2(x), ref, atol=1e-5, rtol=1e-5)
    assert len(fastgen_calls) == 2
    m2.processor.scale.data.fill_(0.0)  # the copy's wrapped forward runs the copy
    assert m2(x).abs().max() == 0 and m(x).abs().max() > 0


def test_fully_masked_rows_and_triton_backend():
    m = ViTBlock(16, 2)
    x = torch.randn(1, 7, 16)
    ref = m(x)
    swap_attention(m)
    with fastgen.use_backend("triton"):
        out = m(x)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    a = AliasAttention()
    swap_attention(a)
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2] = False
    y = a(torch.randn(1, 5, 16), mask)
    assert torch.isfinite(y).all() and (y[0, 2] == 0).all()  # zeros where torch gives NaN


def test_errors():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        swap_attention(object())
    with pytest.raises(TypeError, match="include"):
        swap_attention(nn.Linear(2, 2), include=[1])
    report = swap_attention(nn.MultiheadAttention(8, 2))
    assert not report.replaced and "from_torch" in str(report)

    class MyMHA(nn.MultiheadAttention):  # custom behaviour: left alone
        pass

    seq = nn.Sequential(MyMHA(8, 2))
    report = swap_attention(seq)
    assert not report.replaced and "MyMHA subclasses" in str(report) and type(seq[0]) is MyMHA


def _route(monkeypatch):
    seen = []
    for name in ("_attention_fwd_op", "_via_torch_sdpa", "_sdpa_direct"):
        real = getattr(fa, name)
        monkeypatch.setattr(fa, name, lambda *a, _n=name, _r=real: seen.append(_n) or _r(*a))
    return seen


@pytest.mark.parametrize(
    "kw, route",
    [
        ({}, "_via_torch_sdpa"),
        ({"mask": True, "causal": "bottom_right"}, "_via_torch_sdpa"),
        ({"bias": True, "mask": True, "causal": True}, "_via_torch_sdpa"),
        ({"bias": "grad"}, "_attention_fwd_op"),  # the bias gradient is fastgen's
        ({"dropout_p": 0.5, "seed": 3}, "_attention_fwd_op"),  # a seeded dropout stream is fastgen's
    ],
)
def test_cpu_dispatch_serves_sdpa_expressible_calls_through_torch_sdpa(monkeypatch, kw, route):
    # rule 11: torch's fused CPU SDPA serves what it can express; the result is fastgen's either way
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2, :3], v[:, :2, :3]  # GQA, Sq != Sk
    args = dict(kw)
    if "mask" in args:
        args["mask"] = torch.rand(2, 1, 5, 3, generator=g) > 0.3
    if "bias" in args:
        args["bias"] = torch.randn(1, 4, 5, 3, generator=g, dtype=torch.float64).mul(30)
        args["bias"].requires_grad_(kw["bias"] == "grad")
    seen = _route(monkeypatch)
    out = fa.flash_attention(q, k, v, **args)
    assert seen == [route]
    if "dropout_p" not in kw:
        bias, mask = args.get("bias"), args.get("mask")
        attn = (
            mask
            if bias is None
            else bias.detach()
            if mask is None
            else bias.detach().masked_fill(~mask, -math.inf)
        )
        ref = fa.attention_ref(q, k, v, attn, args.get("causal", False), enable_gqa=True)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    with fastgen.use_backend("torch"):  # a forced backend serves as asked
        fa.flash_attention(q, k, v)
    assert seen[-1] == "_attention_fwd_op"


def test_compile_fullgraph_on_swapped_modules(fastgen_calls):
    # no lock, contextvar or patching in the traced path: dynamo traces fastgen's dispatch into one graph
    torch.manual_seed(0)
    blk = ViTBlock(16, 2)
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False
    )
    x = torch.randn(2, 7, 16)
    for m in (blk, enc):
        ref = m(x)
        swap_attention(m)
        fastgen_calls.clear()
        out = torch.compile(m, fullgraph=True, backend="eager")(x)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert fastgen_calls  # fastgen's attention served the compiled call
        unswap_attention(m)


@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_torch_backend_is_tiled_over_query_rows(monkeypatch, causal):
    # what the torch backend still serves (bias gradient, seeded dropout) runs in query-row tiles, never a
    # full score matrix: small tiles give the float64 reference's output and gradients
    tiles = []
    monkeypatch.setattr(
        fa,
        "_row_chunks",
        lambda sq, hq, sk: tiles.append(sq) or [(r, min(3, sq - r)) for r in range(0, sq, 3)],
    )
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    bias = torch.randn(1, 4, 8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 8, 6, generator=g) > 0.3
    out = fa.flash_attention(q, k, v, bias=bias, mask=mask, causal=causal)
    ref = fa.attention_ref(q, k, v, torch.where(mask, bias, -math.inf), causal, enable_gqa=True)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v, bias))
    refs = torch.autograd.grad((ref * w).sum(), (q, k, v, bias))
    assert tiles  # the torch backend served, in tiles of 3 rows
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    for got, want in zip(grads, refs):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    keep = fa.dropout_keep_mask("torch", (2, 4, 8, 6), 0.3, 11)
    out = fa.flash_attention(q, k, v, mask=mask, causal=causal, dropout_p=0.3, seed=11)
    ref = fa.attention_ref(q, k, v, mask, causal, enable_gqa=True, dropout_mask=keep, dropout_p=0.3)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
