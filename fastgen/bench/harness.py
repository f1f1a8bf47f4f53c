"""The shared benchmark harness behind ``python -m fastgen.bench`` and every ``benchmarks/bench_*.py``.

Contract for benchmark authors
------------------------------
A benchmark script ``benchmarks/bench_<op>.py`` registers one generator of cases per op::

    import torch

    import fastgen
    from fastgen._backend import Call
    from fastgen.bench import Case, Impl, backend_impls, main, register
    from fastgen.ops.my_op import my_op_ref


    @register(op="my_op", description="what one call computes")
    def my_op_cases(device: torch.device, quick: bool):
        for n in ([4096] if quick else [4096, 1 << 20, 1 << 24]):
            yield make_case(device, n)  # build tensors in a helper: nothing outlives the yield


    def make_case(device, n):
        x = torch.randn(n, device=device)
        call = Call(device, x.dtype, {"n": n})  # what dispatch sees for this call
        impls = [Impl("reference", lambda: my_op_ref(x), baseline=True)]
        impls += backend_impls("my_op", call, lambda backend: (lambda: fastgen.my_op(x)))
        return Case(f"n={n} fp32", impls, bytes=2 * x.nbytes, params={"n": n, "dtype": "fp32"},
                    atol=1e-6, rtol=1e-5)


    if __name__ == "__main__":
        raise SystemExit(main(only=["my_op"]))

* ``register(op, description="")`` -> decorator for ``cases(device: torch.device, quick: bool) ->
  Iterable[Case]``. Cases are pulled one at a time, so a case's tensors are freed before the next
  one is built (build them in a helper function, as above, so the generator frame keeps no
  reference). ``quick`` asks for fewer / smaller cases.
* ``Case(name, impls, *, bytes=None, flops=None, params={}, atol=1e-5, rtol=1e-5, bound="memory",
  flop_dtype=None)``: ``bytes`` is the analytic count of bytes read + written by one call (gives
  GB/s and, for memory-bound cases, % of the measured copy bandwidth); ``flops`` the analytic
  FLOP count (gives TFLOP/s). ``bound="compute"`` measures % of roofline against the device's
  nominal peak FLOP/s for ``flop_dtype`` (a torch dtype, or ``"tf32"``) instead. ``params`` goes
  to the JSON verbatim (keep it JSON-friendly).
* ``Case(..., check=fn)``: a case-specific oracle ``fn(out) -> Check(ok, max_abs_err, detail)`` that
  judges every implementation, baselines included (e.g. attention's "at most 2x the error of PyTorch
  in the same dtype against a float64 reference"); ``atol`` / ``rtol`` are then unused.
* ``Impl(name, fn, *, baseline=False)``: ``fn()`` takes no arguments and returns the output (a
  tensor, or a tuple / list / dict of tensors). ``baseline=True`` marks a baseline: every row
  gets a speed-up against each baseline, and the *first* baseline that runs is the correctness
  oracle (call it ``"reference"``: the plain PyTorch a user would write). Every case needs one.
  ``Impl.skipped(name, reason)`` is a row that was not run, shown as ``skipped: reason``.
* ``backend_impls(op, call, make_fn)`` -> ``list[Impl]``: one ``fastgen[<backend>]`` row per
  backend registered for ``op`` in ``fastgen._backend``, in dispatch order. Backends that refuse
  ``call`` (``Op.why_not``) become skipped rows with the reasons; the others run
  ``make_fn(backend)()`` inside ``fastgen.use_backend(backend, op=op)``. Triton on a CPU device
  is never timed (only the interpreter runs it there, a testing tool).

What a run does
---------------
Every implementation runs once (warm-up) and is compared with the oracle's output
(``isclose(out, ref, atol, rtol)`` element-wise, NaNs equal, in at least float32); a wrong answer
is timed and shown anyway, flagged ``WRONG``, and makes the exit code 1 (a secondary baseline that
disagrees, e.g. the reference run in bf16, is flagged ``WRONG (baseline; ...)`` without failing the
run). Then each is timed:

* CUDA: ``triton.testing.do_bench`` (median, L2 flushed before every rep; CUDA events with the
  same protocol when triton is missing or ``--reps`` asks for an exact count),
* CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` median, ``num_threads=torch.get_num_threads()``.

The run's roofline is a large ``dst.copy_(src)`` (bytes read + written) measured once; known
GPUs also get their datasheet peaks (:mod:`fastgen.bench.device`). Results: one plain-text table
per op on stdout, ``<out>/<timestamp>_<device>.json`` (+ ``latest.json``) and a PNG bar chart.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.util
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastgen.bench.device import DeviceSpec, describe_device, device_slug, flop_key, nominal_spec, pick_device

SCHEMA_VERSION = 1
ENV_BENCH_DIR = "FASTGEN_BENCH_DIR"
CaseFn = Callable[[torch.device, bool], Iterable["Case"]]

# =====================================================================================================
# The API for benchmark scripts
# =====================================================================================================


@dataclass
class Impl:
    """One implementation timed in a case. ``fn()`` returns the output checked against the oracle."""

    name: str
    fn: Callable[[], Any] | None = None
    _: KW_ONLY
    baseline: bool = False
    skip: str | None = None

    def __post_init__(self) -> None:
        if self.fn is None and self.skip is None:
            raise ValueError(f"Impl {self.name!r}: give fn, or use Impl.skipped(name, reason)")

    @classmethod
    def skipped(cls, name: str, reason: str, *, baseline: bool = False) -> Impl:
        """A row that is listed but not run (``skipped: reason`` in the table and the JSON)."""
        return cls(name, None, baseline=baseline, skip=reason or "no reason given")


@dataclass
class Case:
    """One shape / configuration of an op and the implementations to time on it.

    ``bytes``: bytes read + written by one call (analytic, not measured); ``flops``: FLOPs of one
    call. ``bound``: ``"memory"`` (% of roofline vs measured copy bandwidth) or ``"compute"`` (vs the
    nominal peak FLOP/s of ``flop_dtype`` on known GPUs). ``atol`` / ``rtol``: correctness tolerance
    against the first baseline's output. ``check``: an oracle of the case's own, ``check(out) -> Check``;
    when given, *every* implementation's output (baselines included) is judged by it instead of being
    compared with the first baseline's (baselines then serve only as speed-up references).
    """

    name: str
    impls: Sequence[Impl]
    _: KW_ONLY
    bytes: int | None = None
    flops: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    atol: float = 1e-5
    rtol: float = 1e-5
    bound: str = "memory"
    flop_dtype: torch.dtype | str | None = None
    check: Callable[[Any], Check] | None = None

    def __post_init__(self) -> None:
        names = [i.name for i in self.impls]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"Case {self.name!r}: implementation names must be unique, repeated: {dupes}")
        if not any(i.baseline for i in self.impls):
            raise ValueError(
                f"Case {self.name!r}: needs at least one Impl(..., baseline=True) "
                "(the plain-PyTorch reference is the correctness oracle)"
            )
        if self.bound not in ("memory", "compute"):
            raise ValueError(f"Case {self.name!r}: bound must be 'memory' or 'compute', got {self.bound!r}")
        if self.bound == "compute" and not self.flops:
            raise ValueError(f"Case {self.name!r}: bound='compute' needs a flops count")


@dataclass
class Benchmark:
    op: str
    cases: CaseFn
    description: str = ""
    source: str = ""


_REGISTRY: dict[str, Benchmark] = {}


_HEADLINE = False


def headline_mode() -> bool:
    """True under ``--headline``: case functions are called with ``quick=True`` and may narrow the quick set
    further to the headline cases (the ratios the README quotes), which are then timed with the full
    budgets. Scripts whose quick set already is the headline set need not look at this."""
    return _HEADLINE


def register(op: str, description: str = "") -> Callable[[CaseFn], CaseFn]:
    """Register ``cases(device, quick) -> Iterable[Case]`` as the benchmark of ``op``."""

    def deco(fn: CaseFn) -> CaseFn:
        try:
            source = str(Path(inspect.getsourcefile(fn) or "").resolve())
        except TypeError:
            source = ""
        old = _REGISTRY.get(op)
        if old is not None and old.source != source:
            raise ValueError(f"benchmark op {op!r} is registered twice: {old.source} and {source}")
        _REGISTRY[op] = Benchmark(op, fn, description or (inspect.getdoc(fn) or "").split("\n")[0], source)
        return fn

    return deco


def registered_benchmarks() -> dict[str, Benchmark]:
    return dict(_REGISTRY)


TRITON_CPU_SKIP = "Triton on CPU runs only in the interpreter (TRITON_INTERPRET=1), a testing tool: not timed"


def backend_impls(
    op: str,
    call: Any,
    make_fn: Callable[[str], Callable[[], Any]],
    *,
    label: str = "fastgen[{}]",
) -> list[Impl]:
    """One :class:`Impl` per backend of ``op`` (dispatch order), forced with ``use_backend``.

    ``call``: the ``fastgen._backend.Call(device, dtype, extra)`` the benchmarked call makes;
    ``make_fn(backend_name)``: a zero-argument callable running the op (the backend is forced around
    it here). Backends that cannot serve ``call`` become skipped rows carrying their reasons.
    """
    from fastgen import _backend

    registry = _backend.registered_ops()
    if op not in registry or not registry[op].backends:
        return [Impl.skipped(label.format("*"), f"op {op!r} has no backends registered in fastgen._backend")]
    entry = registry[op]
    impls = []
    for backend in entry.ordered():
        name = label.format(backend.name)
        if backend.name == "triton" and call.device.type == "cpu":
            impls.append(Impl.skipped(name, TRITON_CPU_SKIP))
            continue
        reasons = entry.why_not(backend.name, call, forced=True)
        if reasons:
            impls.append(Impl.skipped(name, "; ".join(reasons)))
            continue
        impls.append(Impl(name, _backend.forced_call(backend.name, op, make_fn(backend.name))))
    return impls


def token_agreement_check(exact: bool, head: int = 8, min_rows: float = 0.75) -> Callable[[Any], Check]:
    """A ``Case.check`` for generated token ids (batch, ...): the first output judged (the oracle; baselines
    run first) is the reference. ``exact``: every token must equal it (fp32); otherwise the first ``head``
    tokens must agree in at least ``min_rows`` of the rows (16-bit sampling may diverge later)."""
    state: dict[str, Any] = {}

    def check(out: Any) -> Check:
        if "ref" not in state:
            state["ref"] = out
            return Check(True, 0.0, "oracle")
        same = (out == state["ref"]).flatten(1)
        frac = float(same.float().mean())
        if exact:
            return Check(bool(same.all()), None, f"{100 * frac:.1f}% of tokens equal to the oracle")
        rows = float(same[:, :head].all(1).float().mean())
        detail = f"{100 * frac:.1f}% of tokens, first {head} equal in {100 * rows:.0f}% of rows"
        return Check(rows >= min_rows, None, detail)

    return check


def peak_memory_mib(
    device: torch.device, impls: Sequence[Impl], *, cpu: bool = False
) -> dict[str, float | str]:
    """Peak CUDA memory (MiB) above what is resident before the call, during one call of each runnable
    implementation ("oom" when it ran out of memory). Off CUDA: empty, or with ``cpu=True`` the peak CPU
    tensor memory from torch.profiler's memory events (the max of the allocator's "Total Allocated" above
    what was live before; a profiled extra call per implementation). Benchmarks put it in ``params``."""
    if device.type == "cpu" and cpu:
        return _cpu_peak_mib(impls)
    if device.type != "cuda":
        return {}
    out: dict[str, float | str] = {}
    for impl in impls:
        if impl.skip is not None:
            continue
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            impl.fn()
        except torch.OutOfMemoryError:
            out[impl.name] = "oom"
            torch.cuda.empty_cache()
            continue
        torch.cuda.synchronize(device)
        out[impl.name] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    return out


def _cpu_peak_mib(impls: Sequence[Impl]) -> dict[str, float | str]:
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, float | str] = {}
    for impl in impls:
        if impl.skip is not None:
            continue
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            impl.fn()
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        mem = sorted((e["ts"], e["args"]) for e in events if e.get("name") == "[memory]")
        if mem:
            start = mem[0][1]["Total Allocated"] - mem[0][1]["Bytes"]
            out[impl.name] = round((max(a["Total Allocated"] for _, a in mem) - start) / 2**20, 2)
    return out


# =====================================================================================================
# Metrics, correctness, timing
# =====================================================================================================


def achieved_gbps(nbytes: float, ms: float) -> float:
    """GB/s (1e9 bytes per second) for ``nbytes`` moved in ``ms`` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9


