"""grouped_mm's CPU path (torch backend, eager): both schedules ("whole": torch._grouped_mm + one activation;
"blocked": per-expert row blocks with the activation / backward fused per block), every activation, bias or
not, fp32 / bf16, empty experts, one expert owning every row, unused head / tail rows, odd (unaligned) sizes,
against grouped_mm_ref in float64 and autograd through it."""

import pytest
import torch

import fastgen.ops.grouped_mm as G
from fastgen.ops.grouped_mm import ACTIVATIONS, grouped_mm, grouped_mm_ref

TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


@pytest.fixture(params=["whole", "blocked"])
def schedule(request, monkeypatch):
    if request.param == "blocked":  # tiny blocks: several per expert, so dw / dbias accumulate over blocks
        monkeypatch.setattr(G, "_WHOLE_BYTES", 0)
        monkeypatch.setattr(G, "_BLOCK_MIN_ROWS", 0)
        monkeypatch.setattr(G, "_BLOCK_BYTES", 1)
    else:
        monkeypatch.setattr(G, "_WHOLE_BYTES", 1 << 40)
    return request.param


def _check(x, w, offsets, bias, act, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w) + ((bias,) if bias is not None else ())]
    out = grouped_mm(
        leaves[0], leaves[1], offsets, bias=leaves[2] if bias is not None else None, activation=act
    )
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = grouped_mm_ref(ref_leaves[0], ref_leaves[1], offsets,
                         bias=ref_leaves[2] if bias is not None else None, activation=act)  # fmt: skip
    assert out.dtype == dtype and out.shape == ref.shape
    tol = TOL[dtype]
    scale = ref.abs().max().item() + 1.0
    assert (out.double() - ref).abs().max().item() <= tol * scale, "forward"
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(out, leaves, dout.to(dtype))
    want = torch.autograd.grad(ref, ref_leaves, dout)
    for name, g, r in zip(("dx", "dw", "dbias"), got, want):
        s = r.abs().max().item() + 1.0
        assert (g.double() - r).abs().max().item() <= tol * s, name
    # rows outside [offsets[0], offsets[E]) are zeros, and so is their dx
    off = offsets.tolist()
    assert out[: off[0]].abs().sum() == 0 and out[off[-1] :].abs().sum() == 0
    assert got[0][: off[0]].abs().sum() == 0 and got[0][off[-1] :].abs().sum() == 0


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_activations_dtypes_bias(schedule, act, dtype):
    g = torch.Generator().manual_seed(0)
    # aligned sizes (torch._grouped_mm can take them); experts 1 and 3 empty; head row and tail rows unused
    # values on a coarse grid: every pre-activation is exact in bf16, so relu's kink cannot flip a sign
    x = (torch.randn(70, 16, generator=g) * 2).round().clamp(-2, 2) / 2
    w = (torch.randn(5, 16, 32, generator=g) * 2).round().clamp(-2, 2) / 4
    bias = (torch.randn(5, 32, generator=g) * 4).round().clamp(-8, 8) / 8
    offsets = torch.tensor([0, 23, 23, 48, 48, 66], dtype=torch.int32)
    _check(x, w, offsets, bias, act, dtype)
    _check(x, w, offsets, None, act, dtype)


@pytest.mark.parametrize("act", [None, "gelu", "swiglu"])
def test_odd_sizes_and_row_ranges(schedule, act):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(41, 13, generator=g)  # K = 13, N = 10: unaligned, the per-expert mm path
    w = torch.randn(3, 13, 10, generator=g) / 4
    bias = torch.randn(3, 10, generator=g)
    for offs in ([3, 20, 20, 37], [0, 0, 41, 41], [0, 0, 0, 0], [5, 6, 7, 8]):
        _check(x, w, torch.tensor(offs), bias, act, torch.float32)


def test_one_expert_all_rows_and_int64_offsets(schedule):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(96, 32, generator=g)
    w = torch.randn(4, 32, 64, generator=g) / 6
    offsets = torch.tensor([0, 0, 0, 96, 96], dtype=torch.int64)
    _check(x, w, offsets, torch.randn(4, 64, generator=g), "silu", torch.float32)
    _check(x, w, offsets, None, "gelu_tanh", torch.bfloat16)


def test_float64_and_no_grad_inplace(schedule):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 16, generator=g, dtype=torch.float64)
    w = torch.randn(2, 16, 32, generator=g, dtype=torch.float64)
    offsets = torch.tensor([2, 10, 28])
    ref = grouped_mm_ref(x, w, offsets, activation="relu")
    with torch.no_grad():  # the in-place activation path (h not kept)
        out = grouped_mm(x, w, offsets, activation="relu")
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    small = torch.tensor([1, 5, 11])
    xs = x[:12, :3].clone().requires_grad_()
    ws = w[:, :3, :4].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, small, activation="gelu"), (xs, ws))


def test_partial_grads_cpu_path(schedule):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 16, generator=g)
    w = torch.randn(3, 16, 32, generator=g, requires_grad=True)
    bias = torch.randn(3, 32, generator=g, requires_grad=True)
    offsets = torch.tensor([0, 15, 15, 40])
    out = grouped_mm(x, w, offsets, bias=bias, activation="gelu")
    dw, db = torch.autograd.grad(out.sum(), (w, bias))
    w64, b64 = w.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    rw, rb = torch.autograd.grad(grouped_mm_ref(x.double(), w64, offsets, bias=b64, activation="gelu").sum(),
                                 (w64, b64))  # fmt: skip
    assert torch.allclose(dw.double(), rw, atol=1e-4) and torch.allclose(db.double(), rb, atol=1e-4)
    assert torch.all(dw[1] == 0) and torch.all(db[1] == 0)  # the empty expert


