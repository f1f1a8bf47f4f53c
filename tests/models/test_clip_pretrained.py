"""CLIP.from_pretrained / save_pretrained: every release format, built here from tiny random models.

OpenAI TorchScript archives are made with torch.jit on a module tree that carries the release's parameter
names; open_clip files are the checkpoint / Hub layouts open_clip writes; HF directories come from
transformers' own save_pretrained and are compared with transformers' outputs."""

import json
from dataclasses import replace

import pytest
import torch
from optional_imports import import_or_skip
from torch import nn

from fastgen.models import hub
from fastgen.models.clip import (
    CLIP,
    PRESETS,
    detect_clip_format,
    from_name,
    interpolate_pos_embed,
    read_clip_checkpoint,
)

EXACT = {"atol": 0.0, "rtol": 0.0}
JIT_WARNINGS = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


def tiny(name="tiny", **kw):
    """A preset model with non-trivial LayerNorm / bias / BatchNorm-statistics values, in eval mode."""
    torch.manual_seed(0)
    model = from_name(name, **kw).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "ln" in n or "bn" in n:
                p.add_(0.1 * torch.randn_like(p))
        for n, b in model.named_buffers():
            if n.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif n.endswith("running_var"):
                b.copy_(1 + 0.5 * torch.rand_like(b))
    return model


def outputs(model, size=None):
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    h = w = size or (cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0])
    x = torch.randn(2, 3, h, w, generator=g)
    length = min(12, cfg.context_length)
    t = torch.randint(1, cfg.vocab_size - 1, (2, length), generator=g)
    t[:, length - 3] = cfg.vocab_size - 1  # the eot: the largest id
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(t)


def assert_same(model, ref, size=None, **tol):
    for a, b in zip(outputs(model, size), outputs(ref, size)):
        torch.testing.assert_close(a, b, **(tol or EXACT))


def torchscript_archive(state_dict, path, extras=True):
    """A TorchScript archive whose state_dict has ``state_dict``'s names and tensors, as OpenAI's release
    ``.pt`` files (plus their input_resolution / context_length / vocab_size entries)."""

    class Released(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Released()
    for key, value in state_dict.items():
        *parents, leaf = key.split(".")
        mod = root
        for name in parents:
            if name not in mod._modules:
                mod.add_module(name, nn.Module())
            mod = mod._modules[name]
        if value.is_floating_point() and not leaf.startswith("running_"):
            mod.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            mod.register_buffer(leaf, value.clone())
    if extras:
        for name, v in (("input_resolution", 32), ("context_length", 32), ("vocab_size", 258)):
            root.register_buffer(name, torch.tensor(v))
    torch.jit.save(torch.jit.script(root), str(path))
    return path


# ---- OpenAI ---------------------------------------------------------------------------------------------


@JIT_WARNINGS
@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
def test_openai_torchscript_archive(tmp_path, name):
    ref = tiny(name)
    path = torchscript_archive(ref.state_dict(), tmp_path / "ViT-B-32.pt")
    assert detect_clip_format(path) == "openai_jit"
    # heads are not in the weights: OpenAI's rule (width / 64) gives 1 for the tiny text tower, not 4
    model = CLIP.from_pretrained(path, text_heads=4, **({"vision_heads": 4} if name == "tiny" else {}))
    assert model.config == ref.config and not model.training
    assert_same(model, ref)
    assert list(model.state_dict()) == list(ref.state_dict())


@JIT_WARNINGS
def test_openai_archive_in_float16(tmp_path):
    """OpenAI's archives hold float16 weights: float32 by default (exact upcast), "auto" keeps float16."""
    ref = tiny()
    half = {k: v.half() if v.dim() >= 2 else v for k, v in ref.state_dict().items()}  # as convert_weights
    path = torchscript_archive(half, tmp_path / "ViT.pt")
    model = CLIP.from_pretrained(path, vision_heads=4, text_heads=4)
    assert model.visual.proj.dtype == torch.float32
    ref.load_state_dict({k: v.float() for k, v in half.items()})
    assert_same(model, ref)
    auto = CLIP.from_pretrained(path, dtype="auto", vision_heads=4, text_heads=4)
    assert auto.visual.proj.dtype == torch.float16 and torch.equal(auto.visual.proj, half["visual.proj"])


def test_openai_state_dict_file(tmp_path):
    ref = tiny("tiny-rn")
    torch.save(ref.state_dict(), tmp_path / "RN50.pt")
    assert detect_clip_format(tmp_path / "RN50.pt") == "state_dict"
    assert_same(CLIP.from_pretrained(tmp_path / "RN50.pt", text_heads=4), ref)


# ---- open_clip ------------------------------------------------------------------------------------------


def test_open_clip_training_checkpoint_and_plain_files(tmp_path):
    ref = tiny("tiny-gelu")
    sd = ref.state_dict()
    ckpt = {
        "epoch": 3,
        "name": "2024_01_01-model_ViT-B-32-lr_0.0005",
        "state_dict": {"module." + k: v for k, v in sd.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1]}]},
    }
    torch.save(ckpt, tmp_path / "epoch_3.pt")
    torch.save({**sd, "attn_mask": torch.full((32, 32), float("-inf")).triu(1)}, tmp_path / "plain.bin")
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "plain.safetensors"))
    kw = {"vision_heads": 4, "text_heads": 4, "act": "gelu"}  # no config in these files
    for f in ("epoch_3.pt", "plain.bin", "plain.safetensors"):
        assert detect_clip_format(tmp_path / f) == "state_dict"
        assert_same(CLIP.from_pretrained(tmp_path / f, **kw), ref)
    # without act="gelu" the OpenAI default (QuickGELU) is used: different outputs, same weights
    quick = CLIP.from_pretrained(tmp_path / "epoch_3.pt", vision_heads=4, text_heads=4)
    assert quick.config.act == "quick_gelu"
    assert not torch.allclose(outputs(quick)[1], outputs(ref)[1])


