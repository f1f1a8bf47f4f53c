"""fastgen.nn.MultiheadAttention against torch.nn.MultiheadAttention: state_dict, outputs, gradients."""

import pytest
import torch
from torch import nn

import fastgen
from fastgen.nn import MultiheadAttention

E, H, N, L, S = 24, 3, 2, 5, 7  # odd sizes: head_dim 8, L != S


def pair(**kw):
    """A torch MHA and fastgen's copy of it (float64, so differences are the algorithms', not rounding)."""
    t = nn.MultiheadAttention(E, H, dtype=torch.float64, **kw)
    return t, MultiheadAttention.from_torch(t)


def inputs(batch_first, kdim=E, vdim=E, self_attn=False, batched=True):
    q = torch.randn(N, L, E, dtype=torch.float64)
    k = torch.randn(N, S, kdim, dtype=torch.float64)
    v = torch.randn(N, S, vdim, dtype=torch.float64)
    if self_attn:
        k = v = q
    if not batched:
        return [t[0].clone().requires_grad_() for t in (q, k, v)]
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    return [t.detach().clone().requires_grad_() for t in (q, k, v)]


def run_both(t, f, args, **kw):
    """Forward + backward through both; returns their (out, weights, grads) for comparison."""
    res = []
    for mod in (t, f):
        xs = [a.detach().clone().requires_grad_() if a.requires_grad else a for a in args]
        kw_ = {
            k: (v.detach().clone().requires_grad_() if torch.is_tensor(v) and v.requires_grad else v)
            for k, v in kw.items()
        }
        out, w = mod(*xs, **kw_)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
        if w is not None:
            loss = loss + (w * w).sum()
        loss.backward()
        grads = [x.grad for x in xs if x.requires_grad]
        grads += [v.grad for v in kw_.values() if torch.is_tensor(v) and v.requires_grad]
        grads += [p.grad for p in mod.parameters()]
        res.append((out, w, grads))
        mod.zero_grad(set_to_none=True)
    return res


def assert_same(res, atol=1e-10, grad_atol=1e-7):
    # grads: the fused op saves its logsumexp in float32 even for float64 inputs, so its backward is
    # float32-accurate (~1e-8 here); a semantic difference would show at ~1e-1
    (o1, w1, g1), (o2, w2, g2) = res
    assert o1.shape == o2.shape
    torch.testing.assert_close(o2, o1, atol=atol, rtol=1e-7)
    assert (w1 is None) == (w2 is None)
    if w1 is not None:
        torch.testing.assert_close(w2, w1, atol=atol, rtol=1e-7)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, atol=grad_atol, rtol=1e-5)


def test_state_dict_round_trip_and_init():
    for kw in ({}, {"kdim": 10, "vdim": 6, "add_bias_kv": True}, {"bias": False}):
        torch.manual_seed(1)
        t = nn.MultiheadAttention(E, H, **kw)
        torch.manual_seed(1)
        f = MultiheadAttention(E, H, **kw)
        assert list(t.state_dict()) == list(f.state_dict())
        for (nt, pt), (nf, pf) in zip(t.named_parameters(), f.named_parameters()):  # same init, same draws
            assert nt == nf and torch.equal(pt, pf)
        t2 = nn.MultiheadAttention(E, H, **kw)
        t2.load_state_dict(MultiheadAttention(E, H, **kw).state_dict())  # fastgen -> torch
        f.load_state_dict(t2.state_dict())  # torch -> fastgen
        assert all(torch.equal(a, b) for a, b in zip(t2.state_dict().values(), f.state_dict().values()))
    assert type(f.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    t = nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64).eval()
    t.in_proj_weight.requires_grad_(False)
    f = MultiheadAttention.from_torch(t)
    assert f.batch_first and not f.training and f.in_proj_weight.dtype == torch.float64
    assert not f.in_proj_weight.requires_grad and f.out_proj.weight.requires_grad
    assert f.in_proj_weight.data_ptr() != t.in_proj_weight.data_ptr()  # a copy


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("self_attn", [False, True])
def test_matches_torch_plain(batch_first, need_weights, self_attn):
    t, f = pair(batch_first=batch_first)
    args = inputs(batch_first, self_attn=self_attn)
    if self_attn:
        args = [args[0]] * 3
    for avg in (True, False):
        assert_same(run_both(t, f, args, need_weights=need_weights, average_attn_weights=avg))


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize(
    "kw",
    [
        {"kdim": 10, "vdim": 6},
        {"add_bias_kv": True},
        {"add_zero_attn": True},
        {"add_bias_kv": True, "add_zero_attn": True, "kdim": 10, "vdim": 6, "bias": False},
    ],
)
def test_matches_torch_options_and_masks(kw, need_weights):
    t, f = pair(batch_first=True, **kw)
    args = inputs(True, kdim=t.kdim, vdim=t.vdim)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, -3:] = True
    am = torch.rand(L, S) < 0.3
    am3 = torch.rand(N * H, L, S) < 0.3
    am3[..., 0] = False  # at least one visible key per row: torch gives NaN otherwise
    fl = torch.randn(L, S, dtype=torch.float64, requires_grad=True)
    fkpm = torch.where(kpm, float("-inf"), 0.5).double()
    cases = [
        {"key_padding_mask": kpm},
        {"key_padding_mask": torch.zeros(S, N, dtype=torch.bool).index_fill_(0, torch.tensor([5]), True).t()},
        {"attn_mask": am & ~torch.eye(L, S, dtype=torch.bool)},
        {"attn_mask": am3},
        {"attn_mask": fl},
        {"attn_mask": fl, "key_padding_mask": fkpm},
        {"attn_mask": am3, "key_padding_mask": kpm},
        {"attn_mask": torch.randn(N * H, L, S, dtype=torch.float64)},
    ]
    for masks in cases:
        assert_same(run_both(t, f, args, need_weights=need_weights, **masks))


