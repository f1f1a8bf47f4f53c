"""The benchmark harness end to end on tiny synthetic benchmarks (CPU, a few seconds)."""

import json
import sys
import textwrap

import pytest
import torch

from fastgen import _backend
from fastgen.bench import (
    Case,
    Check,
    Impl,
    achieved_gbps,
    achieved_tflops,
    backend_impls,
    compare_outputs,
    harness,
    main,
)
from fastgen.bench.device import device_slug, nominal_spec

GOOD = """
import torch
from fastgen.bench import Case, Impl, main, register

BUILT = []


@register(op="synth_axpy", description="y = 2x + y")
def cases(device, quick):
    for n in ([1000] if quick else [1000, 5000]):
        yield make(device, n)


def make(device, n):
    BUILT.append(n)
    x = torch.randn(n, device=device)
    y = torch.randn(n, device=device)
    return Case(
        f"n={n}",
        [
            Impl("reference", lambda: 2 * x + y, baseline=True),
            Impl("addcmul", lambda: torch.add(y, x, alpha=2)),
            Impl.skipped("fastgen[cuda]", "no CUDA device"),
        ],
        bytes=3 * x.nbytes,
        flops=2 * n,
        params={"n": n, "dtype": torch.float32},
        atol=1e-6,
        rtol=1e-6,
    )


if __name__ == "__main__":
    raise SystemExit(main(only=["synth_axpy"]))
"""

BAD = """
import torch
from fastgen.bench import Case, Impl, register


@register(op="synth_bad")
def cases(device, quick):
    x = torch.ones(64, device=device)
    yield Case(
        "n=64",
        [
            Impl("reference", lambda: (x * 2, x), baseline=True),
            Impl("wrong", lambda: (x * 2 + 1, x)),
            Impl("raises", lambda: 1 / 0),
        ],
        bytes=3 * x.nbytes,
    )
"""


@pytest.fixture
def bench_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # discovery puts the bench dir on sys.path
    d = tmp_path / "benchmarks"
    d.mkdir()
    (d / "bench_good.py").write_text(textwrap.dedent(GOOD))
    (d / "bench_bad.py").write_text(textwrap.dedent(BAD))
    (d / "helper_not_a_bench.py").write_text("raise RuntimeError('must not be imported')\n")
    yield d
    harness._REGISTRY.clear()


def _run(bench_dir, out, *extra):
    return main(["--quick", "--bench-dir", str(bench_dir), "--out", str(out), "--copy-mib", "8", *extra])


def _results(out):
    files = sorted(p.name for p in out.iterdir())
    stems = {p.rsplit(".", 1)[0] for p in files if p != "latest.json"}
    assert len(stems) == 1, files
    stem = stems.pop()
    data = json.loads((out / f"{stem}.json").read_text())
    assert json.loads((out / "latest.json").read_text()) == data
    return stem, files, data


def test_gbps_and_tflops_arithmetic():
    # 6 MB moved in 2 ms is 3 GB/s; 5e9 FLOPs in 10 ms is 0.5 TFLOP/s
    assert achieved_gbps(6_000_000, 2.0) == pytest.approx(3.0)
    assert achieved_tflops(5e9, 10.0) == pytest.approx(0.5)