def open_clip_config(model, quick_gelu):
    c = model.config
    vision = {"image_size": c.image_size, "layers": c.vision_layers, "width": c.vision_width,
              "patch_size": c.patch_size, "head_width": c.vision_width // c.vision_heads}  # fmt: skip
    if c.is_resnet:
        vision = {"image_size": c.image_size, "layers": list(c.vision_layers), "width": c.vision_width,
                  "head_width": c.vision_width * 32 // c.vision_heads}  # fmt: skip
    text = {"context_length": c.context_length, "vocab_size": c.vocab_size, "width": c.text_width,
            "heads": c.text_heads, "layers": c.text_layers}  # fmt: skip
    cfg = {"embed_dim": c.embed_dim, "vision_cfg": vision, "text_cfg": text}
    if quick_gelu:
        cfg["quick_gelu"] = True
    return {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}


@pytest.mark.parametrize(
    "name, weights", [("tiny-gelu", "open_clip_model.safetensors"), ("tiny", "open_clip_pytorch_model.bin"),
                      ("tiny-rn", "open_clip_pytorch_model.bin")]
)  # fmt: skip
def test_open_clip_hub_directory(tmp_path, name, weights):
    """The open_clip_config.json decides QuickGELU vs GELU and the head counts: no overrides needed."""
    ref = tiny(name)
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps(open_clip_config(ref, ref.config.act == "quick_gelu"))
    )
    if weights.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(ref.state_dict(), str(tmp_path / weights))
    else:
        torch.save(ref.state_dict(), tmp_path / weights)
    assert detect_clip_format(tmp_path) == "open_clip_hub"
    model = CLIP.from_pretrained(tmp_path)
    assert model.config == ref.config
    assert_same(model, ref)


# ---- Hugging Face ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model():
    transformers = import_or_skip("transformers")
    tiny_kw = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, max_position_embeddings=16, eos_token_id=99, bos_token_id=98,
                         pad_token_id=0, **tiny_kw),
        vision_config=dict(image_size=24, patch_size=8, hidden_act="gelu", **tiny_kw),
        projection_dim=32,
    )  # fmt: skip
    cfg.text_config.hidden_act = "gelu"
    torch.manual_seed(0)
    ref = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return ref