def test_mixed_mask_types_match_torch():
    t, f = pair()
    args = inputs(False)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, :2] = True
    with pytest.warns(UserWarning):  # torch deprecates mixing; fastgen just serves it
        res = run_both(t, f, args, key_padding_mask=kpm, attn_mask=torch.randn(L, S, dtype=torch.float64))
    assert_same(res)


@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_and_unbatched(need_weights):
    t, f = pair(batch_first=True)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    q = inputs(True, self_attn=True)[0]
    assert_same(run_both(t, f, [q, q, q], attn_mask=causal, is_causal=True, need_weights=need_weights))
    kpm = torch.zeros(N, L, dtype=torch.float64)
    kpm[1, 3:] = float("-inf")
    res = run_both(
        t, f, [q, q, q], attn_mask=causal, is_causal=True, key_padding_mask=kpm, need_weights=need_weights
    )
    assert_same(res)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        f(q, q, q, is_causal=True)
    # unbatched: (L, E), kpm (S,), 3-D mask (H, L, S); batch_first is ignored
    args = inputs(True, batched=False)
    am = torch.rand(H, L, S) < 0.3
    am[..., 0] = False
    for kw in ({}, {"key_padding_mask": torch.arange(S) > 4}, {"attn_mask": am}):
        for avg in (True, False):
            res = run_both(t, f, args, need_weights=need_weights, average_attn_weights=avg, **kw)
            assert res[1][0].shape == (L, E)
            assert_same(res)


def test_dropout_train_vs_eval():
    t, f = pair(dropout=0.5)
    args = inputs(False)
    t.eval(), f.eval()
    assert_same(run_both(t, f, args))  # eval: no dropout, exact
    assert_same(run_both(t, f, args, need_weights=False))
    t.train(), f.train()
    # need_weights=True draws dropout from torch's generator exactly as torch does
    torch.manual_seed(3)
    o1, w1 = t(*args)
    torch.manual_seed(3)
    o2, w2 = f(*args)
    torch.testing.assert_close(o2, o1, atol=1e-10, rtol=1e-7)
    torch.testing.assert_close(w2, w1, atol=1e-10, rtol=1e-7)
    # fused path: its own dropout stream; check it is active, reproducible and unbiased-ish
    torch.manual_seed(4)
    a, w = f(*args, need_weights=False)
    torch.manual_seed(4)
    b, _ = f(*args, need_weights=False)
    f.eval()
    c, _ = f(*args, need_weights=False)
    assert w is None and torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def test_fully_masked_rows_give_zeros_not_nan():
    for need_weights in (True, False):
        _, f = pair(batch_first=True)
        q, k, v = inputs(True)
        am = torch.zeros(L, S, dtype=torch.bool)
        am[2] = True  # query 2 sees nothing
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[1] = True  # batch 1 sees nothing
        out, w = f(q, k, v, attn_mask=am, key_padding_mask=kpm, need_weights=need_weights)
        out.sum().backward()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
        assert all(torch.isfinite(p.grad).all() for p in f.parameters())
        # rows with no visible key: attention output 0, so the output is the out_proj bias
        f.out_proj.bias.data.normal_()
        out, w = f(q, k, v, attn_mask=am, key_padding_mask=kpm, need_weights=need_weights)
        torch.testing.assert_close(out[1], f.out_proj.bias.expand(L, E))
        torch.testing.assert_close(out[0, 2], f.out_proj.bias)
        if need_weights:
            assert (w[1] == 0).all() and (w[0, 2] == 0).all()


