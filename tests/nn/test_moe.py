"""Top2MoE vs the dense reference (every expert applied to every token through the gate matrix)."""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastgen
from fastgen.nn.moe import Top2MoE, top2_moe_dense_ref

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.float64: 1e-12}
PARAMS = ("router.weight", "w1", "b1", "w2", "b2")


def layer(E=4, d=24, ff=40, **kw):
    torch.manual_seed(0)
    moe = Top2MoE(d, ff, E, **kw)
    return moe


def grads_of(out, moe, x, dout):
    names = [n for n in PARAMS if getattr(moe, n.split(".")[0]) is not None]
    tensors = [x] + [moe.get_parameter(n) for n in names]
    return torch.autograd.grad(out, tensors, dout, retain_graph=True), ["x", *names]


def assert_2x(got, ref64, same, dtype, what):
    err = (got.double() - ref64.double()).abs().max().item()
    base = (same.double() - ref64.double()).abs().max().item()
    assert torch.isfinite(got).all(), f"{what}: non-finite"
    assert err <= 2 * base + ATOL[dtype], f"{what}: error {err:.3e} > 2 x {base:.3e} + {ATOL[dtype]}"


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(capacity_factor=None),
        dict(capacity_factor=0.5, dropped_tokens="residual"),
        dict(activation="swiglu", bias=False),
        dict(activation="silu", second_expert_policy="threshold", second_threshold=0.3),
    ],
    ids=["default", "dropless", "tight-residual", "swiglu-nobias", "silu-threshold"],
)
def test_layer_matches_dense_reference(kw):
    moe = layer(**kw)
    x = torch.randn(3, 37, 24, requires_grad=True)  # odd token count (111)
    y, aux = moe(x)
    assert y.shape == x.shape and aux.tokens == 111
    g = moe.gate(x.reshape(-1, 24))  # deterministic here (no jitter, no random policy): the same decisions
    dout = torch.randn_like(y)
    got, names = grads_of(y, moe, x, dout)
    ref64 = top2_moe_dense_ref(x, moe, g)
    same = top2_moe_dense_ref(x, moe, g, upcast=False)
    assert_2x(y, ref64, same, torch.float32, "y")
    g64, _ = grads_of(ref64, moe, x, dout.double())
    glo, _ = grads_of(same, moe, x, dout)
    for name, a, r, s in zip(names, got, g64, glo):
        assert_2x(a, r, s, torch.float32, f"d{name}")
    assert aux.expert_counts.sum().item() <= 2 * 111
    assert torch.isfinite(aux.loss) and aux.loss.requires_grad


def test_dropless_equals_infinite_capacity():
    x = torch.randn(50, 24)
    a = layer(capacity_factor=None)
    b = layer(capacity_factor=1000.0)
    b.load_state_dict(a.state_dict())
    ya, aux_a = a(x)
    yb, aux_b = b(x)
    torch.testing.assert_close(ya, yb)
    assert aux_a.capacity is None and int(aux_a.dropped) == 0 and int(aux_b.dropped) == 0


