"""vq_nearest edge cases: an oracle exact on ties on every CPU, extreme magnitudes (no float32 overflow in
the expanded form), on every backend available here."""

import pytest
import torch

import fastgen
from fastgen import _ext
from fastgen.ops import vq as V

BACKENDS = ["torch", "triton"] + (["cpp"] if _ext.C is not None else [])


def run(backend, x, c, **kw):
    with fastgen.use_backend(backend, op="vq_nearest"):
        return V.vq_nearest(x, c, **kw)


@pytest.mark.parametrize("distance", V.DISTANCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ref_exact_ties_lowest_index(distance, dtype):
    # every code appears 8 times (k and k + 8j): identical columns at every offset of a BLAS block, so the
    # expanded-form matmul would round some copies differently; the direct form must not
    base = torch.randn(8, 37, dtype=torch.float64)
    c = base.repeat(8, 1).to(dtype)
    x = torch.cat([base[torch.randint(0, 8, (24,))], torch.randn(40, 37, dtype=torch.float64)]).to(dtype)
    ref = V.vq_nearest_ref(x, c, distance=distance)
    assert (ref.indices < 8).all(), f"a tie went to a higher copy: {ref.indices.tolist()}"
    want = V.vq_nearest_ref(x, base.to(dtype), distance=distance)
    assert torch.equal(ref.indices, want.indices) and torch.equal(ref.dist, want.dist)
    if distance == "l2":
        assert (ref.dist[:24] == 0).all()


def test_get_output_from_indices_out_of_range():
    from fastgen.nn.vq import VectorQuantize

    vq = VectorQuantize(8, 5)
    assert vq.get_output_from_indices(torch.tensor([[0, 4, -1]])).shape == (1, 3, 8)  # -1: zeros
    for bad in (5, -2):
        with pytest.raises(ValueError, match=r"indices must lie in \[0, codebook_size\) = \[0, 5\)"):
            vq.get_output_from_indices(torch.tensor([[0, bad]]))
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        vq.get_output_from_indices(torch.tensor([[0.0, 1.0]]))


@pytest.mark.parametrize(
    "kw, err, match",
    [
        ({"commitment_weight": float("nan")}, ValueError, "commitment_weight must be in"),
        ({"commitment_weight": -1.0}, ValueError, "commitment_weight must be in"),
        ({"decay": float("nan")}, ValueError, "decay must be in"),
        ({"eps": 0.0}, ValueError, r"eps must be in \(0, inf\)"),
        ({"eps": float("inf")}, ValueError, "eps must be in"),
        ({"dead_code_threshold": float("nan")}, ValueError, "dead_code_threshold must be in"),
        ({"kmeans_iters": 2.5}, TypeError, "kmeans_iters must be an int"),
        ({"commitment_weight": "0.25"}, TypeError, "commitment_weight must be a real number"),
    ],
)
def test_vector_quantize_hyperparameters(kw, err, match):
    from fastgen.nn.vq import VectorQuantize

    with pytest.raises(err, match=match):
        VectorQuantize(8, 5, **kw)


def test_ema_hyperparameters():
    from fastgen.ops.vq_ema import vq_codebook_from_ema, vq_ema_update

    cs, es = torch.ones(4), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="eps must be in"):
        vq_codebook_from_ema(cs, es, float("nan"))
    with pytest.raises(ValueError, match="decay must be in"):
        vq_ema_update(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), cs, es, float("nan"))


def extreme_problem(scale, dtype, heads=None):
    """Rows 1% (of the scale) away from one of 6 well-separated codes, at a magnitude where float32's
    ||x||^2 overflows (1e19: the distances themselves fit; 1e30: they do not, the reference gives inf) or
    the squares underflow (1e-25)."""
    c = torch.randn(6, 8, dtype=torch.float64)
    x = torch.cat([c, c[:4]]) + 0.01 * torch.randn(10, 8, dtype=torch.float64)
    if heads:
        x, c = torch.stack([x, -x * 1e-3]), torch.stack([c, -c * 1e-3])  # a head at another magnitude
    return (x * scale).to(dtype), (c * scale).to(dtype)


@pytest.mark.parametrize("host", [True, False], ids=["host", "device_path"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, distance, scale",
    [
        (torch.float32, "l2", 1e19),
        (torch.float32, "l2", 1e30),
        (torch.float32, "l2", 1e-25),
        (torch.float32, "cosine", 1e30),
        (torch.bfloat16, "l2", 1e30),
        (torch.bfloat16, "cosine", 1e30),
    ],
    ids=str,
)
def test_extreme_magnitudes(monkeypatch, host, backend, dtype, distance, scale):
    if dtype == torch.bfloat16 and backend == "triton":
        pytest.skip("the interpreter gets bf16 arithmetic wrong (bf16: GPU tests)")
    if not host:  # the CUDA / traced-graph path: no host read-back, the rescale always runs
        monkeypatch.setattr(V, "_host_checks", lambda t: False)
    x, c = extreme_problem(scale, dtype, heads=2 if distance == "l2" else None)
    ref = V.vq_nearest_ref(x, c, distance=distance, return_counts=True)
    assert torch.equal(ref.indices[..., :6], torch.arange(6).expand_as(ref.indices[..., :6]))
    for mode in V.MODES:
        got = run(backend, x, c, distance=distance, mode=mode, return_counts=True)
        assert torch.equal(got.indices, ref.indices), (mode, got.indices.tolist())
        assert torch.equal(got.counts, ref.counts)
        if mode == "exact":
            atol = 1e-6 if distance == "cosine" else 0.0  # cosine: ~1e-4 distances, float32's 1 - x.c
            torch.testing.assert_close(got.dist, ref.dist, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", V.DISTANCES)
def test_device_path_bit_identical_on_ordinary_data(monkeypatch, backend, distance):
    x, c = torch.randn(2, 13, 8), torch.randn(2, 7, 8)
    want = run(backend, x, c, distance=distance, return_counts=True)
    monkeypatch.setattr(V, "_host_checks", lambda t: False)
    got = run(backend, x, c, distance=distance, return_counts=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("dim", [-1, (-2, -1)], ids=["rows", "heads"])
def test_absmax_over_dims(dim):
    """The max-abs reduction behind the finiteness check and the rescale: exact, NaN where a NaN is, over
    rows or over whole heads (the fast host check)."""
    t = torch.randn(3, 5, 7) * 4.0
    t[0, 1, 2], t[1, 2, 3], t[2, 4, 6] = float("nan"), -float("inf"), -1e30
    got = V._absmax(t, dim)
    want = t.double().abs().amax(dim)
    assert got.dtype == t.dtype and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.double().nan_to_num(), want.nan_to_num())
