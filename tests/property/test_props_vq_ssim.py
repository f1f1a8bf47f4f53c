"""Properties of vq_nearest, vq_ema_update, ssim_stats and the VectorQuantize module."""

import pytest
import torch
from _props import FLOATS, READ_ONLY_LAYOUTS, Case, assert_2x, backends, make, raises_naming, scaled, seeds
from hypothesis import given
from hypothesis import strategies as st

import fastgen
from fastgen.ops import ssim as S
from fastgen.ops import vq as V
from fastgen.ops import vq_ema as VE

NAN, INF = float("nan"), float("inf")


def direct64(x, c, distance):
    """(..., N, K) distances in float64 by the direct form: exact enough to judge any kernel's choice."""
    x, c = x.double(), c.double()
    if distance == "l2":
        return ((x.unsqueeze(-2) - c.unsqueeze(-3)) ** 2).sum(-1)
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(V.EPS)
    cn = c / c.norm(dim=-1, keepdim=True).clamp_min(V.EPS)
    return (1 - xn @ cn.transpose(-1, -2)).clamp(0, 2)


@st.composite
def vq_cases(draw):
    backend = draw(st.sampled_from(backends("cpp", "torch")))
    dtype = draw(st.sampled_from(FLOATS))
    heads = draw(st.sampled_from([None, 1, 2]))
    n, k, d = draw(st.integers(0, 12)), draw(st.integers(1, 9)), draw(st.integers(1, 12))
    gen = torch.Generator().manual_seed(draw(seeds))
    lead = () if heads is None else (heads,)
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3]))
    x = make((*lead, n, d), dtype, draw(st.sampled_from(READ_ONLY_LAYOUTS)), gen, scale=scale)
    c = make((*lead, k, d), dtype, draw(st.sampled_from(READ_ONLY_LAYOUTS)), gen, scale=scale)
    return Case(
        backend, x, c, draw(st.sampled_from(["l2", "cosine"])), draw(st.sampled_from(["exact", "fast"]))
    )


@scaled(2)
@given(vq_cases())
def test_vq_nearest_picks_a_nearest_code(case):
    """The chosen code is nearest up to the input dtype's rounding, and the returned distance is its distance;
    in exact mode the choice equals the float64 reference wherever the reference's best code is unique."""
    backend, x, c, distance, mode = case
    with fastgen.use_backend(backend, op="vq_nearest"):
        got = fastgen.vq_nearest(x, c, distance=distance, mode=mode, return_counts=True)
    assert got.indices.dtype == torch.int64 and got.dist.dtype == torch.float32
    assert got.indices.shape == x.shape[:-1]
    d64 = direct64(x, c, distance)
    best = d64.min(-1).values
    chosen = d64.gather(-1, got.indices.unsqueeze(-1)).squeeze(-1)
    eps = torch.finfo(x.dtype).eps if mode == "exact" else max(torch.finfo(x.dtype).eps, 2e-3)
    mag = (
        (x.double().pow(2).sum(-1) + c.double().pow(2).sum(-1).max(-1, keepdim=True).values)
        if distance == "l2"
        else 1.0
    )
    tol = 8 * eps * mag + 1e-30
    assert (chosen - best <= tol).all(), (
        f"a farther code was chosen: excess {(chosen - best).max().item():.3e}"
    )
    assert ((got.dist.double() - chosen).abs() <= tol + 1e-6 * chosen.abs()).all(), (
        "dist is not the chosen code's"
    )
    want_counts = torch.nn.functional.one_hot(got.indices, c.shape[-2]).sum(-2)
    assert torch.equal(got.counts, want_counts)
    if mode == "exact" and x.dtype in (torch.float32, torch.float64):
        ref = V.vq_nearest_ref(x, c, distance=distance)
        second = d64.topk(min(2, c.shape[-2]), dim=-1, largest=False).values[..., -1]
        clear = (second - best) > tol
        assert torch.equal(got.indices[clear], ref.indices[clear])


@given(st.sampled_from(backends("cpp", "torch")), st.sampled_from([torch.float32, torch.float64]), seeds)
def test_vq_nearest_huge_values(backend, dtype, seed):
    """Values near 1e30 (float32 squares overflow): finite distances or a clear error, never a silent wrong code."""
    gen = torch.Generator().manual_seed(seed)
    x = make((5, 3), dtype, "contiguous", gen, scale=1e30)
    c = torch.cat([x[:2] * 1.0001, make((3, 3), dtype, "contiguous", gen, scale=1e30)])
    with fastgen.use_backend(backend, op="vq_nearest"):
        try:
            got = fastgen.vq_nearest(x, c)
        except (ValueError, TypeError) as err:
            assert "x" in str(err) or "codebook" in str(err)
            return
    d64 = direct64(x, c, "l2")
    chosen = d64.gather(-1, got.indices.unsqueeze(-1)).squeeze(-1)
    assert (chosen <= d64.min(-1).values * (1 + 1e-5)).all(), f"wrong codes {got.indices.tolist()}"


