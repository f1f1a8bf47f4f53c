"""Properties of the MoE ops: top2_gating, moe_route, moe_permute / moe_unpermute, grouped_mm, Top2MoE."""

import pytest
import torch
from _props import FLOATS, READ_ONLY_LAYOUTS, Case, assert_2x, backends, make, raises_naming, scaled, seeds
from hypothesis import given
from hypothesis import strategies as st

import fastgen
from fastgen.ops import grouped_mm as G
from fastgen.ops import moe_gating as MG
from fastgen.ops import moe_permute as MP

NAN, INF = float("nan"), float("inf")


@st.composite
def gating_cases(draw):
    dtype = draw(st.sampled_from(FLOATS))
    t, e = draw(st.integers(0, 12)), draw(st.integers(2, 7))
    gen = torch.Generator().manual_seed(draw(seeds))
    logits = make(
        (t, e), dtype, draw(st.sampled_from(READ_ONLY_LAYOUTS)), gen, scale=draw(st.sampled_from([0.5, 4.0]))
    )
    kw = {
        "capacity_factor": draw(st.sampled_from([None, 0.5, 1.0, 1.25, 2.0])),
        "min_capacity": draw(st.integers(0, 4)),
        "second_expert_policy": draw(st.sampled_from(["all", "threshold", "random"])),
        "second_threshold": draw(st.sampled_from([0.0, 0.2, 0.45])),
        "normalize": draw(st.booleans()),
        "seed": draw(seeds),
    }
    return Case(dtype, logits, kw)


@scaled(2)
@given(gating_cases())
def test_top2_gating_matches_reference(case):
    dtype, logits, kw = case
    with fastgen.use_backend("torch", op="moe_gating"):
        got = fastgen.top2_gating(logits, **kw)
    ref = MG.top2_gating_ref(logits, **kw)
    assert torch.equal(got.expert_idx.long(), ref.expert_idx.long())
    for name in ("dest", "src", "offsets", "counts"):
        assert torch.equal(getattr(got.routing, name).long(), getattr(ref.routing, name).long()), name
    assert got.capacity == ref.capacity and int(got.dropped) == int(ref.dropped)
    assert torch.equal(got.expert_counts.long(), ref.expert_counts.long())
    ref64 = MG.top2_gating_ref(logits.double(), **kw)
    stat = torch.float64 if dtype == torch.float64 else torch.float32  # statistics are float32 or float64
    assert_2x(got.gates, ref64.gates, ref.gates, stat, "gates")
    assert_2x(got.aux_loss, ref64.aux_loss, ref.aux_loss, stat, "aux_loss")
    assert_2x(got.z_loss, ref64.z_loss, ref.z_loss, stat, "z_loss")


@st.composite
def route_cases(draw):
    backend = draw(st.sampled_from(backends("cpp", "torch")))
    t, k, e = draw(st.integers(0, 10)), draw(st.integers(1, 3)), draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(seeds))
    idx = torch.randint(0, e, (t, k), generator=gen, dtype=draw(st.sampled_from([torch.int32, torch.int64])))
    layout = draw(st.sampled_from(["contiguous", "transposed", "expanded"]))
    if layout == "transposed":
        idx = idx.t().contiguous().t()
    elif layout == "expanded" and t:
        idx = idx[:1].expand(t, k)
    valid = torch.rand((t, k), generator=gen) > 0.3 if draw(st.booleans()) else None
    if valid is not None:  # invalid assignments may hold anything
        idx = torch.where(valid, idx, torch.full_like(idx, -7))
    cap = draw(st.sampled_from([None, 0, 1, 2, 5]))
    return Case(backend, idx, e, cap, valid)


@scaled(2)
@given(route_cases())
def test_moe_route_matches_reference(case):
    backend, idx, e, cap, valid = case
    with fastgen.use_backend(backend, op="moe_route"):
        got = fastgen.moe_route(idx, e, cap, valid)
    ref = MP.moe_route_ref(idx, e, cap, valid)
    for name in ("dest", "src", "offsets", "counts"):
        g, r = getattr(got, name), getattr(ref, name)
        assert g.dtype == torch.int32 and torch.equal(g, r.int()), name


