"""DiscreteVAE / DALLE from_pretrained and save_pretrained: the release pickles (encoder.pkl / decoder.pkl,
read without the dall_e package and without running them) and fastgen's own directory format."""

import os
import pickle
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models import hub
from fastgen.models.dalle import DALLE, DiscreteVAE, DVAEConfig, from_name, map_pixels, unmap_pixels

# ---- a stand-in for the dall_e package: its module paths, class names, attributes and layer names ------


def _fake_dall_e():
    """Modules dall_e.utils / .encoder / .decoder with classes shaped as the release's (written from its
    description: attrs-style attributes, ``blocks`` Sequential of ``input``, ``group_1..4`` and ``output``)."""
    utils, enc_mod, dec_mod = (types.ModuleType(f"dall_e.{n}") for n in ("utils", "encoder", "decoder"))

    class Conv2d(nn.Module):
        def __init__(self, n_in, n_out, kw):
            super().__init__()
            self.n_in, self.n_out, self.kw = n_in, n_out, kw
            self.use_float16, self.device, self.requires_grad = True, torch.device("cpu"), False
            self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw * kw) ** 0.5)
            self.b = nn.Parameter(0.1 * torch.randn(n_out))

        def forward(self, x):
            return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)

    def block_class(kernels):
        class Block(nn.Module):
            def __init__(self, n_in, n_out, n_layers):
                super().__init__()
                self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
                self.device, self.requires_grad = torch.device("cpu"), False
                self.n_hid = n_out // 4
                self.post_gain = 1 / n_layers**2
                self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
                chans = (n_in, self.n_hid, self.n_hid, self.n_hid, n_out)
                layers = []
                for j, kw in enumerate(kernels):
                    layers += [
                        (f"relu_{j + 1}", nn.ReLU()),
                        (f"conv_{j + 1}", Conv2d(chans[j], chans[j + 1], kw)),
                    ]
                self.res_path = nn.Sequential(OrderedDict(layers))

            def forward(self, x):
                return self.id_path(x) + self.post_gain * self.res_path(x)

        return Block

    EncoderBlock, DecoderBlock = block_class((3, 3, 3, 1)), block_class((1, 3, 3, 3))

    def coder(block, first, widths, resample, out_ch):
        class Coder(nn.Module):
            def __init__(self, n_hid, n_blk_per_group, vocab_size, n_init=None):
                super().__init__()
                self.group_count, self.n_hid, self.n_blk_per_group = 4, n_hid, n_blk_per_group
                self.vocab_size, self.device, self.requires_grad = vocab_size, torch.device("cpu"), False
                self.use_mixed_precision = True
                n_layers = 4 * n_blk_per_group
                w = widths(n_hid, n_init)
                items = [("input", first(vocab_size, n_hid, n_init))]
                for g in range(1, 5):
                    blocks = [(f"block_{i + 1}", block(w[g - 1] if i == 0 else w[g], w[g], n_layers))
                              for i in range(n_blk_per_group)]  # fmt: skip
                    extra = [resample()] if g < 4 else []
                    items.append((f"group_{g}", nn.Sequential(OrderedDict(blocks + extra))))
                out = nn.Sequential(
                    OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(w[4], out_ch(vocab_size), 1))])
                )
                items.append(("output", out))
                self.blocks = nn.Sequential(OrderedDict(items))

            def forward(self, x):
                return self.blocks(x)

        return Coder

    Encoder = coder(EncoderBlock, lambda v, h, n: Conv2d(3, h, 7), lambda h, n: [h, h, 2 * h, 4 * h, 8 * h],
                    lambda: ("pool", nn.MaxPool2d(kernel_size=2)), lambda v: v)  # fmt: skip
    Decoder = coder(DecoderBlock, lambda v, h, n: Conv2d(v, n, 1), lambda h, n: [n, 8 * h, 4 * h, 2 * h, h],
                    lambda: ("upsample", nn.Upsample(scale_factor=2, mode="nearest")), lambda v: 6)  # fmt: skip
    for mod, cls, name in ((utils, Conv2d, "Conv2d"), (enc_mod, EncoderBlock, "EncoderBlock"),
                           (enc_mod, Encoder, "Encoder"), (dec_mod, DecoderBlock, "DecoderBlock"),
                           (dec_mod, Decoder, "Decoder")):  # fmt: skip
        cls.__module__, cls.__qualname__, cls.__name__ = mod.__name__, name, name
        setattr(mod, name, cls)
    return {"dall_e": types.ModuleType("dall_e"), "dall_e.utils": utils, "dall_e.encoder": enc_mod,
            "dall_e.decoder": dec_mod}  # fmt: skip


