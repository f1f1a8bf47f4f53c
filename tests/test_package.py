"""Package plumbing: the backend registry, forcing, `fastgen.info`, import without the extension."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastgen
from fastgen._backend import BackendUnavailableError, Call, Op, forced_backend, use_backend


def make_op():
    op = Op("toy", "a toy op")
    op.register("torch", devices=("cpu", "cuda"), dtypes=(torch.float32, torch.float64))(lambda: "torch")
    op.register(
        "cpp",
        devices=("cpu",),
        dtypes=(torch.float32,),
        check=lambda call: ["n too large"] if call.get("n", 0) > 10 else [],
    )(lambda: "cpp")
    op.register("cuda", devices=("cuda",), dtypes=(torch.float32,), available=lambda: ["no GPU here"])(
        lambda: "cuda"
    )
    return op


def test_dispatch_priority_limits_and_reasons():
    op = make_op()
    cpu = torch.device("cpu")
    assert [b.name for b in op.ordered()] == ["cuda", "cpp", "torch"]
    assert op.dispatch(Call(cpu, torch.float32, {"n": 3})).name == "cpp"
    assert op.dispatch(Call(cpu, torch.float32, {"n": 11})).name == "torch"
    assert op.dispatch(Call(cpu, torch.float64, {})).name == "torch"
    report = op.report(Call(cpu, torch.float64, {}))
    assert report["torch"] == []
    assert any("dtype float64 not supported" in r for r in report["cpp"])
    assert "no GPU here" in report["cuda"]
    with pytest.raises(BackendUnavailableError, match="no backend can serve"):
        op.dispatch(Call(cpu, torch.int8, {}))


def test_forcing_by_context_and_env(monkeypatch):
    op = make_op()
    call = Call(torch.device("cpu"), torch.float32, {"n": 3})
    with use_backend("torch"):
        assert op.dispatch(call).name == "torch"
        with use_backend("cpp", op="toy"):
            assert op.dispatch(call).name == "cpp"
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="no GPU here"):
        op.dispatch(call)
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="has no triton implementation"):
        op.dispatch(call)
    monkeypatch.setenv("FASTGEN_BACKEND", "other:cpp,toy:torch")
    assert forced_backend("toy") == "torch" and forced_backend("other") == "cpp"
    assert forced_backend("third") is None
    monkeypatch.setenv("FASTGEN_BACKEND", "cpp")
    with pytest.raises(BackendUnavailableError, match="n too large"):
        op.dispatch(Call(torch.device("cpu"), torch.float32, {"n": 50}))
    with pytest.raises(ValueError, match="unknown backend"), use_backend("numpy"):
        pass


def test_environment_is_read_at_call_time(monkeypatch):
    """The fast environment read sees every kind of os.environ write at once, and agrees with os.environ."""
    from fastgen import _backend
    from fastgen.ops.diffusion_step import OP as op

    monkeypatch.delenv("FASTGEN_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    key = (torch.device("cpu"), torch.float32, True)
    make = lambda: Call(torch.device("cpu"), torch.float32, {"n": 4})
    assert _backend.getenv("FASTGEN_BACKEND") is None and not _backend.triton_interpret()
    natural = op.dispatch_remembered(key, make).name
    monkeypatch.setenv("FASTGEN_BACKEND", "diffusion_step:torch")
    assert _backend.getenv("FASTGEN_BACKEND") == os.environ["FASTGEN_BACKEND"] == "diffusion_step:torch"
    assert forced_backend("diffusion_step") == "torch" and op.dispatch_remembered(key, make).name == "torch"
    os.environ["TRITON_INTERPRET"] = "1"  # a plain write, undone by the delenv below
    assert _backend.triton_interpret()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not _backend.triton_interpret()
    os.environ.update({"FASTGEN_BACKEND": " diffusion_step:cpp "})
    assert forced_backend("diffusion_step") == "cpp"
    monkeypatch.delenv("FASTGEN_BACKEND")
    assert forced_backend("diffusion_step") is None and op.dispatch_remembered(key, make).name == natural
    assert _backend.getenv("PATH") == os.environ.get("PATH")  # a name without a precomputed key


def test_info_lists_every_op_and_backend():
    from fastgen.info import report

    text = report()
    assert "op diffusion_step" in text
    for name in ("cuda", "triton", "cpp", "torch"):
        assert f"    {name}" in text
    assert torch.__version__ in text
    # ops probed with the dtypes their backends declare: no false alarm for the integer-only moe_route
    route = text.split("op moe_route")[1].split("\nop ")[0]
    assert "int32 -> " in route and "float32" not in route.split("\n")[1]
    # a reason shared by several backends is printed once, in the legend
    if "[1]" in text:
        assert text.count("\n  [1] ") == 1


def test_info_json(capsys):
    import json

    from fastgen import info

    info.main(["--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["versions"]["torch"] == torch.__version__
    assert set(data["ops"]["moe_route"]["chosen"]) == {"int32", "int64"}
    for op in data["ops"].values():
        assert set(op["backends"]) <= {"cuda", "triton", "cpp", "torch"}
    with pytest.raises(SystemExit, match="usage"):
        info.main(["--yaml"])


def test_import_without_extension_warns_once_and_serves():
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["fastgen._C"] = None  # as if the extension was never built
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import fastgen
            import fastgen.ops
        msgs = [str(x.message) for x in w if "fastgen._C" in str(x.message)]
        assert len(msgs) == 1, msgs
        import torch
        from fastgen.ops import diffusion_step as D
        abar = torch.linspace(0.99, 0.1, 10, dtype=torch.float64)
        out, _ = D.ddim_step(torch.randn(2, 3), torch.randn(2, 3), abar, 5, 4)
        assert D.OP.dispatch(D.Call(torch.device("cpu"), torch.float32, {})).name == "torch"
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("FASTGEN_BACKEND", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")


def test_public_api():
    for name in fastgen.__all__:
        assert hasattr(fastgen, name), name


def test_op_modules_are_not_shadowed_by_functions():
    """fastgen.ops.<op> stays the module (a function of the same name would shadow it for importers)."""
    import importlib

    import fastgen.ops

    for name in (
        "attention",
        "attention_decode",
        "diffusion_step",
        "grouped_mm",
        "moe_gating",
        "moe_permute",
    ):
        assert getattr(fastgen.ops, name) is importlib.import_module(f"fastgen.ops.{name}")
