"""``swap_attention(model)``: put fastgen's fused attention into an existing model, in place.

Four kinds of replacement, each listed in the returned :class:`SwapReport` (with the reason for every
module skipped, and, when nothing was replaced in a model that has attention, why and what to do):

* ``"transformers"``: a transformers ``PreTrainedModel`` that dispatches attention through transformers'
  ``AttentionInterface`` (v5: all of them) is switched with ``model.set_attn_implementation("fastgen")``
  (see :mod:`fastgen.integrations.transformers`); ``unswap_attention`` switches it back.
* ``"mha"``: every ``torch.nn.MultiheadAttention`` submodule becomes
  :meth:`fastgen.nn.MultiheadAttention.from_torch` of it (same parameters, device, dtype, training mode).
  ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` have an inference fast path (eval + no_grad)
  that reads the attention weights and runs torch's own fused kernel without calling ``self_attn``. Where
  a fastgen kernel would serve the layer (a GPU with Triton, or a forced backend) the swap turns it off (a
  no-op forward pre-hook on the new module, ``use_nested_tensor=False`` on the encoder); where fastgen
  would run torch's SDPA anyway (CPU) it is kept, being faster still (DESIGN rule 11). Swap after moving
  the model to its device. ``unswap_attention`` puts everything back.
* ``"processor"``: a module with a diffusers-style processor hook (a ``processor`` attribute, usually set
  through ``set_processor``) gets its processor wrapped so that, during the processor's call,
  ``F.scaled_dot_product_attention`` is fastgen's. A processor that is itself an ``nn.Module`` (it may
  hold weights) keeps its place in the module tree: its ``forward`` is wrapped instead.
* ``"sdpa-forward"``: any other module whose class source (its ``forward`` or another method of the
  class or its bases) refers to ``scaled_dot_product_attention`` -- as ``F.``/``torch.nn.functional.``
  attribute or as a name imported into the class's module (``from torch.nn.functional import
  scaled_dot_product_attention [as sdpa]``) -- gets its ``forward`` wrapped the same way.

While a swapped module exists (until ``unswap_attention`` or garbage collection), the global
``torch.nn.functional.scaled_dot_product_attention`` (and each module-level alias found) is a small
dispatcher: fastgen's op for calls made inside a wrapped forward / processor of the *current thread /
context* (a ``contextvars`` flag), torch's original everywhere else. Nested wrapped calls are fine. Under
``torch.compile`` the wrapped forwards switch a plain module global instead of the flag (dynamo traces
it; no lock, contextvar or patching in the traced path), so ``torch.compile(model, fullgraph=True)``
traces a swapped model into one graph.

fastgen's SDPA differs from torch's only where torch gives NaN (a query row with every key masked gives
zeros), so a model's outputs match before and after the swap; on CPU it runs torch's fused SDPA kernels
for every call they can express.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import fnmatch
import inspect
import sys
import textwrap
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.nn.attention import MultiheadAttention
from fastgen.ops import attention as _attention_ops

__all__ = ["SwapReport", "swap_attention", "unswap_attention"]

_SDPA_NAME = "scaled_dot_product_attention"
_TORCH_SDPA = torch._C._nn.scaled_dot_product_attention  # what F.scaled_dot_product_attention is


def _fastgen_sdpa(*args, **kwargs):
    return _attention_ops.scaled_dot_product_attention(*args, **kwargs)


# =====================================================================================================
# The scoped, re-entrant, thread-safe SDPA patch
# =====================================================================================================

_use_fastgen: contextvars.ContextVar[bool] = contextvars.ContextVar("fastgen_sdpa_scope", default=False)
# the flag's stand-in while torch.compile traces: dynamo follows reads and writes of a module global (and
# replays them), not a ContextVar or a lock, so the traced path holds neither
_traced_use = False
_lock = threading.RLock()  # guards _targets / _saved; taken at swap / unswap and by eager scopes only
_targets: dict[tuple[int, str], list[Any]] = {}  # (id(namespace dict), name) -> [dict, name, refcount]
_saved: dict[tuple[int, str], Any] = {}  # original values while patched


def _dispatcher(original: Callable[..., Any]) -> Callable[..., Any]:
    def scaled_dot_product_attention(*args, **kwargs):
        use = _traced_use if torch.compiler.is_compiling() else _use_fastgen.get()
        if use:
            return _fastgen_sdpa(*args, **kwargs)
        return original(*args, **kwargs)

    scaled_dot_product_attention.__wrapped__ = original
    scaled_dot_product_attention._fastgen_dispatcher = True
    return scaled_dot_product_attention


def _register_target(ns: dict, name: str) -> tuple[int, str]:
    """Put the dispatcher in ``ns[name]`` (reference-counted): it stays while a swapped module or a scope
    needs it, and serves torch's original to every call outside a fastgen scope."""
    key = (id(ns), name)
    with _lock:
        if key in _targets:
            _targets[key][2] += 1
        else:
            _targets[key] = [ns, name, 1]
            _saved[key] = ns[name]
            ns[name] = _dispatcher(ns[name])
    return key


