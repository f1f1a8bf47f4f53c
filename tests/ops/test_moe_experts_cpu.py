"""The MoE layer's CPU expert path (fastgen.ops.grouped_mm.moe_experts_cpu): gather -> two GEMMs -> combine per
block of rows, against the float64 composition moe_unpermute(grouped_mm(grouped_mm(moe_permute(x)))), its
gradients, its edge cases and its peak memory (no (T*k, .) padded buffers)."""

import json
import os
import tempfile

import pytest
import torch

from fastgen import _ext
from fastgen.nn.moe import Top2MoE
from fastgen.ops import grouped_mm as gm
from fastgen.ops.grouped_mm import grouped_mm_ref, moe_experts_cpu
from fastgen.ops.moe_permute import moe_permute_ref, moe_route, moe_unpermute_ref

pytestmark = pytest.mark.skipif(_ext.C is None, reason="fastgen._C is not built")


def composition(x, routing, gates, w1, b1, w2, b2, act, upcast):
    """The padded-buffer pipeline in plain PyTorch (float64 when upcast)."""
    dt = torch.float64 if upcast else x.dtype
    buf = moe_permute_ref(x, routing, upcast=upcast).to(dt)
    cast = [None if t is None else t.to(dt) for t in (w1, b1, w2, b2)]
    h = grouped_mm_ref(buf, cast[0], routing.offsets, bias=cast[1], activation=act, upcast=upcast)
    o = grouped_mm_ref(h, cast[2], routing.offsets, bias=cast[3], upcast=upcast)
    return moe_unpermute_ref(o, routing, gates.to(dt), upcast=upcast)


def problem(t=53, e=5, d=12, f=20, act="gelu", bias=True, capacity=9, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n1 = 2 * f if act == "swiglu" else f
    x = torch.randn(t, d, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(t)]) if t else torch.empty(0, 2)
    routing = moe_route(idx.to(torch.int32), e, capacity)
    gates = torch.rand(t, 2, generator=g)
    w1 = (torch.randn(e, d, n1, generator=g) * d**-0.5).to(dtype)
    w2 = (torch.randn(e, f, d, generator=g) * f**-0.5).to(dtype)
    b1 = torch.randn(e, n1, generator=g).to(dtype) if bias else None
    b2 = torch.randn(e, d, generator=g).to(dtype) if bias else None
    return x, routing, gates, w1, b1, w2, b2


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize(
    "grouped, block_bytes",
    [(True, None), (False, None), (False, 1)],
    ids=["grouped", "per-expert", "16-row-blocks"],
)
@pytest.mark.parametrize(
    "act, bias, capacity",
    [("gelu", True, 20), ("swiglu", False, 20), ("relu", True, None), (None, True, 3)],
    ids=["gelu-dropping", "swiglu-nobias", "relu-dropless", "none-tight"],
)
def test_matches_composition_fwd_bwd(monkeypatch, grouped, block_bytes, act, bias, capacity):
    # grouped: the experts (~15 rows each) in one torch._grouped_mm block; per-expert: one mm each;
    # 16-row blocks: experts split, weight gradients accumulated over blocks
    monkeypatch.setattr(gm, "_FFN_GROUP_MIN_EXPERTS", 2)  # 5 experts here
    if not grouped:
        monkeypatch.setattr(gm, "_HAS_TORCH_GMM", False)
    if block_bytes is not None:
        monkeypatch.setattr(gm, "_FFN_BLOCK_BYTES", block_bytes)
    x, routing, gates, w1, b1, w2, b2 = problem(act=act or "none", bias=bias, capacity=capacity)
    off = routing.offsets.tolist()
    blocks = gm._ffn_blocks(off, x, 12, w1.shape[2], 20)
    assert any(blk.offs is not None for blk in blocks) == grouped
    split = any(blk.b - blk.a < off[blk.e0 + 1] - off[blk.e0] for blk in blocks)
    assert split == (block_bytes is not None and capacity != 3)
    ins = leaves(x, gates, w1, b1, w2, b2)
    y = moe_experts_cpu(ins[0], routing, *ins[1:], act)
    dy = torch.randn_like(y)
    used = [t for t in ins if t is not None]
    got = torch.autograd.grad(y, used, dy)
    ref_ins = leaves(x, gates, w1, b1, w2, b2)
    ref = composition(ref_ins[0], routing, ref_ins[1], *ref_ins[2:], act, upcast=True)
    want = torch.autograd.grad(ref, [t for t in ref_ins if t is not None], dy.double())
    same = composition(x, routing, gates, w1, b1, w2, b2, act, upcast=False)
    # float32: at most 2x the error of the same-dtype composition, plus a small atol
    assert max_err(y, ref) <= 2 * max_err(same, ref) + 2e-5
    for name, a, b in zip(["x", "gates", "w1", "b1", "w2", "b2"], got, want, strict=False):
        assert a.dtype == torch.float32, name
        scale = b.double().abs().max().item() + 1
        assert max_err(a, b) <= 1e-5 * scale, name


