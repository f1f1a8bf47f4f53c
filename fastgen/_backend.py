"""The backend registry: which of cuda / triton / cpp / torch serves a call.

Backends are data. Every op owns an :class:`Op`; each implementation registers a :class:`Backend` that
declares the devices and dtypes it supports, whether it is usable on this machine at all
(``available() -> list[str]`` of reasons it is not), and per-call limits (``check(call) -> list[str]``).
Dispatch picks the first backend, in the fixed priority order ``cuda, triton, cpp, torch``, whose
``why_not(call)`` is empty.

Forcing a backend
-----------------
* ``FASTGEN_BACKEND=triton`` (any of cuda / triton / cpp / torch) forces one backend for every op;
  ``FASTGEN_BACKEND=diffusion_step:cpp,attention:torch`` forces per op. Read at call time.
* ``with fastgen.use_backend("cpp"):`` does the same inside a block (takes precedence over the
  environment). ``use_backend("cpp", op="diffusion_step")`` limits it to one op.

A forced backend that cannot serve the call raises :class:`BackendUnavailableError` listing every
reason; nothing falls back silently when a specific backend was asked for.

The Triton interpreter (``TRITON_INTERPRET=1``) runs Triton kernels on CPU tensors. It is a testing
tool, so the triton backend takes CPU tensors only when it is forced.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

BACKEND_ORDER: tuple[str, ...] = ("cuda", "triton", "cpp", "torch")
ENV_VAR = "FASTGEN_BACKEND"

_forced: contextvars.ContextVar[dict[str | None, str] | None] = contextvars.ContextVar(
    "fastgen_forced_backend", default=None
)


class BackendUnavailableError(RuntimeError):
    """A backend was forced (env var or ``use_backend``) but cannot serve this call."""


@dataclass
class Call:
    """What dispatch needs to know about one call: device, dtype and op-specific facts (``extra``)."""

    device: torch.device
    dtype: torch.dtype
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.extra[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.extra.get(key, default)


@dataclass
class Backend:
    name: str
    fn: Callable[..., Any]
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    available: Callable[[], list[str]] = lambda: []
    check: Callable[[Call], list[str]] | None = None
    forced_only_devices: tuple[str, ...] = ()
    note: str = ""

    def why_not(self, call: Call, forced: bool = False) -> list[str]:
        reasons = list(self.available())
        devices = self.devices + (self.forced_only_devices if forced else ())
        if call.device.type not in devices:
            if call.device.type in self.forced_only_devices:
                reasons.append(
                    f"device {call.device.type!r} is served by {self.name} only when forced "
                    f"({ENV_VAR}={self.name} or fastgen.use_backend({self.name!r}))"
                )
            else:
                reasons.append(f"device {call.device.type!r} not supported (supports {list(devices)})")
        if call.dtype not in self.dtypes:
            names = [str(d).replace("torch.", "") for d in self.dtypes]
            reasons.append(f"dtype {str(call.dtype).replace('torch.', '')} not supported (supports {names})")
        if self.check is not None and not reasons:
            reasons.extend(self.check(call))
        return reasons


def plain_eager(x: Any) -> bool:
    """True when a call on ``x`` may skip its ``torch.library`` custom op and run the backend directly: plain
    eager mode (not torch.compile / export tracing, no dispatch or function mode such as FakeTensor or
    FlopCounter) and a plain tensor (no subclass). The custom op's Python wrapper costs ~30-50 us per call on
    a CPU, more than small kernels; traced calls keep the op, so compiled graphs still see one node."""
    return (
        type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not torch._C._len_torch_dispatch_stack()
        and not torch._C._is_torch_function_mode_enabled()
    )


def host_values(t: torch.Tensor, limit: int = 4096) -> list | None:
    """The values of a small CPU tensor as a list when a plain eager call may read them on the host (for
    checks: cheaper than building boolean tensors to test), else None."""
    if t.is_cpu and t.numel() <= limit and plain_eager(t):
        return t.tolist()
    return None


def _launch_device(args: tuple) -> torch.device | None:
    """The CUDA device of the first tensor argument (None when it is not a CUDA tensor)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device if a.device.type == "cuda" else None
    return None