def hf_features(ref, x, t):
    with torch.no_grad():
        out = ref.get_image_features(pixel_values=x), ref.get_text_features(input_ids=t)
    return [getattr(o, "pooler_output", o) for o in out]


@pytest.mark.parametrize("layout", ["safetensors", "bin", "sharded"])
def test_hf_directory(tmp_path, hf_model, layout):
    if layout == "bin":  # what transformers < 5 wrote with safe_serialization=False
        hf_model.config.save_pretrained(tmp_path)
        torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        hf_model.save_pretrained(tmp_path, **({"max_shard_size": "40KB"} if layout == "sharded" else {}))
    if layout == "sharded":
        assert (tmp_path / "model.safetensors.index.json").is_file()
    assert detect_clip_format(tmp_path) == "hf"
    model = CLIP.from_pretrained(tmp_path)
    assert (
        model.config.act == "gelu" and model.config.eot_rule == "eos_id" and model.config.eos_token_id == 99
    )
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 24, 24, generator=g)
    t = torch.randint(1, 98, (3, 16), generator=g)
    t[:, 9], t[:, -1] = 99, 98  # the FIRST eos is pooled, even with a larger id after it
    img_ref, txt_ref = hf_features(hf_model, x, t)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), img_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(t), txt_ref, atol=1e-5, rtol=1e-5)


# ---- fastgen's own format -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, strategy", [("tiny", "adaptive_pool"), ("tiny-rn", "resize"), ("micro", "interpolate")]
)
def test_fastgen_round_trip(tmp_path, name, strategy):
    ref = tiny(name)
    ref.visual.size_strategy = strategy  # set on the tower: stored in the config
    out = ref.save_pretrained(tmp_path / "m")
    assert hub.is_fastgen_dir(out) and detect_clip_format(out) == "fastgen"
    meta = json.loads((out / "config.json").read_text())
    assert meta["model_type"] == "clip" and meta["config"]["size_strategy"] == strategy
    model = CLIP.from_pretrained(out)
    assert model.config == replace(ref.config, size_strategy=strategy)
    assert model.visual.size_strategy == strategy
    a, b = model.state_dict(), ref.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    size = 2 * model.config.grid_size[0] * model.config.patch_size  # not the trained size
    assert_same(model, ref, size=size)


def test_overrides_and_image_size_resample(tmp_path):
    ref = tiny()
    ref.save_pretrained(tmp_path / "m")
    model = CLIP.from_pretrained(tmp_path / "m", size_strategy="adaptive_pool", pool_mode="max")
    assert model.visual.size_strategy == "adaptive_pool" and model.visual.pool_mode == "max"
    # a new trained size: the pos-embed is resampled once at load; outputs equal the on-the-fly interpolation
    big = CLIP.from_pretrained(tmp_path / "m", image_size=48)
    assert big.visual.grid_size == (6, 6)
    want = interpolate_pos_embed(ref.visual.positional_embedding.detach(), 4, 6)
    torch.testing.assert_close(big.visual.positional_embedding.detach(), want, **EXACT)
    assert_same(big, ref, size=48, atol=1e-5, rtol=1e-5)
    cfg, sd, stored = read_clip_checkpoint(tmp_path / "m", image_size=48)
    assert (
        stored == ref.config and cfg.image_size == 48 and sd["visual.positional_embedding"].shape == (17, 64)
    )
    half = CLIP.from_pretrained(tmp_path / "m", dtype=torch.float64)
    assert half.visual.proj.dtype == torch.float64