@st.composite
def ema_cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    heads = draw(st.sampled_from([None, 2]))
    n, k, d = draw(st.integers(0, 10)), draw(st.integers(1, 6)), draw(st.integers(1, 7))
    gen = torch.Generator().manual_seed(draw(seeds))
    lead = () if heads is None else (heads,)
    x = make((*lead, n, d), dtype, draw(st.sampled_from(READ_ONLY_LAYOUTS)), gen)
    idx = torch.randint(
        0, k, (*lead, n), generator=gen, dtype=draw(st.sampled_from([torch.int32, torch.int64]))
    )
    cs = torch.rand((*lead, k), generator=gen) * 3
    es = make((*lead, k, d), torch.float32, "contiguous", gen)
    return Case(x, idx, cs, es, draw(st.sampled_from([0.0, 0.5, 0.99, 1.0])), draw(st.booleans()))


@scaled(2)
@given(ema_cases())
def test_vq_ema_update_matches_reference(case):
    x, idx, cs, es, decay, det = case
    want_cs, want_es = VE.vq_ema_update_ref(x, idx, cs, es, decay, upcast=True)
    same_cs, same_es = VE.vq_ema_update_ref(x, idx, cs, es, decay)
    with fastgen.use_backend("torch", op="vq_ema"):
        fastgen.vq_ema_update(x, idx, cs, es, decay, deterministic=det)
    assert_2x(cs, want_cs, same_cs, torch.float32, "cluster_size")
    assert_2x(es, want_es, same_es, torch.float32, "embed_sum")


@st.composite
def ssim_cases(draw):
    dtype = draw(st.sampled_from(FLOATS))
    win = draw(st.sampled_from([1, 3, 5, 7]))
    b, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h, w = draw(st.integers(win, win + 6)), draw(st.integers(win, win + 6))
    gen = torch.Generator().manual_seed(draw(seeds))
    x = make((b, c, h, w), torch.float64, "contiguous", gen).sigmoid().to(dtype)
    y = (x.double() + 0.1 * make((b, c, h, w), torch.float64, "contiguous", gen)).clamp(0, 1).to(dtype)
    lay = draw(st.sampled_from(READ_ONLY_LAYOUTS))
    x = make(x.shape, dtype, lay, gen).copy_(x) if lay != "expanded" else x
    kw = {
        "window_size": win,
        "sigma": draw(st.sampled_from([0.5, 1.5])),
        "data_range": draw(st.sampled_from([1.0, 2.0])),
    }
    return Case(dtype, x, y, kw)


@scaled(1.5)
@given(ssim_cases())
def test_ssim_matches_reference(case):
    dtype, x, y, kw = case
    with fastgen.use_backend("torch", op="ssim"):
        got = S.ssim_stats(x, y, **kw)
    ref = S.ssim_ref(x, y, **kw, upcast=True)
    same = S.ssim_ref(x, y, **kw)
    assert_2x(got, ref, same, torch.float64 if dtype == torch.float64 else torch.float32, "ssim")


# ---- invalid input -------------------------------------------------------------------------------------


def _set(**kv):
    return lambda a: a.update({k: (v(a) if callable(v) else v) for k, v in kv.items()})


VQ_INVALID = [
    ("x int", _set(x=lambda a: a["x"].int()), ["x"]),
    ("x 1-D", _set(x=lambda a: a["x"][0]), ["x"]),
    ("codebook dtype", _set(codebook=lambda a: a["codebook"].double()), ["codebook"]),
    ("codebook meta", _set(codebook=lambda a: a["codebook"].to("meta")), ["codebook"]),
    ("codebook D", _set(codebook=lambda a: a["codebook"][:, :3]), ["codebook"]),
    ("codebook empty", _set(codebook=lambda a: a["codebook"][:0]), ["codebook"]),
    (
        "codebook heads",
        _set(x=lambda a: a["x"][None].expand(2, 5, 4), codebook=lambda a: a["codebook"][None]),
        ["codebook"],
    ),
    ("x NaN", _set(x=lambda a: a["x"].index_fill(0, torch.tensor([2]), NAN)), ["x"]),
    (
        "codebook inf",
        _set(codebook=lambda a: a["codebook"].index_fill(0, torch.tensor([1]), INF)),
        ["codebook"],
    ),
    ("distance", _set(distance="l1"), ["distance"]),
    ("mode", _set(mode="approx"), ["mode"]),
]


@pytest.mark.parametrize("case", VQ_INVALID, ids=[c[0] for c in VQ_INVALID])
@given(backend=st.sampled_from(backends("cpp", "torch")), seed=seeds)
def test_vq_nearest_rejects_bad_input(case, backend, seed):
    _, mutate, names = case
    gen = torch.Generator().manual_seed(seed)
    a = {
        "x": make((5, 4), torch.float32, "contiguous", gen),
        "codebook": make((6, 4), torch.float32, "contiguous", gen),
    }
    mutate(a)
    with fastgen.use_backend(backend, op="vq_nearest"), raises_naming(*names):
        fastgen.vq_nearest(a.pop("x"), a.pop("codebook"), **a)