def test_cli_op_filter_writes_json_and_png(bench_dir, tmp_path, capsys):
    out = tmp_path / "results"
    assert _run(bench_dir, out, "--op", "synth_axpy") == 0
    stem, files, data = _results(out)
    assert f"{stem}.png" in files and data["plot"] == f"{stem}.png"
    assert stem.endswith(device_slug(data["device"]))

    for key in ("date", "device", "versions", "git", "copy_bandwidth_gbps", "rows", "timer"):
        assert key in data, key
    assert data["device"]["kind"] == "cpu" and data["device"]["cpu_threads"] == torch.get_num_threads()
    assert data["device"]["cpu_model"]
    assert set(data["versions"]) >= {"torch", "torch_cuda", "triton", "fastgen", "python"}
    assert set(data["git"]) == {"commit", "dirty"}
    assert data["copy_bandwidth_gbps"] > 0

    rows = data["rows"]
    assert {r["op"] for r in rows} == {"synth_axpy"}  # --op filtered out synth_bad
    by_impl = {r["impl"]: r for r in rows}
    ref, fast, skipped = by_impl["reference"], by_impl["addcmul"], by_impl["fastgen[cuda]"]
    assert ref["reference"] and ref["correct"] is True
    assert fast["correct"] is True and fast["status"] == "ok"
    assert skipped["status"] == "skipped" and skipped["skip_reason"] == "no CUDA device"
    assert skipped["ms"] is None and skipped["correct"] is None
    assert fast["gbps"] == pytest.approx(achieved_gbps(3 * 1000 * 4, fast["ms"]))
    assert fast["tflops"] == pytest.approx(achieved_tflops(2 * 1000, fast["ms"]))
    assert fast["pct_roofline"] == pytest.approx(100 * fast["gbps"] / data["copy_bandwidth_gbps"])
    assert fast["speedup"]["reference"] == pytest.approx(ref["ms"] / fast["ms"])
    assert fast["params"] == {"n": 1000, "dtype": "torch.float32"}

    text = capsys.readouterr().out
    assert "== synth_axpy: y = 2x + y ==" in text
    assert "not run: fastgen[cuda]: no CUDA device" in text  # once, below the table
    header = next(line for line in text.splitlines() if line.startswith("case"))
    assert header.split() == [
        "case",
        "impl",
        "ms",
        "spread",
        "GB/s",
        "TFLOP/s",
        "%roof",
        "vs",
        "reference",
        "ok",
    ]
    # the run ends with the summary: per op rows, wrong, errors, faster / slower and the geometric mean
    tail = text.rstrip().splitlines()
    assert tail[-3].startswith("== summary") and tail[-1].split()[:2] == ["synth_axpy", str(len(rows))]
    assert data["summary"]["ops"][0]["op"] == "synth_axpy"


def test_wrong_answer_is_flagged_and_fails_the_run(bench_dir, tmp_path, capsys):
    out = tmp_path / "results"
    assert _run(bench_dir, out, "--no-plot") == 1
    _, files, data = _results(out)
    assert not any(f.endswith(".png") for f in files) and data["plot"] is None
    rows = {(r["op"], r["impl"]): r for r in data["rows"]}
    wrong = rows["synth_bad", "wrong"]
    assert wrong["correct"] is False and wrong["ms"] is not None  # timed and shown, not hidden
    assert "out[0]" in wrong["check"] and wrong["max_abs_err"] == pytest.approx(1.0)
    assert rows["synth_bad", "raises"]["status"] == "error"
    assert "ZeroDivisionError" in rows["synth_bad", "raises"]["error"]
    assert rows["synth_axpy", "addcmul"]["correct"] is True
    ops = {o["op"]: o for o in data["summary"].pop("ops")}
    assert data["summary"] == {"rows": 6, "wrong": 1, "baselines_off": 0, "errors": 1}
    assert ops["synth_bad"]["wrong"] == 1 and ops["synth_bad"]["errors"] == 1
    captured = capsys.readouterr()
    assert "WRONG" in captured.out and "ERROR: ZeroDivisionError" in captured.out
    assert "WRONG: synth_bad / n=64 / wrong" in captured.err


def test_secondary_baseline_mismatch_is_flagged_but_does_not_fail(tmp_path, capsys):
    x = torch.ones(8)

    @harness.register(op="synth_baselines")
    def cases(device, quick):
        yield Case(
            "n=8",
            [
                Impl("reference", lambda: x * 3, baseline=True),
                Impl("reference-sloppy", lambda: x * 3.5, baseline=True),
                Impl("fast", lambda: x + x + x),
            ],
        )

    try:
        out = tmp_path / "results"
        args = ["--quick", "--out", str(out), "--copy-mib", "8", "--no-plot"]
        assert main(args, only=["synth_baselines"]) == 0
    finally:
        harness._REGISTRY.clear()
    _, _, data = _results(out)
    rows = {r["impl"]: r for r in data["rows"]}
    assert rows["reference-sloppy"]["correct"] is False and rows["fast"]["correct"] is True
    assert set(rows["fast"]["speedup"]) == {"reference", "reference-sloppy"}
    assert data["summary"]["wrong"] == 0 and data["summary"]["baselines_off"] == 1
    captured = capsys.readouterr()
    assert "WRONG (baseline; " in captured.out and "vs reference-sloppy" in captured.out
    assert "differs from the oracle" in captured.err


