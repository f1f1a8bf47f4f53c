import json

import pytest
import torch

pytest.importorskip("sklearn", reason="the digits example needs scikit-learn (load_digits)")
pytest.importorskip("matplotlib", reason="the digits example writes PNG plots with matplotlib")


def test_digits_quick_end_to_end(tmp_path, capsys):
    from fastgen.train.examples.digits import main

    out = tmp_path / "digits"
    results = main(["--quick", "--no-progress", "--out", str(out)])
    assert set(results) == {"base", "finetune", "scratch"}
    for r in results.values():
        assert 0 < r["mse"] < 0.2 and -1 <= r["ssim"] <= 1 and r["fid"] >= 0 and r["is"] >= 1
    for f in ["results.json", "loss_curves.png", "reconstructions.png"]:
        assert (out / f).exists(), f
    # the three models are saved in fastgen's format and load back to the same evaluation numbers
    from fastgen.train.examples.digits import VQAutoencoder, load_digits_16, reconstruct, split_domains

    x, y = load_digits_16()
    xtest = split_domains(x, y, 60, 60, 0)["held_test"][0]
    for name in ["base", "finetune", "scratch"]:
        loaded = VQAutoencoder.from_pretrained(str(out / f"{name}_model")).eval()
        assert loaded.config.codebook == 64 and "vq._codebook.embed_avg" in loaded.state_dict()
        mse = torch.nn.functional.mse_loss(reconstruct(loaded, xtest), xtest).item()
        assert mse == pytest.approx(results[name]["mse"], rel=1e-5), name
    for run in ["base", "finetune", "scratch", "classifier"]:
        for f in ["log.csv", "log.json", "loss_curve.png"]:
            assert (out / run / f).exists(), f"{run}/{f}"
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"]["finetune"]["mse"] == pytest.approx(results["finetune"]["mse"])
    text = capsys.readouterr().out
    assert "fine-tuned beats base and from-scratch" in text and "SSIM" in text
    # the quick run already shows the effect of fine-tuning from the base checkpoint
    assert results["finetune"]["mse"] < min(results["base"]["mse"], results["scratch"]["mse"])