def achieved_tflops(flops: float, ms: float) -> float:
    """TFLOP/s (1e12 FLOPs per second) for ``flops`` done in ``ms`` milliseconds."""
    return flops / (ms * 1e-3) / 1e12


def _flatten(out: Any, path: str = "out") -> Iterator[tuple[str, Any]]:
    if isinstance(out, dict):
        for k in sorted(out, key=str):
            yield from _flatten(out[k], f"{path}[{k!r}]")
    elif isinstance(out, list | tuple):
        for i, v in enumerate(out):
            yield from _flatten(v, f"{path}[{i}]")
    else:
        yield path, out


@dataclass
class Check:
    ok: bool
    max_abs_err: float | None = None
    detail: str = ""


def compare_outputs(out: Any, ref: Any, atol: float, rtol: float) -> Check:
    """Element-wise ``|out - ref| <= atol + rtol * |ref|`` over every tensor in the outputs (NaN == NaN).

    Outputs may be tensors, numbers, None, or tuples / lists / dicts of those; the structure, shapes
    and NaN positions must match. Floating tensors are compared in (at least) float32.
    """
    got, want = list(_flatten(out)), list(_flatten(ref))
    if [p for p, _ in got] != [p for p, _ in want]:
        return Check(
            False, None, f"output structure differs: {[p for p, _ in got]} vs {[p for p, _ in want]}"
        )
    worst = 0.0
    for (path, a), (_, b) in zip(got, want):
        if a is None or b is None:
            if a is not b:
                return Check(False, None, f"{path}: None vs a value")
            continue
        a = torch.as_tensor(a).detach()
        b = torch.as_tensor(b).detach()
        if a.shape != b.shape:
            return Check(False, None, f"{path}: shape {tuple(a.shape)} vs reference {tuple(b.shape)}")
        if a.numel() == 0:
            continue
        if a.is_floating_point() or b.is_floating_point() or a.is_complex() or b.is_complex():
            dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        else:
            dtype = torch.promote_types(a.dtype, b.dtype)
        a = a.to(device=b.device, dtype=dtype)
        b = b.to(dtype=dtype)
        close = torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
        diff = (a - b).abs()
        finite = torch.isfinite(diff)
        if finite.any():
            worst = max(worst, float(diff[finite].max()))
        bad = int((~close).sum())
        if bad:
            return Check(
                False,
                worst,
                f"{path}: {bad}/{a.numel()} elements outside atol={atol:g} rtol={rtol:g} "
                f"(max abs err {worst:.3g})",
            )
    return Check(True, worst)