def _unregister_target(key: tuple[int, str]) -> None:
    with _lock:
        entry = _targets.get(key)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] == 0:
            ns, name, _ = entry
            ns[name] = _saved.pop(key)
            del _targets[key]


@contextlib.contextmanager
def sdpa_scope(enabled: bool = True) -> Iterator[None]:
    """Within the block, in this thread / context, ``F.scaled_dot_product_attention`` (and the registered
    module-level aliases) call fastgen's op when ``enabled`` (torch's when not). Re-entrant. Eager only:
    under torch.compile the swapped modules' forwards switch fastgen on themselves (see _run_scoped)."""
    key = _register_target(F.__dict__, _SDPA_NAME)
    token = _use_fastgen.set(enabled)
    try:
        yield
    finally:
        _use_fastgen.reset(token)
        _unregister_target(key)


def _run_scoped(enabled: bool, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    global _traced_use
    if torch.compiler.is_compiling():
        # the dispatchers are in place since the swap; only the flag changes, in a global dynamo traces
        prev, _traced_use = _traced_use, enabled
        out = fn(*args, **kwargs)
        _traced_use = prev
        return out
    with sdpa_scope(enabled):  # keeps F's dispatcher even for a deepcopy that outlives its original
        return fn(*args, **kwargs)


def _scoped_forward(self, *args, **kwargs):
    # bound to the module as an instance attribute, so deepcopy rebinds it to the copy
    d = self.__dict__
    inner = d.get("_fastgen_inner_forward")
    if inner is None:
        return _run_scoped(d.get("_fastgen_sdpa_enabled", True), type(self).forward, (self, *args), kwargs)
    return _run_scoped(d.get("_fastgen_sdpa_enabled", True), inner, args, kwargs)


class FastgenProcessor:
    """Wraps a (non-Module) diffusers-style attention processor: calls it inside :func:`sdpa_scope`.
    Other attribute reads go to the wrapped processor; ``.processor`` is the original."""

    def __init__(self, processor: Callable[..., Any]):
        self.processor = processor

    def __call__(self, *args, **kwargs):
        return _run_scoped(True, self.processor, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "processor":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.processor, name)

    def __repr__(self) -> str:
        return f"FastgenProcessor({self.processor!r})"


# =====================================================================================================
# Finding the modules that call SDPA
# =====================================================================================================


def _sdpa_aliases(ns: dict) -> list[str]:
    return [
        name
        for name, val in list(ns.items())
        if (val is _TORCH_SDPA or getattr(val, "__wrapped__", None) is _TORCH_SDPA)
        and not name.startswith("__")
    ]


_refs_cache: weakref.WeakKeyDictionary[Any, tuple[bool | None, list[tuple[dict, str]]]] = (
    weakref.WeakKeyDictionary()
)


def _class_refs_sdpa(cls: Any) -> tuple[bool | None, list[tuple[dict, str]]]:
    # reading and parsing a class's source costs milliseconds; a transformers model has dozens of classes
    try:
        return _refs_cache[cls]
    except (KeyError, TypeError):
        pass
    found = _class_refs_sdpa_uncached(cls)
    with contextlib.suppress(TypeError):
        _refs_cache[cls] = found
    return found


def _class_refs_sdpa_uncached(cls: Any) -> tuple[bool | None, list[tuple[dict, str]]]:
    """Whether the source of ``cls`` or a base (outside torch / fastgen) refers to SDPA, as an attribute
    ``*.scaled_dot_product_attention`` or as a name bound to it in the class's module; also the module
    globals to patch. None when no source could be read."""
    found, readable, aliases = False, False, []
    # a plain function (a processor may be one) is read itself, with its own globals
    sources = [cls] if isinstance(cls, types.FunctionType) else list(cls.__mro__)
    for klass in sources:
        mod_name = getattr(klass, "__module__", "") or ""
        if klass is object or mod_name.split(".")[0] in ("torch", "fastgen", "builtins"):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError, IndentationError):
            continue
        readable = True
        module = sys.modules.get(mod_name)
        ns = klass.__globals__ if isinstance(klass, types.FunctionType) else vars(module) if module else {}
        names = set(_sdpa_aliases(ns))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == _SDPA_NAME:
                found = True
            elif isinstance(node, ast.Name) and (node.id in names or node.id == _SDPA_NAME):
                found = True
                if node.id in names:
                    aliases.append((ns, node.id))
    return (found if readable else None), aliases


