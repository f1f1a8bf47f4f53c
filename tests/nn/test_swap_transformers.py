"""fastgen as a transformers v5 attention implementation: tiny random models give the outputs, gradients
and greedy generations of their own sdpa implementation (numerics rule against a float64 run)."""

import copy
import gc

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastgen  # noqa: E402
import fastgen.integrations.transformers as ft  # noqa: E402
import fastgen.ops.attention as fa  # noqa: E402

V = 64  # vocabulary of the text models


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/nn/conftest.py


def _bert():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    return transformers.BertModel(cfg), "text", "last_hidden_state"


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg), "text", "logits"


def _llama():  # GQA (4 query heads over 2 key/value heads), RoPE
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg), "text", "logits"


def _vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64)  # fmt: skip
    return transformers.ViTModel(cfg), "image", "last_hidden_state"


def _clip():
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16,
    )  # fmt: skip
    return transformers.CLIPModel(cfg), "text+image", "logits_per_image"


def _t5():  # relative position bias: through fastgen's bias path (with its gradient)
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8)  # fmt: skip
    return transformers.T5ForConditionalGeneration(cfg), "seq2seq", "logits"


def _bart():  # encoder-decoder with cross-attention
    cfg = transformers.BartConfig(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64)  # fmt: skip
    return transformers.BartForConditionalGeneration(cfg), "seq2seq", "logits"


MODELS = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "vit": _vit, "clip": _clip, "t5": _t5, "bart": _bart}


