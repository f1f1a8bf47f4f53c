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


@pytest.mark.parametrize("bad", [[0, 2**32 + 1, 2**32 + 3], [0, 2**32, 2], [-(2**32), 1, 3]])
def test_grouped_mm_int64_offsets_checked_before_narrowing(bad):
    from fastgen.ops.grouped_mm import grouped_mm

    x, w = torch.randn(3, 4), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        grouped_mm(x, w, torch.tensor(bad, dtype=torch.int64))
    ok = grouped_mm(x, w, torch.tensor([0, 1, 3], dtype=torch.int64))
    torch.testing.assert_close(ok, torch.cat([x[:1] @ w[0], x[1:] @ w[1]]))


def test_moe_messages_name_the_op_and_the_tensors():
    from fastgen.ops.moe_permute import moe_permute, moe_route, moe_unpermute

    with pytest.raises(ValueError, match=r"^fastgen\.moe_route: expert_idx entries"):
        moe_route(torch.tensor([[0, 5]]), 4)
    with pytest.raises(ValueError, match=r"^fastgen\.moe_route: num_experts"):
        moe_route(torch.tensor([[0, 1]]), 0)
    routing = moe_route(torch.tensor([[0, 1], [1, 2]]), 4)
    buf = moe_permute(torch.randn(2, 3), routing)
    gates = torch.ones(2, 2)
    meta = type(routing)(*(t.to("meta") for t in routing))
    with pytest.raises(
        ValueError, match=r"^fastgen\.moe_unpermute: routing\.dest is on meta but buf is on cpu"
    ):
        moe_unpermute(buf, meta, gates)
    with pytest.raises(ValueError, match=r"^fastgen\.moe_unpermute: gates has 3 tokens"):
        moe_unpermute(buf, routing, torch.ones(3, 2))
    with pytest.raises(
        ValueError, match=r"^fastgen\.moe_permute: x has|^fastgen\.moe_permute: routing\.dest has"
    ):
        moe_permute(torch.randn(3, 3), routing)