def test_unknown_op_is_a_clear_error(bench_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _run(bench_dir, tmp_path / "results", "--op", "nope")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown op 'nope'" in err and "synth_axpy" in err and "synth_bad" in err


def test_bench_dir_from_env_and_list(bench_dir, monkeypatch, capsys):
    monkeypatch.setenv("FASTGEN_BENCH_DIR", str(bench_dir))
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "synth_axpy" in listed and "synth_bad" in listed and "bench_good.py" in listed


def test_missing_bench_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--bench-dir", str(tmp_path / "missing")])
    assert "does not exist" in capsys.readouterr().err


def test_cases_are_built_lazily_and_exact_reps(bench_dir, tmp_path):
    out = tmp_path / "results"
    events = []
    harness.discover(bench_dir)
    bench = harness._REGISTRY["synth_axpy"]
    original = bench.cases

    def traced(device, quick):
        for case in original(device, quick):
            events.append(("built", case.name))
            impls = [
                Impl(i.name, _traced(i.fn, case.name), baseline=i.baseline, skip=i.skip) for i in case.impls
            ]
            yield Case(case.name, impls, bytes=case.bytes)

    def _traced(fn, name):
        if fn is None:
            return None

        def run():
            events.append(("ran", name))
            return fn()

        return run

    bench.cases = traced
    args = ["--out", str(out), "--copy-mib", "8", "--no-plot", "--reps", "3"]
    assert main(args, only=["synth_axpy"]) == 0
    built = [i for i, e in enumerate(events) if e[0] == "built"]
    first_run_of_second = events.index(("ran", "n=5000"))
    assert built == [0, built[1]] and built[1] > events.index(("ran", "n=1000"))
    assert first_run_of_second > built[1]
    _, _, data = _results(out)
    timed = [r for r in data["rows"] if r["ms"] is not None]
    assert len(timed) == 4 and all(r["runs"] % 3 == 0 for r in timed)


def test_plot_skipped_with_one_message_without_matplotlib(bench_dir, tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "results"
    assert _run(bench_dir, out, "--op", "synth_axpy") == 0
    _, files, data = _results(out)
    assert data["plot"] is None and not any(f.endswith(".png") for f in files)
    assert capsys.readouterr().err.count("matplotlib is not installed") == 1


def test_compare_outputs():
    a = torch.tensor([1.0, float("nan"), 3.0])
    assert compare_outputs(a, a.clone(), 0, 0).ok  # NaN == NaN
    assert compare_outputs(a.half(), a.double(), 1e-3, 1e-3).ok  # dtypes may differ
    check = compare_outputs(a + 0.1, a, 1e-3, 0)
    assert not check.ok and check.max_abs_err == pytest.approx(0.1, rel=1e-5)
    assert not compare_outputs(torch.zeros(2, 3), torch.zeros(3, 2), 1, 1).ok
    assert not compare_outputs((a,), (a, a), 1, 1).ok
    assert compare_outputs({"x": a, "n": 3}, {"x": a, "n": 3}, 0, 0).ok


def test_case_validation():
    with pytest.raises(ValueError, match="baseline=True"):
        Case("c", [Impl("fast", lambda: 0)])
    with pytest.raises(ValueError, match="unique"):
        Case("c", [Impl("a", lambda: 0, baseline=True), Impl("a", lambda: 0)])
    with pytest.raises(ValueError, match="flops"):
        Case("c", [Impl("a", lambda: 0, baseline=True)], bound="compute")
    with pytest.raises(ValueError, match=r"Impl\.skipped"):
        Impl("a")


@pytest.fixture
def fake_op():
    name = "_bench_test_op"
    op = _backend.get_op(name, "test op")
    used = []
    op.register(
        "cpp", devices=("cpu",), dtypes=(torch.float32,), available=lambda: ["fastgen._C is not built"]
    )(lambda x: x)
    op.register("triton", devices=("cuda",), dtypes=(torch.float32,), forced_only_devices=("cpu",))(
        lambda x: x
    )
    op.register("torch", devices=("cpu", "cuda"), dtypes=(torch.float32,))(lambda x: x)
    yield name, used
    _backend._REGISTRY.pop(name, None)


def test_backend_impls_force_each_backend_and_explain_refusals(fake_op):
    name, used = fake_op
    call = _backend.Call(torch.device("cpu"), torch.float32, {})

    def make_fn(backend):
        return lambda: used.append((backend, _backend.forced_backend(name))) or torch.ones(1)

    impls = {i.name: i for i in backend_impls(name, call, make_fn)}
    assert list(impls) == ["fastgen[triton]", "fastgen[cpp]", "fastgen[torch]"]
    assert "interpreter" in impls["fastgen[triton]"].skip
    assert impls["fastgen[cpp]"].skip == "fastgen._C is not built"
    impls["fastgen[torch]"].fn()
    assert used == [("torch", "torch")]  # run with the backend forced, and only inside the call
    assert _backend.forced_backend(name) is None
    with _backend.use_backend("cpp", op="other"):  # an outer forcing of another op stays, and is restored
        impls["fastgen[torch]"].fn()
        assert _backend.forced_backend("other") == "cpp" and _backend.forced_backend(name) is None
    assert used[-1] == ("torch", "torch") and _backend.forced_backend("other") is None
    failing = backend_impls(name, call, lambda b: lambda: 1 / 0)[-1]
    with pytest.raises(ZeroDivisionError):
        failing.fn()
    assert _backend.forced_backend(name) is None  # reset on an exception too

    wrong_dtype = _backend.Call(torch.device("cpu"), torch.float16, {})
    assert "dtype float16 not supported" in backend_impls(name, wrong_dtype, make_fn)[-1].skip
    assert backend_impls("_no_such_op", call, make_fn)[0].skip


def test_nominal_specs():
    assert nominal_spec("NVIDIA H100 80GB HBM3").hbm_gbps == 3350
    assert nominal_spec("NVIDIA H100 80GB HBM3").peak_tflops["bf16"] == pytest.approx(989)
    assert nominal_spec("NVIDIA H100 PCIe").hbm_gbps == 2000
    assert nominal_spec("NVIDIA H200").hbm_gbps == 4800
    assert nominal_spec("NVIDIA H200").peak_tflops["bf16"] == pytest.approx(989)
    assert nominal_spec("NVIDIA A100-SXM4-80GB").peak_tflops["bf16"] == pytest.approx(312)
    assert nominal_spec("NVIDIA A100 80GB PCIe").hbm_gbps == pytest.approx(1935)
    assert nominal_spec("NVIDIA GeForce RTX 4090") is None


def test_case_check_judges_every_output_baselines_included(tmp_path, capsys):
    """Case(check=...) replaces the compare-with-the-first-baseline oracle for every row."""
    x = torch.ones(8)

    def check(out):
        err = float((out - 3 * x).abs().max())
        return Check(err <= 0.1, err, "" if err <= 0.1 else f"err {err:g}")

    @harness.register(op="synth_check")
    def cases(device, quick):
        yield Case(
            "n=8",
            [
                Impl("torch-a", lambda: x * 3.5, baseline=True),  # first baseline, yet judged: off
                Impl("torch-b", lambda: x * 3, baseline=True),
                Impl("fast", lambda: x + x + x),
                Impl("fast-wrong", lambda: x * 4),
            ],
            flops=8,
            check=check,
        )

    try:
        out = tmp_path / "results"
        args = ["--quick", "--out", str(out), "--copy-mib", "8", "--no-plot"]
        assert main(args, only=["synth_check"]) == 1  # fast-wrong fails the run
    finally:
        harness._REGISTRY.clear()
    _, _, data = _results(out)
    rows = {r["impl"]: r for r in data["rows"]}
    assert not any(r["reference"] for r in rows.values())
    assert rows["torch-a"]["correct"] is False and rows["torch-b"]["correct"] is True
    assert rows["fast"]["correct"] is True and rows["fast-wrong"]["check"] == "err 1"
    assert set(rows["fast"]["speedup"]) == {"torch-a", "torch-b"}
    assert data["summary"]["wrong"] == 1 and data["summary"]["baselines_off"] == 1
    assert "WRONG: synth_check / n=8 / fast-wrong: err 1" in capsys.readouterr().err


def test_table_fits_120_columns_and_collapses_what_did_not_run():
    from fastgen.bench.harness import (
        TABLE_WIDTH,
        Benchmark,
        OpResult,
        Row,
        format_summary,
        format_table,
        summarize,
    )

    rows = []
    for case in ("a very long case name that would push every column far to the right x 4096", "short"):
        for i in range(4):  # four baselines with long names
            rows.append(Row("op", case, f"baseline-with-a-long-name-{i}", True, ms=2.0 + i, spread=0.02))
        rows.append(Row("op", case, "fastgen[cpp]", False, ms=1.0, spread=0.3, correct=True,
                        speedup={f"baseline-with-a-long-name-{i}": (2.0 + i) for i in range(4)}))  # fmt: skip
        rows.append(
            Row("op", case, "fastgen[cuda]", False, status="skipped", skip_reason="no CUDA device " * 12)
        )
        rows.append(Row("op", case, "fastgen[torch]", False, ms=4.0, correct=False, check="max err 1.0 " * 20,
                        speedup={f"baseline-with-a-long-name-{i}": (2.0 + i) / 4 for i in range(4)}))  # fmt: skip
    res = OpResult(Benchmark("op", lambda d, q: iter(()), "test", "x.py"), rows)
    text = format_table(res)
    assert max(len(line) for line in text.splitlines()) <= TABLE_WIDTH
    assert text.count("not run: fastgen[cuda]") == 1  # once, not once per case
    assert "baselines: [1] baseline-with-a-long-name-0" in text  # numbered when the names do not fit
    assert "1.000~" in text  # noisy row marked
    assert "fastgen[torch]: fastgen's plain-PyTorch fallback" in text
    (summary,) = summarize([res])
    # per case the best correct fastgen row (cpp, 2x) against the case's first baseline; torch was wrong
    assert summary["wrong"] == 2 and summary["faster"] == 2 and summary["geomean"] == pytest.approx(2.0)
    assert max(len(line) for line in format_summary([summary]).splitlines()) <= TABLE_WIDTH


def test_headline_runs_the_quick_cases_narrowed_with_full_timing(tmp_path):
    seen = []
    x = torch.ones(8)

    @harness.register(op="synth_headline")
    def cases(device, quick):
        seen.append((quick, harness.headline_mode()))
        names = ["headline"] if harness.headline_mode() else ["a", "b"]
        for name in names:
            yield Case(name, [Impl("reference", lambda: x * 2, baseline=True), Impl("fast", lambda: x + x)])

    try:
        out = tmp_path / "results"
        assert (
            main(
                ["--headline", "--device", "cpu", "--out", str(out), "--copy-mib", "8", "--no-plot"],
                only=["synth_headline"],
            )
            == 0
        )
        assert (
            main(
                ["--quick", "--device", "cpu", "--out", str(out), "--copy-mib", "8", "--no-plot"],
                only=["synth_headline"],
            )
            == 0
        )
    finally:
        harness._REGISTRY.clear()
        harness._HEADLINE = False
    assert seen == [(True, True), (True, False)]
    data = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "latest.json"]
    headline = next(d for d in data if d["headline"])
    quick = next(d for d in data if not d["headline"])
    assert {r["case"] for r in headline["rows"]} == {"headline"} and not headline["quick"]
    assert "min_run_time=0.5s" in headline["timer"]  # full timing budgets, not the quick ones
    assert {r["case"] for r in quick["rows"]} == {"a", "b"} and "min_run_time=0.05s" in quick["timer"]


def test_one_png_per_op_and_baseline_errors_marked_apart(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    x = torch.ones(8)
    titles = []
    from matplotlib.axes import Axes

    real = Axes.set_title
    monkeypatch.setattr(
        Axes, "set_title", lambda self, t, *a, **k: titles.append(t) or real(self, t, *a, **k)
    )

    for op in ("synth_p1", "synth_p2"):

        @harness.register(op=op)
        def cases(device, quick):
            yield Case("n=8", [Impl("reference", lambda: x * 3, baseline=True),
                               Impl("reference-bf16", lambda: x * 3.5, baseline=True),
                               Impl("fast", lambda: x + x + x)])  # fmt: skip

    try:
        out = tmp_path / "results"
        args = ["--quick", "--device", "cpu", "--out", str(out), "--copy-mib", "8"]
        assert main(args, only=["synth_p1", "synth_p2"]) == 0
    finally:
        harness._REGISTRY.clear()
    data = json.loads((out / "latest.json").read_text())
    assert [p.rsplit("_", 1)[-1] for p in data["plots"]] == ["p1.png", "p2.png"]
    assert all((out / p).exists() for p in data["plots"])
    assert len(titles) == 2 and all("grey cross-hatch: a baseline" in t and "WRONG" not in t for t in titles)
