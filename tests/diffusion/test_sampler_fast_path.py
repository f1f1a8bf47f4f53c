"""Sampler.step's fast path (validated once, a few microseconds of Python) gives exactly the full path's
result, is taken for every step after the first of a loop, and steps aside whenever it cannot serve."""

import pytest
import torch

from fastgen.diffusion import NoiseSchedule
from fastgen.diffusion import samplers as S
from fastgen.ops import diffusion_step as D

CONFIGS = [
    ("ddim", {}, False),
    ("ddim", {"eta": 0.5, "clip_sample": 1.0, "guidance_scale": 3.0}, False),
    ("ddpm", {"variance_type": "learned_range", "guidance_scale": 2.0}, True),
    ("ddpm", {"prediction_type": "v_prediction"}, False),
    ("euler_ancestral", {}, False),
    ("dpm_solver++_2m", {"guidance_scale": 1.5}, False),
]


def _model(learned: bool, c: int):
    def fn(x, t):
        out = torch.sin(x * 1.3 + t.view(-1, *[1] * (x.dim() - 1)).to(x.dtype) * 1e-3)
        return torch.cat([out, out.tanh()], 1) if learned else out

    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,kw,learned", CONFIGS)
def test_fast_path_equals_full_path_bitwise(name, kw, learned, dtype, monkeypatch):
    sched = NoiseSchedule.from_name("linear", 1000).respace("8")
    shape = (2, 3, 5, 7)
    calls = []
    full_step = D.sampler_step

    def counting(*a, **k):
        calls.append(1)
        return full_step(*a, **k)

    monkeypatch.setattr(D, "sampler_step", counting)
    fast = S.SAMPLERS[name](sched, **kw).sample(
        _model(learned, 3), shape, seed=7, dtype=dtype, progress=False
    )
    # x_T (counter_normal runs a step) and the first step validate and plan; the other 7 take the fast path
    assert len(calls) == 2
    monkeypatch.setattr(S.Sampler, "_fast_step", lambda self, *a: None)
    calls.clear()
    slow = S.SAMPLERS[name](sched, **kw).sample(
        _model(learned, 3), shape, seed=7, dtype=dtype, progress=False
    )
    assert len(calls) == 9
    assert torch.equal(fast, slow)


def test_fast_path_steps_aside():
    sched = NoiseSchedule.from_name("linear", 1000).respace("6")
    smp = S.DDIMSampler(sched, eta=1.0)
    x = torch.randn(2, 3, 4, 4)
    eps = torch.randn(2, 3, 4, 4)
    smp.step(5, x, eps, seed=1)
    assert smp._plan is not None
    # a new shape, a non-contiguous tensor, no seed for a noisy step, a bad index: the full path runs
    assert smp._fast_step(4, torch.randn(1, 3, 4, 4), eps[:1], None, 1, 0) is None
    assert smp._fast_step(4, x.transpose(2, 3), eps, None, 1, 0) is None
    assert smp._fast_step(4, x, eps, None, None, 0) is None
    assert smp._fast_step(6, x, eps, None, 1, 0) is None
    assert smp._fast_step(True, x, eps, None, 1, 0) is None
    with pytest.raises(ValueError, match=r"step index i=6 out of range"):
        smp.step(6, x, eps, seed=1)
    with pytest.raises(ValueError, match="model_output has shape"):
        smp.step(4, x, eps[:1], seed=1)
    # dynamic thresholding and guidance rescale need extra passes: never planned
    assert S.DDIMSampler(sched, dynamic_threshold=0.9)._plan is None
    thr = S.DDIMSampler(sched, dynamic_threshold=0.9)
    thr.step(5, x, eps)
    assert thr._plan is None


def test_fast_path_defers_to_the_custom_op_when_traced():
    sched = NoiseSchedule.from_name("linear", 1000).respace("4")
    smp = S.DDIMSampler(sched, clip_sample=1.0)
    x, eps = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    smp.step(3, x, eps)

    @torch.compile(fullgraph=True, backend="eager")
    def compiled(x, eps):
        return smp.step(2, x, eps)

    got = compiled(x, eps)
    want = S.DDIMSampler(sched, clip_sample=1.0).step(2, x, eps)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