@pytest.fixture
def release(tmp_path, monkeypatch):
    """Tiny random encoder.pkl / decoder.pkl written under the release class paths; the fake package is
    removed from sys.modules before the test reads them (as on a machine without dall_e)."""
    mods = _fake_dall_e()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    torch.manual_seed(0)
    enc = mods["dall_e.encoder"].Encoder(n_hid=8, n_blk_per_group=2, vocab_size=32).eval()
    dec = mods["dall_e.decoder"].Decoder(n_hid=8, n_blk_per_group=2, vocab_size=32, n_init=12).eval()
    d = tmp_path / "release"
    d.mkdir()
    torch.save(enc, d / "encoder.pkl")
    torch.save(dec, d / "decoder.pkl")
    for name in mods:
        monkeypatch.delitem(sys.modules, name)
    return d, enc, dec


def test_dvae_from_release_pickles_equals_release_modules(release):
    d, enc, dec = release
    assert not any(m == "dall_e" or m.startswith("dall_e.") for m in sys.modules)
    by_dir = DiscreteVAE.from_pretrained(d)
    by_pair = DiscreteVAE.from_pretrained((d / "encoder.pkl", str(d / "decoder.pkl")))
    by_release = DiscreteVAE.from_release(str(d / "encoder.pkl"), d / "decoder.pkl")  # paths work too
    direct = DiscreteVAE.from_release(enc.state_dict(), dec.state_dict())
    assert by_dir.cfg == DVAEConfig(vocab_size=32, n_hid=8, n_init=12, n_blk_per_group=2)
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_tokens = enc(map_pixels(x)).argmax(1)  # the release module's own forward
        tokens = torch.randint(0, 32, (2, 2, 3), generator=torch.Generator().manual_seed(2))
        onehot = F.one_hot(tokens, 32).permute(0, 3, 1, 2).float()
        ref_images = unmap_pixels(torch.sigmoid(dec(onehot)[:, :3]))
    for vae in (by_dir, by_pair, by_release, direct):
        assert torch.equal(vae.encode(x), ref_tokens)
        torch.testing.assert_close(vae.decode(tokens), ref_images, rtol=1e-5, atol=1e-6)
    assert torch.equal(by_dir.decode(tokens), direct.decode(tokens))


