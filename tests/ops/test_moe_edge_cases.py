"""MoE edge cases: hyperparameter validation (NaN, out of range, non-integers), int64 offsets validated
before narrowing, error messages that name the right op and the right tensors."""

import pytest
import torch

from fastgen.nn.moe import Top2MoE
from fastgen.ops.moe_gating import capacity_for, top2_gating

NAN = float("nan")


@pytest.mark.parametrize(
    "kw, err, match",
    [
        ({"second_threshold": NAN}, ValueError, "second_threshold must be in"),
        ({"second_threshold": -1.0}, ValueError, r"second_threshold must be in \[0, 1\]"),
        ({"min_capacity": 2.5}, TypeError, "min_capacity must be an int"),
        ({"min_capacity": -1}, ValueError, "min_capacity must be >= 0"),
        ({"capacity_factor": NAN}, ValueError, "capacity_factor must be in"),
        ({"capacity_factor": float("inf")}, ValueError, "capacity_factor must be in"),
        ({"capacity_factor": 0.0}, ValueError, r"capacity_factor must be in \(0, inf\)"),
    ],
)
def test_top2_gating_hyperparameters(kw, err, match):
    logits = torch.randn(6, 4)
    with pytest.raises(err, match=match):
        top2_gating(logits, second_expert_policy="threshold", **kw)


def test_capacity_for_hyperparameters():
    assert capacity_for(10, 2, 1.1) == 11
    with pytest.raises(TypeError, match="min_capacity must be an int"):
        capacity_for(10, 2, 1.0, min_capacity=2.5)
    with pytest.raises(ValueError, match="capacity_factor must be in"):
        capacity_for(10, 2, NAN)


@pytest.mark.parametrize(
    "kw, err, match",
    [
        ({"aux_loss_weight": NAN}, ValueError, "aux_loss_weight must be in"),
        ({"aux_loss_weight": -0.1}, ValueError, "aux_loss_weight must be in"),
        ({"z_loss_weight": float("inf")}, ValueError, "z_loss_weight must be in"),
        ({"jitter_eps": NAN}, ValueError, "jitter_eps must be in"),
        ({"capacity_factor": float("inf")}, ValueError, "capacity_factor must be in"),
        ({"second_threshold": NAN}, ValueError, "second_threshold must be in"),
        ({"second_expert_policy": "top1"}, ValueError, "second_expert_policy must be one of"),
        ({"min_capacity": 2.5}, TypeError, "min_capacity must be an int"),
        ({"d_ff": 8.0}, TypeError, "d_ff must be an int"),
    ],
)
def test_top2moe_hyperparameters(kw, err, match):
    args = {"d_model": 8, "d_ff": 16, "num_experts": 4} | kw
    with pytest.raises(err, match=match):
        Top2MoE(**args)