def device_guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a Triton launcher) run with its tensors' GPU as the current device.

    Triton launches on the current device and its stream; tensors on ``cuda:1`` while ``cuda:0`` is
    current would be read through the wrong context. (The CUDA C++ kernels hold a ``CUDAGuard``.) A named
    tuple of launchers (an op with several entry points) gets each of them guarded."""
    if isinstance(fn, tuple):
        return type(fn)(*(device_guarded(f) for f in fn))

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        dev = _launch_device(args)
        if dev is not None and dev.index is not None and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev.index):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    guarded.__wrapped_launcher__ = fn
    return guarded


class Op:
    """One op's backends. ``op.dispatch(call)`` returns the backend that serves ``call``."""

    def __init__(self, name: str, doc: str = ""):
        self.name = name
        self.doc = doc
        self.backends: dict[str, Backend] = {}
        self._remembered: dict[tuple, Backend] = {}

    def register(
        self,
        name: str,
        *,
        devices: tuple[str, ...],
        dtypes: tuple[torch.dtype, ...],
        available: Callable[[], list[str]] | None = None,
        check: Callable[[Call], list[str]] | None = None,
        forced_only_devices: tuple[str, ...] = (),
        note: str = "",
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        if name not in BACKEND_ORDER:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_ORDER}")

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.backends[name] = Backend(
                name=name,
                fn=device_guarded(fn) if name == "triton" else fn,
                devices=devices,
                dtypes=dtypes,
                available=available or (lambda: []),
                check=check,
                forced_only_devices=forced_only_devices,
                note=note,
            )
            return fn

        return deco

    def ordered(self) -> list[Backend]:
        return [self.backends[n] for n in BACKEND_ORDER if n in self.backends]

    def why_not(self, backend: str, call: Call, forced: bool = False) -> list[str]:
        if backend not in self.backends:
            return [f"op {self.name!r} has no {backend} implementation (has {list(self.backends)})"]
        return self.backends[backend].why_not(call, forced=forced)

    def forced_backend(self) -> str | None:
        return forced_backend(self.name)

    def dispatch_remembered(self, key: tuple, make_call: Callable[[], Call]) -> Backend:
        """``dispatch(make_call())``, remembered per ``key`` (the facts of the call dispatch reads) plus what
        it reads besides the call: a forced backend and the Triton interpreter. For eager hot paths whose
        kernel costs a few microseconds on a CPU; at most 256 keys are kept."""
        full = (*key, self.forced_backend(), triton_interpret())
        backend = self._remembered.get(full)
        if backend is None:
            backend = self.dispatch(make_call())
            if len(self._remembered) < 256:
                self._remembered[full] = backend
        return backend

    def dispatch(self, call: Call) -> Backend:
        forced = self.forced_backend()
        if forced is not None:
            reasons = self.why_not(forced, call, forced=True)
            if reasons:
                raise BackendUnavailableError(
                    f"fastgen.{self.name}: backend {forced!r} was forced but cannot serve this call "
                    f"(device={call.device.type}, dtype={str(call.dtype).replace('torch.', '')}):\n  - "
                    + "\n  - ".join(reasons)
                )
            return self.backends[forced]
        refusals = []
        for backend in self.ordered():
            reasons = backend.why_not(call)
            if not reasons:
                return backend
            refusals.append(f"{backend.name}: " + "; ".join(reasons))
        raise BackendUnavailableError(
            f"fastgen.{self.name}: no backend can serve this call:\n  - " + "\n  - ".join(refusals)
        )

    def report(self, call: Call) -> dict[str, list[str]]:
        """backend name -> reasons it would refuse ``call`` (empty list: it can serve)."""
        return {b.name: b.why_not(call) for b in self.ordered()}


_REGISTRY: dict[str, Op] = {}


def get_op(name: str, doc: str = "") -> Op:
    """The registry entry for ``name``, created on first use."""
    if name not in _REGISTRY:
        _REGISTRY[name] = Op(name, doc)
    return _REGISTRY[name]


def registered_ops() -> dict[str, Op]:
    return dict(_REGISTRY)


