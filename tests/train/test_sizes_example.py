import json

import pytest

pytest.importorskip("sklearn", reason="the sizes example needs scikit-learn (load_digits)")
pytest.importorskip("matplotlib", reason="the sizes example writes a PNG plot with matplotlib")


def test_sizes_quick_end_to_end(tmp_path, capsys):
    from fastgen.models.clip import SIZE_STRATEGIES
    from fastgen.train.examples.sizes import main

    out = tmp_path / "sizes"
    rows = main(["--quick", "--steps", "30", "--ft-steps", "2", "--out", str(out)])
    zero = [r for r in rows if r["run"] == "zero-shot"]
    assert {(r["size"], r["strategy"]) for r in zero} == {(s, k) for s in (6, 8, 12) for k in SIZE_STRATEGIES}
    # 2 new sizes x 2 strategies x (plain, multi-size) fine-tunes
    assert len(rows) - len(zero) == 8
    assert all(0 <= r["accuracy"] <= 1 and r["images_per_s"] > 0 for r in rows)
    # at the trained size every strategy is the trained model: identical predictions
    assert len({r["accuracy"] for r in zero if r["size"] == 8}) == 1
    for f in ("results.json", "results.md", "sizes.png"):
        assert (out / f).exists(), f
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == rows and saved["meta"]["train_size"] == 8
    assert "| size | run | strategy | accuracy | images/s |" in capsys.readouterr().out
