"""``python -m fastgen.info``: versions, device, extension status, and for every op which backends
can serve it here (and why the others cannot)."""

from __future__ import annotations

import json
import os
import platform
import sys

import torch

import fastgen
from fastgen import _backend, _ext
from fastgen._backend import Call


def _versions() -> dict[str, str]:
    out = {
        "fastgen": fastgen.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch.version.cuda": str(torch.version.cuda),
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as e:  # pragma: no cover
        out["triton"] = f"not importable ({type(e).__name__})"
    return out


def _device() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return (
            f"cuda:0 {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
            f"{p.multi_processor_count} SMs)"
        )
    return f"cpu {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


_PROBE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _probe_dtypes(op: _backend.Op) -> list[torch.dtype]:
    """The dtypes some backend of the op declares (moe_route: int32 / int64), float64 only if nothing else."""
    declared = {d for b in op.ordered() for d in b.dtypes}
    dtypes = [d for d in _PROBE_DTYPES if d in declared and d != torch.float64]
    return dtypes or [d for d in _PROBE_DTYPES if d in declared]


def collect() -> dict:
    """Everything ``report`` shows, as plain data (``python -m fastgen.info --json``)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict = {"versions": _versions(), "device": _device(), "ops": {}}
    out["extension"] = {
        "built": _ext.C is not None,
        "error": None if _ext.C is not None else _ext.load_error(),
    }
    if _ext.C is not None:
        out["extension"]["cuda"] = bool(_ext.C.has_cuda())
        if hasattr(_ext.C, "cpu_isa"):
            try:
                isa = _ext.C.cpu_isa()
            except ValueError as e:  # a bad FASTGEN_CPU_ISA: show it rather than fail the whole report
                isa = f"error: {e}"
            out["extension"]["cpu_isa"] = isa
            out["extension"]["cpu_isa_best"] = _ext.C.cpu_isa_best()
    out["env"] = {k: os.environ.get(k) for k in (_backend.ENV_VAR, "TRITON_INTERPRET", "FASTGEN_CPU_ISA")}
    for name, op in sorted(_backend.registered_ops().items()):
        dtypes = _probe_dtypes(op)
        chosen = {}
        for dtype in dtypes:
            try:
                chosen[_dtype_name(dtype)] = op.dispatch(Call(device, dtype, {})).name
            except _backend.BackendUnavailableError:
                chosen[_dtype_name(dtype)] = None
        call = Call(device, dtypes[0] if dtypes else torch.float32, {})
        backends = {
            b.name: {"usable": not (r := b.why_not(call)), "reasons": r, "note": b.note} for b in op.ordered()
        }
        out["ops"][name] = {"doc": op.doc, "device": device.type, "chosen": chosen, "backends": backends}
    return out


def report() -> str:
    info = collect()
    lines = ["fastgen info", ""]
    for k, v in info["versions"].items():
        lines.append(f"  {k:<20} {v}")
    lines.append(f"  {'device':<20} {info['device']}")
    ext = info["extension"]
    text = "built" if ext["built"] else f"missing ({ext['error']})"
    if ext["built"]:
        text += " with CUDA sources" if ext["cuda"] else " (C++ CPU only)"
    lines.append(f"  {'fastgen._C':<20} {text}")
    if "cpu_isa" in ext:
        cap = info["env"]["FASTGEN_CPU_ISA"]
        lines.append(
            f"  {'C++ CPU SIMD path':<20} {ext['cpu_isa']} (this CPU's best: {ext['cpu_isa_best']}; "
            f"FASTGEN_CPU_ISA={cap or '(not set)'})"
        )
    forced = info["env"][_backend.ENV_VAR]
    lines.append(
        f"  {_backend.ENV_VAR:<20} {forced or '(not set: automatic, ' + ' > '.join(_backend.BACKEND_ORDER) + ')'}"
    )
    lines.append(f"  {'TRITON_INTERPRET':<20} {info['env']['TRITON_INTERPRET'] or '(not set)'}")
    lines.append("")
    # a refusal reason that several backends share (no CUDA device, no CUDA sources...) is printed once, below
    counts: dict[str, int] = {}
    for op in info["ops"].values():
        for b in op["backends"].values():
            for r in b["reasons"]:
                counts[r] = counts.get(r, 0) + 1
    keys = {r: f"[{i + 1}]" for i, r in enumerate(r for r, n in counts.items() if n > 1)}
    for name, op in info["ops"].items():
        lines.append(f"op {name}: {op['doc']}")
        chosen = ", ".join(f"{d} -> {b or 'none'}" for d, b in op["chosen"].items())
        lines.append(f"  {op['device']}: {chosen}")
        for bname, b in op["backends"].items():
            status = "usable" if b["usable"] else "no: " + "; ".join(keys.get(r, r) for r in b["reasons"])
            note = f"  [{b['note']}]" if b["note"] else ""
            lines.append(f"    {bname:<7} {status}{note}")
        lines.append("")
    if keys:
        lines.append("reasons:")
        lines.extend(f"  {k} {r}" for r, k in keys.items())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args != ["--json"]:
        raise SystemExit("usage: python -m fastgen.info [--json]")
    print(json.dumps(collect(), indent=1) if args else report())


if __name__ == "__main__":
    main()
