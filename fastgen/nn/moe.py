r"""Top-2 mixture-of-experts layer (GShard / GLaM), over fastgen's routing, permutation and grouped GEMMs.

For tokens ``x: (T, d_model)`` (any leading dims are flattened)::

    logits = router(x * jitter)                 # (T, E) in fp32; jitter ~ U[1 - eps, 1 + eps] in training
    g      = top2_gating(logits, ...)           # top-2 experts, renormalised gates, capacity dropping
    buf    = moe_permute(x, g.routing)          # rows grouped by expert, no (T, E, C) one-hot
    h      = act(grouped_mm(buf, w1) + b1)      # all experts' first GEMM in one launch, activation fused
    o      = grouped_mm(h, w2) + b2
    y      = moe_unpermute(o, g.routing, gates) # y_t = sum_j gate_tj * o[dest_tj]

On CPU in eager mode (single process) the last four lines run as one block-by-block pass
(:func:`fastgen.ops.grouped_mm.moe_experts_cpu`): each expert's rows are gathered from x, go through both
GEMMs and are added into y with their gates, so neither the (T*k, d) buffers nor the (T*k, d_ff)
activations are materialised; peak memory stays below a plain loop over experts.

A token whose assignments were all dropped by capacity gets zeros (``dropped_tokens="zero"``, GShard) or
itself (``"residual"``, i.e. the layer is the identity for it). ``capacity_factor=None`` is dropless.

Expert parallelism: with ``process_group`` of size P the layer holds experts
``[rank * E / P, (rank + 1) * E / P)``; each rank routes its own tokens, sends each expert's rows to its
owner with ``all_to_all_single`` and gets the results back the same way (differentiable both ways). The
router is replicated (:func:`sync_moe_grads` averages its gradients, also over a data-parallel group);
the capacity applies to each rank's tokens (GShard's groups). ``Top2MoE.load_dense_state_dict`` loads a
single-process state dict into the shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastgen._checks import check_int, check_real
from fastgen.ops.grouped_mm import (
    ACTIVATIONS,
    grouped_mm,
    grouped_mm_ref,
    moe_experts_cpu,
    moe_experts_cpu_usable,
)
from fastgen.ops.moe_gating import POLICIES, Gating, top2_gating
from fastgen.ops.moe_permute import Routing, moe_permute, moe_unpermute

DROPPED_TOKENS = ("zero", "residual")


@dataclass
class MoEAux:
    """What the layer returns next to its output.

    loss: aux_loss_weight * aux_loss + z_loss_weight * z_loss (add it to the training loss);
    aux_loss / z_loss: the unweighted load-balancing and router z losses; expert_counts: (E,) assignments
    per expert before dropping; dropped: assignments dropped by capacity; capacity: per-expert slots
    (None: dropless); tokens: T.
    """

    loss: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_counts: torch.Tensor
    dropped: torch.Tensor
    capacity: int | None
    tokens: int


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with its adjoint (the reverse exchange) as the backward."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
    ) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        out_splits, in_splits = ctx.splits
        dx = dout.new_empty((sum(in_splits), *dout.shape[1:]))
        dist.all_to_all_single(dx, dout.contiguous(), in_splits, out_splits, group=ctx.group)
        return dx, None, None, None


class Top2MoE(nn.Module):
    """Top-2 mixture of experts FFN: ``y, aux = moe(x)`` for ``x: (..., d_model)``.

    Args:
        d_model, d_ff: model and expert hidden widths; num_experts: E (>= 2).
        capacity_factor: slots per expert = ceil(cf * T * 2 / E), at least ``min_capacity``; None: dropless.
        activation: "gelu", "gelu_tanh", "relu", "silu" or "swiglu" (w1 then has 2 * d_ff columns).
        second_expert_policy / second_threshold: "all", "threshold" or "random" (GShard), see top2_gating.
        jitter_eps: multiplicative uniform noise on the router input in training (Switch); 0 disables.
        aux_loss_weight, z_loss_weight: weights of the two router losses in ``aux.loss``.
        dropped_tokens: "zero" or "residual" for tokens that lost all their assignments.
        bias: expert biases b1 (E, d_ff') and b2 (E, d_model).
        process_group: expert parallelism over this group (E divisible by its size); None: all local.
    Parameters: ``router.weight`` (E, d_model); ``w1`` (E_local, d_model, d_ff'), ``w2`` (E_local, d_ff,
    d_model) in "x @ w" layout, ``b1``, ``b2``.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        capacity_factor: float | None = 1.25,
        activation: str = "gelu",
        second_expert_policy: str = "all",
        jitter_eps: float = 0.0,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        *,
        min_capacity: int = 4,
        second_threshold: float = 0.2,
        dropped_tokens: str = "zero",
        normalize_gates: bool = True,
        bias: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            check_int("Top2MoE", name, v, -(2**63))  # the type; the ranges are checked below
        if num_experts < 2:
            raise ValueError(
                f"Top2MoE: num_experts must be >= 2 for top-2 routing (k > E), got {num_experts}"
            )
        if d_model <= 0 or d_ff <= 0:
            raise ValueError(f"Top2MoE: d_model and d_ff must be positive, got {d_model}, {d_ff}")
        if activation not in ACTIVATIONS or activation is None:
            raise ValueError(f"Top2MoE: unknown activation {activation!r}; expected one of {ACTIVATIONS[1:]}")
        if dropped_tokens not in DROPPED_TOKENS:
            raise ValueError(
                f"Top2MoE: dropped_tokens must be one of {DROPPED_TOKENS}, got {dropped_tokens!r}"
            )
        if capacity_factor is not None:
            check_real("Top2MoE", "capacity_factor", capacity_factor, 0.0, lo_open=True)
        if second_expert_policy not in POLICIES:
            raise ValueError(
                f"Top2MoE: second_expert_policy must be one of {POLICIES}, got {second_expert_policy!r}"
            )
        check_real("Top2MoE", "second_threshold", second_threshold, 0.0, 1.0)
        check_int("Top2MoE", "min_capacity", min_capacity, 0)
        check_real("Top2MoE", "jitter_eps", jitter_eps, 0.0)
        if jitter_eps >= 1.0:  # the noise factor U[1 - eps, 1 + eps] must stay positive
            raise ValueError(f"Top2MoE: jitter_eps must be in [0, 1), got {jitter_eps}")
        check_real("Top2MoE", "aux_loss_weight", aux_loss_weight, 0.0)
        check_real("Top2MoE", "z_loss_weight", z_loss_weight, 0.0)
        world, rank = 1, 0
        if process_group is not None:
            world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
            if num_experts % world:
                raise ValueError(
                    f"Top2MoE: num_experts {num_experts} is not divisible by the group size {world}"
                )
        self.d_model, self.d_ff, self.num_experts = d_model, d_ff, num_experts
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity
        self.activation, self.second_expert_policy, self.second_threshold = (
            activation,
            second_expert_policy,
            second_threshold,
        )
        self.jitter_eps, self.aux_loss_weight, self.z_loss_weight = jitter_eps, aux_loss_weight, z_loss_weight
        self.dropped_tokens, self.normalize_gates = dropped_tokens, normalize_gates
        self.process_group, self.world, self.rank = process_group, world, rank
        self.num_local_experts = num_experts // world
        self.first_expert = rank * self.num_local_experts
        kw = {"device": device, "dtype": dtype}
        ff_in = 2 * d_ff if activation == "swiglu" else d_ff
        el = self.num_local_experts
        self.router = nn.Linear(d_model, num_experts, bias=False, **kw)
        self.w1 = nn.Parameter(torch.empty(el, d_model, ff_in, **kw))
        self.w2 = nn.Parameter(torch.empty(el, d_ff, d_model, **kw))
        self.b1 = nn.Parameter(torch.empty(el, ff_in, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.empty(el, d_model, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised as nn.Linear would be (uniform +-1/sqrt(fan_in)); the router likewise."""
        self.router.reset_parameters()
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = w.shape[1] ** -0.5
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        ep = (
            f", experts {self.first_expert}..{self.first_expert + self.num_local_experts - 1} of this rank"
            if self.world > 1
            else ""
        )
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
            f"capacity_factor={self.capacity_factor}, activation={self.activation!r}{ep}"
        )

    # ---- routing ----------------------------------------------------------------------------------------

    def gate(self, x2: torch.Tensor) -> Gating:
        """Router logits (fp32, with jitter in training) -> top-2 gating decisions for tokens (T, d_model)."""
        xr = x2
        if self.training and self.jitter_eps > 0:
            noise = torch.empty_like(x2).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            xr = x2 * noise
        logits = F.linear(xr.float(), self.router.weight.float())
        return top2_gating(
            logits,
            capacity_factor=self.capacity_factor,
            min_capacity=self.min_capacity,
            second_expert_policy=self.second_expert_policy,
            second_threshold=self.second_threshold,
            normalize=self.normalize_gates,
        )

    def experts(self, buf: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The local experts' FFN on rows grouped by expert (``offsets``: (E_local + 1,))."""
        h = grouped_mm(buf, self.w1, offsets, bias=self.b1, activation=self.activation)
        return grouped_mm(h, self.w2, offsets, bias=self.b2)

    # ---- forward ----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"Top2MoE: x must be (..., d_model={self.d_model}), got {tuple(getattr(x, 'shape', ()))}"
            )
        if x.dtype != self.w1.dtype:
            raise ValueError(f"Top2MoE: x is {x.dtype} but the experts are {self.w1.dtype}")
        shape = x.shape
        x2 = x.reshape(-1, self.d_model)
        g = self.gate(x2)
        if self.world == 1 and moe_experts_cpu_usable(x2):
            # no (T*k, d) / (T*k, d_ff) buffers: each expert's rows go from x through both GEMMs into y
            y = moe_experts_cpu(x2, g.routing, g.gates, self.w1, self.b1, self.w2, self.b2, self.activation)
        else:
            buf = moe_permute(x2, g.routing)
            out = (
                self.experts(buf, g.routing.offsets)
                if self.world == 1
                else self._experts_parallel(buf, g.routing)
            )
            y = moe_unpermute(out, g.routing, g.gates)
        if self.dropped_tokens == "residual":
            lost = (g.routing.dest < 0).all(dim=1, keepdim=True)
            y = torch.where(lost, x2, y)
        loss = self.aux_loss_weight * g.aux_loss + self.z_loss_weight * g.z_loss
        aux = MoEAux(loss, g.aux_loss, g.z_loss, g.expert_counts, g.dropped, g.capacity, x2.shape[0])
        return y.reshape(shape), aux

    def _experts_parallel(self, buf: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Send each expert's rows to its owner, run the local experts, send the results back."""
        world, el, group = self.world, self.num_local_experts, self.process_group
        kept = (routing.offsets[1:] - routing.offsets[:-1]).to(torch.int64)  # (E,) rows per expert
        # every rank learns how many rows it gets from every source rank for each of its local experts
        recv_counts = torch.empty_like(kept)
        dist.all_to_all_single(recv_counts, kept, group=group)
        send = kept.view(world, el).sum(1).tolist()
        recv_matrix = recv_counts.view(world, el)  # [source rank, local expert]
        recv = recv_matrix.sum(1).tolist()
        used = sum(send)
        rows = _AllToAll.apply(buf[:used], recv, send, group)
        # received rows are ordered [source][local expert]; the grouped GEMM wants [local expert][source]
        expert_of_row = torch.repeat_interleave(
            torch.arange(el, device=buf.device).repeat(world), recv_matrix.reshape(-1).to(buf.device)
        )
        order = torch.sort(expert_of_row, stable=True).indices
        per_expert = recv_matrix.sum(0).to(buf.device)
        offsets = torch.zeros(el + 1, dtype=torch.int32, device=buf.device)
        offsets[1:] = torch.cumsum(per_expert, 0)
        out_sorted = self.experts(rows[order], offsets)
        out_rows = torch.empty_like(out_sorted).index_copy(0, order, out_sorted)
        back = _AllToAll.apply(out_rows, send, recv, group)
        # the buffer's unused rows (beyond the kept ones) stay zero, as moe_unpermute expects
        pad = back.new_zeros((buf.shape[0] - used, back.shape[1]))
        return torch.cat([back, pad], 0)

    # ---- state -----------------------------------------------------------------------------------------

    def load_dense_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load the state dict of a single-process Top2MoE (all E experts) into this shard."""
        lo, hi = self.first_expert, self.first_expert + self.num_local_experts
        local = {k: (v[lo:hi] if k in ("w1", "w2", "b1", "b2") else v) for k, v in state.items()}
        self.load_state_dict(local)


def sync_moe_grads(model: nn.Module, ep_group: Any = None, dp_group: Any = None) -> None:
    """Average the gradients of a model whose Top2MoE layers are expert parallel over ``ep_group`` and
    which is data parallel over ``dp_group`` (a 2-D (dp, ep) mesh; either may be None for size 1), so that
    the update is the single-process one on the mean of the ``dp * ep`` ranks' losses (every rank holds
    its own tokens). Replicated parameters (router, attention, embeddings, dense FFNs) are averaged over
    all ranks. An expert shard already holds the gradient of every EP peer's tokens (summed by the
    all-to-all's backward), so it is summed over ``dp_group`` only and divided by ``dp * ep``. Call it
    between ``backward()`` and clipping / ``optimizer.step()``; every rank must call it."""
    ep = dist.get_world_size(ep_group) if ep_group is not None else 1
    dp = dist.get_world_size(dp_group) if dp_group is not None else 1
    expert_ids = set()
    for name, mod in model.named_modules():
        if isinstance(mod, Top2MoE) and mod.world > 1:
            if mod.world != ep:
                raise ValueError(
                    f"sync_moe_grads: {name or 'model'} shards its experts over {mod.world} ranks but "
                    f"ep_group has {ep}; pass the group the model was built with"
                )
            expert_ids.update(id(p) for p in (mod.w1, mod.w2, mod.b1, mod.b2) if p is not None)
    if ep * dp == 1:
        return
    replicated = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in expert_ids]
    experts = [p.grad for p in model.parameters() if p.grad is not None and id(p) in expert_ids]
    for grads, groups in ((replicated, (ep_group, dp_group)), (experts, (dp_group,))):
        if not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective per group, not one per tensor
        for g in groups:
            if g is not None and dist.get_world_size(g) > 1:
                dist.all_reduce(flat, group=g)
        flat /= ep * dp
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def top2_moe_dense_ref(x: torch.Tensor, moe: Top2MoE, gating: Gating, *, upcast: bool = True) -> torch.Tensor:
    """Every expert applied to every token, combined through the (T, E) gate matrix of ``gating``: the dense
    reference of the layer (single process). Float64 when ``upcast``; returns x's dtype and shape."""
    dt = torch.float64 if upcast else x.dtype
    x2 = x.reshape(-1, moe.d_model)
    t = x2.shape[0]
    kept = gating.routing.dest >= 0
    combine = torch.zeros(t, moe.num_experts, dtype=dt, device=x.device)
    combine = combine.scatter_add(1, gating.expert_idx.long(), torch.where(kept, gating.gates.to(dt), 0.0))
    all_rows = torch.tensor([0, t], dtype=torch.int32, device=x.device)
    y = torch.zeros(t, moe.d_model, dtype=dt, device=x.device)
    for e in range(moe.num_experts):
        sl = slice(e, e + 1)
        b1 = None if moe.b1 is None else moe.b1[sl].to(dt)
        b2 = None if moe.b2 is None else moe.b2[sl].to(dt)
        h = grouped_mm_ref(
            x2.to(dt), moe.w1[sl].to(dt), all_rows, bias=b1, activation=moe.activation, upcast=upcast
        )
        o = grouped_mm_ref(h, moe.w2[sl].to(dt), all_rows, bias=b2, upcast=upcast)
        y = y + combine[:, e : e + 1] * o
    if moe.dropped_tokens == "residual":
        y = torch.where(kept.any(1, keepdim=True), y, x2.to(dt))
    return y.to(x.dtype).reshape(x.shape)