# ---- errors ---------------------------------------------------------------------------------------------


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.pt: file not found.*OpenAI's CLIP release"):
        CLIP.from_pretrained(tmp_path / "nothing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a CLIP checkpoint directory"):
        CLIP.from_pretrained(tmp_path / "empty")
    with pytest.raises(TypeError, match=r"path: expected a str or os\.PathLike"):
        CLIP.from_pretrained(3)
    ref = tiny()
    ref.save_pretrained(tmp_path / "m")
    with pytest.raises(TypeError, match=r"unknown config overrides \['bogus'\]"):
        CLIP.from_pretrained(tmp_path / "m", bogus=1)
    with pytest.raises(TypeError, match="dtype: expected"):
        CLIP.from_pretrained(tmp_path / "m", dtype="half")
    # an HF / open_clip directory without its weights names the file and where it comes from
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(
        json.dumps({"model_type": "clip", "text_config": {}, "vision_config": {}})
    )
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors: file not found.*Hugging Face"):
        CLIP.from_pretrained(hf)
    (hf / "config.json").write_text(
        json.dumps({"model_type": "siglip", "text_config": {}, "vision_config": {}})
    )
    with pytest.raises(ValueError, match="model_type 'siglip' is not supported"):
        CLIP.from_pretrained(hf)
    oc = tmp_path / "oc"
    oc.mkdir()
    (oc / "open_clip_config.json").write_text(json.dumps(open_clip_config(ref, True)))
    with pytest.raises(FileNotFoundError, match=r"open_clip_pytorch_model\.bin: file not found"):
        CLIP.from_pretrained(oc)
    cfg = open_clip_config(ref, True)
    cfg["model_cfg"]["vision_cfg"]["timm_model_name"] = "vit_base_patch16_224"
    (oc / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.save(ref.state_dict(), oc / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError, match="timm_model_name='vit_base_patch16_224'"):
        CLIP.from_pretrained(oc)
    cfg["model_cfg"]["vision_cfg"].pop("timm_model_name")
    cfg["model_cfg"]["text_cfg"]["pool_type"] = "last"
    (oc / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"text_cfg\.pool_type='last' is not supported"):
        CLIP.from_pretrained(oc)
    # towers fastgen's CLIP cannot represent: the first unsupported keys are named
    sd = ref.state_dict()
    timm = {k.replace("visual.", "visual.trunk."): v for k, v in sd.items()}
    torch.save(timm, tmp_path / "timm.pt")
    with pytest.raises(ValueError, match=r"unsupported keys, first \['visual\.trunk\.class_embedding'"):
        CLIP.from_pretrained(tmp_path / "timm.pt")
    hf_text = {**{k: v for k, v in sd.items() if k.startswith("visual.")},
               "text.transformer.embeddings.word_embeddings.weight": torch.zeros(4, 4)}  # fmt: skip
    torch.save(hf_text, tmp_path / "hftext.pt")
    with pytest.raises(ValueError, match=r"first \['text\.transformer\.embeddings"):
        CLIP.from_pretrained(tmp_path / "hftext.pt")
    torch.save({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(64)}, tmp_path / "ls.pt")
    with pytest.raises(ValueError, match=r"\['visual\.transformer\.resblocks\.0\.ls_1\.gamma'\]"):
        CLIP.from_pretrained(tmp_path / "ls.pt")
    torch.save({"vision_model.embeddings.class_embedding": torch.zeros(4)}, tmp_path / "hfsd.pt")
    with pytest.raises(ValueError, match="a Hugging Face CLIPModel state_dict"):
        CLIP.from_pretrained(tmp_path / "hfsd.pt")
    torch.save({k: v for k, v in sd.items() if k != "visual.ln_pre.weight"}, tmp_path / "noln.pt")
    with pytest.raises(ValueError, match=r"missing \['visual\.ln_pre\.weight'\]"):
        CLIP.from_pretrained(tmp_path / "noln.pt", vision_heads=4, text_heads=4)
    torch.save({k: v for k, v in sd.items() if not k.startswith("visual.")}, tmp_path / "text_only.pt")
    with pytest.raises(ValueError, match="not a CLIP checkpoint with both towers"):
        CLIP.from_pretrained(tmp_path / "text_only.pt")
    # a fastgen directory of another model
    hub.save_fastgen_dir(tmp_path / "other", "dvae", PRESETS["tiny"], {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="holds a fastgen 'dvae' model, not a 'clip' model"):
        CLIP.from_pretrained(tmp_path / "other")
    with pytest.raises(TypeError, match="directory: expected"):
        ref.save_pretrained(None)
