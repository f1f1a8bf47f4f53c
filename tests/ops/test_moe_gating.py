"""top2_gating (GShard / GLaM top-2 router) vs top2_gating_ref, on the torch backend and the Triton kernel
(interpreter on CPU): router decisions, gates, losses, gradients, errors."""

import math
import subprocess
import sys

import pytest
import torch

import fastgen
from fastgen.ops import moe_gating as G
from fastgen.ops.moe_permute import moe_route

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
# cpp: the C++ CPU router (CPU tensors only)
BACKENDS = ["torch", "triton"] + ([] if GPU or fastgen._ext.C is None else ["cpp"])
POLICIES = ["all", "threshold", "random"]


def gate(logits, backend="torch", **kw):
    with fastgen.use_backend(backend, op="moe_gating"):
        return G.top2_gating(logits, **kw)


def assert_same_decisions(got, ref, logits, atol=1e-6):
    """Everything the router decides is identical; the float outputs agree to atol."""
    t = logits.shape[0]
    assert got.expert_idx.dtype == torch.int32 and got.expert_idx.shape == (t, 2)
    assert torch.equal(got.expert_idx, ref.expert_idx)
    assert got.capacity == ref.capacity
    for name in ("dest", "src", "offsets", "counts"):
        assert torch.equal(getattr(got.routing, name), getattr(ref.routing, name)), name
    assert torch.equal(got.expert_counts, ref.expert_counts)
    assert int(got.dropped) == int(ref.dropped)
    assert got.gates.dtype == ref.gates.dtype
    torch.testing.assert_close(got.gates, ref.gates, atol=atol, rtol=0)
    assert torch.equal(got.gates != 0, got.routing.dest >= 0)
    torch.testing.assert_close(got.aux_loss, ref.aux_loss, atol=atol, rtol=1e-6)
    torch.testing.assert_close(got.z_loss, ref.z_loss, atol=atol, rtol=1e-6)


def second_valid(g, logits, policy, thr=0.2, seed=None):
    p = torch.softmax(logits.double(), -1).gather(1, g.expert_idx.long())
    g2 = p[:, 1] / p.sum(-1)
    if policy == "all":
        return torch.ones_like(g2, dtype=torch.bool)
    if policy == "threshold":
        return g2 > thr
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(g2.shape[0], generator=gen).double() < g2 / thr


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cf", [None, 0.5, 1000.0])
def test_matches_ref(backend, policy, cf, poison_empty):
    logits = torch.randn(37, 6, device=DEV) * 2
    got = gate(logits, backend, capacity_factor=cf, second_expert_policy=policy, seed=11)
    ref = G.top2_gating_ref(logits, capacity_factor=cf, second_expert_policy=policy, seed=11)
    assert_same_decisions(got, ref, logits)
    valid = second_valid(got, logits.cpu(), policy, seed=11).to(DEV)
    valid = torch.stack([torch.ones_like(valid), valid], 1)
    route = moe_route(got.expert_idx, 6, got.capacity, valid)
    for a, b in zip(got.routing, route):
        assert torch.equal(a, b)
    if cf == 0.5:
        assert got.capacity == 7 and int(got.dropped) > 0  # ceil(0.5 * 37 * 2 / 6) = 7
    else:
        assert int(got.dropped) == 0
    kept_first = got.gates[:, 0] != 0
    if policy != "all":
        assert not valid[:, 1].all()  # the policy skipped some second choices: not counted as dropped
    n_valid = int(valid.sum())
    assert int(got.expert_counts.sum()) == n_valid
    assert int((got.routing.dest >= 0).sum()) == n_valid - int(got.dropped)
    if cf is None:
        assert kept_first.all()
        if policy == "all":  # g1 + g2 = 1; a skipped second choice leaves g1 as it is (GShard)
            torch.testing.assert_close(got.gates.sum(-1), torch.ones(37, device=DEV))