# =====================================================================================================
# Report, matching, swap / unswap
# =====================================================================================================


@dataclass
class SwapReport:
    """What :func:`swap_attention` did. ``replaced``: (qualified name, kind, detail) with kind one of
    ``"mha"``, ``"processor"``, ``"sdpa-forward"``; ``skipped``: (qualified name, reason); ``notes``:
    other changes (fast paths turned off)."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def names(self, kind: str | None = None) -> list[str]:
        return [n for n, k, _ in self.replaced if kind is None or k == kind]

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"swap_attention: {len(self.replaced)} replaced, {len(self.skipped)} skipped"]
        lines += [f"  [{kind}] {name or '<root>'}: {detail}" for name, kind, detail in self.replaced]
        lines += [f"  [skipped] {name or '<root>'}: {why}" for name, why in self.skipped]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


_Filter = str | Iterable[str] | Callable[[str, nn.Module], bool] | None
_undo: weakref.WeakKeyDictionary[nn.Module, list[Callable[[], None]]] = weakref.WeakKeyDictionary()


def _matcher(spec: _Filter, what: str) -> Callable[[str, nn.Module], bool] | None:
    """A pattern matches a module when it fnmatches its qualified name or an ancestor's."""
    if spec is None:
        return None
    if callable(spec):
        return spec
    pats = [spec] if isinstance(spec, str) else list(spec)
    if not all(isinstance(p, str) for p in pats):
        raise TypeError(f"{what} must be a glob string, an iterable of them, or a callable(name, module)")

    def match(name: str, _module: nn.Module) -> bool:
        parts = name.split(".") if name else [""]
        prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in pats)

    return match


def _wrap_forward(module: nn.Module, enabled: bool, aliases: list[tuple[dict, str]]) -> Callable[[], None]:
    d = module.__dict__
    had_inner = "forward" in d
    d["_fastgen_inner_forward"] = d["forward"] if had_inner else None
    d["_fastgen_sdpa_enabled"] = enabled
    d["forward"] = types.MethodType(_scoped_forward, module)
    keys = _register_targets(module, aliases)

    def undo():
        inner = d.pop("_fastgen_inner_forward", None)
        d.pop("_fastgen_sdpa_enabled", None)
        if had_inner:
            d["forward"] = inner
        else:
            d.pop("forward", None)
        keys()

    return undo


def _register_targets(owner: Any, aliases: list[tuple[dict, str]]) -> Callable[[], None]:
    """Dispatchers for F's SDPA and ``aliases`` while ``owner`` is swapped: released by the returned
    callable (unswap) or when ``owner`` is garbage collected, whichever comes first (once)."""
    keys = [_register_target(F.__dict__, _SDPA_NAME)] + [_register_target(ns, n) for ns, n in aliases]
    return weakref.finalize(owner, _release, keys)