@dataclass
class Timing:
    ms: float
    runs: int | None
    method: str
    spread: float | None = None  # interquartile range of the repeats / median (None: one measurement)


class Timer:
    """Median time of a zero-argument callable, the house way (DESIGN.md rule 7).

    CUDA: ``triton.testing.do_bench`` (``warmup``/``rep`` budgets in ms: 25/100, quick 5/20) or, without
    triton or with an exact ``reps`` count, CUDA events with the same protocol (L2 flushed by zeroing
    a 256 MiB buffer before every rep). CPU: ``blocked_autorange(min_run_time=0.5 s, quick 0.05 s)``,
    or ``reps`` blocks of ``Timer.timeit`` sized to about 1 ms each.
    """

    def __init__(self, device: torch.device, *, quick: bool = False, reps: int | None = None):
        if reps is not None and reps < 1:
            raise ValueError(f"reps must be >= 1, got {reps}")
        self.device = device
        self.quick = quick
        self.reps = reps
        self.warmup_ms, self.rep_ms = (5, 20) if quick else (25, 100)
        self.min_run_time = 0.05 if quick else 0.5
        self._triton = None
        if device.type == "cuda" and reps is None:
            try:
                import triton.testing

                self._triton = triton.testing
            except Exception:
                self._triton = None
        self._flush: torch.Tensor | None = None

    def describe(self) -> str:
        if self.device.type == "cuda":
            if self._triton is not None:
                return f"triton.testing.do_bench(warmup={self.warmup_ms}ms, rep={self.rep_ms}ms), median"
            n = f"{self.reps} reps" if self.reps else f"~{self.rep_ms}ms of reps"
            return f"CUDA events, L2 flushed before each rep, {n}, median"
        threads = torch.get_num_threads()
        if self.reps:
            return f"torch.utils.benchmark Timer.timeit x {self.reps} blocks (~1ms each), median, {threads} threads"
        return (
            f"torch.utils.benchmark blocked_autorange(min_run_time={self.min_run_time}s), median, "
            f"{threads} threads"
        )

    def __call__(self, fn: Callable[[], Any]) -> Timing:
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                return self._cuda(fn)
        return self._cpu(fn)

    def _cpu(self, fn: Callable[[], Any]) -> Timing:
        from torch.utils import benchmark as tb

        timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        if self.reps is None:
            m = timer.blocked_autorange(min_run_time=self.min_run_time)
            return Timing(m.median * 1e3, m.number_per_run * len(m.times), self.describe(), _iqr(m.times))
        one = min(timer.timeit(number=1).median for _ in range(3))  # min: robust to a stall
        number = max(1, math.ceil(1e-3 / max(one, 1e-9)))
        per_run = [timer.timeit(number=number).median for _ in range(self.reps)]
        return Timing(statistics.median(per_run) * 1e3, number * self.reps, self.describe(), _iqr(per_run))

    def _cuda(self, fn: Callable[[], Any]) -> Timing:
        torch.cuda.synchronize()
        if self._triton is not None:
            q = self._triton.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.25, 0.5, 0.75])
            q25, med, q75 = (float(v) for v in q)
            return Timing(med, None, self.describe(), (q75 - q25) / med if med > 0 else None)
        if self._flush is None:
            self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=self.device)
        flush = self._flush
        ev = lambda: torch.cuda.Event(enable_timing=True)
        fn()
        torch.cuda.synchronize()
        start, end = ev(), ev()
        start.record()
        for _ in range(5):
            flush.zero_()
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end) / 5, 1e-4)
        for _ in range(max(1, int(self.warmup_ms / estimate))):
            fn()
        n = self.reps or max(1, int(self.rep_ms / estimate))
        starts, ends = [ev() for _ in range(n)], [ev() for _ in range(n)]
        for i in range(n):
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        return Timing(statistics.median(times), n, self.describe(), _iqr(times))


