"""The ``fastgen`` command: every subcommand end to end on tiny local files, and its errors."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastgen import cli


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_and_bench_pass_through(capsys):
    code, out, _ = run(capsys, "info", "--json")
    assert code == 0 and "torch" in json.loads(out)["versions"]
    code, out, _ = run(capsys, "bench", "--list")
    assert code == 0 and "attention" in out and "vq_nearest" in out


def test_console_script_is_declared_and_runs():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    if "fastgen" in eps:  # installed from this tree (tests/run.sh installs it)
        assert eps["fastgen"] == "fastgen.cli:main"
    r = subprocess.run([sys.executable, "-m", "fastgen.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("info", "bench", "sample", "clip", "fid", "ssim"):
        assert cmd in r.stdout


def test_missing_weights_say_which_file_and_where(capsys, tmp_path):
    code, _, err = run(capsys, "sample", "glide", "--weights", str(tmp_path / "nope"), "--prompt", "a cat")
    assert code == 2 and "nope" in err and "base.pt" in err and "glide-text2im" in err
    code, _, err = run(capsys, "clip", "zero-shot", "--weights", str(tmp_path / "ViT-B-32.pt"),
                       "--labels", "a,b", "x.png")  # fmt: skip
    assert code == 2 and "ViT-B-32.pt" in err and "OpenAI CLIP" in err
    code, _, err = run(capsys, "fid", str(tmp_path), str(tmp_path))
    assert code == 2 and "pt_inception-2015-12-05" in err and "pytorch-fid" in err
    code, _, err = run(capsys, "ssim", str(tmp_path / "a.png"), str(tmp_path / "b.png"))
    assert code == 2 and "two image files or two folders" in err
    code, _, err = run(
        capsys, "sample", "glide", "--weights", str(tmp_path), "--prompt", "x", "--batch-size", "0"
    )
    assert code == 2 and "--batch-size must be >= 1" in err


def test_save_grid_and_load_image_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (5, 3, 6, 7), generator=g).float() / 255
    cli.save_grid(imgs, str(tmp_path / "grid.png"), nrow=3)
    back = cli.load_image(str(tmp_path / "grid.png"))
    assert back.shape == (3, 2 * 6 + 2, 3 * 7 + 4)  # 2 rows x 3 columns, 2 px gaps
    torch.testing.assert_close(back[:, 8:14, 9:16], imgs[4], atol=0, rtol=0)  # row 1, column 1
    assert back[:, 6:8].eq(0).all()  # the gap
    # [-1, 1] images (GLIDE's range) map to the same bytes
    cli.save_grid(imgs * 2 - 1, str(tmp_path / "g2.png"), nrow=3, value_range=(-1.0, 1.0))
    assert torch.equal(cli.load_image(str(tmp_path / "g2.png")), back)


def test_clip_preprocess_is_resize_shorter_side_then_centre_crop():
    img = torch.rand(3, 40, 60)
    out = cli.clip_preprocess(img, 32)
    resized = F.interpolate(img[None], size=(32, 48), mode="bicubic", align_corners=False, antialias=True)[0]
    crop = resized[:, :, 8:40].clamp(0, 1)
    mean, std = torch.tensor(cli.CLIP_MEAN).view(3, 1, 1), torch.tensor(cli.CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(out, (crop - mean) / std)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(cli.CLIError, match=r"bad\.png: not a readable image"):
        cli.load_image(str(bad))


# ---- end to end on tiny random models saved in fastgen's format -------------------------------------


def _gpt2_files(d):
    """A GPT-2-style encoder.json / vocab.bpe with a few merges (ids < 300)."""
    from fastgen.models.glide_tokenizer import byte_to_unicode

    merges = [("a", "t"), ("Ġ", "c"), ("Ġc", "at"), ("o", "g")]
    vocab = [byte_to_unicode()[b] for b in range(256)] + ["".join(m) for m in merges] + ["<|endoftext|>"]
    (d / "encoder.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def test_sample_glide_writes_the_seeded_grid(tmp_path, capsys):
    from fastgen.models.glide import GLIDE, quantize_8bit, sample_base, sample_upsample
    from fastgen.models.glide import from_name as glide_config
    from fastgen.models.glide_tokenizer import GlideTokenizer

    torch.manual_seed(0)
    base = GLIDE(glide_config("glide-tiny", image_size=8, n_vocab=300)).eval()
    up = GLIDE(glide_config("glide-upsample-tiny", n_vocab=300)).eval()
    base.save_pretrained(tmp_path / "base")
    up.save_pretrained(tmp_path / "up")
    _gpt2_files(tmp_path / "base")  # the tokenizer files beside the weights are found
    out = tmp_path / "grid.png"
    args = ["sample", "glide", "--weights", str(tmp_path / "base"), "--prompt", "a cat", "--out", str(out),
            "--steps", "3", "--seed", "5", "--batch-size", "2", "--guidance", "2.5", "--no-progress"]  # fmt: skip
    code, text, err = run(capsys, *args, "--upsample", "--upsample-weights", str(tmp_path / "up"),
                          "--upsample-steps", "2")  # fmt: skip
    assert code == 0, err
    assert "2 images of 32x32" in text
    # the same images computed directly
    tok = GlideTokenizer.from_pretrained(tmp_path / "base")
    tokens, mask = tok(["a cat"] * 2, text_ctx=base.cfg.text_ctx)
    with torch.no_grad():
        low = sample_base(base, tokens, mask, guidance_scale=2.5, steps="3", seed=5, progress=False)
        want = sample_upsample(up, quantize_8bit(low), tokens, mask, steps="2", seed=6, progress=False)
    ref = tmp_path / "ref.png"
    cli.save_grid(want, str(ref), value_range=(-1.0, 1.0))
    assert torch.equal(cli.load_image(str(out)), cli.load_image(str(ref)))
    # a tokenizer whose ids do not fit the model's vocabulary is refused by name
    small = GLIDE(glide_config("glide-tiny", image_size=8)).eval()  # n_vocab 64
    small.save_pretrained(tmp_path / "small")
    code, _, err = run(capsys, "sample", "glide", "--weights", str(tmp_path / "small"), "--prompt", "a cat",
                       "--tokenizer", str(tmp_path / "base"), "--out", str(out), "--steps", "2")  # fmt: skip
    assert code == 2 and "does not belong to these weights" in err


def test_clip_zero_shot_prints_the_models_probabilities(tmp_path, capsys):
    from fastgen.models.clip import SimpleTokenizer
    from fastgen.models.clip import from_name as clip_model

    torch.manual_seed(0)
    model = clip_model("tiny").eval()
    model.save_pretrained(tmp_path / "clip")
    g = torch.Generator().manual_seed(1)
    paths = []
    for i, (h, w) in enumerate([(40, 56), (32, 32)]):
        paths.append(str(tmp_path / f"img{i}.png"))
        cli.save_grid(torch.rand(1, 3, h, w, generator=g), paths[-1], nrow=1)
    code, text, err = run(capsys, "clip", "zero-shot", "--weights", str(tmp_path / "clip"),
                          "--labels", "cat, dog,car", "--top", "3", *paths)  # fmt: skip
    assert code == 0, err
    tok = SimpleTokenizer()
    texts = tok([f"a photo of {x}." for x in ("cat", "dog", "car")], context_length=32, truncate=True)
    batch = torch.stack([cli.clip_preprocess(cli.load_image(p), 32) for p in paths])
    with torch.no_grad():
        probs = model.zero_shot_predict(batch, model.zero_shot_classifier(texts))
    lines = text.strip().splitlines()
    assert len(lines) == 2
    for line, p in zip(lines, probs):
        best = int(p.argmax())
        assert (
            line.startswith(paths[lines.index(line)])
            and f"{['cat', 'dog', 'car'][best]} {p[best]:.3f}" in line
        )
    code, _, err = run(capsys, "clip", "zero-shot", "--weights", str(tmp_path / "clip"), "--labels", "cat",
                       *paths)  # fmt: skip
    assert code == 2 and "at least 2" in err


def test_sample_dalle_and_ssim(tmp_path, capsys):
    from fastgen.models.dalle import DALLE
    from fastgen.models.dalle import from_name as dalle_config

    torch.manual_seed(0)
    DALLE(dalle_config("dalle-tiny", text_vocab_size=300)).save_pretrained(tmp_path / "dalle")
    out = tmp_path / "d.png"
    args = ["sample", "dalle", "--weights", str(tmp_path / "dalle"), "--prompt", "hi", "--out", str(out),
            "--batch-size", "2", "--seed", "3", "--top-k", "8", "--no-progress"]  # fmt: skip
    code, text, err = run(capsys, *args)
    assert code == 0, err
    assert "2 images of 32x32" in text
    first = cli.load_image(str(out))
    assert run(capsys, *args)[0] == 0 and torch.equal(cli.load_image(str(out)), first)  # seeded
    # ssim of an image with itself is 1; two folders pair files by name
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cli.save_grid(first[None], str(tmp_path / "a" / "x.png"), nrow=1)
    cli.save_grid(first[None], str(tmp_path / "b" / "x.png"), nrow=1)
    code, text, _ = run(capsys, "ssim", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"))
    assert code == 0 and text.strip() == "SSIM 1.000000"
    code, text, _ = run(capsys, "ssim", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 0 and text.strip() == "SSIM 1.000000"


def test_fid_between_folders_uses_the_fid_network(tmp_path, capsys, monkeypatch):
    """The command loads the FID network from --weights and computes fid_folders' value. The network is
    replaced by a small stand-in (a 299x299 Inception forward per image is seconds on a CPU; the real
    network's own tests are in tests/metrics/test_fid_inception.py)."""
    from fastgen.metrics import inception
    from fastgen.metrics.folders import fid_folders

    seen = []

    def stand_in(path, device=None, **kw):
        seen.append(str(path))
        return lambda x: torch.cat([x.mean((2, 3)), x.std((2, 3)), x.amax((2, 3))], 1)

    monkeypatch.setattr(inception, "load_fid_inception", stand_in)
    (tmp_path / "pt_inception.pth").write_bytes(b"")
    g = torch.Generator().manual_seed(2)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            cli.save_grid(torch.rand(1, 3, 24, 24, generator=g), str(tmp_path / name / f"{i}.png"), nrow=1)
    weights = str(tmp_path / "pt_inception.pth")
    code, text, err = run(capsys, "fid", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", weights,
                          "--batch-size", "3", "--resize", "clean", "--no-progress")  # fmt: skip
    assert code == 0, err
    assert seen == [weights]
    want = fid_folders(tmp_path / "a", tmp_path / "b", weights=weights, batch_size=3, resize="clean",
                       progress=False)  # fmt: skip
    assert text.strip() == f"FID {want:.4f}" and want > 0
