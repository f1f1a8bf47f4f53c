"""benchmarks/bench_attention.py end to end on the CPU (--quick: tiny shapes, about ten seconds)."""

import json
import sys
from pathlib import Path

import pytest

from fastgen.bench import harness, main

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.skipif(not (BENCH_DIR / "bench_attention.py").is_file(), reason="no source checkout")
def test_quick_cpu_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))  # discovery puts the bench dir on sys.path
    out = tmp_path / "results"
    args = ["--quick", "--op", "attention", "--device", "cpu", "--bench-dir", str(BENCH_DIR)]
    try:
        assert main([*args, "--out", str(out), "--copy-mib", "8", "--no-plot"]) == 0
    finally:
        harness._REGISTRY.clear()
    data = json.loads((out / "latest.json").read_text())
    rows = data["rows"]
    assert {r["op"] for r in rows} == {"attention"}
    modes = {r["params"]["mode"] for r in rows}
    assert modes == {"fwd", "bwd", "fwd+bwd"}
    fastgen = [r for r in rows if r["impl"] == "fastgen[torch]"]
    assert fastgen and all(r["status"] == "ok" and r["correct"] is True and r["tflops"] for r in fastgen)
    math = [r for r in rows if r["impl"] == "sdpa[math]"]
    assert all(r["correct"] is True and set(r["speedup"]) >= {"sdpa[math]"} for r in math)
    unsupported = [r for r in rows if r["impl"] == "sdpa[efficient]"]
    assert all(r["status"] == "skipped" and r["skip_reason"].startswith("unsupported") for r in unsupported)
    assert any(r["params"].get("varlen") for r in rows) and any(r["params"].get("bias") for r in rows)
    text = capsys.readouterr().out
    assert "vs sdpa[flash]" in text and "vs flash-attn" in text
