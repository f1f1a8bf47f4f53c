"""Throughput of the distributed training path: ``python -m fastgen.train.bench [--steps N] [--json PATH]``.

Times :class:`fastgen.train.Trainer` steps (optimizer steps per second, after warm-up) on one model and
one global batch for: one process (``strategy="none"``), 2 gloo processes on this CPU (``"ddp"`` and
``"fsdp"``; each rank takes half of every batch and ``cores / 2`` threads, so the pair uses the same
cores as the single process), and, on a CUDA machine, a 1-process DDP (nccl) against plain on one GPU:
the cost of the wrappers themselves. Speed-ups from several GPUs cannot be measured on one GPU or on a
CPU: the CPU rows show the overhead of the distributed machinery (gradient all-reduce or reduce-scatter
over gloo), not a scaling result.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn


class _Net(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
            )
            for _ in range(depth)
        )
        self.head = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def _loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def _time_trainer(
    strategy: str, device: str, steps: int, warmup: int, width: int, depth: int, batch: int
) -> float:
    from fastgen.train import FineTuneConfig, Trainer

    torch.manual_seed(0)
    model = _Net(width, depth)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)) for _ in range(4)
    ]
    cfg = FineTuneConfig(max_steps=warmup + steps, lr=1e-4, progress=False, verbose=False, plot=False,
                         strategy=strategy, device=device)  # fmt: skip
    t = Trainer(model, data, _loss, cfg)
    t.fit(until=warmup)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    t.fit()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def _worker(
    rank: int, world: int, port: int, out: str, strategy: str, device: str, kw: dict[str, int]
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        sps = _time_trainer(strategy, device, **kw)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"steps_per_s": sps}, f)
    finally:
        dist.destroy_process_group()


def make_trainer(strategy: str, device: str, width: int = 256, depth: int = 4, batch: int = 64):
    """A Trainer on the benchmark model that steps on demand (``t.fit(until=t.step + 1)``): the schedule is
    set for a horizon no benchmark reaches, so every call is one optimizer step on one global batch."""
    from fastgen.train import FineTuneConfig, Trainer

    torch.manual_seed(0)
    model = _Net(width, depth)
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)) for _ in range(4)
    ]
    cfg = FineTuneConfig(max_steps=10**9, lr=1e-4, progress=False, verbose=False, plot=False,
                         strategy=strategy, device=device)  # fmt: skip
    return Trainer(model, data, _loss, cfg)


def one_step(trainer: Any) -> torch.Tensor:
    """One optimizer step; returns the step's logged loss (a host float in a tensor)."""
    trainer.fit(until=trainer.step + 1)
    return torch.tensor(trainer.history[-1]["loss"])


def mirror_worker(rank: int, world: int, port: int, strategy: str, kw: dict[str, int]) -> None:
    """Rank >= 1 of a step-driven group (``benchmarks/bench_train.py``): joins rank 0 (the benchmark process),
    then takes one training step per command broadcast from rank 0 until it receives 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        trainer = make_trainer(strategy, "cpu", **kw)
        cmd = torch.zeros(1, dtype=torch.int64)
        while True:
            dist.broadcast(cmd, 0)
            if int(cmd) == 0:
                break
            one_step(trainer)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(world: int, strategy: str, device: str, kw: dict[str, int]) -> float:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        mp.spawn(_worker, args=(world, _free_port(), out, strategy, device, kw), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)["steps_per_s"]


def run(
    steps: int = 30, warmup: int = 5, width: int = 256, depth: int = 4, batch: int = 64
) -> list[dict[str, Any]]:
    """The rows described in the module docstring: ``{"config", "device", "world", "steps_per_s",
    "vs_single"}``."""
    kw = dict(steps=steps, warmup=warmup, width=width, depth=depth, batch=batch)
    rows: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    single = _time_trainer("none", "cpu", **kw)
    rows.append({"config": "cpu 1 process", "device": "cpu", "world": 1, "steps_per_s": single})
    for strategy in ("ddp", "fsdp"):
        sps = _spawned(2, strategy, "cpu", kw)
        rows.append(
            {"config": f"cpu 2 gloo processes, {strategy}", "device": "cpu", "world": 2, "steps_per_s": sps}
        )
    torch.set_num_threads(threads)
    for r in rows:
        r["vs_single"] = r["steps_per_s"] / single
    if torch.cuda.is_available():
        plain = _time_trainer("none", "cuda", **kw)
        ddp = _spawned(1, "ddp", "cuda", kw)
        name = torch.cuda.get_device_name()
        rows.append(
            {"config": "1 GPU plain", "device": name, "world": 1, "steps_per_s": plain, "vs_single": 1.0}
        )
        rows.append({"config": "1 GPU DDP (nccl)", "device": name, "world": 1, "steps_per_s": ddp,
                     "vs_single": ddp / plain})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)
    rows = run(steps=a.steps, width=a.width, batch=a.batch)
    meta = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()}
    print(
        f"fastgen.train distributed overhead (torch {meta['torch']}, {meta['cpu_count']} CPUs, load {meta['load_avg'][0]:.2f})"
    )
    for r in rows:
        print(f"  {r['config']:<32} {r['steps_per_s']:8.2f} steps/s  {r['vs_single']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