def _iqr(times: Sequence[float]) -> float | None:
    """Interquartile range / median of repeated measurements (None with fewer than 4)."""
    if len(times) < 4:
        return None
    q = statistics.quantiles(times, n=4)
    med = statistics.median(times)
    return (q[2] - q[0]) / med if med > 0 else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device, timer: Timer, mib: int = 256) -> dict[str, Any]:
    """GB/s of ``dst.copy_(src)`` for a ``mib`` MiB float32 tensor, counting bytes read + written."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)  # touch every page before timing
    moved = 2 * src.nbytes
    timing = timer(lambda: dst.copy_(src))
    return {
        "gbps": achieved_gbps(moved, timing.ms),
        "ms": timing.ms,
        "bytes": moved,
        "method": f"dst.copy_(src), {mib} MiB float32, read + write bytes; {timing.method}",
    }


# =====================================================================================================
# Running cases
# =====================================================================================================


@dataclass
class Row:
    """One line of the results: one implementation on one case."""

    op: str
    case: str
    impl: str
    baseline: bool
    status: str = "ok"  # ok | skipped | error
    reference: bool = False  # this row's output was the correctness oracle
    correct: bool | None = None
    max_abs_err: float | None = None
    check: str = ""
    skip_reason: str | None = None
    error: str | None = None
    ms: float | None = None
    runs: int | None = None
    spread: float | None = None  # IQR / median of the repeats
    gbps: float | None = None
    tflops: float | None = None
    pct_roofline: float | None = None
    roofline: str | None = None
    pct_nominal_bw: float | None = None
    speedup: dict[str, float] = field(default_factory=dict)
    bytes: int | None = None
    flops: int | None = None
    bound: str = "memory"
    atol: float | None = None
    rtol: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    timer: str | None = None


@dataclass
class Roofline:
    copy_gbps: float | None
    spec: DeviceSpec | None

    def apply(self, row: Row, case: Case) -> None:
        if row.gbps is not None and self.spec is not None:
            row.pct_nominal_bw = 100 * row.gbps / self.spec.hbm_gbps
        if case.bound == "compute":
            key = flop_key(case.flop_dtype)
            peak = self.spec.peak_tflops.get(key) if (self.spec and key) else None
            if peak and row.tflops is not None:
                row.pct_roofline, row.roofline = 100 * row.tflops / peak, f"peak {key} {peak:g} TFLOP/s"
        elif row.gbps is not None and self.copy_gbps:
            row.pct_roofline, row.roofline = 100 * row.gbps / self.copy_gbps, "copy bandwidth"


def _err_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " | ")
    return text if len(text) <= 300 else text[:297] + "..."


def run_case(op: str, case: Case, device: torch.device, timer: Timer, roof: Roofline) -> list[Row]:
    """Check every implementation against the first baseline, then time each one."""
    rows = {
        impl.name: Row(
            op=op,
            case=case.name,
            impl=impl.name,
            baseline=impl.baseline,
            bytes=case.bytes,
            flops=case.flops,
            bound=case.bound,
            atol=case.atol,
            rtol=case.rtol,
            params=dict(case.params),
        )
        for impl in case.impls
    }
    runnable = []
    for impl in case.impls:
        if impl.skip is not None:
            rows[impl.name].status, rows[impl.name].skip_reason = "skipped", impl.skip
        else:
            runnable.append(impl)

    # One call each (also the warm-up). Baselines go first so that only the oracle's output and one
    # other output are alive at a time.
    ref: Any = None
    have_ref = False
    for impl in sorted(runnable, key=lambda i: not i.baseline):
        row = rows[impl.name]
        try:
            out = impl.fn()  # type: ignore[misc]
            _sync(device)
        except Exception as e:
            row.status, row.error = "error", _err_text(e)
            continue
        if case.check is not None:  # the case's own oracle judges every output
            try:
                check = case.check(out)
            except Exception as e:
                check = Check(False, None, f"check failed: {_err_text(e)}")
            row.correct, row.max_abs_err, row.check = check.ok, check.max_abs_err, check.detail
            del out
            continue
        if impl.baseline and not have_ref:
            ref, have_ref = out, True
            row.reference, row.correct, row.max_abs_err = True, True, 0.0
            continue
        if not have_ref:
            row.check = "no baseline output to compare with"
        else:
            try:
                check = compare_outputs(out, ref, case.atol, case.rtol)
            except Exception as e:
                check = Check(False, None, f"comparison failed: {_err_text(e)}")
            row.correct, row.max_abs_err, row.check = check.ok, check.max_abs_err, check.detail
        del out
    del ref

    for impl in runnable:
        row = rows[impl.name]
        if row.status != "ok":
            continue
        try:
            timing = timer(impl.fn)  # type: ignore[arg-type]
        except Exception as e:
            row.status, row.error = "error", "while timing: " + _err_text(e)
            continue
        row.ms, row.runs, row.timer, row.spread = timing.ms, timing.runs, timing.method, timing.spread
        if case.bytes:
            row.gbps = achieved_gbps(case.bytes, timing.ms)
        if case.flops:
            row.tflops = achieved_tflops(case.flops, timing.ms)
        roof.apply(row, case)

    timed_baselines = [r for r in rows.values() if r.baseline and r.ms]
    for row in rows.values():
        if row.ms:
            row.speedup = {b.impl: b.ms / row.ms for b in timed_baselines}  # type: ignore[operator]
    return [rows[i.name] for i in case.impls]


@dataclass
class OpResult:
    bench: Benchmark
    rows: list[Row] = field(default_factory=list)
    error: str | None = None


def run_benchmark(
    bench: Benchmark, device: torch.device, timer: Timer, roof: Roofline, *, quick: bool, log: Any = None
) -> OpResult:
    """Pull the benchmark's cases one at a time and run each (tensors of a case die before the next)."""
    log = log or sys.stderr
    result = OpResult(bench)
    try:
        cases = iter(bench.cases(device, quick))
        index = 0
        while True:
            try:
                case = next(cases)
            except StopIteration:
                break
            index += 1
            print(f"  [{bench.op}] case {index}: {case.name}", file=log, flush=True)
            result.rows.extend(run_case(bench.op, case, device, timer, roof))
            del case
            gc.collect()
    except Exception as e:
        result.error = f"building cases failed: {_err_text(e)}"
        traceback.print_exc(file=log)
    return result