def _build(name):
    torch.manual_seed(0)
    model, kind, out = MODELS[name]()
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "dropout_rate", "dropout", "attention_dropout", "activation_dropout"):  # fmt: skip
        for cfg in (model.config, *(getattr(model.config, k) for k in model.config.sub_configs)):
            if hasattr(cfg, key):
                setattr(cfg, key, 0.0)
    for m in model.modules():  # modules read their dropout rates at construction
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("dropout", "attention_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    model.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 9), generator=g)
    pad = torch.ones(2, 9, dtype=torch.long)
    pad[1, 6:] = 0  # a padded row
    inputs = {}
    if "text" in kind or kind == "seq2seq":
        inputs.update(input_ids=ids, attention_mask=pad)
    if "image" in kind:
        inputs["pixel_values"] = torch.randn(2, 3, 16, 16, generator=g)
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(0, V, (2, 5), generator=g)
    return model, inputs, out


@pytest.fixture
def routes(monkeypatch):
    seen = []
    for name in ("_attention_fwd_op", "_via_torch_sdpa", "_sdpa_direct"):
        real = getattr(fa, name)
        monkeypatch.setattr(fa, name, lambda *a, _n=name, _r=real: seen.append(_n) or _r(*a))
    return seen


def _run(model, inputs, out):
    y = getattr(model(**inputs), out)
    weight = torch.arange(y.numel(), dtype=torch.float64).reshape(y.shape).mul(0.37).sin()  # fixed, any dtype
    (y.double() * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


def _gate(name, got, base, exact):
    # numerics rule: fastgen's float32 error vs the float64 run at most 2x sdpa's own float32 error
    err, ref_err = (got.double() - exact).abs().max(), (base.double() - exact).abs().max()
    assert err <= 2 * ref_err + 1e-5 * (1 + exact.abs().max()), f"{name}: {err:.3g} vs sdpa {ref_err:.3g}"


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_and_gradients_equal_sdpa(name, routes):
    model, inputs, out = _build(name)
    model.train()  # gradients through every attention path (dropout is 0)
    exact_model = copy.deepcopy(model).double()
    dinputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    base, base_g = _run(model, inputs, out)
    exact, exact_g = _run(exact_model, dinputs, out)

    report = fastgen.swap_attention(model)
    assert report.names("transformers") == [""] and model.config._attn_implementation == "fastgen"
    routes.clear()
    got, got_g = _run(model, inputs, out)
    assert routes, "fastgen's attention was not called"
    if name == "t5":  # the learned relative position bias needs its gradient: fastgen's own kernel
        assert "_attention_fwd_op" in routes
    _gate(name, got, base, exact)
    assert got_g.keys() == base_g.keys()
    for n in got_g:
        _gate(f"{name} grad {n}", got_g[n], base_g[n], exact_g[n])

    assert fastgen.unswap_attention(model) > 0 and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["gpt2", "llama", "bart"])
def test_greedy_generate_with_kv_cache_gives_identical_tokens(name, routes):
    model, inputs, _ = _build(name)
    model.eval()
    inputs.pop("decoder_input_ids", None)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    ref = model.generate(**inputs, **kw)
    model.set_attn_implementation("fastgen")
    routes.clear()
    out = model.generate(**inputs, **kw)
    assert routes and torch.equal(out, ref)


def test_from_pretrained_and_output_attentions_fallback(tmp_path, routes):
    model, inputs, _ = _build("bert")
    model.eval().save_pretrained(tmp_path)
    loaded = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="fastgen").eval()
    assert loaded.config._attn_implementation == "fastgen"
    routes.clear()
    torch.testing.assert_close(loaded(**inputs).last_hidden_state, model(**inputs).last_hidden_state)
    assert routes
    ft.FALLBACKS.clear()
    out = loaded(**inputs, output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == 2
    assert ft.FALLBACKS  # recorded, with its reason
    assert all("output_attentions" in why for _, why in ft.FALLBACKS)


@pytest.mark.parametrize("mask_value", ["finfo_min", "bool"])
def test_fully_masked_query_rows_match_sdpa(mask_value):
    # an HF-style additive mask of finfo.min over a whole row: SDPA's uniform average, never sum(v)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    keep = torch.rand(2, 1, 5, 5, generator=g) > 0.4
    keep[0, 0, 2] = False
    mask = (
        keep
        if mask_value == "bool"
        else torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    )
    module = torch.nn.Module()
    out, _ = ft.fastgen_attention_forward(module, q, k, v, mask, scaling=0.3)
    ref, _ = transformers.integrations.sdpa_attention.sdpa_attention_forward(
        module, q, k, v, mask, scaling=0.3
    )
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_swap_report_explains():
    class OwnAttention(torch.nn.Module):  # computes attention in its own code
        def forward(self, x):
            return (x @ x.transpose(-1, -2)).softmax(-1) @ x

    report = fastgen.swap_attention(torch.nn.Sequential(OwnAttention(), OwnAttention()))
    text = str(report)
    assert len(report) == 0 and "2 module(s) look like attention" in text and "What to do" in text
    model, _, _ = _build("bert")
    report = fastgen.swap_attention(model, exclude="*")
    assert not report.replaced and "not switched" in str(report)
    assert model.config._attn_implementation == "sdpa"
    report = fastgen.swap_attention(model)
    assert "'sdpa' -> 'fastgen' (2 attention modules" in str(report)
    fastgen.unswap_attention(model)
    gc.collect()


def test_compile_fullgraph_on_a_swapped_transformers_model(routes):
    model, inputs, out = _build("bert")
    model.eval()
    ref = getattr(model(**inputs), out)
    fastgen.swap_attention(model)
    routes.clear()
    got = getattr(torch.compile(model, fullgraph=True, backend="eager")(**inputs), out)
    assert routes
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_attention_dropout_in_training(routes):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    model.set_attn_implementation("fastgen")
    ids = torch.randint(0, V, (2, 9))
    routes.clear()
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(model.train()(input_ids=ids).last_hidden_state)
    assert routes and torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1])  # torch.manual_seed makes it reproducible
    assert not torch.allclose(outs[0], outs[2])  # and it does drop
    eval_out = model.eval()(input_ids=ids).last_hidden_state
    assert not torch.allclose(outs[0], eval_out)