def test_float64_exact_and_no_grad_path():
    x, routing, gates, w1, b1, w2, b2 = problem(dtype=torch.float64)
    ref = composition(x, routing, gates, w1, b1, w2, b2, "silu", upcast=True)
    with torch.no_grad():  # the no-autograd path (nothing saved, activation in place)
        y = moe_experts_cpu(x, routing, gates, w1, b1, w2, b2, "silu")
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("min_experts", [2, 100], ids=["grouped", "per-expert"])
def test_bfloat16_within_2x_of_the_same_dtype_composition(monkeypatch, min_experts):
    monkeypatch.setattr(gm, "_FFN_GROUP_MIN_EXPERTS", min_experts)
    x, routing, gates, w1, b1, w2, b2 = problem(dtype=torch.bfloat16)
    y = moe_experts_cpu(x, routing, gates, w1, b1, w2, b2, "gelu")
    ref = composition(x, routing, gates, w1, b1, w2, b2, "gelu", upcast=True)
    same = composition(x, routing, gates, w1, b1, w2, b2, "gelu", upcast=False)
    assert y.dtype == torch.bfloat16
    assert max_err(y, ref) <= 2 * max_err(same, ref) + 1e-2


@pytest.mark.parametrize("t, capacity", [(0, None), (10, 0)], ids=["no-tokens", "all-dropped"])
def test_empty(t, capacity):
    x, routing, gates, w1, b1, w2, b2 = problem(t=t, capacity=capacity)
    ins = leaves(x, gates, w1, b1, w2, b2)
    y = moe_experts_cpu(ins[0], routing, *ins[1:], "gelu")
    assert y.shape == (t, 12) and not y.any()
    y.sum().backward()
    assert all(not p.grad.any() for p in ins)


def test_nan_propagates_like_the_reference():
    x, routing, gates, w1, b1, w2, b2 = problem()
    x[3, 0] = float("nan")
    with torch.no_grad():
        y = moe_experts_cpu(x, routing, gates, w1, b1, w2, b2, "gelu")
    ref = composition(x, routing, gates, w1, b1, w2, b2, "gelu", upcast=True)
    assert torch.equal(y.isnan(), ref.isnan()) and y.isnan().any()


def test_scatter_add_binding():
    """Duplicated tokens (two rows of one token in one call), scale, skipped rows, a float32 accumulator
    for bfloat16 rows, and an error naming the argument."""
    k, t, d = 2, 3, 40
    rows = torch.randn(5, d)
    src = torch.tensor([5, 4, -1, 0, 1], dtype=torch.int32)  # a = t*k + j: tokens 2, 2, -, 0, 0
    scale = torch.rand(t * k)
    out = torch.randn(t, d)
    want = out.double().clone()
    for r, a in enumerate(src.tolist()):
        if a >= 0:
            want[a // k] += scale[a].double() * rows[r].double()
    _ext.C.moe_scatter_add_cpu(out, rows, src, scale, k)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    acc = torch.zeros(t, d)
    _ext.C.moe_scatter_add_cpu(acc, rows.bfloat16(), src, None, k)
    assert acc.dtype == torch.float32 and acc[1].abs().max() == 0
    with pytest.raises(RuntimeError, match="out must be"):
        _ext.C.moe_scatter_add_cpu(torch.zeros(t, d, dtype=torch.float64), rows, src, None, k)


def _peak_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals) - totals[0] + 1 if totals else 0


