"""vq_ema_update: every backend (and both summation modes) against the one-hot einsum reference, codes
without rows, bit-identical deterministic mode, the Laplace-smoothed codebook, errors, opcheck."""

import pytest
import torch

from fastgen import use_backend
from fastgen.ops.vq_ema import vq_codebook_from_ema, vq_ema_update, vq_ema_update_ref

pytestmark = pytest.mark.usefixtures("poison_empty")
HAS_CUDA = torch.cuda.is_available()
BACKENDS = ["torch", "triton"]
DEV = "cuda" if HAS_CUDA else "cpu"


def make(heads, n, k, d, dtype, device=DEV, unused=3):
    """Random inputs; the last ``unused`` codes get no rows."""
    sh = () if heads is None else (heads,)
    x = torch.randn(*sh, n, d, device=device).to(dtype)
    idx = torch.randint(0, k - unused, (*sh, n), device=device)
    cs = torch.rand(*sh, k, device=device) * 5
    es = torch.randn(*sh, k, d, device=device)
    return x, idx, cs, es


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [None, 3])
def test_matches_one_hot_reference(backend, deterministic, dtype, heads):
    n, k, d, decay = 67, 13, 37, 0.9
    x, idx, cs, es = make(heads, n, k, d, dtype)
    cs0, es0 = cs.clone(), es.clone()
    ref_cs, ref_es = vq_ema_update_ref(x, idx, cs, es, decay, upcast=True)
    with use_backend(backend, op="vq_ema"):
        assert vq_ema_update(x, idx, cs, es, decay, deterministic=deterministic) is None
    torch.testing.assert_close(cs, ref_cs, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(es, ref_es, atol=2e-5, rtol=1e-5)
    # codes with no rows only decay
    torch.testing.assert_close(cs[..., -3:], decay * cs0[..., -3:], atol=0, rtol=1e-6)
    torch.testing.assert_close(es[..., -3:, :], decay * es0[..., -3:, :], atol=0, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_int32_and_strided_x(backend):
    x, idx, cs, es = make(2, 40, 9, 24, torch.float32, unused=0)
    x = x.to(torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous rows
    idx = idx.to(torch.int32)
    ref_cs, ref_es = vq_ema_update_ref(x, idx, cs, es, 0.5, upcast=True)
    with use_backend(backend, op="vq_ema"):
        vq_ema_update(x, idx, cs, es, 0.5)
    torch.testing.assert_close(cs, ref_cs, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(es, ref_es, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_no_rows_and_decay_edges(backend, deterministic):
    x, idx, cs, es = make(None, 0, 5, 8, torch.float32, unused=0)
    cs0, es0 = cs.clone(), es.clone()
    with use_backend(backend, op="vq_ema"):
        vq_ema_update(x, idx, cs, es, 0.25, deterministic=deterministic)
        torch.testing.assert_close(cs, 0.25 * cs0)
        torch.testing.assert_close(es, 0.25 * es0)
        x, idx, cs, es = make(None, 30, 5, 8, torch.float32, unused=1)
        vq_ema_update(x, idx, cs, es, 0.0, deterministic=deterministic)  # decay 0: plain counts / sums
    torch.testing.assert_close(cs, torch.bincount(idx, minlength=5).float())
    sums = torch.zeros(5, 8).index_add_(0, idx.cpu(), x.cpu())
    torch.testing.assert_close(es.cpu(), sums, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_is_bit_identical(backend):
    n = 3000 if HAS_CUDA else 300
    x, idx, cs, es = make(2, n, 7, 40, torch.float32, unused=0)
    outs = []
    for _ in range(3):
        c, e = cs.clone(), es.clone()
        with use_backend(backend, op="vq_ema"):
            vq_ema_update(x, idx, c, e, 0.99, deterministic=True)
        outs.append((c, e))
    for c, e in outs[1:]:
        assert torch.equal(c, outs[0][0]) and torch.equal(e, outs[0][1])


def test_laplace_smoothing_formula():
    cs = torch.tensor([[3.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
    es = torch.arange(18, dtype=torch.float32).view(2, 3, 3)
    eps = 0.1
    out = vq_codebook_from_ema(cs, es, eps)
    for h in range(2):
        n = float(cs[h].sum())
        for k in range(3):
            smoothed = (float(cs[h, k]) + eps) / (n + 3 * eps) * n
            torch.testing.assert_close(out[h, k], es[h, k] / smoothed)
    torch.testing.assert_close(vq_codebook_from_ema(cs[0], es[0], eps), out[0])  # single head
    with pytest.raises(ValueError, match="embed_sum"):
        vq_codebook_from_ema(cs, es[:, :2])


def test_errors():
    x, idx, cs, es = make(None, 10, 6, 4, torch.float32, device="cpu")
    cases = [
        ((x, idx[:5], cs, es, 0.9), r"indices must be \(N,\)"),
        ((x, idx, cs, es[:, :3], 0.9), r"embed_sum must be \(K, D\)"),
        ((x[None], idx, cs, es, 0.9), r"indices must be \(H, N\)"),
        ((x[:, :0], idx, torch.zeros(0), torch.zeros(0, 0), 0.9), "codebook is empty"),
        ((x, idx, cs.double(), es, 0.9), "cluster_size must be float32"),
        ((x, idx.float(), cs, es, 0.9), "indices must be int32 or int64"),
        ((x.int(), idx, cs, es, 0.9), "x must be float16"),
        ((x, idx + 6, cs, es, 0.9), r"indices must lie in \[0, K\) = \[0, 6\)"),
        ((x, idx - 1, cs, es, 0.9), "indices must lie in"),
        ((x, idx, cs, es, 1.5), r"decay must be in \[0, 1\]"),
        ((x, idx, cs, es.t().contiguous().t(), 0.9), "embed_sum must be contiguous"),
        ((x[0], idx, cs, es, 0.9), r"x must be \(N, D\) or \(H, N, D\)"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            vq_ema_update(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    from fastgen.ops.vq_ema import _vq_ema_update_op

    x, idx, cs, es = make(2, 20, 6, 8, torch.float32, unused=0)
    with use_backend(backend, op="vq_ema"):
        torch.library.opcheck(_vq_ema_update_op, (x, idx, cs, es, 0.9, True))


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_large_triton_vs_reference(deterministic):
    n, k, d = 16384, 1024, 256
    x, idx, cs, es = make(None, n, k, d, torch.bfloat16, device="cuda", unused=10)
    ref_cs, ref_es = vq_ema_update_ref(x, idx, cs, es, 0.99, upcast=True)
    with use_backend("triton", op="vq_ema"):
        vq_ema_update(x, idx, cs, es, 0.99, deterministic=deterministic)
    torch.testing.assert_close(cs, ref_cs, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(es, ref_es, atol=1e-4, rtol=1e-4)


def test_torch_compile_fullgraph():
    x, idx, cs, es = make(2, 20, 6, 8, torch.float32, unused=0)
    ref_cs, ref_es = vq_ema_update_ref(x, idx, cs, es, 0.9, upcast=True)

    def step(x, idx, cs, es):
        vq_ema_update(x, idx, cs, es, 0.9)
        return vq_codebook_from_ema(cs, es)

    with use_backend("torch", op="vq_ema"):
        codebook = torch.compile(step, backend="aot_eager", fullgraph=True)(x, idx, cs, es)
    torch.testing.assert_close(cs, ref_cs, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(es, ref_es, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(codebook, vq_codebook_from_ema(ref_cs, ref_es))