def test_dropless_equals_huge_capacity():
    logits = torch.randn(29, 5, device=DEV)
    a, b = gate(logits, capacity_factor=None), gate(logits, capacity_factor=1e4)
    assert a.capacity is None and b.capacity == math.ceil(1e4 * 29 * 2 / 5)
    for x, y in zip(a.routing, b.routing):
        assert torch.equal(x, y)
    assert torch.equal(a.gates, b.gates) and int(a.dropped) == int(b.dropped) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_lowest_index_first(backend):
    logits = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],
            [1.0, 3.0, 3.0, 0.0],
            [2.0, 0.0, 2.0, 2.0],
            [0.0, 1.0, 0.0, 1.0],
            [5, 5, 5, 6],
        ],
        device=DEV,
    )
    got = gate(logits, backend, capacity_factor=None)
    want = [[0, 1], [1, 2], [0, 2], [1, 3], [3, 0]]
    assert got.expert_idx.tolist() == want
    assert got.expert_idx.tolist() == G.top2_gating_ref(logits, capacity_factor=None).expert_idx.tolist()
    torch.testing.assert_close(got.gates[:3], torch.full((3, 2), 0.5, device=DEV))
    # integer-valued random logits: many ties, same decisions as the reference
    x = torch.randint(-2, 3, (41, 7), device=DEV).float()
    for cf in (None, 0.6):
        assert_same_decisions(
            gate(x, backend, capacity_factor=cf), G.top2_gating_ref(x, capacity_factor=cf), x
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_popular_expert_and_empty_experts(backend):
    t, e = 23, 8
    logits = torch.randn(t, e, device=DEV) * 0.1
    logits[:, 2] += 10.0
    logits[:, 5] += 5.0  # every token: first choice 2, second 5; the other six experts are empty
    got = gate(logits, backend, capacity_factor=1.0, min_capacity=4)
    cap = math.ceil(1.0 * t * 2 / e)  # 6
    assert got.capacity == cap
    assert (got.expert_idx[:, 0] == 2).all() and (got.expert_idx[:, 1] == 5).all()
    keep = got.routing.dest >= 0
    # position priority: the first `cap` tokens keep their first choice, and their second choice as well
    assert keep[:, 0].tolist() == [i < cap for i in range(t)]
    assert keep[:, 1].tolist() == [i < cap for i in range(t)]
    assert int(got.dropped) == 2 * (t - cap)
    assert got.expert_counts.tolist() == [0, 0, t, 0, 0, t, 0, 0]
    assert got.routing.offsets.tolist() == [0, 0, 0, cap, cap, cap, 2 * cap, 2 * cap, 2 * cap]
    assert_same_decisions(got, G.top2_gating_ref(logits, capacity_factor=1.0), logits)
    # GShard's aux loss is E * P_2 when every first choice is expert 2
    p = torch.softmax(logits.double(), -1)
    assert math.isclose(got.aux_loss.item(), e * p[:, 2].mean().item(), rel_tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_and_normalize_by_hand(backend):
    t, e = 19, 5
    logits = torch.randn(t, e, device=DEV) * 3
    x = logits.double().cpu()
    p = torch.softmax(x, -1)
    i1 = p.argmax(-1)
    f = torch.tensor([(i1 == j).sum().item() / t for j in range(e)], dtype=torch.float64)
    aux = e * sum(f[j] * p[:, j].mean() for j in range(e))
    z = sum(torch.logsumexp(x[i], 0) ** 2 for i in range(t)) / t
    for normalize in (True, False):
        got = gate(logits, backend, capacity_factor=None, normalize=normalize)
        assert got.aux_loss.dtype == torch.float32 and got.aux_loss.dim() == 0
        assert math.isclose(got.aux_loss.item(), aux.item(), rel_tol=1e-5)
        assert math.isclose(got.z_loss.item(), z.item(), rel_tol=1e-5)
        top = p.gather(1, got.expert_idx.long().cpu())
        want = top / top.sum(-1, keepdim=True) if normalize else top
        torch.testing.assert_close(got.gates.cpu().double(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_inputs(backend):
    logits = (torch.randn(33, 9, device=DEV) * 2).half()
    got = gate(logits, backend, capacity_factor=0.75)
    assert got.gates.dtype == torch.float32
    assert_same_decisions(got, G.top2_gating_ref(logits, capacity_factor=0.75), logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_programs_strided(backend, poison_empty):
    # E = 100: several row blocks, partial sums across programs; a transposed (non-contiguous) view
    logits = (torch.randn(100, 70, device=DEV) * 2).t()
    got = gate(logits, backend, capacity_factor=1.0, second_expert_policy="threshold")
    assert_same_decisions(
        got, G.top2_gating_ref(logits, capacity_factor=1.0, second_expert_policy="threshold"), logits
    )


def test_random_policy_reproducible():
    logits = torch.randn(64, 4, device=DEV)
    a = gate(logits, second_expert_policy="random", seed=5)
    b = gate(logits, second_expert_policy="random", seed=5)
    assert torch.equal(a.routing.dest, b.routing.dest)
    torch.manual_seed(123)
    c = gate(logits, second_expert_policy="random", capacity_factor=None)
    torch.manual_seed(123)
    d = G.top2_gating_ref(logits, second_expert_policy="random", capacity_factor=None)
    assert torch.equal(c.routing.dest, d.routing.dest)
    routed = c.routing.dest[:, 1] >= 0
    assert 0 < int(routed.sum()) < 64  # the draw matters


def test_empty_batch():
    got = gate(torch.randn(0, 4, device=DEV, requires_grad=True), capacity_factor=2.0)
    assert got.expert_idx.shape == (0, 2) and got.capacity == 4  # min_capacity
    assert got.aux_loss.item() == 0 and got.z_loss.item() == 0 and int(got.dropped) == 0


def test_capacity_for():
    assert G.capacity_for(37, 6, 1.25) == 16
    assert G.capacity_for(10, 2, 1.1) == 11  # not 12 from 11.000000000000002
    assert G.capacity_for(8, 64, 1.0) == 4 and G.capacity_for(8, 64, 1.0, min_capacity=0) == 1
    assert G.capacity_for(8, 4, None) is None
    assert G.capacity_for(9, 3, 1.0, k=1) == 4 and G.capacity_for(90, 3, 1.0, k=1) == 30


def _outputs(gating):
    return gating.gates, gating.aux_loss, gating.z_loss


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(normalize, backend):
    # tight capacity and the threshold policy: some gates are 0 (dropped / not routed)
    logits = torch.randn(11, 5, dtype=torch.float64, device=DEV, requires_grad=True)
    kw = dict(capacity_factor=0.6, min_capacity=2, second_expert_policy="threshold", normalize=normalize)
    fn = lambda x: _outputs(gate(x, backend, **kw))
    assert int(gate(logits, backend, **kw).dropped) > 0
    torch.autograd.gradcheck(fn, (logits,))
    # and the same gradients as autograd through the reference
    w = [torch.randn(11, 2, dtype=torch.float64, device=DEV), 0.7, 1.3]
    loss = lambda outs: sum((o * wi).sum() for o, wi in zip(outs, w))
    g_got = torch.autograd.grad(loss(fn(logits)), logits)[0]
    g_ref = torch.autograd.grad(loss(_outputs(G.top2_gating_ref(logits, **kw))), logits)[0]
    torch.testing.assert_close(g_got, g_ref, atol=1e-12, rtol=1e-10)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ router serves CPU tensors")
def test_cpp_router_chunks_and_threads():
    """Rows in several fixed chunks (256 tokens each): the per-expert sums are the same whatever the
    number of threads, and match the torch backend; a non-finite logit is reported like there."""
    logits = torch.randn(700, 7) * 3
    n = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(fastgen._ext.C.moe_top2_router_cpu(logits))
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    ref = G._fwd_torch(logits)
    for a, b in zip(outs[0], ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    bad = logits.clone()
    bad[5, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or"):
        gate(bad, "cpp")


def test_triton_gradients_match_torch(poison_empty):
    logits = torch.randn(21, 7, device=DEV) * 2
    w = [torch.randn(21, 2, device=DEV), 0.7, 1.3]
    grads = {}
    for backend in BACKENDS:
        x = logits.clone().requires_grad_()
        g = gate(x, backend, capacity_factor=0.8)
        loss = sum((o * wi).sum() for o, wi in zip(_outputs(g), w))
        grads[backend] = torch.autograd.grad(loss, x)[0]
    torch.testing.assert_close(grads["triton"], grads["torch"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    dt = torch.float64 if backend == "torch" else torch.float32
    logits = torch.randn(13, 6, device=DEV, dtype=dt, requires_grad=True)
    with fastgen.use_backend(backend, op="moe_gating"):
        torch.library.opcheck(G._top2_router_op, (logits,))


@pytest.mark.parametrize(
    "make, kw, match",
    [
        (lambda: torch.randn(5, 1), {}, "k > E"),
        (lambda: torch.randn(5, 3, 2), {}, "2-D"),
        (lambda: torch.randn(5), {}, "2-D"),
        (lambda: torch.randint(0, 3, (5, 4)), {}, "floating point"),
        (lambda: torch.tensor([[0.0, float("nan"), 1.0]]), {}, "NaN or"),
        (lambda: torch.tensor([[0.0, 1.0], [float("inf"), 1.0]]), {}, "NaN or"),
        (lambda: torch.tensor([[0.0, 1.0], [float("-inf"), 1.0]]), {}, "NaN or"),
        (lambda: torch.randn(5, 4), {"second_expert_policy": "top"}, "second_expert_policy"),
        (lambda: torch.randn(5, 4), {"capacity_factor": 0.0}, "capacity_factor"),
        (lambda: torch.randn(5, 4), {"capacity_factor": -1.0}, "capacity_factor"),
        (lambda: torch.randn(5, 4), {"min_capacity": -1}, "min_capacity"),
    ],
)
@pytest.mark.parametrize("fn", [G.top2_gating, G.top2_gating_ref])
def test_errors(make, kw, match, fn):
    with pytest.raises(ValueError, match=match):
        fn(make(), **kw)


@pytest.mark.gpu
def test_gpu_large_and_nonfinite():
    logits = torch.randn(40_001, 64, device="cuda", dtype=torch.bfloat16)
    got = gate(logits, "triton", capacity_factor=1.25)
    ref = gate(logits, "torch", capacity_factor=1.25)
    assert_same_decisions(got, ref, logits, atol=1e-5)
    # a device-side assert poisons the CUDA context: check it in a child process
    code = (
        "import torch, fastgen\n"
        "x = torch.randn(999, 16, device='cuda'); x[123, 7] = float('nan')\n"
        "with fastgen.use_backend('triton', op='moe_gating'):\n"
        "    fastgen.ops.moe_gating.top2_gating(x)\n"
        "torch.cuda.synchronize()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "NaN or" in res.stderr, res.stderr[-2000:]


def test_compile_fullgraph():
    logits = torch.randn(17, 6, device=DEV)
    fn = torch.compile(lambda x: _outputs(G.top2_gating(x, capacity_factor=None)), fullgraph=True)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got, want = fn(x1), _outputs(G.top2_gating(x2, capacity_factor=None))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    sum(o.sum() for o in got).backward()
    sum(o.sum() for o in want).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_dispatch_remembered_honours_forcing(monkeypatch):
    """Calls dispatch once per (device, dtype, E within the Triton limit); a backend forced after that
    (use_backend, FASTGEN_BACKEND) is still honoured, and so is the Triton kernel's E limit."""
    from fastgen._backend import BackendUnavailableError

    monkeypatch.delenv("FASTGEN_BACKEND", raising=False)
    logits = torch.randn(5, 8, device=DEV)
    calls, dispatch = [], G.OP.dispatch
    monkeypatch.setattr(G.OP, "dispatch", lambda call: calls.append(call) or dispatch(call))
    ref = G.top2_gating(logits)
    G.top2_gating(logits)
    assert len(calls) <= 1
    served = []
    torch_fn = G.OP.backends["torch"].fn
    monkeypatch.setattr(G.OP.backends["torch"], "fn", lambda x: served.append(1) or torch_fn(x))
    with fastgen.use_backend("torch", op="moe_gating"):
        assert_same_decisions(G.top2_gating(logits), ref, logits)
    assert served == [1]
    with fastgen.use_backend("cuda", op="moe_gating"), pytest.raises(BackendUnavailableError, match="cuda"):
        G.top2_gating(logits)
    monkeypatch.setenv("FASTGEN_BACKEND", "moe_gating:triton")
    G.top2_gating(logits)  # remembers triton for E within its limit ...
    with pytest.raises(BackendUnavailableError, match="num_experts 8193 > 8192"):
        G.top2_gating(torch.randn(1, 8193, device=DEV))  # ... which is not E beyond it
    monkeypatch.setenv("FASTGEN_BACKEND", "moe_gating:torch")
    G.top2_gating(logits)
    assert served == [1, 1]