EMA_INVALID = [
    ("x int", _set(x=lambda a: a["x"].int()), ["x"]),
    ("indices float", _set(indices=lambda a: a["indices"].float()), ["indices"]),
    ("indices out of range", _set(indices=lambda a: a["indices"] + 6), ["indices"]),
    ("indices negative", _set(indices=lambda a: a["indices"] - 6), ["indices"]),
    ("indices shape", _set(indices=lambda a: a["indices"][:3]), ["indices"]),
    ("cluster_size float64", _set(cluster_size=lambda a: a["cluster_size"].double()), ["cluster_size"]),
    ("embed_sum strided", _set(embed_sum=lambda a: a["embed_sum"].t().contiguous().t()), ["embed_sum"]),
    ("embed_sum meta", _set(embed_sum=lambda a: a["embed_sum"].to("meta")), ["embed_sum"]),
    ("decay NaN", _set(decay=NAN), ["decay"]),
    ("decay 1.5", _set(decay=1.5), ["decay"]),
    ("decay negative", _set(decay=-0.1), ["decay"]),
]


@pytest.mark.parametrize("case", EMA_INVALID, ids=[c[0] for c in EMA_INVALID])
@given(seed=seeds)
def test_vq_ema_update_rejects_bad_input(case, seed):
    _, mutate, names = case
    gen = torch.Generator().manual_seed(seed)
    a = {
        "x": make((5, 4), torch.float32, "contiguous", gen),
        "indices": torch.randint(0, 6, (5,), generator=gen),
        "cluster_size": torch.ones(6),
        "embed_sum": torch.zeros(6, 4),
        "decay": 0.9,
    }
    mutate(a)
    with fastgen.use_backend("torch", op="vq_ema"), raises_naming(*names):
        fastgen.vq_ema_update(**a)


SSIM_INVALID = [
    (
        "img1 int",
        _set(img1=lambda a: (a["img1"] * 10).int(), img2=lambda a: (a["img2"] * 10).int()),
        ["img1"],
    ),
    ("img2 shape", _set(img2=lambda a: a["img2"][:, :, :-1]), ["img2", "img1 and img2"]),
    ("img2 dtype", _set(img2=lambda a: a["img2"].double()), ["img2", "img1 and img2"]),
    ("img2 meta", _set(img2=lambda a: a["img2"].to("meta")), ["img2", "img1 and img2"]),
    ("img1 3-D", _set(img1=lambda a: a["img1"][0], img2=lambda a: a["img2"][0]), ["img1"]),
    ("window_size even", _set(window_size=4), ["window_size"]),
    ("window_size too big", _set(window_size=13), ["window_size"]),
    ("window_size float", _set(window_size=3.0), ["window_size"]),
    ("sigma NaN", _set(sigma=NAN), ["sigma"]),
    ("sigma inf", _set(sigma=INF), ["sigma"]),
    ("data_range 0", _set(data_range=0.0), ["data_range"]),
    ("data_range NaN", _set(data_range=NAN), ["data_range"]),
    ("k1 NaN", _set(k1=NAN), ["k1"]),
    ("k2 negative", _set(k2=-0.03), ["k2"]),
]


@pytest.mark.parametrize("case", SSIM_INVALID, ids=[c[0] for c in SSIM_INVALID])
@given(seed=seeds)
def test_ssim_rejects_bad_input(case, seed):
    _, mutate, names = case
    gen = torch.Generator().manual_seed(seed)
    a = {
        "img1": make((2, 3, 12, 12), torch.float32, "contiguous", gen).sigmoid(),
        "img2": make((2, 3, 12, 12), torch.float32, "contiguous", gen).sigmoid(),
        "window_size": 5,
    }
    mutate(a)
    with fastgen.use_backend("torch", op="ssim"), raises_naming(*names):
        S.ssim_stats(a.pop("img1"), a.pop("img2"), **a)


VQ_MODULE_INVALID = [
    ("codebook_size 0", {"codebook_size": 0}, ["codebook_size"]),
    ("heads 3", {"heads": 3}, ["heads", "dim"]),
    ("decay NaN", {"decay": NAN}, ["decay"]),
    ("commitment_weight NaN", {"commitment_weight": NAN}, ["commitment_weight"]),
    ("commitment_weight negative", {"commitment_weight": -1.0}, ["commitment_weight"]),
    ("dead_code_threshold NaN", {"dead_code_threshold": NAN}, ["dead_code_threshold"]),
    ("eps NaN", {"eps": NAN}, ["eps"]),
    ("eps negative", {"eps": -1e-5}, ["eps"]),
    ("kmeans_iters negative", {"kmeans_init": True, "kmeans_iters": -1}, ["kmeans_iters"]),
    ("distance", {"distance": "l1"}, ["distance"]),
]


@pytest.mark.parametrize("case", VQ_MODULE_INVALID, ids=[c[0] for c in VQ_MODULE_INVALID])
def test_vector_quantize_rejects_bad_hyperparameters(case):
    _, kw, names = case
    with raises_naming(*names):
        fastgen.VectorQuantize(**{"dim": 8, "codebook_size": 16, **kw})