def _release(keys: list[tuple[int, str]]) -> None:
    for key in keys:
        _unregister_target(key)


def swap_attention(model: nn.Module, *, include: _Filter = None, exclude: _Filter = None) -> SwapReport:
    """Replace, in place, the attention in ``model`` by fastgen's fused attention (see the module doc).

    include / exclude: a glob over qualified module names (``"encoder.layers.*"``), an iterable of them or
    a callable ``(name, module) -> bool``; a pattern matching a module also covers its descendants. A
    module is swapped when it matches ``include`` (if given) and not ``exclude``. An excluded SDPA-calling
    module inside a swapped one is pinned to torch's SDPA. Returns a :class:`SwapReport`;
    :func:`unswap_attention` undoes everything.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_attention expects an nn.Module, got {type(model).__name__}")
    inc, exc = _matcher(include, "include"), _matcher(exclude, "exclude")

    def wanted(name: str, m: nn.Module) -> str | None:
        if inc is not None and not inc(name, m):
            return "not matched by include"
        if exc is not None and exc(name, m):
            return "matched by exclude"
        return None

    report = SwapReport()
    undo = _undo.setdefault(model, [])
    _swap_transformers(model, wanted, report, undo)

    # (a) nn.MultiheadAttention -> fastgen MultiheadAttention, in every parent that holds it
    named = dict((id(m), n) for n, m in reversed(list(model.named_modules(remove_duplicate=False))))
    if isinstance(model, nn.MultiheadAttention):
        report.skipped.append(
            ("", "the root module is a MultiheadAttention: use MultiheadAttention.from_torch")
        )
    new_of: dict[int, MultiheadAttention] = {}
    seen_sub: set[int] = set()
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if not isinstance(child, nn.MultiheadAttention):
                continue
            qual = named[id(child)]
            if type(child) is not nn.MultiheadAttention:  # a subclass may change forward or parameters
                if id(child) not in seen_sub:
                    seen_sub.add(id(child))
                    report.skipped.append((qual, f"{type(child).__name__} subclasses nn.MultiheadAttention"))
                continue
            why = wanted(qual, child)
            if why is not None:
                if id(child) not in new_of:
                    report.skipped.append((qual, why))
                continue
            first = id(child) not in new_of
            if first:
                new_of[id(child)] = MultiheadAttention.from_torch(child)
            new = new_of[id(child)]
            parent._modules[child_name] = new
            undo.append(_undo_setitem(parent, child_name, child))
            if first:
                report.replaced.append(
                    (
                        qual,
                        "mha",
                        f"nn.MultiheadAttention -> fastgen.nn.MultiheadAttention ({new.extra_repr()})",
                    )
                )
            _disable_layer_fast_path(parent, new, named[id(parent)], report, undo)
    for m in model.modules():
        if (
            isinstance(m, nn.TransformerEncoder)
            and getattr(m, "use_nested_tensor", False)
            and any(
                isinstance(getattr(layer, "self_attn", None), MultiheadAttention)
                and _fastgen_kernel_serves(layer.self_attn)
                for layer in m.layers
            )
        ):
            m.use_nested_tensor = False
            undo.append(_undo_setattr(m, "use_nested_tensor", True))
            report.notes.append(
                f"{named[id(m)] or '<root>'}: use_nested_tensor=False (torch's nested fast path)"
            )

    # (b) processors and (c) modules whose class calls SDPA
    wrapped: list[str] = []
    pinned: list[tuple[nn.Module, str, list]] = []
    for qual, m in model.named_modules():
        if isinstance(m, MultiheadAttention) or "_fastgen_inner_forward" in m.__dict__:
            continue
        proc = m.__dict__.get("processor", m._modules.get("processor"))
        if (
            callable(proc)
            and not isinstance(proc, FastgenProcessor)
            and "_fastgen_inner_forward" not in getattr(proc, "__dict__", {})
        ):
            _swap_processor(qual, m, proc, wanted, report, undo)
        if type(m).__module__.split(".")[0] in ("torch", "fastgen"):
            continue
        refs, aliases = _class_refs_sdpa(type(m))
        if not refs:
            continue
        why = wanted(qual, m)
        if why is not None:
            report.skipped.append((qual, f"{type(m).__name__} calls SDPA but is {why}"))
            pinned.append((m, qual, aliases))
            continue
        undo.append(_wrap_forward(m, True, aliases))
        wrapped.append(qual)
        via = ", ".join(sorted({n for _, n in aliases})) or "F.scaled_dot_product_attention"
        report.replaced.append(
            (qual, "sdpa-forward", f"{type(m).__name__}.forward runs with fastgen SDPA (via {via})")
        )
    for m, qual, aliases in pinned:  # an excluded module inside a wrapped one keeps torch's SDPA
        if any(w == "" or qual.startswith(w + ".") for w in wrapped):
            undo.append(_wrap_forward(m, False, aliases))
            report.notes.append(f"{qual}: pinned to torch's SDPA inside a swapped parent")
    if not report.replaced:
        _explain_nothing_replaced(model, report)
    return report


def _swap_transformers(model: nn.Module, wanted, report: SwapReport, undo: list) -> None:
    """A transformers PreTrainedModel: switch its attention implementation to "fastgen" (its
    AttentionInterface entry), which every attention module of the model dispatches through."""
    tf = sys.modules.get("transformers")
    pretrained = getattr(tf, "PreTrainedModel", None) if tf is not None else None
    if pretrained is None or not isinstance(model, pretrained):
        return
    name = type(model).__name__
    why = wanted("", model)
    if why is not None:
        report.skipped.append(("", f"{name}: attn_implementation not switched (the root module is {why})"))
        return
    can = getattr(model, "_can_set_attn_implementation", lambda: True)
    if not callable(getattr(model, "set_attn_implementation", None)) or not can():
        report.skipped.append(
            (
                "",
                f"{name} does not dispatch attention through transformers' AttentionInterface: "
                "attn_implementation not switched (its modules are searched for SDPA calls instead)",
            )
        )
        return
    from fastgen.integrations import transformers as integration  # registers "fastgen"

    prev = model.config._attn_implementation
    if prev == integration.NAME:
        report.notes.append(f"{name}: attn_implementation is already 'fastgen'")
        return
    model.set_attn_implementation(integration.NAME)
    ref = weakref.ref(model)
    undo.append(lambda: ref() is not None and ref().set_attn_implementation(prev))
    n = len(_attention_leaves(model))
    report.replaced.append(
        (
            "",
            "transformers",
            f"{name}: attn_implementation {prev!r} -> 'fastgen' ({n} attention modules dispatch through "
            "transformers' AttentionInterface; calls fastgen cannot serve fall back per call to the "
            "model's own implementation, counted in fastgen.integrations.transformers.FALLBACKS)",
        )
    )


def _looks_like_attention(m: nn.Module) -> bool:
    name = type(m).__name__.lower()
    return name.endswith(("attention", "attn", "selfattention")) and not isinstance(m, nn.ModuleList)


def _attention_leaves(model: nn.Module) -> list[str]:
    """Qualified names of the modules that look like attention and hold none that does (BertAttention
    holds BertSelfAttention: one attention)."""
    names = [q for q, m in model.named_modules() if _looks_like_attention(m)]
    return [q for q in names if not any(o.startswith(q + ".") or (q == "" and o) for o in names)]


def _explain_nothing_replaced(model: nn.Module, report: SwapReport) -> None:
    looks = [q or "<root>" for q in _attention_leaves(model)]
    if not looks:
        return
    shown = ", ".join(looks[:3]) + (", ..." if len(looks) > 3 else "")
    report.notes.append(
        f"{len(looks)} module(s) look like attention ({shown}) but none is an nn.MultiheadAttention, has a "
        "diffusers-style processor or calls F.scaled_dot_product_attention: they compute attention in their "
        "own code, which swap_attention cannot see. What to do: call fastgen.scaled_dot_product_attention "
        "(or use fastgen.nn.MultiheadAttention) in them; for transformers models load or switch them with "
        "attn_implementation='fastgen' (import fastgen.integrations.transformers)"
    )


def _undo_setitem(parent: nn.Module, name: str, old: nn.Module) -> Callable[[], None]:
    # the undo list lives in a WeakKeyDictionary keyed by the model: holding the parent (often the model
    # itself) strongly would keep the model, and F's dispatcher, alive forever
    ref = weakref.ref(parent)

    def undo():
        p = ref()
        if p is not None:
            p._modules[name] = old

    return undo


def _undo_setattr(m: nn.Module, name: str, value: Any) -> Callable[[], None]:
    ref = weakref.ref(m)  # as _undo_setitem: the undo list must not keep the model alive
    return lambda: ref() is not None and setattr(ref(), name, value)


def _fastgen_kernel_serves(mha: nn.Module) -> bool:
    """Whether a fastgen kernel (not torch's own SDPA) would serve this module's attention where its
    weights are now: only then is torch's fused inference fast path worth turning off (rule 11)."""
    w = next(mha.parameters(), None)
    if w is None or not w.is_floating_point():
        return True
    head_dim = max(1, getattr(mha, "head_dim", 64))
    return _attention_ops._default_backend(w.device.type, w.dtype, head_dim, head_dim) != "torch"


def _disable_layer_fast_path(parent, new, parent_name, report, undo) -> None:
    if isinstance(parent, nn.TransformerEncoderLayer) and parent.self_attn is new:
        if not _fastgen_kernel_serves(new):
            report.notes.append(
                f"{parent_name or '<root>'}: torch's TransformerEncoderLayer inference fast path kept (eval + "
                "no_grad calls): where the weights are, fastgen would run torch's SDPA, and the fused fast "
                "path is faster still; swap after moving the model to its device"
            )
            return
        # the layer's inference fast path skips self_attn.forward whenever no module has hooks
        handle = new.register_forward_pre_hook(_noop_hook)
        undo.append(handle.remove)
        report.notes.append(
            f"{parent_name or '<root>'}: torch's TransformerEncoderLayer fast path turned off"
        )


def _noop_hook(module, args):
    return None


def _swap_processor(qual, m, proc, wanted, report, undo) -> None:
    # a module with set_processor is a processor hook for sure: its processor is wrapped even when no
    # SDPA call shows in its source (it may call a helper; harmless if it computes attention itself); a
    # bare callable `processor` attribute counts only when its class visibly calls SDPA
    hooked = callable(getattr(m, "set_processor", None))
    refs, aliases = _class_refs_sdpa(proc if isinstance(proc, types.FunctionType) else type(proc))
    if not hooked and not refs:
        return
    name = type(proc).__name__
    why = wanted(qual, m)
    if why is not None:
        report.skipped.append((qual, f"processor {name} {why}"))
        return
    if isinstance(proc, nn.Module):
        undo.append(_wrap_forward(proc, True, aliases))
    else:
        wrapper = FastgenProcessor(proc)
        keys = _register_targets(wrapper, aliases)
        _set_processor(m, wrapper)

        def restore(m=m, proc=proc, keys=keys):
            _set_processor(m, proc)
            keys()

        undo.append(restore)
    seen = "calls scaled_dot_product_attention" if refs else "no SDPA call seen in its source, wrapped anyway"
    report.replaced.append((qual, "processor", f"{name} runs with fastgen SDPA ({seen})"))


def _set_processor(m: nn.Module, proc: Any) -> None:
    setter = getattr(m, "set_processor", None)
    if callable(setter):
        setter(proc)
    else:
        m.processor = proc


def unswap_attention(model: nn.Module) -> int:
    """Undo every :func:`swap_attention` on ``model`` (latest first): the original modules, processors
    and forwards are back. Returns the number of changes undone."""
    actions = _undo.pop(model, [])
    for action in reversed(actions):
        action()
    return len(actions)
