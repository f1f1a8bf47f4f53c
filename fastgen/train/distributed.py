r"""torch.distributed plumbing of :mod:`fastgen.train`: process-group detection, data sharding, metric
reduction, FSDP2 wrapping, and the gradient synchronisation of expert x data parallel MoE models.

* :func:`init_distributed` joins the process group that ``torchrun`` describes in the environment
  (``env://``: ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) with nccl on CUDA and gloo on
  CPU; a group the user already initialised is used as it is.
* :func:`shard_batch` gives rank ``r`` of ``W`` rows ``[r * B / W, (r + 1) * B / W)`` of every tensor of a
  batch. Every rank iterates the same loader with the same RNG state (the trainer broadcasts rank 0's
  state at start), so the ranks see distinct samples whose union is exactly the batch a single process
  would see: the global batch, the data order and the exact-resume guarantee do not depend on the world
  size.
* :func:`sync_moe_grads` averages the gradients of an expert-parallel model over a 2-D (data x expert)
  device mesh. Every rank holds its own tokens, so the objective is the mean of the ranks' losses: the
  gradients of replicated (non-expert) parameters are averaged over all ``dp * ep`` ranks; an expert
  shard already receives the gradient of every EP peer's tokens through the all-to-all, so it is summed
  over the DP group only and divided by ``dp * ep``.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastgen.nn.moe import sync_moe_grads

__all__ = ["STRATEGIES", "all_reduce_mean", "apply_fsdp", "broadcast_rng_state", "default_backend",
           "fsdp_blocks", "init_distributed", "local_device", "moe_mesh", "rank", "shard_batch",
           "sync_moe_grads", "world_size"]  # fmt: skip

STRATEGIES = ("ddp", "fsdp", "none")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def default_backend(device: torch.device | str) -> str:
    """nccl for CUDA devices, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device: torch.device | str = "cpu") -> bool:
    """Join the process group described by the environment (``torchrun``) if there is one; True when a
    process group is up afterwards. Does nothing when a group is already initialised or when
    ``WORLD_SIZE`` is unset or 1."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            f"init_distributed: WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set; "
            "launch with torchrun or set the env:// variables"
        )
    device = local_device(torch.device(device))
    if device.type == "cuda":  # nccl collectives (and object broadcasts) use the current device
        torch.cuda.set_device(device)
    dist.init_process_group(default_backend(device), init_method="env://")
    return True


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index becomes ``cuda:LOCAL_RANK`` under torchrun, else the current CUDA device
    (DDP needs an explicit device index); other devices are unchanged."""
    if device.type == "cuda" and device.index is None:
        if "LOCAL_RANK" in os.environ:
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
    return device


def shard_batch(batch: Any, rank: int, world: int, what: str = "train_data") -> Any:
    """Rank ``rank``'s contiguous ``1 / world`` of dim 0 of every tensor in ``batch`` (tuples, lists and
    dicts are walked; other leaves are passed through). The batch size must be divisible by ``world`` so
    that the mean of the ranks' mean losses is the mean loss of the whole batch."""
    if world == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            return batch
        n = batch.shape[0]
        if n % world:
            raise ValueError(
                f"{what}: a batch of {n} rows cannot be split evenly over {world} ranks (data sharding "
                f"splits every batch along dim 0): use a batch size divisible by {world}, or "
                "FineTuneConfig(shard_data=False) with data that is already rank-specific"
            )
        k = n // world
        return batch[rank * k : (rank + 1) * k]
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard_batch(b, rank, world, what) for b in batch)
    if isinstance(batch, dict):
        return {k: shard_batch(v, rank, world, what) for k, v in batch.items()}
    return batch


def all_reduce_mean(values: Sequence[float], device: torch.device, group: Any = None) -> list[float]:
    """The mean over the ranks of each of ``values`` (one float64 all-reduce), bit-identical on every
    rank: rank 0's result is broadcast, so decisions taken from it (early stopping, skipping a
    non-finite step) agree everywhere."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return (t / dist.get_world_size(group)).tolist()


def broadcast_rng_state() -> None:
    """Give every rank rank 0's torch / numpy / python RNG state, so that every rank iterates the data in
    the same order (data sharding relies on it)."""
    from fastgen.train.finetune import get_rng_state, set_rng_state

    st = [get_rng_state() if rank() == 0 else None]
    dist.broadcast_object_list(st, src=0)
    here = get_rng_state()
    if "cuda" in here:  # the CUDA generators are per device: keep this rank's own
        st[0]["cuda"] = here["cuda"]
    else:
        st[0].pop("cuda", None)
    set_rng_state(st[0])


def fsdp_blocks(model: nn.Module, patterns: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The modules that get their own ``fully_shard`` group: those whose name matches one of
    ``patterns`` (fnmatch), or by default the elements of the outermost ``nn.ModuleList``\\ s (the
    transformer / residual blocks)."""
    named = list(model.named_modules())
    if patterns is not None:
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n, _ in named if n):
                raise ValueError(f"FineTuneConfig.fsdp_blocks: pattern {p!r} matches no submodule")
        return [(n, m) for n, m in named if n and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    out: list[tuple[str, nn.Module]] = []
    lists = [n for n, m in named if isinstance(m, nn.ModuleList)]
    outer = [n for n in lists if not any(n.startswith(o + ".") for o in lists if o != n)]
    for n in outer:
        ml = model.get_submodule(n)
        out += [(f"{n}.{i}", m) for i, m in enumerate(ml) if any(True for _ in m.parameters())]
    return out


def apply_fsdp(model: nn.Module, precision: str, blocks: Sequence[str] | None = None) -> list[str]:
    """FSDP2: ``fully_shard`` each block (:func:`fsdp_blocks`), then the root, over the default process
    group. Under bf16 / fp16 the parameters are all-gathered in that dtype and gradients reduced in
    float32 (``MixedPrecisionPolicy``). Returns the names of the sharded blocks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low is not None else None)
    chosen = fsdp_blocks(model, blocks)
    for _, m in chosen:
        fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return [n for n, _ in chosen]


# ---- expert x data parallel MoE ------------------------------------------------------------------------


def moe_mesh(dp: int, ep: int, device_type: str = "cpu"):
    """A 2-D ``DeviceMesh`` of shape (dp, ep) named ("dp", "ep") over the default process group (its size
    must be ``dp * ep``): expert parallelism inside each row, data parallelism across rows. Build the
    model with ``process_group=mesh.get_group("ep")``."""
    from torch.distributed.device_mesh import init_device_mesh

    for name, v in (("dp", dp), ("ep", ep)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"moe_mesh: {name} must be an int >= 1, got {v!r}")
    if dp * ep != world_size():
        raise ValueError(f"moe_mesh: dp * ep = {dp} * {ep} must equal the world size {world_size()}")
    return init_device_mesh(device_type, (dp, ep), mesh_dim_names=("dp", "ep"))
