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
