"""Every benchmark script's --quick CPU run completes, with every fastgen row correct (exit code 0)."""

import json
import sys
from pathlib import Path

import pytest

from fastgen.bench import harness, main

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.skipif(not BENCH_DIR.is_dir(), reason="no source checkout")
@pytest.mark.parametrize(
    "op",
    ["attention_decode", "moe", "vq_ema", "dalle", "clip", "glam", "ssim", "glide", "adaptive_pool", "train"],
)
def test_quick_cpu_run(op, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # discovery puts the bench dir on sys.path
    out = tmp_path / "results"
    args = ["--quick", "--op", op, "--device", "cpu", "--bench-dir", str(BENCH_DIR), "--out", str(out)]
    try:
        assert main([*args, "--copy-mib", "8", "--no-plot"]) == 0
    finally:
        harness._REGISTRY.clear()
    rows = json.loads((out / "latest.json").read_text())["rows"]
    ours = [r for r in rows if r["impl"].startswith("fastgen") and r["status"] == "ok"]
    assert ours and all(r["correct"] is True for r in ours)
