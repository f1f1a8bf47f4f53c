"""Triton launchers run with their tensors' GPU as the current device (tensors on cuda:1 while cuda:0 is
current). Checked on CPU through the guard's decisions, and for real where two GPUs exist."""

import contextlib

import pytest
import torch

from fastgen import _backend


def test_every_triton_backend_is_guarded():
    import fastgen.ops  # noqa: F401  (registers every op)

    ops = _backend.registered_ops()
    triton = [op.backends["triton"] for op in ops.values() if "triton" in op.backends]
    assert len(triton) >= 8

    def launchers(fn):
        return list(fn) if isinstance(fn, tuple) else [fn]  # moe_permute: a named tuple of entry points

    for b in triton:
        assert all(hasattr(f, "__wrapped_launcher__") for f in launchers(b.fn)), b
    for op in ops.values():
        for name, b in op.backends.items():
            if name != "triton":
                assert not any(hasattr(f, "__wrapped_launcher__") for f in launchers(b.fn)), (op.name, name)
    from fastgen.ops import moe_permute

    guarded = moe_permute.OP.backends["triton"].fn
    assert type(guarded) is type(moe_permute._TRITON) and callable(guarded.gather)


def test_guard_switches_to_the_tensors_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(index):
        entered.append(index)
        yield

    seen = []
    launcher = _backend.device_guarded(lambda *a, **k: seen.append((a, k)) or "ran")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    x = torch.zeros(2)
    # a CPU tensor: no guard
    assert launcher(x, 3, flag=True) == "ran" and entered == [] and seen[-1][1] == {"flag": True}
    # a tensor on cuda:1 while cuda:0 is current: the launch runs inside torch.cuda.device(1)
    monkeypatch.setattr(_backend, "_launch_device", lambda args: torch.device("cuda", 1))
    assert launcher(x) == "ran" and entered == [1]
    # already current: no switch
    monkeypatch.setattr(_backend, "_launch_device", lambda args: torch.device("cuda", 0))
    assert launcher(x) == "ran" and entered == [1]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_attention_and_step_on_the_second_gpu():
    import fastgen
    from fastgen.ops import attention as A

    with torch.cuda.device(0), fastgen.use_backend("triton"):
        q, k, v = (torch.randn(2, 64, 4, 64, device="cuda:1", dtype=torch.float16) for _ in range(3))
        out = fastgen.flash_attention(q, k, v, causal=True)
        ref = A.attention_ref(q, k, v, causal=True)
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
