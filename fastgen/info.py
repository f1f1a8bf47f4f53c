"""``python -m fastgen.info``: versions, device, extension status, and for every op which backends
can serve it here (and why the others cannot)."""

from __future__ import annotations

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


def report() -> str:
    lines = ["fastgen info", ""]
    for k, v in _versions().items():
        lines.append(f"  {k:<20} {v}")
    lines.append(f"  {'device':<20} {_device()}")
    ext = "built" if _ext.C is not None else f"missing ({_ext.load_error()})"
    if _ext.C is not None:
        ext += " with CUDA sources" if _ext.C.has_cuda() else " (C++ CPU only)"
    lines.append(f"  {'fastgen._C':<20} {ext}")
    if _ext.C is not None and hasattr(_ext.C, "cpu_isa"):
        cap = os.environ.get("FASTGEN_CPU_ISA")
        try:
            isa = _ext.C.cpu_isa()
        except ValueError as e:  # a bad FASTGEN_CPU_ISA: show it rather than fail the whole report
            isa = f"error: {e}"
        lines.append(
            f"  {'C++ CPU SIMD path':<20} {isa} (this CPU's best: {_ext.C.cpu_isa_best()}; "
            f"FASTGEN_CPU_ISA={cap or '(not set)'})"
        )
    forced = os.environ.get(_backend.ENV_VAR)
    lines.append(
        f"  {_backend.ENV_VAR:<20} {forced or '(not set: automatic, ' + ' > '.join(_backend.BACKEND_ORDER) + ')'}"
    )
    lines.append(f"  {'TRITON_INTERPRET':<20} {os.environ.get('TRITON_INTERPRET', '(not set)')}")
    lines.append("")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name, op in sorted(_backend.registered_ops().items()):
        lines.append(f"op {name}: {op.doc}")
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            call = Call(device, dtype, {})
            try:
                chosen = op.dispatch(call).name
            except _backend.BackendUnavailableError as e:
                chosen = f"none ({e})"
            lines.append(f"  {device.type} {str(dtype).replace('torch.', ''):<9} -> {chosen}")
        call = Call(device, torch.float32, {})
        for backend in op.ordered():
            reasons = backend.why_not(call)
            status = "usable" if not reasons else "no: " + "; ".join(reasons)
            note = f"  [{backend.note}]" if backend.note else ""
            lines.append(f"    {backend.name:<7} {status}{note}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