def test_dvae_save_pretrained_round_trip(release, tmp_path):
    vae = DiscreteVAE.from_pretrained(release[0])
    out = vae.save_pretrained(tmp_path / "fg")
    assert hub.is_fastgen_dir(out)
    back = DiscreteVAE.from_pretrained(tmp_path / "fg")
    assert back.cfg == vae.cfg
    for k, v in vae.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_dvae_refuses_code_in_pickles_and_explains_missing_files(release, tmp_path, monkeypatch):
    d = release[0]
    marker = tmp_path / "pwned"

    class Evil(nn.Module):
        def __reduce_ex__(self, proto):
            return (os.system, (f"touch {marker}",))

    torch.save(Evil(), tmp_path / "encoder.pkl")
    with pytest.raises(pickle.UnpicklingError, match=r"system, which is not on this reader's allow-list"):
        DiscreteVAE.from_pretrained((tmp_path / "encoder.pkl", d / "decoder.pkl"))
    assert not marker.exists()
    with pytest.raises(
        ValueError, match=r"holds a dall_e\.decoder\.Decoder, expected a dall_e\.encoder\.Encoder"
    ):
        DiscreteVAE.from_pretrained((d / "decoder.pkl", d / "decoder.pkl"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"encoder\.pkl: file not found.*https://cdn\.openai\.com/dall-e/encoder\.pkl"
    ):
        DiscreteVAE.from_pretrained(empty)
    with pytest.raises(
        FileNotFoundError, match=r"decoder\.pkl.*https://cdn\.openai\.com/dall-e/decoder\.pkl"
    ):
        DiscreteVAE.from_pretrained((d / "encoder.pkl", empty / "decoder.pkl"))
    with pytest.raises(TypeError, match="from_pretrained"):
        DiscreteVAE.from_release([1], {})
    with pytest.raises(TypeError, match="path must be"):
        DiscreteVAE.from_pretrained(3)
    torch.manual_seed(0)
    DALLE(from_name("dalle-tiny")).save_pretrained(tmp_path / "dalle")
    with pytest.raises(ValueError, match="holds a 'dalle' model, not a 'dvae' model"):
        DiscreteVAE.from_pretrained(tmp_path / "dalle")


def _inputs(cfg):
    g = torch.Generator().manual_seed(3)
    text = torch.randint(1, cfg.text_vocab_size, (2, cfg.text_seq_len - 2), generator=g)
    return text, torch.randint(0, cfg.image_vocab_size, (2, cfg.image_grid, cfg.image_grid), generator=g)


def test_dalle_round_trip_with_its_dvae_and_overrides(tmp_path):
    torch.manual_seed(0)
    model = DALLE(from_name("dalle-tiny-sparse")).eval()
    model.save_pretrained(tmp_path / "m")
    back = DALLE.from_pretrained(tmp_path / "m").eval()
    assert back.cfg == model.cfg
    text, image = _inputs(model.cfg)
    with torch.no_grad():
        for a, b in zip(back.logits(text, image), model.logits(text, image), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(back.dvae.decode(image), model.dvae.decode(image))
    resized = DALLE.from_pretrained(tmp_path / "m", size_strategy="resize", pos_interp_mode="nearest")
    assert resized.cfg.size_strategy == "resize" and resized.cfg.pos_interp_mode == "nearest"
    with pytest.raises(TypeError, match=r"unknown config fields \['bogus'\]"):
        DALLE.from_pretrained(tmp_path / "m", bogus=1)
    with pytest.raises(FileNotFoundError, match=r"config\.json: file not found"):
        DALLE.from_pretrained(tmp_path / "nothing")


def test_dalle_attaches_release_dvae(release, tmp_path):
    torch.manual_seed(0)
    cfg = from_name("dalle-tiny", dvae=None)
    model = DALLE(cfg).eval()
    assert model.dvae is None
    model.save_pretrained(tmp_path / "m")
    assert DALLE.from_pretrained(tmp_path / "m").dvae is None
    with_dvae = DALLE.from_pretrained(tmp_path / "m", dvae=release[0]).eval()
    ref = DiscreteVAE.from_pretrained(release[0])
    assert with_dvae.cfg.dvae == ref.cfg
    tokens = torch.randint(0, 32, (1, 4, 4))
    assert torch.equal(with_dvae.dvae.decode(tokens), ref.decode(tokens))
    text, image = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(with_dvae.logits(text, image)[1], model.logits(text, image)[1])
    # saved with the dVAE, read back whole
    with_dvae.save_pretrained(tmp_path / "m2")
    again = DALLE.from_pretrained(tmp_path / "m2")
    assert torch.equal(again.dvae.decode(tokens), ref.decode(tokens))
    with pytest.raises(ValueError, match="32-token vocabulary, the transformer 48 image tokens"):
        DALLE.from_pretrained(tmp_path / "m", dvae=release[0], image_vocab_size=48)