def _parse_env(value: str) -> dict[str | None, str]:
    out: dict[str | None, str] = {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        op, _, backend = part.rpartition(":")
        backend = backend.strip().lower()
        if backend not in BACKEND_ORDER:
            raise BackendUnavailableError(
                f"{ENV_VAR}={value!r}: unknown backend {backend!r}; expected one of {list(BACKEND_ORDER)}"
            )
        out[op.strip() or None] = backend
    return out


def getenv(name: str) -> str | None:
    """``os.environ.get(name)``, read at call time, in ~0.1 us instead of ~0.7 us: CPython's ``os.environ``
    keeps its variables in a dict of encoded keys (``_data``, updated by every ``os.environ`` write, as
    ``monkeypatch.setenv`` makes); the dict is looked up directly where it exists, else the public mapping.
    The hot dispatch paths read two variables per call (``FASTGEN_BACKEND``, ``TRITON_INTERPRET``)."""
    env = os.environ
    data = getattr(env, "_data", None)
    key = _ENV_KEYS.get(name)
    if type(data) is not dict or key is None:
        return env.get(name)
    v = data.get(key)
    return None if v is None else env.decodevalue(v)


def _encoded_keys(*names: str) -> dict[str, Any]:
    enc = getattr(os.environ, "encodekey", None)
    return {} if enc is None else {n: enc(n) for n in names}


_ENV_KEYS = _encoded_keys(ENV_VAR, "TRITON_INTERPRET")


def forced_backend(op: str) -> str | None:
    """The backend forced for ``op`` by ``use_backend`` or ``FASTGEN_BACKEND``, or None."""
    ctx = _forced.get()
    if ctx is not None:
        if op in ctx:
            return ctx[op]
        if None in ctx:
            return ctx[None]
    env = getenv(ENV_VAR)
    env = env.strip() if env else env
    if env:
        parsed = _parse_env(env)
        return parsed.get(op, parsed.get(None))
    return None


def _known_backend(backend: str) -> None:
    if backend not in BACKEND_ORDER:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKEND_ORDER)}")


@contextlib.contextmanager
def use_backend(backend: str, op: str | None = None) -> Iterator[None]:
    """Force ``backend`` for every op (or only ``op``) inside the block."""
    _known_backend(backend)
    current = dict(_forced.get() or {})
    current[op] = backend
    token = _forced.set(current)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_call(backend: str, op: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` wrapped to run as under ``use_backend(backend, op=op)``, setting the context variable directly:
    the context manager's own ~2 us per call would be counted by a benchmark timing a small CPU op."""
    _known_backend(backend)
    alone = {op: backend}

    def run() -> Any:
        outer = _forced.get()
        token = _forced.set(alone if outer is None else {**outer, op: backend})
        try:
            return fn()
        finally:
            _forced.reset(token)

    return run


# ---- availability probes shared by all ops -------------------------------------------------------


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def triton_interpret() -> bool:
    return getenv("TRITON_INTERPRET") == "1"


def triton_available() -> list[str]:
    err = _triton_import_error()
    if err:
        return [err]
    if not torch.cuda.is_available() and not triton_interpret():
        return ["no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU for testing)"]
    return []


def triton_check_device(call: Call) -> list[str]:
    """Under the interpreter Triton runs CPU tensors; on a GPU it runs CUDA tensors only."""
    if call.device.type == "cpu" and not triton_interpret():
        return ["CPU tensors need TRITON_INTERPRET=1"]
    if call.device.type == "cuda" and triton_interpret():
        return ["TRITON_INTERPRET=1 is set: the interpreter runs CPU tensors only"]
    return []


def triton_check(**limits: int) -> Callable[[Call], list[str]]:
    """The per-call check of a Triton backend: the device rule above plus upper limits on call facts,
    e.g. ``triton_check(head_dim=256)`` refuses a call whose ``extra["head_dim"]`` exceeds 256."""

    def check(call: Call) -> list[str]:
        reasons = triton_check_device(call)
        reasons += [
            f"{key} {call[key]} > {limit}" for key, limit in limits.items() if call.get(key, 0) > limit
        ]
        return reasons

    return check


def cpp_available() -> list[str]:
    from fastgen import _ext

    return [] if _ext.C is not None else [f"fastgen._C is not built ({_ext.load_error()})"]


def cuda_available() -> list[str]:
    from fastgen import _ext

    reasons = []
    if _ext.C is None:
        reasons.append(f"fastgen._C is not built ({_ext.load_error()})")
    elif not _ext.C.has_cuda():
        reasons.append("fastgen._C was built without CUDA sources (CPU-only torch at build time)")
    if not torch.cuda.is_available():
        reasons.append("no CUDA device")
    return reasons