@scaled(2)
@given(route_cases(), st.sampled_from(FLOATS), st.integers(1, 9), st.sampled_from(READ_ONLY_LAYOUTS), seeds)
def test_moe_permute_unpermute_match_reference(case, dtype, d, layout, seed):
    backend, idx, e, cap, valid = case
    gen = torch.Generator().manual_seed(seed)
    routing = MP.moe_route_ref(idx, e, cap, valid)
    t, k = idx.shape
    x = make((t, d), dtype, layout, gen)
    with fastgen.use_backend(backend, op="moe_permute"):
        buf = fastgen.moe_permute(x, routing)
    assert buf.dtype == dtype
    assert torch.equal(buf, MP.moe_permute_ref(x, routing)), "moe_permute is a gather: exact"
    y = make((t * k, d), dtype, layout, gen)
    gates = make((t, k), draw_dtype(dtype), "contiguous", gen).abs()
    with fastgen.use_backend(backend, op="moe_permute"):
        out = fastgen.moe_unpermute(y, routing, gates)
    ref = MP.moe_unpermute_ref(y, routing, gates, upcast=True)
    same = MP.moe_unpermute_ref(y, routing, gates)
    assert out.dtype == dtype
    assert_2x(out, ref, same, dtype, f"moe_unpermute {backend}")