def test_all_tokens_to_one_expert_and_dropping():
    moe = layer(E=4, capacity_factor=1.0, min_capacity=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 5.0  # every token prefers expert 0 (inputs kept positive)
        moe.router.weight[1] = 2.0
    x = torch.rand(20, 24) + 0.1
    y, aux = moe(x)
    cap = aux.capacity
    assert cap == 10  # ceil(1.0 * 20 * 2 / 4)
    assert aux.expert_counts.tolist() == [20, 20, 0, 0]
    assert int(aux.dropped) == 2 * (20 - cap)
    # the last 10 tokens lost both assignments (position priority: first choices in token order first)
    assert y[cap:].abs().max() == 0 and y[:cap].abs().min() > 0
    moe.dropped_tokens = "residual"
    y2, _ = moe(x)
    torch.testing.assert_close(y2[cap:], x[cap:])
    torch.testing.assert_close(y2[:cap], y[:cap])


def test_bad_input_errors():
    with pytest.raises(ValueError, match="k > E"):
        Top2MoE(8, 16, 1)
    with pytest.raises(ValueError, match="activation"):
        Top2MoE(8, 16, 4, activation="tanh")
    with pytest.raises(ValueError, match="capacity_factor"):
        Top2MoE(8, 16, 4, capacity_factor=0.0)
    moe = Top2MoE(8, 16, 4)
    with pytest.raises(ValueError, match=r"d_model=8"):
        moe(torch.randn(5, 9))
    with pytest.raises(ValueError, match="float64"):
        moe(torch.randn(5, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or"):
        moe(torch.full((5, 8), float("nan")))


def test_jitter_only_in_training_and_aux_losses():
    moe = layer(jitter_eps=0.1, z_loss_weight=1e-3)
    x = torch.randn(30, 24)
    moe.eval()
    y1, aux = moe(x)
    y2, _ = moe(x)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(aux.loss, 0.01 * aux.aux_loss + 1e-3 * aux.z_loss)
    moe.train()
    torch.manual_seed(1)
    y3, _ = moe(x)
    torch.manual_seed(2)
    y4, _ = moe(x)
    assert not torch.equal(y3, y4)


def test_triton_backends_tiny():
    """The whole layer with every op forced to its Triton kernels (interpreter on CPU)."""
    moe = layer(E=3, d=16, ff=16)
    x = torch.randn(9, 16, requires_grad=True)
    y_ref, _ = moe(x)
    with fastgen.use_backend("triton"):
        y, _ = moe(x)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-5)


# ---- expert parallelism: 2 processes over gloo, equal to the single-process layer --------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ep_worker(rank, world, port, outdir, kw):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        dense = Top2MoE(24, 40, 4, **kw)
        ep = Top2MoE(24, 40, 4, process_group=dist.group.WORLD, **kw)
        ep.load_dense_state_dict(dense.state_dict())
        x = torch.randn(world, 29, 24)[rank].requires_grad_()  # each rank its own (odd) tokens
        y, aux = ep(x)
        (y * torch.linspace(-1, 1, 24)).sum().backward()
        torch.save(
            {"x": x.detach(), "y": y.detach(), "grads": {n: p.grad for n, p in ep.named_parameters()},
             "xgrad": x.grad, "counts": aux.expert_counts},
            os.path.join(outdir, f"rank{rank}.pt"),
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kw", [dict(capacity_factor=None), dict(capacity_factor=1.0, min_capacity=2)])
def test_expert_parallel_equals_single_process(kw):
    world = 2
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_ep_worker, args=(world, _free_port(), outdir, kw), nprocs=world, join=True)
        res = [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)]
    torch.manual_seed(0)
    dense = Top2MoE(24, 40, 4, **kw)
    grads = {n: torch.zeros_like(p) for n, p in dense.named_parameters()}
    for r in range(world):  # the capacity applies per rank (GShard groups): run each rank's tokens alone
        dense.zero_grad()
        x = res[r]["x"].clone().requires_grad_()
        y, aux = dense(x)
        (y * torch.linspace(-1, 1, 24)).sum().backward()
        torch.testing.assert_close(res[r]["y"], y.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res[r]["xgrad"], x.grad, atol=1e-5, rtol=1e-5)
        assert torch.equal(res[r]["counts"], aux.expert_counts)
        for n, p in dense.named_parameters():
            grads[n] += p.grad
    for r in range(world):  # each rank holds experts [2r, 2r + 2) and the full router
        lo, hi = 2 * r, 2 * r + 2
        for n, g in res[r]["grads"].items():
            want = grads[n] if n == "router.weight" else grads[n][lo:hi]
            if n == "router.weight":  # a replicated router's grads are summed over ranks (as DDP would)
                g = sum(res[q]["grads"][n] for q in range(world))
            torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)