def test_float32_and_fused_path_is_used(monkeypatch):
    t = nn.MultiheadAttention(E, H, batch_first=True)
    f = MultiheadAttention.from_torch(t)
    x = torch.randn(N, L, E)
    calls = []
    real = fastgen.nn.attention.flash_attention
    monkeypatch.setattr(
        fastgen.nn.attention, "flash_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    out, w = f(x, x, x, need_weights=False)
    torch.testing.assert_close(out, t(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)
    assert calls and w is None


def test_triton_backend_tiny():
    t = nn.MultiheadAttention(16, 2, batch_first=True)
    f = MultiheadAttention.from_torch(t)
    x = torch.randn(2, 9, 16, requires_grad=True)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    ref, _ = t(x, x, x, key_padding_mask=kpm, need_weights=False)
    (gref,) = torch.autograd.grad(ref.sum(), x)
    with fastgen.use_backend("triton"):
        out, _ = f(x, x, x, key_padding_mask=kpm, need_weights=False)
        (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(g, gref, atol=2e-5, rtol=1e-4)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="embed_dim must be divisible by num_heads"):
        MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="greater than 0"):
        MultiheadAttention(0, 1)
    f = MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(N, L, E)
    with pytest.raises(ValueError, match=r"key_padding_mask of shape \(2, 5\)"):
        f(x, x, x, key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"2-D attn_mask is \(5, 4\), but should be \(5, 5\)"):
        f(x, x, x, attn_mask=torch.zeros(L, L - 1))
    with pytest.raises(ValueError, match=r"should be \(6, 5, 5\)"):
        f(x, x, x, attn_mask=torch.zeros(N, L, L))
    with pytest.raises(ValueError, match="only bool and floating types of attn_mask"):
        f(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int64))
    with pytest.raises(ValueError, match="feature size 24"):
        f(x, x, torch.randn(N, L, E + 1))
    with pytest.raises(ValueError, match="batched"):
        f(x, x[0], x[0])
    with pytest.raises(ValueError, match="batch sizes differ"):
        f(x, x[:1], x[:1])
    with pytest.raises(TypeError, match=r"expects a torch\.nn\.MultiheadAttention"):
        MultiheadAttention.from_torch(nn.Linear(2, 2))


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("tgt, src", [(0, 0), (L, 0), (0, S)])
def test_empty_sequences_match_torch(need_weights, tgt, src):
    t, f = pair(batch_first=True)
    q = torch.randn(N, tgt, E, dtype=torch.float64)
    kv = torch.randn(N, src, E, dtype=torch.float64)
    (o1, w1), (o2, w2) = t(q, kv, kv, need_weights=need_weights), f(q, kv, kv, need_weights=need_weights)
    assert o2.shape == o1.shape and (w1 is None) == (w2 is None)
    torch.testing.assert_close(o2, o1)  # no key: the output projection of zeros, as torch
    if w1 is not None:
        assert w2.shape == w1.shape


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_input_dtype_must_match_the_parameters(dtype):
    f = MultiheadAttention(E, H, batch_first=True)  # float32 parameters; torch fails inside F.linear
    x = torch.ones(N, L, E, dtype=dtype)
    with pytest.raises(TypeError, match=f"query has dtype {dtype}, expected torch.float32"):
        f(x, x, x)
    with pytest.raises(TypeError, match=f"value has dtype {dtype}"):
        f(x.float(), x.float(), x)