def draw_dtype(dtype):
    """Gates: float32 with 16-bit buffers (the mixed case moe_unpermute documents), else the buffer's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@st.composite
def gmm_cases(draw):
    dtype = draw(st.sampled_from(FLOATS))
    e, k, n = draw(st.integers(1, 4)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    act = draw(st.sampled_from([None, "relu", "gelu", "gelu_tanh", "silu", "swiglu"]))
    if act == "swiglu":
        n = 2 * n
    sizes = draw(st.lists(st.integers(0, 5), min_size=e, max_size=e))
    lo, tail = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    rows = lo + sum(sizes) + tail
    offsets = torch.tensor(
        [lo, *(lo + torch.tensor(sizes).cumsum(0)).tolist()],
        dtype=draw(st.sampled_from([torch.int32, torch.int64])),
    )
    gen = torch.Generator().manual_seed(draw(seeds))
    x = make((rows, k), dtype, draw(st.sampled_from(READ_ONLY_LAYOUTS)), gen)
    w = make((e, k, n), dtype, draw(st.sampled_from(READ_ONLY_LAYOUTS)), gen, scale=k**-0.5)
    bias = make((e, n), dtype, draw(st.sampled_from(READ_ONLY_LAYOUTS)), gen) if draw(st.booleans()) else None
    return Case(dtype, x, w, offsets, bias, act)


@scaled(2)
@given(gmm_cases())
def test_grouped_mm_matches_reference(case):
    dtype, x, w, offsets, bias, act = case
    with fastgen.use_backend("torch", op="grouped_mm"):
        out = fastgen.grouped_mm(x, w, offsets, bias=bias, activation=act)
    ref = G.grouped_mm_ref(
        x.double(), w.double(), offsets, bias=None if bias is None else bias.double(), activation=act
    )
    same = G.grouped_mm_ref(x, w, offsets, bias=bias, activation=act, upcast=False)
    assert out.dtype == dtype
    assert_2x(out, ref, same, dtype, "grouped_mm")


# ---- invalid input -------------------------------------------------------------------------------------


def _set(**kv):
    return lambda a: a.update({k: (v(a) if callable(v) else v) for k, v in kv.items()})


GATING_INVALID = [
    ("logits int", _set(logits=lambda a: a["logits"].int()), ["logits"]),
    ("logits 3-D", _set(logits=lambda a: a["logits"][None]), ["logits"]),
    ("one expert", _set(logits=lambda a: a["logits"][:, :1]), ["logits", "k"]),
    ("logits NaN", _set(logits=lambda a: a["logits"].index_fill(0, torch.tensor([1]), NAN)), ["logits"]),
    ("logits inf", _set(logits=lambda a: a["logits"].index_fill(0, torch.tensor([1]), INF)), ["logits"]),
    ("capacity_factor 0", _set(capacity_factor=0.0), ["capacity_factor"]),
    ("capacity_factor NaN", _set(capacity_factor=NAN), ["capacity_factor"]),
    ("capacity_factor inf", _set(capacity_factor=INF), ["capacity_factor"]),
    ("min_capacity negative", _set(min_capacity=-1), ["min_capacity"]),
    ("min_capacity float", _set(min_capacity=2.5), ["min_capacity"]),
    ("second_expert_policy", _set(second_expert_policy="top"), ["second_expert_policy"]),
    (
        "second_threshold NaN",
        _set(second_expert_policy="threshold", second_threshold=NAN),
        ["second_threshold"],
    ),
    (
        "second_threshold negative",
        _set(second_expert_policy="random", second_threshold=-0.5),
        ["second_threshold"],
    ),
    (
        "second_threshold > 1",
        _set(second_expert_policy="threshold", second_threshold=1.5),
        ["second_threshold"],
    ),
]


@pytest.mark.parametrize("case", GATING_INVALID, ids=[c[0] for c in GATING_INVALID])
@given(seed=seeds)
def test_top2_gating_rejects_bad_input(case, seed):
    _, mutate, names = case
    a = {"logits": make((6, 4), torch.float32, "contiguous", torch.Generator().manual_seed(seed))}
    mutate(a)
    with fastgen.use_backend("torch", op="moe_gating"), raises_naming(*names):
        fastgen.top2_gating(a.pop("logits"), **a)


ROUTE_INVALID = [
    ("expert_idx float", _set(expert_idx=lambda a: a["expert_idx"].float()), ["expert_idx"]),
    ("expert_idx 1-D", _set(expert_idx=lambda a: a["expert_idx"][:, 0]), ["expert_idx"]),
    ("expert_idx out of range", _set(expert_idx=lambda a: a["expert_idx"] + 4), ["expert_idx"]),
    ("expert_idx negative", _set(expert_idx=lambda a: a["expert_idx"] - 4), ["expert_idx"]),
    ("num_experts 0", _set(num_experts=0), ["num_experts"]),
    ("num_experts float", _set(num_experts=4.0), ["num_experts"]),
    ("capacity negative", _set(capacity=-1), ["capacity"]),
    ("capacity float", _set(capacity=2.5), ["capacity"]),
    ("valid int", _set(valid=lambda a: torch.ones_like(a["expert_idx"])), ["valid"]),
    ("valid shape", _set(valid=lambda a: torch.ones(a["expert_idx"].shape[0], dtype=torch.bool)), ["valid"]),
    (
        "valid meta",
        _set(valid=lambda a: torch.ones_like(a["expert_idx"], dtype=torch.bool, device="meta")),
        ["valid"],
    ),
]


@pytest.mark.parametrize("case", ROUTE_INVALID, ids=[c[0] for c in ROUTE_INVALID])
@given(backend=st.sampled_from(backends("cpp", "torch")), seed=seeds)
def test_moe_route_rejects_bad_input(case, backend, seed):
    _, mutate, names = case
    gen = torch.Generator().manual_seed(seed)
    a = {
        "expert_idx": torch.randint(0, 4, (5, 2), generator=gen),
        "num_experts": 4,
        "capacity": 3,
        "valid": None,
    }
    mutate(a)
    with fastgen.use_backend(backend, op="moe_route"), raises_naming(*names):
        fastgen.moe_route(**a)


def _routing(gen):
    return MP.moe_route_ref(torch.randint(0, 3, (5, 2), generator=gen), 3, 3)


PERMUTE_INVALID = [
    ("x int", _set(x=lambda a: a["x"].int()), ["x"]),
    ("x rows", _set(x=lambda a: a["x"][:4]), ["x", "routing.dest"]),
    ("x 3-D", _set(x=lambda a: a["x"][None]), ["x"]),
    (
        "routing dest int64",
        _set(routing=lambda a: a["routing"]._replace(dest=a["routing"].dest.long())),
        ["routing.dest"],
    ),
    (
        "routing src meta",
        _set(routing=lambda a: a["routing"]._replace(src=a["routing"].src.to("meta"))),
        ["routing.src"],
    ),
    (
        "routing src out of range",
        _set(routing=lambda a: a["routing"]._replace(src=a["routing"].src + 10)),
        ["routing.src"],
    ),
    ("routing not a Routing", _set(routing=lambda a: list(a["routing"])), ["routing"]),
]


@pytest.mark.parametrize("case", PERMUTE_INVALID, ids=[c[0] for c in PERMUTE_INVALID])
@given(backend=st.sampled_from(backends("cpp", "torch")), seed=seeds)
def test_moe_permute_rejects_bad_input(case, backend, seed):
    _, mutate, names = case
    gen = torch.Generator().manual_seed(seed)
    a = {"x": make((5, 4), torch.float32, "contiguous", gen), "routing": _routing(gen)}
    mutate(a)
    with fastgen.use_backend(backend, op="moe_permute"), raises_naming(*names):
        fastgen.moe_permute(a["x"], a["routing"])


UNPERMUTE_INVALID = [
    ("buf rows", _set(buf=lambda a: a["buf"][:9]), ["buf"]),
    ("buf int", _set(buf=lambda a: a["buf"].int()), ["buf"]),
    ("gates int", _set(gates=lambda a: a["gates"].int()), ["gates"]),
    ("gates shape", _set(gates=lambda a: a["gates"][:, :1]), ["gates"]),
    ("gates meta", _set(gates=lambda a: a["gates"].to("meta")), ["gates"]),
    (
        "routing dest out of range",
        _set(routing=lambda a: a["routing"]._replace(dest=a["routing"].dest + 10)),
        ["routing.dest"],
    ),
]


@pytest.mark.parametrize("case", UNPERMUTE_INVALID, ids=[c[0] for c in UNPERMUTE_INVALID])
@given(backend=st.sampled_from(backends("cpp", "torch")), seed=seeds)
def test_moe_unpermute_rejects_bad_input(case, backend, seed):
    _, mutate, names = case
    gen = torch.Generator().manual_seed(seed)
    a = {
        "buf": make((10, 4), torch.float32, "contiguous", gen),
        "routing": _routing(gen),
        "gates": make((5, 2), torch.float32, "contiguous", gen),
    }
    mutate(a)
    with fastgen.use_backend(backend, op="moe_permute"), raises_naming(*names):
        fastgen.moe_unpermute(a["buf"], a["routing"], a["gates"])


GMM_INVALID = [
    ("x int", _set(x=lambda a: a["x"].int()), ["x"]),
    ("x 3-D", _set(x=lambda a: a["x"][None]), ["x"]),
    ("w dtype", _set(w=lambda a: a["w"].double()), ["w"]),
    ("w meta", _set(w=lambda a: a["w"].to("meta")), ["w"]),
    ("w K", _set(w=lambda a: a["w"][:, :3]), ["w"]),
    ("offsets float", _set(offsets=lambda a: a["offsets"].float()), ["offsets"]),
    ("offsets entries", _set(offsets=lambda a: a["offsets"][:3]), ["offsets"]),
    ("offsets decreasing", _set(offsets=torch.tensor([0, 5, 2, 8], dtype=torch.int32)), ["offsets"]),
    ("offsets past R", _set(offsets=torch.tensor([0, 2, 5, 9], dtype=torch.int32)), ["offsets"]),
    ("offsets negative", _set(offsets=torch.tensor([-1, 2, 5, 8], dtype=torch.int32)), ["offsets"]),
    ("offsets int64 wrap", _set(offsets=torch.tensor([0, 2, 5, 2**32 + 8])), ["offsets"]),
    ("bias shape", _set(bias=torch.zeros(3, 5)), ["bias"]),
    ("bias dtype", _set(bias=torch.zeros(3, 6, dtype=torch.float64)), ["bias"]),
    ("activation", _set(activation="tanh"), ["activation"]),
    ("swiglu odd N", _set(w=lambda a: a["w"][..., :5], activation="swiglu"), ["swiglu", "N", "w"]),
]


@pytest.mark.parametrize("case", GMM_INVALID, ids=[c[0] for c in GMM_INVALID])
@given(seed=seeds)
def test_grouped_mm_rejects_bad_input(case, seed):
    _, mutate, names = case
    gen = torch.Generator().manual_seed(seed)
    a = {
        "x": make((8, 4), torch.float32, "contiguous", gen),
        "w": make((3, 4, 6), torch.float32, "contiguous", gen),
        "offsets": torch.tensor([0, 2, 5, 8], dtype=torch.int32),
    }
    mutate(a)
    with fastgen.use_backend("torch", op="grouped_mm"), raises_naming(*names):
        fastgen.grouped_mm(a.pop("x"), a.pop("w"), a.pop("offsets"), **a)


MOE_INVALID = [
    ("num_experts 1", {"num_experts": 1}, ["num_experts"]),
    ("d_model 0", {"d_model": 0}, ["d_model"]),
    ("activation", {"activation": "tanh"}, ["activation"]),
    ("capacity_factor NaN", {"capacity_factor": NAN}, ["capacity_factor"]),
    ("capacity_factor inf", {"capacity_factor": INF}, ["capacity_factor"]),
    ("jitter_eps NaN", {"jitter_eps": NAN}, ["jitter_eps"]),
    ("aux_loss_weight NaN", {"aux_loss_weight": NAN}, ["aux_loss_weight"]),
    ("z_loss_weight negative", {"z_loss_weight": -1.0}, ["z_loss_weight"]),
    ("second_threshold NaN", {"second_threshold": NAN}, ["second_threshold"]),
    ("second_expert_policy", {"second_expert_policy": "top"}, ["second_expert_policy"]),
    ("min_capacity negative", {"min_capacity": -1}, ["min_capacity"]),
    ("dropped_tokens", {"dropped_tokens": "drop"}, ["dropped_tokens"]),
]


@pytest.mark.parametrize("case", MOE_INVALID, ids=[c[0] for c in MOE_INVALID])
def test_top2moe_rejects_bad_hyperparameters(case):
    """Bad constructor arguments fail at construction (not at the first forward), naming the argument."""
    _, kw, names = case
    with raises_naming(*names):
        fastgen.Top2MoE(**{"d_model": 8, "d_ff": 16, "num_experts": 4, **kw})
