"""VectorQuantize / ResidualVQ / the dVAE gather decode: lookups equal vq_nearest_ref, straight-through
gradients, losses, EMA updates (training only), dead codes, k-means init, layouts, heads, errors."""

import pytest
import torch
import torch.nn.functional as F

from fastgen.nn.vq import (
    DVAEQuantizer,
    OneHotConv1x1AsGather,
    ResidualVQ,
    VectorQuantize,
    decode_tokens,
    dvae_tokens,
)
from fastgen.ops.vq import vq_nearest_ref
from fastgen.ops.vq_ema import vq_codebook_from_ema, vq_ema_update_ref


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def same_state(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_indices_match_reference_and_loss(distance):
    vq = VectorQuantize(12, 40, distance=distance, commitment_weight=0.3).eval()
    x = torch.randn(3, 17, 12)
    q, idx, loss = vq(x)
    assert idx.shape == (3, 17) and idx.dtype == torch.int64 and q.shape == x.shape
    ref = vq_nearest_ref(x.reshape(-1, 12), vq.codebook, distance=distance).indices
    assert torch.equal(idx.reshape(-1), ref)
    xs = F.normalize(x, dim=-1) if distance == "cosine" else x
    codes = vq.codebook[idx]
    if distance == "cosine":
        codes = F.normalize(codes, dim=-1)
    torch.testing.assert_close(q, codes)
    torch.testing.assert_close(loss, 0.3 * F.mse_loss(xs, codes))


@pytest.mark.parametrize("weight", [0.0, 0.25])
def test_straight_through_gradient(weight):
    vq = VectorQuantize(8, 16, commitment_weight=weight)
    x = torch.randn(4, 9, 8, requires_grad=True)
    g = torch.randn(4, 9, 8)
    q, _, loss = vq(x)
    q_leaf = q.detach().requires_grad_()
    (q_leaf * g).sum().backward()  # the gradient w.r.t. q
    ((q * g).sum() + loss).backward()
    codes = q.detach()
    expect = q_leaf.grad + weight * 2 * (x.detach() - codes) / x.numel()
    torch.testing.assert_close(x.grad, expect)


def test_ema_buffers_update_in_training_only():
    vq = VectorQuantize(6, 10, decay=0.8, eps=1e-5)
    x = torch.randn(50, 6)
    before = snapshot(vq)
    vq.eval()
    vq(x)
    with torch.no_grad():
        vq.train()
        vq(x)
    assert same_state(before, snapshot(vq))
    _, idx, _ = vq(x)
    cs, es = vq_ema_update_ref(
        x, idx, before["_codebook.cluster_size"][0], before["_codebook.embed_avg"][0], 0.8
    )
    cb = vq._codebook
    torch.testing.assert_close(cb.cluster_size[0], cs)
    torch.testing.assert_close(cb.embed_avg[0], es)
    torch.testing.assert_close(cb.embed[0], vq_codebook_from_ema(cs, es, 1e-5))
    assert not torch.equal(cb.embed, before["_codebook.embed"])


def test_learned_codebook_gets_codebook_loss_gradient():
    vq = VectorQuantize(6, 10, ema=False, commitment_weight=0.0)
    assert isinstance(vq._codebook.embed, torch.nn.Parameter)
    x = torch.randn(30, 6)
    _, idx, loss = vq(x)
    torch.testing.assert_close(loss, F.mse_loss(vq.codebook[idx], x))
    loss.backward()
    used = torch.zeros(10, dtype=torch.bool)
    used[idx] = True
    grad = vq._codebook.embed.grad[0]
    assert grad[used].abs().sum() > 0 and grad[~used].abs().sum() == 0


def test_dead_codes_replaced_from_batch_rows():
    vq = VectorQuantize(4, 32, decay=0.5, dead_code_threshold=0.6)
    x = torch.randn(40, 4)
    cs0 = vq._codebook.cluster_size.clone()
    _, idx, _, info = vq(x, return_info=True)
    counts = torch.bincount(idx, minlength=32).float()
    dead = (0.5 * cs0[0] + 0.5 * counts) < 0.6
    assert dead.any()
    assert int(info["dead_codes_replaced"]) == int(dead.sum())
    embed = vq._codebook.embed[0]
    for k in torch.nonzero(dead).flatten():
        assert (embed[k] == x).all(-1).any(), "a replaced code must be a row of the batch"
    assert (vq._codebook.cluster_size[0][dead] == 0.6).all()
    assert 0 < float(info["usage"]) <= 1 and 1 <= float(info["perplexity"]) <= 32


def test_kmeans_init_runs_once(monkeypatch):
    vq = VectorQuantize(5, 8, kmeans_init=True, kmeans_iters=5)
    calls = []
    real = vq._kmeans
    monkeypatch.setattr(vq, "_kmeans", lambda xs: (calls.append(1), real(xs)))
    embed0 = vq._codebook.embed.clone()
    centers = torch.randn(8, 5) * 10
    x = centers[torch.arange(200) % 8] + 0.01 * torch.randn(200, 5)
    vq.eval()
    loss0 = vq(x)[2]
    assert not calls and not bool(vq._codebook.initted)
    vq.train()
    vq(x)
    vq(x)
    assert len(calls) == 1 and bool(vq._codebook.initted)
    assert not torch.equal(vq._codebook.embed, embed0)
    vq.eval()
    _, _, loss, info = vq(x, return_info=True)
    assert float(loss) < 0.1 * float(loss0) and float(info["usage"]) > 0.5  # codes moved onto the data


def test_channel_first_equals_channel_last():
    cf = VectorQuantize(6, 12, channel_last=False)
    cl = VectorQuantize(6, 12)
    cl.load_state_dict(cf.state_dict())
    x = torch.randn(2, 6, 5, 7)
    q1, i1, l1 = cf(x)
    q2, i2, l2 = cl(x.permute(0, 2, 3, 1))
    assert q1.shape == x.shape and i1.shape == (2, 5, 7)
    torch.testing.assert_close(q1, q2.permute(0, 3, 1, 2))
    assert torch.equal(i1, i2)
    torch.testing.assert_close(l1, l2)
    assert same_state(cf.state_dict(), cl.state_dict())  # same EMA update too
    assert cf.get_output_from_indices(i1).shape == x.shape


def test_heads_equal_independent_quantizers():
    vq = VectorQuantize(16, 20, heads=2, decay=0.9)
    singles = [VectorQuantize(8, 20, decay=0.9) for _ in range(2)]
    for h, s in enumerate(singles):
        for name, buf in vq._codebook.state_dict().items():
            getattr(s._codebook, name).copy_(buf[h : h + 1] if buf.dim() else buf)
    x = torch.randn(3, 11, 16)
    q, idx, loss = vq(x)
    assert idx.shape == (3, 11, 2)
    outs = [s(x[..., 8 * h : 8 * h + 8]) for h, s in enumerate(singles)]
    torch.testing.assert_close(q, torch.cat([o[0] for o in outs], -1))
    assert torch.equal(idx, torch.stack([o[1] for o in outs], -1))
    torch.testing.assert_close(loss, (outs[0][2] + outs[1][2]) / 2)
    for h, s in enumerate(singles):  # EMA updates independent per head
        torch.testing.assert_close(vq._codebook.embed[h], s._codebook.embed[0])
        torch.testing.assert_close(vq._codebook.cluster_size[h], s._codebook.cluster_size[0])


def test_bf16_input_keeps_dtype():
    vq = VectorQuantize(8, 16)
    q, _, loss = vq(torch.randn(2, 5, 8, dtype=torch.bfloat16))
    assert (
        q.dtype == torch.bfloat16
        and loss.dtype == torch.float32
        and vq._codebook.embed.dtype == torch.float32
    )


def test_residual_vq():
    centers = torch.randn(16, 8)
    x = centers[torch.randint(0, 16, (4, 64))] + 0.3 * torch.randn(4, 64, 8)
    rvq = ResidualVQ(3, 8, 16, kmeans_init=True, decay=0.9)
    for _ in range(3):
        rvq(x)
    rvq.eval()
    before = snapshot(rvq)
    q, idx, losses = rvq(x)
    assert q.shape == x.shape and idx.shape == (4, 64, 3) and losses.shape == (3,)
    assert same_state(before, snapshot(rvq))
    torch.testing.assert_close(rvq.get_output_from_indices(idx), q)
    r, errs = x, []
    for i, layer in enumerate(rvq.layers):
        r = r - layer.get_output_from_indices(idx[..., i])
        errs.append(float(r.pow(2).mean()))
    assert float(x.pow(2).mean()) > errs[0] > errs[1] > errs[2]


def test_residual_vq_dropout_and_shared_codebook():
    rvq = ResidualVQ(4, 8, 16, shared_codebook=True, quantize_dropout=True)
    assert all(layer._codebook is rvq.layers[0]._codebook for layer in rvq.layers)
    torch.manual_seed(3)
    seen = set()
    for _ in range(12):
        _, idx, losses = rvq(torch.randn(2, 5, 8))
        kept = int((idx[0, 0] >= 0).sum())
        seen.add(kept)
        assert (idx[..., kept:] == -1).all() and (losses[kept:] == 0).all()
    assert len(seen) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dvae_decode_equals_one_hot_conv(dtype):
    k, c_out = 8192, 16
    logits = torch.randn(2, k, 3, 4, dtype=dtype)
    tokens = dvae_tokens(logits)
    assert torch.equal(tokens, DVAEQuantizer(k)(logits)) and tokens.shape == (2, 3, 4)
    conv = torch.nn.Conv2d(k, c_out, 1).to(dtype)
    one_hot = DVAEQuantizer(k).one_hot(tokens, dtype)
    ref = conv(one_hot)
    out = decode_tokens(tokens, conv.weight, conv.bias)
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(out, ref, **tol)
    m = OneHotConv1x1AsGather.from_conv(conv)
    assert m.weight is conv.weight
    torch.testing.assert_close(m(tokens), ref, **tol)
    torch.testing.assert_close(m(one_hot), ref, **tol)  # float input: the ordinary conv
    torch.testing.assert_close(
        OneHotConv1x1AsGather.from_conv(conv, assume_one_hot=True)(one_hot), ref, **tol
    )
    assert torch.equal(decode_tokens(tokens, conv.weight), F.conv2d(one_hot, conv.weight))


def test_errors():
    with pytest.raises(ValueError, match="codebook_size must be >= 1"):
        VectorQuantize(8, 0)
    with pytest.raises(ValueError, match="dim=10 is not divisible by heads=3"):
        VectorQuantize(10, 4, heads=3)
    with pytest.raises(ValueError, match="distance must be one of"):
        VectorQuantize(8, 4, distance="l1")
    vq = VectorQuantize(8, 4)
    with pytest.raises(ValueError, match=r"x must be \(..., dim=8\), got shape \(2, 3, 7\)"):
        vq(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="channel_last=False"):
        vq(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match=r"channel-first x must be \(batch, dim=8"):
        VectorQuantize(8, 4, channel_last=False)(torch.randn(2, 4, 8))
    before = snapshot(vq)
    with pytest.raises(ValueError, match="NaN or inf"):
        vq(torch.tensor([[float("nan")] * 8]))
    assert same_state(before, snapshot(vq))
    with pytest.raises(ValueError, match="floating-point"):
        vq(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, K\) = \[0, 5\)"):
        decode_tokens(torch.full((1, 2, 2), 5), torch.randn(3, 5, 1, 1))
    with pytest.raises(ValueError, match="needs a plain 1x1 Conv2d"):
        OneHotConv1x1AsGather.from_conv(torch.nn.Conv2d(5, 3, 3))
    with pytest.raises(ValueError, match="num_quantizers"):
        ResidualVQ(2, 8, 4).get_output_from_indices(torch.zeros(3, 3, dtype=torch.int64))
