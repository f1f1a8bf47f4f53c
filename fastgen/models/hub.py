"""Saving and loading models: fastgen's own format and the helpers the release-format readers share.

fastgen's format is a directory holding

- ``config.json``: ``{"model_type": "clip" | "dvae" | "dalle" | "glide" | "glide_clip" | "glam",
  "fastgen_version": ..., "config": {the model's config dataclass as JSON}}``;
- ``model.safetensors``: the ``state_dict`` (tensors made contiguous; tied tensors are stored once by
  each model's own ``save_pretrained`` rules).

Nothing here downloads anything: every path is local. Release formats (TorchScript archives, pickles,
HF directories) are read by each model's ``from_pretrained``, with the helpers below:

- :func:`read_state_dict` reads a plain checkpoint (``.safetensors``, or a ``torch.save``-d dict read with
  ``weights_only=True``) and unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and DDP's ``module.``;
- :func:`restricted_torch_load` reads a pickle of whole modules (the DALL-E ``encoder.pkl``) without
  running the pickle's code: only an allow-list of names resolves, every allowed class becomes an inert
  record, and :func:`module_state_dict` flattens the records' parameters and buffers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import typing
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "config_from_dict",
    "config_to_dict",
    "config_with_overrides",
    "is_fastgen_dir",
    "load_fastgen_dir",
    "missing_weights_error",
    "module_state_dict",
    "package_dirs",
    "read_state_dict",
    "restricted_torch_load",
    "save_fastgen_dir",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# =====================================================================================================
# Config dataclasses <-> JSON
# =====================================================================================================


def _jsonable(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"config value {v!r} ({type(v).__name__}) cannot be written as JSON")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-ready dict (tuples become lists, nested dataclasses dicts)."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"config_to_dict: expected a config dataclass, got {type(cfg).__name__}")
    return _jsonable(cfg)


def _tuples(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    return v


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild ``cls`` (a config dataclass) from :func:`config_to_dict`'s output.

    JSON lists become tuples; a field whose type is a dataclass (or ``Dataclass | None``) is rebuilt
    recursively. Unknown keys raise (a config from a newer fastgen is not silently truncated).
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__}: config must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_in(hints.get(name))
        if sub is not None and isinstance(value, Mapping):
            kwargs[name] = config_from_dict(sub, value)
        else:
            kwargs[name] = _tuples(value)
    return cls(**kwargs)


def config_with_overrides(cfg: Any, overrides: Mapping[str, Any], who: str) -> Any:
    """``dataclasses.replace(cfg, **overrides)`` with unknown field names refused by name (``who`` names the
    caller in the message, e.g. ``"GLIDE.from_pretrained"``)."""
    known = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"{who}: unknown config fields {unknown}; known: {sorted(known)}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def _dataclass_in(hint: Any) -> type | None:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


# =====================================================================================================
# fastgen's own format
# =====================================================================================================


def is_fastgen_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by ``save_pretrained`` (it has config.json with a
    ``model_type`` and ``model.safetensors``)."""
    p = Path(path)
    if not (p.is_dir() and (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()):
        return False
    try:
        meta = json.loads((p / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "model_type" in meta and "config" in meta


def save_fastgen_dir(
    directory: str | os.PathLike,
    model_type: str,
    config: Any,
    state_dict: Mapping[str, torch.Tensor],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``directory`` (created if missing).

    ``state_dict`` tensors must not share memory (safetensors refuses aliases; models with tied weights
    drop the tied copy before calling this and re-tie on load). Returns the directory.
    """
    from safetensors.torch import save_file

    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ValueError(f"save_pretrained: {d} exists and is not a directory")
    d.mkdir(parents=True, exist_ok=True)
    from fastgen import __version__

    meta = {"model_type": model_type, "fastgen_version": __version__, "config": config_to_dict(config)}
    if extra:
        meta.update(_jsonable(dict(extra)))
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(d / WEIGHTS_NAME), metadata={"format": "pt", "model_type": model_type})
    (d / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return d


def load_fastgen_dir(
    directory: str | os.PathLike, model_type: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a ``save_pretrained`` directory: (the whole config.json, the state_dict). Raises a
    ``ValueError`` naming both types when the directory holds another kind of model."""
    from safetensors.torch import load_file

    d = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / name).is_file():
            raise missing_weights_error(d / name, f"fastgen {model_type} directory", "save_pretrained(dir)")
    meta = json.loads((d / CONFIG_NAME).read_text())
    found = meta.get("model_type") if isinstance(meta, dict) else None
    if found != model_type:
        raise ValueError(f"from_pretrained: {d} holds a {found!r} model, not a {model_type!r} model")
    return meta, load_file(str(d / WEIGHTS_NAME))


def package_dirs(name: str) -> list[str]:
    """The directories of an installed package, found without importing it (empty when not installed): where
    packages ship data files (CLIP's BPE merges, GLIDE's GPT-2 vocabulary)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [os.path.dirname(spec.origin)]
    return dirs


def missing_weights_error(path: str | os.PathLike, what: str, where: str) -> FileNotFoundError:
    """The error for a weights file that is not there: which file, what it is, where it comes from."""
    return FileNotFoundError(
        f"{os.fspath(path)}: file not found. It should hold {what}; it comes from {where}. "
        "fastgen downloads nothing: fetch the file and pass its local path."
    )


# =====================================================================================================
# Plain checkpoints
# =====================================================================================================


def _unwrap(state: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    out = dict(state)
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a ``torch.save``-d state_dict (read with
    ``weights_only=True``: no code in the file runs). ``{"state_dict": ...}`` / ``{"model": ...}``
    wrappers and a DDP ``module.`` prefix are removed."""
    p = Path(path)
    if not p.is_file():
        raise missing_weights_error(p, "a checkpoint", "the model's release or save_pretrained")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{p}: not a plain state_dict ({str(e).splitlines()[0]}); if it is a TorchScript archive or a "
            "pickle of modules, pass it to the model's from_pretrained"
        ) from e
    return _unwrap(state, p)


# =====================================================================================================
# Pickles of whole modules, read without running them
# =====================================================================================================


class _Record:
    """An inert stand-in for an allowed pickled class: keeps the pickled state, runs nothing."""

    _pickled_class = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__.update(state if isinstance(state, dict) else {"_state": state})

    def __repr__(self) -> str:
        return f"<record of {self._pickled_class}>"


# Internals torch.save writes for tensors and parameters: rebuilt with torch's own functions.
_TORCH_REBUILD = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("torch", "device"),
    ("torch", "Size"),
}
_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


def _make_unpickler(allowed: frozenset[tuple[str, str]], path: Path):
    records: dict[tuple[str, str], type] = {}

    class _Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module == "__builtin__":  # protocol-2 pickles (torch.save's) spell builtins this way
                module = "builtins"
            if (module, name) in _TORCH_REBUILD:
                return super().find_class(module, name)
            if module == "torch" and name in _DTYPES:
                return getattr(torch, name)
            if (module, name) in allowed:
                key = (module, name)
                if key not in records:
                    records[key] = type(name, (_Record,), {"_pickled_class": f"{module}.{name}"})
                return records[key]
            raise pickle.UnpicklingError(
                f"{path}: the pickle names {module}.{name}, which is not on this reader's allow-list "
                "(refused: reading it could run code)"
            )

    return _Restricted


def restricted_torch_load(path: str | os.PathLike, allowed: Iterable[str]) -> Any:
    """``torch.load`` of a pickle of whole modules where only ``allowed`` ("module.Class") names resolve.

    Each allowed class is replaced by an inert record that keeps the object's pickled ``__dict__``
    (nothing of the original class runs: not its ``__init__``, ``__setstate__`` nor ``__reduce__``);
    tensors and parameters are rebuilt by torch. Anything else the pickle names raises
    ``pickle.UnpicklingError``. Use :func:`module_state_dict` on the result.
    """
    p = Path(path)
    if not p.is_file():
        raise missing_weights_error(p, "a pickled module", "the model's release")
    allow = frozenset(tuple(a.rsplit(".", 1)) for a in allowed)
    unpickler = _make_unpickler(allow, p)

    class _Module:  # the pickle_module torch.load expects
        Unpickler = unpickler
        UnpicklingError = pickle.UnpicklingError

        @staticmethod
        def load(f, **kw):
            return unpickler(f, **kw).load()

    return torch.load(p, map_location="cpu", weights_only=False, pickle_module=_Module)


def module_state_dict(obj: Any, prefix: str = "") -> OrderedDict[str, torch.Tensor]:
    """The state_dict of a record tree from :func:`restricted_torch_load`: ``_parameters`` and persistent
    ``_buffers`` of every record reachable through ``_modules``, with dotted names."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    state = getattr(obj, "__dict__", {})
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, t in (state.get("_parameters") or {}).items():
        if t is not None:
            out[prefix + name] = t.detach() if isinstance(t, torch.Tensor) else t
    for name, t in (state.get("_buffers") or {}).items():
        if t is not None and name not in skip:
            out[prefix + name] = t
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out
