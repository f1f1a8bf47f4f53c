"""fastgen.models.hub: config JSON round trips, plain checkpoints, and the restricted module unpickler."""

import pickle
import sys
import types

import pytest
import torch
from torch import nn

from fastgen.models import hub
from fastgen.models.clip import CLIPConfig
from fastgen.models.dalle import DALLEConfig


def test_config_round_trip_keeps_tuples_and_nested_dataclasses():
    cfg = CLIPConfig(image_size=(32, 48), patch_size=16, vision_width=64, vision_heads=4, text_width=32,
                     text_heads=4, vision_layers=2, text_layers=1, embed_dim=16)  # fmt: skip
    back = hub.config_from_dict(CLIPConfig, hub.config_to_dict(cfg))
    assert back == cfg and back.image_size == (32, 48)
    d = DALLEConfig(d_model=32, n_heads=4, n_layers=2, attn_types=("row", "column"))
    back = hub.config_from_dict(DALLEConfig, hub.config_to_dict(d))
    assert back == d and back.attn_types == ("row", "column") and type(back.dvae) is type(d.dvae)
    with pytest.raises(ValueError, match=r"unknown config keys \['bogus'\]"):
        hub.config_from_dict(CLIPConfig, {"bogus": 1})


def test_fastgen_dir_round_trip_and_type_check(tmp_path):
    cfg = DALLEConfig(d_model=32, n_heads=4, n_layers=2)
    sd = {"a": torch.randn(3, 4).t(), "b": torch.arange(5)}
    hub.save_fastgen_dir(tmp_path / "m", "dalle", cfg, sd)
    assert hub.is_fastgen_dir(tmp_path / "m") and not hub.is_fastgen_dir(tmp_path)
    meta, back = hub.load_fastgen_dir(tmp_path / "m", "dalle")
    assert meta["model_type"] == "dalle" and hub.config_from_dict(DALLEConfig, meta["config"]) == cfg
    torch.testing.assert_close(back["a"], sd["a"])
    assert torch.equal(back["b"], sd["b"])
    with pytest.raises(ValueError, match="holds a 'dalle' model, not a 'clip' model"):
        hub.load_fastgen_dir(tmp_path / "m", "clip")
    with pytest.raises(FileNotFoundError, match=r"config\.json: file not found"):
        hub.load_fastgen_dir(tmp_path / "nothing", "clip")


def test_read_state_dict_unwraps(tmp_path):
    sd = {"w": torch.randn(2, 2)}
    torch.save({"state_dict": {"module.w": sd["w"]}}, tmp_path / "c.pt")
    assert torch.equal(hub.read_state_dict(tmp_path / "c.pt")["w"], sd["w"])
    torch.save(nn.Linear(2, 2), tmp_path / "whole.pt")
    with pytest.raises(ValueError, match="not a plain state_dict"):
        hub.read_state_dict(tmp_path / "whole.pt")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt: file not found"):
        hub.read_state_dict(tmp_path / "missing.pt")


def _fake_release_module():
    mod = types.ModuleType("fake_release.layers")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 2))
            self.register_buffer("scale", torch.ones(2))
            self.register_buffer("tmp", torch.zeros(1), persistent=False)
            self.inner = nn.Sequential(nn.ReLU(), nn.Linear(2, 2))
            self.device = torch.device("cpu")

        def __reduce_ex__(self, proto):  # a pickled module whose loading would run code, if allowed
            return (print, ("pwned",)) if getattr(self, "evil", False) else super().__reduce_ex__(proto)

    Block.__module__ = "fake_release.layers"
    Block.__qualname__ = "Block"
    mod.Block = Block
    return mod


def test_restricted_load_reads_modules_without_running_them(tmp_path, monkeypatch):
    mod = _fake_release_module()
    monkeypatch.setitem(sys.modules, "fake_release", types.ModuleType("fake_release"))
    monkeypatch.setitem(sys.modules, "fake_release.layers", mod)
    block = mod.Block()
    torch.save(block, tmp_path / "block.pkl")
    expected = block.state_dict()
    block.evil = True
    torch.save(block, tmp_path / "evil.pkl")
    monkeypatch.delitem(sys.modules, "fake_release.layers")  # the release package is not installed
    allowed = ["fake_release.layers.Block", "torch.nn.modules.container.Sequential",
               "torch.nn.modules.activation.ReLU", "torch.nn.modules.linear.Linear"]  # fmt: skip
    rec = hub.restricted_torch_load(tmp_path / "block.pkl", allowed)
    sd = hub.module_state_dict(rec)
    assert list(sd) == list(expected) and "tmp" not in sd
    for k in sd:
        assert torch.equal(sd[k], expected[k])
    with pytest.raises(
        pickle.UnpicklingError, match=r"builtins\.print, which is not on this reader's allow-list"
    ):
        hub.restricted_torch_load(tmp_path / "evil.pkl", allowed)
    with pytest.raises(pickle.UnpicklingError, match=r"torch\.nn\.modules\.linear\.Linear"):
        hub.restricted_torch_load(tmp_path / "block.pkl", allowed[:-1])