# =====================================================================================================
# Reporting: table, JSON, plot
# =====================================================================================================


def _num(x: float | None, kind: str) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if kind == "ms":
        if x >= 100:
            return f"{x:.1f}"
        if x >= 1:
            return f"{x:.3f}"
        return f"{x:.4f}" if x >= 1e-3 else f"{x:.2e}"
    if kind == "gbps":
        return f"{x:.1f}"
    if kind == "tflops":
        return f"{x:.2f}" if x < 100 else f"{x:.1f}"
    if kind == "pct":
        return f"{x:.1f}%"
    if kind == "x":
        return f"{x:.2f}x"
    return str(x)


def _ok_text(row: Row) -> str:
    if row.status == "error":
        return "ERROR"
    if row.reference:
        return "ref"
    if row.correct is None:
        return "n/a"
    if row.correct:
        return "ok"
    who = "baseline; " if row.baseline else ""
    return f"WRONG ({who}{row.check})" if row.check or who else "WRONG"


TABLE_WIDTH = 120
NOISY = 0.10  # a row whose repeats spread (IQR / median) more than this is marked "~"


def _impl_kind(name: str) -> str | None:
    if name.startswith("fastgen[torch]"):
        return "fastgen's plain-PyTorch fallback (no fastgen kernel)"
    return None


def format_table(result: OpResult, copy_gbps: float | None = None) -> str:
    """Plain-text table of one op, at most TABLE_WIDTH columns: time, its spread, throughput and % of the
    roofline where known, the speed-up against each baseline, and the check. Implementations that did not
    run are listed once below the table with their reason; failed rows stay inline."""
    rows = result.rows
    baselines: list[str] = []
    for r in rows:
        if r.baseline and r.impl not in baselines and r.status == "ok":
            baselines.append(r.impl)
    ran = [r for r in rows if r.status != "skipped"]
    metrics = [
        (h, k, attr)
        for h, k, attr in (
            ("GB/s", "gbps", "gbps"),
            ("TFLOP/s", "tflops", "tflops"),
            ("%roof", "pct", "pct_roofline"),
        )
        if any(getattr(r, attr) is not None for r in ran)
    ]
    labels = [f"vs {b}" for b in baselines]
    # too wide with the baselines' names: number them and name them in a legend under the table
    fixed = 30 + 2 + max([len(r.impl) for r in ran] or [4]) + 2 + 9 + 8 + 9 * len(metrics) + 6
    legend = sum(max(len(x), 7) + 2 for x in labels) + fixed > TABLE_WIDTH
    if legend:
        labels = [f"vs [{i + 1}]" for i in range(len(baselines))]
    header = ["case", "impl", "ms", "spread", *[m[0] for m in metrics], *labels, "ok"]
    numeric = set(range(2, len(header) - 1))
    body: list[list[str] | tuple[str, str, str]] = []
    last_case = None
    case_width = 30
    for r in ran:
        case = r.case if r.case != last_case else ""
        last_case = r.case
        if len(case) > case_width:  # a long case name gets a line of its own
            body.append((case, "", ""))
            case = ""
        if r.status == "error":
            body.append((case, r.impl, f"ERROR: {r.error}"))
            continue
        noisy = r.spread is not None and r.spread > NOISY
        body.append(
            [
                case,
                r.impl,
                _num(r.ms, "ms") + ("~" if noisy else ""),
                "-" if r.spread is None else f"{100 * r.spread:.0f}%",
                *[_num(getattr(r, attr), k) for _, k, attr in metrics],
                *[_num(r.speedup.get(b), "x") for b in baselines],
                _ok_text(r),
            ]
        )
    widths = [len(h) for h in header]
    for line in body:
        if isinstance(line, list):
            for i, c in enumerate(line[:-1]):
                widths[i] = max(widths[i], len(c))
        elif line[1]:
            widths[1] = max(widths[1], len(line[1]))
    widths[0] = min(widths[0], case_width)

    def fit(text: str) -> str:
        return text if len(text) <= TABLE_WIDTH else text[: TABLE_WIDTH - 3] + "..."

    def fmt(cells: Sequence[str]) -> str:
        out = []
        for i, c in enumerate(cells):
            if i == len(header) - 1:
                out.append(c)
            elif i in numeric:
                out.append(c.rjust(widths[i]))
            else:
                out.append(c.ljust(widths[i]))
        return fit("  ".join(out).rstrip())

    title = f"== {result.bench.op}" + (f": {result.bench.description}" if result.bench.description else "")
    lines = [fit(title + " =="), fmt(header), fit("  ".join("-" * w for w in widths))]
    for line in body:
        if isinstance(line, list):
            lines.append(fmt(line))
        elif not line[1]:
            lines.append(fit(line[0]))
        else:
            lines.append(
                fit((line[0].ljust(widths[0]) + "  " + line[1].ljust(widths[1]) + "  " + line[2]).rstrip())
            )
    if result.error:
        lines.extend(textwrap.wrap(f"ERROR: {result.error}", TABLE_WIDTH, subsequent_indent="    "))
    if not rows and not result.error:
        lines.append("(no cases)")
    # implementations that did not run: each once, with its reason once (not once per case)
    not_run: dict[str, list[str]] = {}
    for r in rows:
        if r.status == "skipped":
            reasons = not_run.setdefault(r.impl, [])
            if r.skip_reason not in reasons:
                reasons.append(r.skip_reason or "")
    if legend:
        lines.append(fit("baselines: " + ", ".join(f"[{i + 1}] {b}" for i, b in enumerate(baselines))))
    for impl, reasons in not_run.items():  # wrapped, not cut: the reason is the point of the line
        lines.extend(
            textwrap.wrap(f"not run: {impl}: {' | '.join(reasons)}", TABLE_WIDTH, subsequent_indent="    ")
        )
    notes = []
    if copy_gbps and any(r.bound == "memory" and r.gbps for r in rows):
        notes.append(f"achieved GB/s / measured copy bandwidth ({copy_gbps:.1f} GB/s)")
    if any(r.bound == "compute" and r.tflops for r in rows):
        notes.append("compute-bound cases: TFLOP/s / nominal peak FLOP/s of their dtype (known GPUs only)")
    if notes and metrics:
        lines.append(fit("%roof: " + "; ".join(notes)))
    if any(r.spread is not None and r.spread > NOISY for r in ran):
        lines.append(
            f"~: noisy row (spread = interquartile range of the repeats / median > {100 * NOISY:.0f}%)"
        )
    kinds = {r.impl: _impl_kind(r.impl) for r in ran if _impl_kind(r.impl)}
    for impl, kind in kinds.items():
        lines.append(fit(f"{impl}: {kind}"))
    return "\n".join(lines)