def test_layer_forward_has_no_padded_buffers():
    """The padded pipeline held a (T*k, d_ff) activation buffer (2 MiB here) next to (T*k, d) ones; the
    block path holds y, the gating and one expert's rows (~0.6 MiB)."""
    torch.manual_seed(0)
    t, d, ff = 2048, 32, 128
    moe = Top2MoE(d, ff, 8)
    x = torch.randn(t, d)
    with torch.no_grad():
        moe(x)  # warm-up
        peak = _peak_bytes(lambda: moe(x))
    assert 0 < peak < t * 2 * ff * 4 // 2, peak


def test_grouped_block_weight_grads_in_place(monkeypatch, record_calls):
    """A grouped block's weight gradients go straight into dw[e] (fastgen._C's grouped kernels where built,
    else one mm per expert; zeros for an expert without rows inside the block): no K-grouped
    torch._grouped_mm whose (experts, K, N) result would be copied; values as the float64 composition."""
    monkeypatch.setattr(gm, "_FFN_GROUP_MIN_EXPERTS", 2)
    calls = []
    real = torch._grouped_mm

    def spy(a, b, *args, **kwargs):
        calls.append((a.dim(), b.dim()))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    record_calls(gm, "_GROUPED_ROWS", "_GROUPED_WGRAD", into=calls)
    g = torch.Generator().manual_seed(9)
    t, e, d, f = 40, 5, 16, 32
    choice = torch.tensor([0, 1, 3, 4])  # expert 2 gets no rows: inside the block of experts 0 .. 4
    idx = torch.stack([choice[torch.randperm(4, generator=g)[:2]] for _ in range(t)]).to(torch.int32)
    routing = moe_route(idx, e, None)
    x = torch.randn(t, d, generator=g)
    gates = torch.rand(t, 2, generator=g)
    w1, w2 = torch.randn(e, d, f, generator=g) / 4, torch.randn(e, f, d, generator=g) / 4
    b1, b2 = torch.randn(e, f, generator=g), torch.randn(e, d, generator=g)
    blocks = gm._ffn_blocks(routing.offsets.tolist(), x, d, f, f)
    assert len(blocks) == 1 and blocks[0].e1 - blocks[0].e0 == 5
    ins = leaves(x, gates, w1, b1, w2, b2)
    y = moe_experts_cpu(ins[0], routing, *ins[1:], "gelu")
    dy = torch.randn_like(y)
    calls.clear()
    got = torch.autograd.grad(y, ins, dy)
    assert calls and (2, 2) not in calls  # only the (rows, K) x (E, K, N) forms in the backward
    if gm._GROUPED_ROWS is not None:  # the grouped kernels serve every GEMM of the block
        assert set(calls) == {"_GROUPED_ROWS", "_GROUPED_WGRAD"} and calls.count("_GROUPED_WGRAD") == 2
    ref_ins = leaves(x, gates, w1, b1, w2, b2)
    ref = composition(ref_ins[0], routing, ref_ins[1], *ref_ins[2:], "gelu", upcast=True)
    want = torch.autograd.grad(ref, ref_ins, dy.double())
    for name, a, b in zip(["x", "gates", "w1", "b1", "w2", "b2"], got, want, strict=True):
        assert max_err(a, b) <= 1e-5 * (b.abs().max().item() + 1), name
    assert torch.all(got[2][2] == 0) and torch.all(got[4][2] == 0)
