import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn", reason="the sizes example needs scikit-learn (load_digits)")
pytest.importorskip("matplotlib", reason="the sizes example writes a PNG plot with matplotlib")


def test_sizes_quick_end_to_end(tmp_path, capsys):
    from fastgen.models.clip import SIZE_STRATEGIES
    from fastgen.train.examples.sizes import main

    out = tmp_path / "sizes"
    argv = ["--quick", "--steps", "60", "--ft-steps", "2", "--ae-steps", "100", "--ae-ft-steps", "2"]
    res = main([*argv, "--out", str(out)])
    rows, ae = res["classifier"], res["autoencoder"]

    # --- the classifier table
    zero = [r for r in rows if r["run"] == "zero-shot"]
    assert {(r["size"], r["strategy"]) for r in zero} == {(s, k) for s in (6, 8, 12) for k in SIZE_STRATEGIES}
    # 2 new sizes x 2 strategies x (plain, multi-size) fine-tunes
    assert len(rows) - len(zero) == 8
    assert all(0 <= r["accuracy"] <= 1 and r["images_per_s"] > 0 for r in rows)
    # at the trained size every strategy is the trained model: identical predictions
    assert len({r["accuracy"] for r in zero if r["size"] == 8}) == 1
    # it learned something: well above chance (0.1 for ten balanced classes) at the trained size
    assert min(r["accuracy"] for r in zero if r["size"] == 8) > 0.3

    # --- the autoencoder table
    by = {(r["size"], r["run"], r["strategy"]): r for r in ae}
    for s in (12, 16, 24):
        for key in ("baseline", "mean image"), ("zero-shot", "native"), ("zero-shot", "resize"):
            assert (s, *key) in by, (s, key)
    for s in (12, 24):
        for run in ("fine-tune", "fine-tune + multi-size"):
            assert (s, run, "native") in by
    assert len(ae) == 3 * 3 + 4
    for r in ae:
        assert math.isfinite(r["mse"]) and r["mse"] >= 0, r
        assert 0 < r["ssim"] <= 1, r
        assert math.isfinite(r["fid"]) and r["fid"] >= -1e-6, r
        assert r["images_per_s"] is None if r["run"] == "baseline" else r["images_per_s"] > 0
    # the trained autoencoder beats predicting the mean training image, at the trained size
    nat16, mean16 = by[16, "zero-shot", "native"], by[16, "baseline", "mean image"]
    assert nat16["mse"] < 0.8 * mean16["mse"] and nat16["ssim"] > mean16["ssim"]
    # at the trained size "resize" has nothing to resize: the same reconstructions as "native"
    res16 = by[16, "zero-shot", "resize"]
    assert (res16["mse"], res16["ssim"], res16["fid"]) == (nat16["mse"], nat16["ssim"], nat16["fid"])

    for f in ("results.json", "results.md", "sizes.png"):
        assert (out / f).exists(), f
    saved = json.loads((out / "results.json").read_text())
    assert saved["classifier"] == rows and saved["autoencoder"] == ae
    assert saved["meta"]["classifier"]["train_size"] == 8 and saved["meta"]["autoencoder"]["train_size"] == 16
    text = capsys.readouterr().out
    assert "| size | run | strategy | accuracy | images/s |" in text
    assert "| size | run | strategy | MSE | SSIM |" in text
    md = (out / "results.md").read_text()
    assert sum(line.startswith("|---:|") for line in md.splitlines()) == 2  # two tables


def test_vq_autoencoder_sizes_and_strategies():
    from fastgen.train.examples.sizes import VQAutoencoder

    torch.manual_seed(0)
    m = VQAutoencoder(16, width=8, dim=4, codebook_size=16).eval()
    x16, x24 = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 24, 12)
    with torch.no_grad():
        y, commit = m(x24)
        assert y.shape == x24.shape and commit.shape == () and bool(((y >= 0) & (y <= 1)).all())
        assert m.encode(x24).shape == (3, 6, 3)  # native: the latent grid is H / 4 x W / 4
        nat16, codes16 = m(x16)[0], m.encode(x16)
        m.size_strategy = "resize"
        assert m.encode(x24).shape == (3, 4, 4)  # coded at the trained 16x16
        y_resize = m(x24)[0]
        assert y_resize.shape == x24.shape
        # resize = code the 16x16 resized image natively, resize the reconstruction back
        m.size_strategy = "native"
        small = F.interpolate(x24, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
        expect = F.interpolate(
            m(small)[0], size=(24, 12), mode="bilinear", align_corners=False, antialias=True
        )
        torch.testing.assert_close(y_resize, expect)
        m.size_strategy = "resize"
        assert torch.equal(m(x16)[0], nat16) and torch.equal(m.encode(x16), codes16)
    m.size_strategy = "bogus"
    with pytest.raises(ValueError, match="size_strategy"):
        m(x16)
    m.size_strategy = "native"
    with pytest.raises(ValueError, match="multiples of 4"):
        m(torch.rand(1, 1, 14, 16))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        m(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="train_size"):
        VQAutoencoder(18)


def test_fid_features_fixed_and_size_agnostic():
    from fastgen.metrics.fid import FID
    from fastgen.train.examples.sizes import make_fid_features

    a, b = make_fid_features(), make_fid_features()
    x = torch.rand(5, 1, 12, 12)
    assert torch.equal(a(x), b(x)) and a(x).shape == (5, 128)
    assert a(torch.rand(5, 1, 24, 24)).shape == (5, 128)
    # FID of a set with itself is ~0; with a shifted set, clearly positive
    fid = FID(a)
    real = torch.rand(64, 1, 16, 16)
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert abs(fid.compute()) < 1e-6
    fid.reset()
    fid.update(real, real=True)
    fid.update((real * 0.3).clamp(0, 1), real=False)
    assert fid.compute() > 1e-3


def _load_bench_sizes():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sizes.py"
    if not path.exists():
        pytest.skip("benchmarks/ is not in this checkout")
    spec = importlib.util.spec_from_file_location("_bench_sizes_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("model", ["vit", "vq-ae"])
def test_bench_sizes_cases_and_oracles(model):
    """The benchmark's rows run and pass their oracles (tiny batch, not timed): equal to the baseline at the
    trained 16x16, the right shapes at 24x24; a wrong output is rejected by the 24x24 oracle."""
    from fastgen.bench import compare_outputs

    bench = _load_bench_sizes()
    cpu = torch.device("cpu")
    same = bench.make_case(cpu, model, 2, 16)
    assert same.check is None and same.impls[0].baseline
    ref = same.impls[0].fn()
    for impl in same.impls[1:]:
        assert compare_outputs(impl.fn(), ref, same.atol, same.rtol).ok, impl.name
    case = bench.make_case(cpu, model, 2, 24)
    names = [i.name for i in case.impls]
    assert names == (["interpolate", "adaptive_pool", "resize"] if model == "vit" else ["native", "resize"])
    for impl in case.impls:
        out = impl.fn()
        assert case.check(out).ok, (impl.name, case.check(out).detail)
    bad = torch.zeros(2, 5) if model == "vit" else torch.zeros(2, 5, 5, dtype=torch.int64)
    assert not case.check(bad).ok