def summarize(results: Sequence[OpResult]) -> list[dict[str, Any]]:
    """Per op: rows, wrong answers (fastgen's; baselines' apart), errors, and, per case, the best correct
    fastgen row against the op's main (first) baseline: cases faster / slower and the geometric mean."""
    out = []
    for res in results:
        rows = res.rows
        ratios, mains = [], []
        for case in dict.fromkeys(r.case for r in rows):
            in_case = [r for r in rows if r.case == case]
            main = next((r.impl for r in in_case if r.baseline and r.status == "ok" and r.ms), None)
            mine = [
                r for r in in_case if not r.baseline and r.ms and r.correct is not False and main in r.speedup
            ]
            if mine:
                ratios.append(max(r.speedup[main] for r in mine))
                mains.append(main)
        out.append(
            {
                "op": res.bench.op,
                "rows": len(rows),
                "wrong": sum(r.correct is False and not r.baseline for r in rows),
                "baseline_off": sum(r.correct is False and r.baseline for r in rows),
                "errors": sum(r.status == "error" for r in rows) + bool(res.error),
                "baseline": ", ".join(dict.fromkeys(mains)) or None,
                "cases": len(ratios),
                "faster": sum(x > 1.0 for x in ratios),
                "slower": sum(x < 1.0 for x in ratios),
                "geomean": math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if ratios else None,
            }
        )
    return out


def format_summary(summary: Sequence[dict[str, Any]]) -> str:
    """The last thing a run prints: one line per op."""
    head = f"{'op':<18}{'rows':>5}{'wrong':>6}{'errors':>7}{'faster':>7}{'slower':>7}  geomean  vs"
    lines = ["== summary: per case, the best correct fastgen row vs the case's first baseline ==", head]
    for s in summary:
        g = "-" if s["geomean"] is None else f"{s['geomean']:.2f}x"
        wrong = f"{s['wrong']}" + (f"+{s['baseline_off']}b" if s["baseline_off"] else "")
        lines.append(
            f"{s['op']:<18}{s['rows']:>5}{wrong:>6}{s['errors']:>7}{s['faster']:>7}{s['slower']:>7}"
            f"  {g:>7}  {s['baseline'] or '-'}"
        )
    if any(s["baseline_off"] for s in summary):
        lines.append(
            "wrong: fastgen rows that disagree with the oracle; +Nb: baselines that disagree (their error)"
        )
    return "\n".join(line[:TABLE_WIDTH] for line in lines)


