import json

import pytest

pytest.importorskip("sklearn", reason="the digits example needs scikit-learn (load_digits)")
pytest.importorskip("matplotlib", reason="the digits example writes PNG plots with matplotlib")


def test_digits_quick_end_to_end(tmp_path, capsys):
    from fastgen.train.examples.digits import main

    out = tmp_path / "digits"
    results = main(["--quick", "--no-progress", "--out", str(out)])
    assert set(results) == {"base", "finetune", "scratch"}
    for r in results.values():
        assert 0 < r["mse"] < 0.2 and -1 <= r["ssim"] <= 1 and r["fid"] >= 0 and r["is"] >= 1
    for f in ["base.pt", "results.json", "loss_curves.png", "reconstructions.png"]:
        assert (out / f).exists(), f
    for run in ["base", "finetune", "scratch", "classifier"]:
        for f in ["log.csv", "log.json", "loss_curve.png"]:
            assert (out / run / f).exists(), f"{run}/{f}"
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"]["finetune"]["mse"] == pytest.approx(results["finetune"]["mse"])
    text = capsys.readouterr().out
    assert "fine-tuned beats base and from-scratch" in text and "SSIM" in text
    # the quick run already shows the effect of fine-tuning from the base checkpoint
    assert results["finetune"]["mse"] < min(results["base"]["mse"], results["scratch"]["mse"])