@pytest.mark.parametrize("act", ["gelu", "swiglu", None])
def test_small_all_rows_calls_use_torch_autograd(schedule, act):
    """A "whole" call using every row, with a gradient, runs torch._grouped_mm under torch's own autograd
    (cheaper per call than the Python Function); swiglu (less saved memory in the Function), calls with
    unused rows and the blocked schedule keep the Function. Same values and gradients either way."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(32, 16, generator=g)
    w = torch.randn(4, 16, 32, generator=g) / 4
    bias = torch.randn(4, 32, generator=g)
    for offs, all_rows in (([0, 8, 8, 20, 32], True), ([2, 8, 8, 20, 30], False)):
        offsets = torch.tensor(offs, dtype=torch.int32)
        out = grouped_mm(x.requires_grad_(), w, offsets, bias=bias, activation=act)
        native = schedule == "whole" and act != "swiglu" and all_rows
        assert isinstance(out.grad_fn, torch.autograd.function.BackwardCFunction) != native
        _check(x, w, offsets, bias, act, torch.float32)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_balanced_experts_one_bmm(monkeypatch, act, dtype):
    """Every expert with the same rows, covering x: one bmm / baddbmm over (E, R / E, K), forward and
    backward, with or without a gradient, no torch._grouped_mm call; a non-contiguous x, or unused rows,
    take the other paths. Same values as the float64 loop."""

    def refuse(*args, **kwargs):
        raise AssertionError("balanced experts must not call torch._grouped_mm")

    g = torch.Generator().manual_seed(7)
    x = (torch.randn(48, 16, generator=g) * 2).round().clamp(-2, 2) / 2
    w = (torch.randn(3, 16, 32, generator=g) * 2).round().clamp(-2, 2) / 4
    bias = (torch.randn(3, 32, generator=g) * 4).round().clamp(-8, 8) / 8
    offsets = torch.tensor([0, 16, 32, 48], dtype=torch.int32)
    with monkeypatch.context() as m:
        m.setattr(torch, "_grouped_mm", refuse)
        _check(x, w, offsets, bias, act, dtype)
        _check(x, w, offsets, None, act, dtype)
        with torch.no_grad():
            out = grouped_mm(x.to(dtype), w.to(dtype), offsets, bias=bias.to(dtype), activation=act)
        ref = grouped_mm_ref(x, w, offsets, bias=bias, activation=act)
        assert (out.double() - ref.double()).abs().max().item() <= TOL[dtype] * (ref.abs().max().item() + 1)
    xt = torch.randn(16, 48, generator=g).t()  # balanced but not contiguous: not viewable as (E, g, K)
    _check(xt, w, offsets, bias, act, torch.float32)
    assert G._balanced(xt, offsets.tolist()) == 0 and G._balanced(x, [0, 16, 32, 48]) == 16
    assert G._balanced(x, [0, 16, 32, 47]) == 0 and G._balanced(x, [0, 8, 40, 48]) == 0
    assert G._balanced(x[:0], [0, 0, 0, 0]) == 0


def _peak_bytes(fn) -> int:
    """Peak CPU tensor bytes allocated during fn() above what was live before (torch.profiler's memory
    events, as the benchmarks measure it)."""
    from fastgen.bench import Impl
    from fastgen.bench.harness import _cpu_peak_mib

    return int(_cpu_peak_mib([Impl("fn", fn)])["fn"] * 2**20)


def test_swiglu_few_experts_block_scratch_memory():
    """swiglu over a few experts keeps one block of the pre-activation as scratch (once the whole h would pass
    1 MiB: below, one GEMM call and one fused pass serve it): no (R, N) h without a gradient, and no (R, N)
    dh in the backward; values as the float64 loop (unused rows zero)."""
    g = torch.Generator().manual_seed(8)
    r, k, n = 1040, 16, 512
    x = torch.randn(r, k, generator=g)
    w = torch.randn(4, k, n, generator=g) / 4
    bias = torch.randn(4, n, generator=g)
    offsets = torch.tensor([0, 576, 800, 928, 1024], dtype=torch.int32)  # 16 unused tail rows
    with torch.no_grad():
        out = grouped_mm(x, w, offsets, bias=bias, activation="swiglu")
    ref = grouped_mm_ref(x, w, offsets, bias=bias, activation="swiglu")
    assert (out.double() - ref).abs().max().item() <= 2e-4 * (ref.abs().max().item() + 1)
    f4, big, block = 4, r * n * 4, 512 * n * 4  # blocks of 1 MiB of h: 512 rows
    with torch.no_grad():
        peak = _peak_bytes(lambda: grouped_mm(x, w, offsets, activation="swiglu"))
    assert peak <= r * n // 2 * f4 + block + (64 << 10) < r * n // 2 * f4 + big  # out + one block

    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    dout = torch.randn(r, n // 2, generator=g)

    def fwd_bwd():
        o = grouped_mm(xg, wg, offsets, activation="swiglu")
        return torch.autograd.grad(o, (xg, wg), dout)

    # saved h + out, then the backward's dh block, dx and dw
    limit = big + r * n // 2 * f4 + block + x.numel() * f4 + w.numel() * f4 + (64 << 10)
    assert _peak_bytes(fwd_bwd) <= limit < limit - block + big
    _check(x, w, offsets, bias, "swiglu", torch.float32)
