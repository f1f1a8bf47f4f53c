"""FID / SSIM between image folders (fastgen.metrics.folders) against direct numpy / scipy / skimage
computations on the same files, plus the clean-fid resize against PIL's 8-bit bicubic."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import structural_similarity

from fastgen.metrics.folders import (
    ImageFolder,
    clean_resize,
    fid_folders,
    list_images,
    read_image,
    ssim_files,
    ssim_folders,
)


def write_images(folder, n, size=(16, 16), seed=0, ext="png", shift=0):
    """n smooth-plus-noise RGB images (uint8) saved as folder/img_000.ext ...; returns the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    xx = np.mgrid[0:h, 0:w][1]
    out = []
    for i in range(n):
        base = 120 + 60 * np.sin(xx / (2 + i % 3) + rng.uniform(0, 6))[..., None] * rng.uniform(0.2, 1, 3)
        img = np.clip(base + shift + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:03d}.{ext}")
        out.append(img)
    return out


def fid_numpy(real: np.ndarray, fake: np.ndarray) -> float:
    """pytorch-fid's formula: np.mean / np.cov and scipy.linalg.sqrtm."""
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def tiny_extractor(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> 6 features: per-channel mean and standard deviation."""
    return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def tiny_features_numpy(images) -> np.ndarray:
    x = np.stack(images).astype(np.float64) / 255.0  # (N, H, W, 3)
    return np.concatenate([x.mean((1, 2)), x.std((1, 2), ddof=1)], 1)


def test_list_images_filters_sorts_and_recurses(tmp_path):
    write_images(tmp_path, 2)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "Z.JPG")
    (tmp_path / "notes.txt").write_text("no image")
    write_images(tmp_path / "sub", 1, ext="webp")
    names = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert names == ["Z.JPG", "img_000.png", "img_001.png"]
    names = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)]
    assert names == ["Z.JPG", "img_000.png", "img_001.png", "sub/img_000.webp"]


def test_read_image_converts_to_rgb(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgba = np.dstack([np.full((8, 8), v, np.uint8) for v in (10, 20, 30, 40)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    got = read_image(tmp_path / "g.png")
    assert got.shape == (8, 8, 3) and got.dtype == np.uint8
    assert (got == grey[..., None]).all()
    assert (read_image(tmp_path / "a.png") == np.array([10, 20, 30], np.uint8)).all()
    t = ImageFolder(tmp_path)[1]  # g.png, sorted after a.png
    assert t.shape == (3, 8, 8) and t.dtype == torch.float32
    torch.testing.assert_close(t, torch.from_numpy(grey / 255.0).float().expand(3, 8, 8))


@pytest.mark.parametrize("batch_size", [3, 50])
def test_fid_folders_equals_numpy_reference(tmp_path, batch_size):
    a = write_images(tmp_path / "a", 9, seed=1)
    b = write_images(tmp_path / "b", 11, seed=2, shift=30)
    want = fid_numpy(tiny_features_numpy(a), tiny_features_numpy(b))
    got = fid_folders(
        tmp_path / "a", tmp_path / "b", extractor=tiny_extractor, batch_size=batch_size, progress=False
    )
    assert want > 0.01
    assert got == pytest.approx(want, rel=1e-6)


def test_fid_folders_mixed_sizes_legacy_resizes_each_image(tmp_path):
    imgs = write_images(tmp_path / "a", 2, size=(16, 16)) + write_images(tmp_path / "a2", 1, size=(20, 12))
    (tmp_path / "a2" / "img_000.png").rename(tmp_path / "a" / "img_002.png")
    seen = []

    def record(x):
        seen.append(x.clone())
        return tiny_extractor(x)

    fid_folders(tmp_path / "a", tmp_path / "a", extractor=record, batch_size=3, progress=False)
    assert seen[0].shape == (3, 3, 299, 299)
    for img, got in zip(imgs, seen[0]):
        x = torch.from_numpy(img.transpose(2, 0, 1) / 255.0).float()[None]
        want = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(got, want)
    # equal sizes in a batch: the images go to the network as they are (it resizes inside)
    seen.clear()
    fid_folders(tmp_path / "a", tmp_path / "a", extractor=record, batch_size=2, progress=False)
    assert seen[0].shape == (2, 3, 16, 16)


def test_clean_resize_matches_pil_bicubic(tmp_path):
    img = write_images(tmp_path, 1, size=(40, 56))[0]
    got = clean_resize(img)
    assert got.shape == (299, 299, 3) and got.dtype == np.float32
    assert got.min() >= 0 and got.max() <= 255
    # PIL's 8-bit RGB bicubic is the same separable filter, with the result of each of its two passes
    # rounded to uint8 (the horizontal pass's rounding is then filtered again: up to ~1.1 off)
    ref8 = np.asarray(Image.fromarray(img).resize((299, 299), Image.Resampling.BICUBIC)).astype(np.float32)
    assert np.abs(got - ref8).max() <= 1.5 and np.abs(got - ref8).mean() < 0.5
    # and not the bilinear tensor resize of "legacy" mode
    x = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32))[None]
    bil = (
        F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)[0].numpy().transpose(1, 2, 0)
    )
    assert np.abs(got - bil).max() > 5
    # a constant image stays constant (the filter's weights sum to 1)
    const = clean_resize(np.full((10, 13, 3), 77, np.uint8))
    np.testing.assert_allclose(const, 77, atol=1e-3)
    t = ImageFolder(tmp_path, resize="clean")[0]
    torch.testing.assert_close(t, torch.from_numpy(got.transpose(2, 0, 1) / 255.0))


def test_fid_folders_clean_feeds_clean_resized_images(tmp_path):
    a = write_images(tmp_path / "a", 3, size=(24, 24), seed=3)
    seen = []

    def record(x):
        seen.append(x.clone())
        return tiny_extractor(x)

    fid_folders(tmp_path / "a", tmp_path / "a", extractor=record, resize="clean", progress=False)
    assert seen[0].shape == (3, 3, 299, 299)
    torch.testing.assert_close(seen[0][1], torch.from_numpy(clean_resize(a[1]).transpose(2, 0, 1) / 255.0))


def test_fid_folders_errors(tmp_path):
    write_images(tmp_path / "a", 3)
    write_images(tmp_path / "one", 1)
    (tmp_path / "empty").mkdir()
    kw = {"extractor": tiny_extractor, "progress": False}
    with pytest.raises(FileNotFoundError, match="missing"):
        fid_folders(tmp_path / "a", tmp_path / "missing", **kw)
    with pytest.raises(ValueError, match=r"empty.*no images"):
        fid_folders(tmp_path / "empty", tmp_path / "a", **kw)
    with pytest.raises(ValueError, match=r"dir_b.*one.*at least 2"):
        fid_folders(tmp_path / "a", tmp_path / "one", **kw)
    with pytest.raises(ValueError, match="resize"):
        fid_folders(tmp_path / "a", tmp_path / "a", resize="bicubic", **kw)
    with pytest.raises(ValueError, match="batch_size"):
        fid_folders(tmp_path / "a", tmp_path / "a", batch_size=0, **kw)
    with pytest.raises(ValueError, match=r"weights=.*pt_inception-2015-12-05"):
        fid_folders(tmp_path / "a", tmp_path / "a", progress=False)
    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*github\.com/mseitzer/pytorch-fid/releases"):
        fid_folders(tmp_path / "a", tmp_path / "a", weights=tmp_path / "nope.pth", progress=False)
    (tmp_path / "a" / "img_001.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"img_001\.png"):
        fid_folders(tmp_path / "a", tmp_path / "a", **kw)


def test_progress_bar(tmp_path, capsys):
    write_images(tmp_path / "a", 3)
    fid_folders(tmp_path / "a", tmp_path / "a", extractor=tiny_extractor, progress=False)
    assert capsys.readouterr().err == ""
    fid_folders(tmp_path / "a", tmp_path / "a", extractor=tiny_extractor, progress=True)
    assert "3/3" in capsys.readouterr().err


def skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(
        a / 255.0,
        b / 255.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=2,
    )


def test_ssim_files_and_folders_match_skimage(tmp_path):
    a = write_images(tmp_path / "a", 3, size=(24, 32), seed=4)
    b = write_images(tmp_path / "b", 3, size=(24, 32), seed=5)
    want = [skimage_ssim(x, y) for x, y in zip(a, b)]
    got = ssim_files(tmp_path / "a" / "img_001.png", tmp_path / "b" / "img_001.png")
    assert got == pytest.approx(want[1], abs=1e-5)
    mean, per_file = ssim_folders(tmp_path / "a", tmp_path / "b", progress=False, return_per_file=True)
    assert list(per_file) == ["img_000.png", "img_001.png", "img_002.png"]
    np.testing.assert_allclose(list(per_file.values()), want, atol=1e-5)
    assert mean == pytest.approx(np.mean(want), abs=1e-5)
    assert ssim_folders(tmp_path / "a", tmp_path / "a", progress=False) == pytest.approx(1.0, abs=1e-6)


def test_ssim_errors(tmp_path):
    write_images(tmp_path / "a", 2, size=(16, 16))
    write_images(tmp_path / "b", 2, size=(16, 20))
    write_images(tmp_path / "c", 3, size=(16, 16))
    write_images(tmp_path / "tiny", 1, size=(8, 8))
    with pytest.raises(ValueError, match=r"same size.*a[/\\]img_000\.png.*16x16.*b[/\\]img_000\.png.*20x16"):
        ssim_folders(tmp_path / "a", tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match=r"same file names.*img_002\.png"):
        ssim_folders(tmp_path / "a", tmp_path / "c", progress=False)
    with pytest.raises(FileNotFoundError, match="nope"):
        ssim_folders(tmp_path / "a", tmp_path / "nope", progress=False)
    with pytest.raises(FileNotFoundError, match="path_b"):
        ssim_files(tmp_path / "a" / "img_000.png", tmp_path / "a" / "nope.png")
    t = tmp_path / "tiny" / "img_000.png"
    with pytest.raises(ValueError, match=r"tiny[/\\]img_000\.png"):
        ssim_files(t, t)


@pytest.mark.slow
def test_fid_folders_through_the_inception_network(tmp_path):
    """The real FID network (random weights in the release file's layout) at batch 2: fid_folders equals
    the numpy formula on features of the PIL-read images computed by the same network."""
    from test_fid_inception import random_fid_state_dict  # tests/metrics is on sys.path (rootless)

    from fastgen.metrics.inception import load_fid_inception

    path = tmp_path / "w.pth"
    torch.save(random_fid_state_dict(), path)
    a = write_images(tmp_path / "a", 2, size=(32, 32), seed=6)
    b = write_images(tmp_path / "b", 2, size=(32, 32), seed=7, shift=40)
    got = fid_folders(
        tmp_path / "a", tmp_path / "b", weights=path, batch_size=2, device="cpu", progress=False
    )
    net = load_fid_inception(path)
    with torch.no_grad():
        x = torch.from_numpy(np.stack(a + b).transpose(0, 3, 1, 2) / 255.0).float()
        feats = net(x).double().numpy()
    assert feats.shape == (4, 2048)
    # 2 samples per set: rank-1 covariances, so compare with the trace form directly
    mu1, mu2 = feats[:2].mean(0), feats[2:].mean(0)
    s1, s2 = np.cov(feats[:2], rowvar=False), np.cov(feats[2:], rowvar=False)
    d1, d2 = feats[1] - feats[0], feats[3] - feats[2]
    # s_i = d_i d_i^T / 2, so tr((s1 s2)^(1/2)) = |d1 . d2| / 2
    want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * abs(d1 @ d2) / 2
    assert got == pytest.approx(want, rel=1e-4)
