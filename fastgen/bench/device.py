"""What the benchmarks ran on, and the roofline numbers to compare against.

Two kinds of ceiling are reported:

* **measured copy bandwidth** (every device, CPU included): a large ``dst.copy_(src)`` timed once
  per run, counting the bytes read *and* written. This is the practical memory roofline that every
  memory-bound row's ``%roof`` is measured against.
* **nominal peaks** from the vendor datasheets, only for GPUs recognised by name
  (``torch.cuda.get_device_name()``): HBM bandwidth and dense peak FLOP/s per dtype. Compute-bound
  cases are measured against these; unknown devices get the measured copy bandwidth only.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class DeviceSpec:
    """Datasheet numbers for one GPU model.

    ``hbm_gbps``: peak DRAM bandwidth in GB/s (1e9 bytes/s).
    ``peak_tflops``: dense (no sparsity) peak in TFLOP/s, keyed by ``"bf16"``, ``"fp16"``, ``"tf32"``
    (tensor cores) and ``"fp32"``, ``"fp64"`` (CUDA cores, non-tensor).
    """

    model: str
    hbm_gbps: float
    peak_tflops: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_H100_SXM = {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 66.9, "fp64": 33.5}
_H100_PCIE = {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2, "fp64": 25.6}
_H100_NVL = {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0, "fp64": 30.0}
_A100 = {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5, "fp64": 9.7}

# (required substrings of the lower-cased device name, spec); the first entry whose substrings all
# occur wins, so the more specific names come first.
_KNOWN: tuple[tuple[tuple[str, ...], DeviceSpec], ...] = (
    (("h200", "nvl"), DeviceSpec("H200 NVL", 4800.0, _H100_NVL)),
    (("h200",), DeviceSpec("H200 SXM", 4800.0, _H100_SXM)),
    (("h100", "pcie"), DeviceSpec("H100 PCIe", 2000.0, _H100_PCIE)),
    (("h100", "nvl"), DeviceSpec("H100 NVL", 3900.0, _H100_NVL)),
    (("h100", "hbm3"), DeviceSpec("H100 SXM", 3350.0, _H100_SXM)),
    (("h100", "sxm"), DeviceSpec("H100 SXM", 3350.0, _H100_SXM)),
    (("a100", "80gb", "pcie"), DeviceSpec("A100 80GB PCIe", 1935.0, _A100)),
    (("a100", "80gb"), DeviceSpec("A100 80GB SXM", 2039.0, _A100)),
    (("a100", "40gb"), DeviceSpec("A100 40GB", 1555.0, _A100)),
)


def nominal_spec(device_name: str) -> DeviceSpec | None:
    """The datasheet numbers for a GPU named like ``torch.cuda.get_device_name()``, or None.

    >>> nominal_spec("NVIDIA H100 80GB HBM3").hbm_gbps
    3350.0
    """
    name = device_name.lower()
    for needles, spec in _KNOWN:
        if all(n in name for n in needles):
            return spec
    return None


def flop_key(dtype: torch.dtype | str | None) -> str | None:
    """Key into :attr:`DeviceSpec.peak_tflops` for a compute dtype (``"tf32"`` passes through)."""
    if dtype is None or isinstance(dtype, str):
        return dtype
    return {
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
        torch.float32: "fp32",
        torch.float64: "fp64",
    }.get(dtype)


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` ("cpu", "cuda", "cuda:1"), or the current CUDA device when there is one, else CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--device {requested}: torch sees no CUDA device")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def describe_device(device: torch.device) -> dict[str, Any]:
    """JSON-ready description: kind, name, (GPU) capability / SMs / memory, CPU model and threads,
    and the nominal peaks when the GPU is known (else ``"nominal": None``)."""
    info: dict[str, Any] = {
        "kind": device.type,
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        spec = nominal_spec(name)
        info.update(
            name=name,
            index=device.index,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            nominal=spec.to_json() if spec else None,
        )
    else:
        info.update(name=info["cpu_model"], nominal=None)
    return info


def device_slug(info: dict[str, Any]) -> str:
    """Short file-name-safe tag: ``nvidia-h100-80gb-hbm3`` or ``cpu-intel-r-xeon-r-...``."""
    name = str(info.get("name") or info.get("kind") or "device")
    if info.get("kind") == "cpu":
        name = "cpu " + name
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:48].rstrip("-") or "device"
