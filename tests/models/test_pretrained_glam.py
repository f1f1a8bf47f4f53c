"""GLaM save_pretrained / from_pretrained: fastgen's directory format, tied parameters stored once and
re-tied, config overrides, errors."""

import json

import pytest
import torch
from safetensors import safe_open

from fastgen.models.glam import GLaM, from_name


def _model(name, **overrides):
    torch.manual_seed(0)
    model = GLaM(from_name(name, **overrides)).eval()
    with torch.no_grad():  # random norms and biases too, so every tensor matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _logits(model):
    tokens = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(tokens)[0]


def _stored(directory):
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("name", ["glam-tiny", "glam-tiny-8e"])
def test_round_trip_equal_logits(name, tmp_path):
    model = _model(name)
    model.save_pretrained(tmp_path / "m")
    assert _stored(tmp_path / "m") == set(model.state_dict())
    back = GLaM.from_pretrained(tmp_path / "m").eval()
    assert back.config == model.config
    assert torch.equal(_logits(back), _logits(model))
    assert (back.lm_head is None) == model.config.tie_embeddings
    if back.lm_head is not None:  # untied: two separate tensors
        assert back.lm_head.weight.data_ptr() != back.tok_emb.weight.data_ptr()


def test_hand_tied_head_is_stored_once_and_retied(tmp_path):
    model = _model("glam-tiny", tie_embeddings=False)
    model.lm_head.weight = model.tok_emb.weight  # tied by hand: one Parameter under two names
    model.save_pretrained(tmp_path / "m")
    assert "lm_head.weight" not in _stored(tmp_path / "m") and "tok_emb.weight" in _stored(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["model_type"] == "glam" and meta["tied"] == {"lm_head.weight": "tok_emb.weight"}
    back = GLaM.from_pretrained(tmp_path / "m").eval()
    assert back.lm_head.weight is back.tok_emb.weight
    assert torch.equal(_logits(back), _logits(model))
    assert len(list(back.parameters())) == len(list(model.parameters()))


def test_overrides_and_errors(tmp_path):
    model = _model("glam-tiny")
    model.save_pretrained(tmp_path / "m")
    back = GLaM.from_pretrained(tmp_path / "m", eval_capacity_factor=2.0, jitter_eps=0.01)
    assert back.config.eval_capacity_factor == 2.0 and back.config.jitter_eps == 0.01
    with pytest.raises(TypeError, match=r"unknown config fields \['bogus'\]"):
        GLaM.from_pretrained(tmp_path / "m", bogus=1)
    with pytest.raises(RuntimeError, match="size mismatch"):
        GLaM.from_pretrained(tmp_path / "m", d_ff=32)
    with pytest.raises(FileNotFoundError, match=r"config\.json: file not found"):
        GLaM.from_pretrained(tmp_path / "missing")
    with pytest.raises(TypeError, match="path must be"):
        GLaM.from_pretrained(1)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "dalle"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="holds a 'dalle' model, not a 'glam' model"):
        GLaM.from_pretrained(tmp_path / "m")
    model.process_group = object()  # an expert-parallel shard holds only its experts
    with pytest.raises(ValueError, match="expert-parallel shard"):
        model.save_pretrained(tmp_path / "shard")