def _git(root: Path) -> dict[str, Any]:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")

    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(
                ["git", "--no-optional-locks", "-C", str(root), *args],
                capture_output=True,
                text=True,
                timeout=20,
                env=env,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout if p.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def _versions() -> dict[str, Any]:
    fastgen_mod = sys.modules.get("fastgen")
    version = getattr(fastgen_mod, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("fastgen")
        except Exception:
            version = None
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "fastgen": version,
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, bool | int | str):
        return x
    return str(x)  # dtypes, devices, paths...


# matplotlib's default cycle without its red, which marks wrong outputs
_COLORS = ("C0", "C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9")


def write_plot(path: Path, results: Sequence[OpResult], copy_gbps: float | None, device_name: str) -> bool:
    """A bar chart per op (GB/s per case and impl, or ms when a case has no byte count) with the
    measured copy bandwidth as a dashed line. Returns False (with one message) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(
            "fastgen.bench: matplotlib is not installed, so no plot was written (the JSON has every "
            "number); `pip install matplotlib` for plots, or pass --no-plot to silence this.",
            file=sys.stderr,
        )
        return False
    panels = [r for r in results if any(row.ms for row in r.rows)]
    if not panels:
        return False
    n_cases = max(len({row.case for row in r.rows}) for r in panels)
    fig = Figure(figsize=(max(8.0, 1.6 * n_cases + 3), 4.2 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, result in zip(axes, panels):
        timed = [r for r in result.rows if r.ms]
        cases = list(dict.fromkeys(r.case for r in timed))
        impls = list(dict.fromkeys([r.impl for r in timed if r.baseline] + [r.impl for r in timed]))
        use_gbps = all(r.gbps is not None for r in timed)
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            labelled = False
            for i, case in enumerate(cases):
                row = next((r for r in timed if r.case == case and r.impl == impl), None)
                if row is None:
                    continue
                wrong = row.correct is False
                # a wrong fastgen row is fastgen's failure (red); a baseline that disagrees with the oracle
                # (e.g. the reference run in bf16) is the baseline's error (grey cross-hatch), drawn apart
                ax.bar(
                    i - 0.4 + width * (j + 0.5),
                    row.gbps if use_gbps else row.ms,
                    width,
                    color=_COLORS[j % len(_COLORS)],
                    hatch=("xx" if row.baseline else "//") if wrong else None,
                    edgecolor=("0.4" if row.baseline else "red") if wrong else None,
                    label=None if labelled else impl,
                )
                labelled = True
        if use_gbps and copy_gbps:
            ax.axhline(copy_gbps, color="k", ls="--", lw=1, label=f"copy bandwidth {copy_gbps:.0f} GB/s")
        ax.set_xticks(range(len(cases)), cases, rotation=15, ha="right", fontsize=8)
        if not use_gbps:
            ax.set_yscale("log")  # cases differ by orders of magnitude
        ax.set_ylabel("achieved GB/s" if use_gbps else "median ms, log scale (lower is better)")
        title = f"{result.bench.op} on {device_name}"
        notes = []
        if any(r.correct is False and not r.baseline for r in timed):
            notes.append("hatched red: fastgen output WRONG")
        if any(r.correct is False and r.baseline for r in timed):
            notes.append("grey cross-hatch: a baseline that disagrees with the oracle")
        if notes:
            title += "  (" + "; ".join(notes) + ")"
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=110)
    return True


# =====================================================================================================
# Discovery and the CLI
# =====================================================================================================


def default_bench_dir() -> Path:
    """``$FASTGEN_BENCH_DIR``, else ``<repo>/benchmarks`` next to the fastgen package, else ``./benchmarks``."""
    env = os.environ.get(ENV_BENCH_DIR)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2] / "benchmarks"
    if repo.is_dir():
        return repo
    cwd = Path.cwd() / "benchmarks"
    return cwd if cwd.is_dir() else repo


def discover(bench_dir: Path, log: Any = None) -> tuple[dict[str, Benchmark], list[str]]:
    """Import every ``bench_*.py`` in ``bench_dir`` (fresh) and return what they registered, plus
    one message per script that failed to import."""
    log = log or sys.stderr
    _REGISTRY.clear()
    errors: list[str] = []
    bench_dir = bench_dir.resolve()
    if str(bench_dir) not in sys.path:  # scripts may share helpers that live next to them
        sys.path.insert(0, str(bench_dir))
    for path in sorted(bench_dir.glob("bench_*.py")):
        name = f"_fastgen_bench_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            errors.append(f"{path.name}: cannot be loaded as a module")
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            errors.append(f"{path.name}: import failed: {_err_text(e)}")
            print(f"fastgen.bench: {path} failed to import:", file=log)
            traceback.print_exc(file=log)
    return registered_benchmarks(), errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastgen.bench",
        description="Run fastgen's benchmarks (benchmarks/bench_*.py): time every implementation, "
        "check it against the PyTorch reference, report ms, GB/s, TFLOP/s, % of roofline and speed-ups.",
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer cases and reps (a smoke run, not numbers to quote)"
    )
    p.add_argument(
        "--headline",
        action="store_true",
        help="the headline cases only (1-5 per op: the ratios that matter, at full size on a GPU) with full "
        "timing budgets: what `benchmarks/gpu_check.sh bench` runs in one short GPU window",
    )
    p.add_argument("--op", action="extend", nargs="+", metavar="NAME", help="run only these ops (repeatable)")
    p.add_argument(
        "--out", default="bench_results", type=Path, help="results directory (default: bench_results/)"
    )
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        metavar="N",
        help="exact number of timed reps per implementation (CUDA: N event-timed calls; CPU: N ~1 ms blocks) "
        "instead of the time budgets",
    )
    p.add_argument(
        "--bench-dir", type=Path, default=None, help=f"where the bench_*.py scripts are (env {ENV_BENCH_DIR})"
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the current GPU, else cpu)")
    p.add_argument(
        "--copy-mib", type=int, default=256, metavar="MIB", help="tensor size for the copy-bandwidth roofline"
    )
    p.add_argument("--list", action="store_true", help="list the benchmarks found and exit")
    return p


def _header(meta: dict[str, Any], copy: dict[str, Any] | None, timer: Timer) -> str:
    dev = meta["device"]
    v = meta["versions"]
    git = meta["git"]
    if dev["kind"] == "cuda":
        where = f"{dev['name']} (cuda:{dev['index']}, sm_{dev['capability'].replace('.', '')}, {dev['sm_count']} SMs)"
    else:
        where = f"cpu {dev['name']} ({dev['cpu_threads']} threads)"
    commit = (git["commit"] or "unknown")[:10] + (" (dirty)" if git.get("dirty") else "")
    lines = [
        f"fastgen.bench {meta['date']}  {where}",
        f"  torch {v['torch']} (cuda {v['torch_cuda']}), triton {v['triton']}, fastgen {v['fastgen']} @ {commit}",
        f"  timer: {timer.describe()}",
    ]
    if copy:
        lines.append(f"  copy bandwidth: {copy['gbps']:.1f} GB/s measured ({copy['method'].split(';')[0]})")
    nominal = dev.get("nominal")
    if nominal:
        peaks = ", ".join(f"{k} {v:g}" for k, v in nominal["peak_tflops"].items())
        lines.append(f"  nominal {nominal['model']}: HBM {nominal['hbm_gbps']:g} GB/s; TFLOP/s {peaks}")
    return "\n".join(lines)


def _stem(out_dir: Path, slug: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"{stamp}_{slug}"
    k = 1
    while (out_dir / f"{stem}.json").exists():
        k += 1
        stem = f"{stamp}-{k}_{slug}"
    return stem


def main(argv: Sequence[str] | None = None, *, only: Sequence[str] | None = None) -> int:
    """The CLI. ``only``: run just these already-registered ops without discovering scripts (what a
    ``bench_*.py`` run as a script passes). Returns the exit code: 0, or 1 when an implementation
    was wrong (baselines excepted) or raised, a benchmark could not build its cases, or (full runs) a
    script failed to import."""
    parser = build_parser()
    args = parser.parse_args(argv)
    import_errors: list[str] = []
    if only is not None:
        missing = [op for op in only if op not in _REGISTRY]
        if missing:
            parser.error(f"ops {missing} are not registered in this process")
        benchmarks = {op: _REGISTRY[op] for op in only}
        where = "this script"
    else:
        bench_dir = args.bench_dir or default_bench_dir()
        if not bench_dir.is_dir():
            parser.error(
                f"benchmark directory {bench_dir} does not exist "
                f"(pass --bench-dir or set {ENV_BENCH_DIR}; a source checkout has it at <repo>/benchmarks)"
            )
        benchmarks, import_errors = discover(bench_dir)
        where = str(bench_dir)
    if args.list:
        for op, b in sorted(benchmarks.items()):
            print(f"{op:<24} {b.description}  [{Path(b.source).name}]")
        for e in import_errors:
            print(f"(not loaded) {e}")
        return 1 if import_errors else 0
    selected = list(dict.fromkeys(args.op)) if args.op else sorted(benchmarks)
    unknown = [op for op in selected if op not in benchmarks]
    if unknown:
        known = ", ".join(sorted(benchmarks)) or "none"
        msg = f"unknown op {', '.join(repr(u) for u in unknown)}; benchmarks found in {where}: {known}"
        if import_errors:
            msg += "\n(scripts that failed to import: " + "; ".join(import_errors) + ")"
        parser.error(msg)
    if not selected:
        parser.error(
            f"no benchmarks found in {where} (expected bench_*.py scripts calling fastgen.bench.register)"
        )

    try:
        device = pick_device(args.device)
    except (RuntimeError, ValueError) as e:
        parser.error(str(e))
    global _HEADLINE
    _HEADLINE = bool(args.headline)
    timer = Timer(device, quick=args.quick, reps=args.reps)
    info = describe_device(device)
    meta: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": info,
        "versions": _versions(),
        "git": _git(Path(__file__).resolve().parents[2]),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "headline": args.headline,
        "reps": args.reps,
        "timer": timer.describe(),
        "env": {k: os.environ[k] for k in ("FASTGEN_BACKEND", "TRITON_INTERPRET") if k in os.environ},
    }
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "fastgen.bench: TRITON_INTERPRET=1 is set; Triton rows will not be timed on a GPU",
            file=sys.stderr,
        )

    try:
        copy = measure_copy_bandwidth(device, timer, args.copy_mib)
    except Exception as e:
        print(f"fastgen.bench: copy-bandwidth measurement failed ({_err_text(e)}); no %roof", file=sys.stderr)
        copy = None
    copy_gbps = copy["gbps"] if copy else None
    spec = nominal_spec(info["name"]) if device.type == "cuda" else None
    roof = Roofline(copy_gbps, spec)
    print(_header(meta, copy, timer), flush=True)

    results = []
    for op in selected:
        print(f"running {op} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = run_benchmark(benchmarks[op], device, timer, roof, quick=args.quick or args.headline)
        results.append(result)
        print(f"\n{format_table(result, copy_gbps)}\n({time.perf_counter() - t0:.1f}s)", flush=True)

    # A baseline that disagrees with the oracle (e.g. the same PyTorch ops run in bf16) is flagged but
    # is not a fastgen failure; a fastgen (non-baseline) implementation that disagrees is.
    wrong = [r for res in results for r in res.rows if r.correct is False and not r.baseline]
    baselines_off = [r for res in results for r in res.rows if r.correct is False and r.baseline]
    failed = [r for res in results for r in res.rows if r.status == "error"]
    op_errors = [f"{res.bench.op}: {res.error}" for res in results if res.error]
    meta.update(
        copy_bandwidth=copy,
        copy_bandwidth_gbps=copy_gbps,
        ops={
            res.bench.op: {
                "description": res.bench.description,
                "source": res.bench.source,
                "error": res.error,
            }
            for res in results
        },
        import_errors=import_errors,
        summary={
            "rows": sum(len(r.rows) for r in results),
            "wrong": len(wrong),
            "baselines_off": len(baselines_off),
            "errors": len(failed),
            "ops": summarize(results),
        },
        rows=[asdict(r) for res in results for r in res.rows],
    )

    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(out_dir, device_slug(info))
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    plots: list[str] = []
    if not args.no_plot:
        # one PNG per op: <stem>.png for a one-op run, <stem>_<op>.png each otherwise
        per_op = [(png_path, results)] if len(results) == 1 else [
            (out_dir / f"{stem}_{res.bench.op}.png", [res]) for res in results
        ]  # fmt: skip
        for path, group in per_op:
            try:
                if write_plot(path, group, copy_gbps, info["name"]):
                    plots.append(path.name)
                elif importlib.util.find_spec("matplotlib") is None:
                    break  # write_plot said why, once
            except Exception as e:
                print(
                    f"fastgen.bench: plotting failed ({_err_text(e)}); results are in the JSON",
                    file=sys.stderr,
                )
    meta["plot"] = plots[0] if plots else None
    meta["plots"] = plots
    text = json.dumps(_jsonable(meta), indent=2) + "\n"
    json_path.write_text(text)
    (out_dir / "latest.json").write_text(text)
    pngs = "".join(f", {out_dir / name}" for name in plots)
    print(f"wrote {json_path}{pngs}, {out_dir / 'latest.json'}")

    status = 0
    for r in baselines_off:
        print(
            f"note: baseline {r.op} / {r.case} / {r.impl} differs from the oracle: {r.check}", file=sys.stderr
        )
    for r in wrong:
        print(f"WRONG: {r.op} / {r.case} / {r.impl}: {r.check}", file=sys.stderr)
        status = 1
    for r in failed:
        print(f"ERROR: {r.op} / {r.case} / {r.impl}: {r.error}", file=sys.stderr)
        status = 1
    for e in op_errors:
        print(f"ERROR: {e}", file=sys.stderr)
        status = 1
    if import_errors:
        for e in import_errors:
            print(f"{'ERROR' if not args.op else 'warning'}: {e}", file=sys.stderr)
        if not args.op:
            status = 1
    sys.stderr.flush()
    print("\n" + format_summary(meta["summary"]["ops"]), flush=True)
    return status
