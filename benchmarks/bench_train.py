"""Benchmark: the distributed training path of ``fastgen.train`` (optimizer steps, scheduler, clipping).

One ``Trainer`` step on one global batch of a small residual MLP (``fastgen.train.bench``), timed per call:

* ``1 process`` (the baseline): ``strategy="none"`` in this process, all of its threads;
* ``ddp x2 gloo`` / ``fsdp x2 gloo`` (CPU): this process is rank 0 of a 2-process gloo group and a spawned
  rank 1 takes the same step on the other half of every batch (each rank with half the threads, so the pair
  uses the cores the single process uses). Each timed call broadcasts one command to rank 1 and runs the
  step on rank 0; the gradient all-reduce (DDP) or reduce-scatter / all-gather (FSDP2) makes rank 0 wait
  for rank 1, so the time is the pair's step time;
* ``ddp x1 nccl`` (GPU): DDP over a 1-rank group against plain training on the same GPU: the cost of the
  wrapper itself.

On one CPU or one GPU this measures the overhead of the distributed machinery, not a scaling result:
speed-ups from several GPUs cannot be measured without several GPUs. The check only asks for a finite
loss (the implementations train different copies of the model for different numbers of steps).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastgen.bench import Case, Impl, main, register
from fastgen.bench.harness import Check
from fastgen.train import bench as TB


def _finite(loss: torch.Tensor) -> Check:
    ok = bool(torch.isfinite(loss).all())
    return Check(ok, None, "" if ok else f"non-finite loss {loss}")


@register("train", "fastgen.train step: 1 process vs 2 gloo processes (DDP, FSDP2); 1-GPU DDP vs plain")
def cases(device: torch.device, quick: bool):
    kw = {"width": 128, "depth": 2, "batch": 32} if quick else {"width": 256, "depth": 4, "batch": 64}
    name = f"MLP w{kw['width']} x{kw['depth']} batch {kw['batch']}"
    if device.type == "cuda":
        plain = TB.make_trainer("none", str(device), **kw)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(TB._free_port()))
        dist.init_process_group("nccl", rank=0, world_size=1)
        try:
            ddp = TB.make_trainer("ddp", str(device), **kw)
            yield Case(f"{name} cuda", [
                Impl("plain", lambda: TB.one_step(plain), baseline=True),
                Impl("fastgen[ddp x1 nccl]", lambda: TB.one_step(ddp)),
            ], check=_finite, params=dict(kw))  # fmt: skip
        finally:
            dist.destroy_process_group()
        return
    single = TB.make_trainer("none", "cpu", **kw)
    threads = torch.get_num_threads()
    cmd = torch.ones(1, dtype=torch.int64)  # 1: take a step, 0: leave the group

    def step_single():
        torch.set_num_threads(threads)  # the baseline gets all of this process's threads
        try:
            return TB.one_step(single)
        finally:
            torch.set_num_threads(max(1, threads // 2))

    for strategy in ("ddp", "fsdp"):
        port = TB._free_port()
        helper = mp.get_context("spawn").Process(
            target=TB.mirror_worker, args=(1, 2, port, strategy, kw), daemon=True
        )
        helper.start()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=0, world_size=2)
        try:
            torch.set_num_threads(max(1, threads // 2))
            pair = TB.make_trainer(strategy, "cpu", **kw)

            def step_pair(pair=pair):
                dist.broadcast(cmd.fill_(1), 0)
                return TB.one_step(pair)

            yield Case(f"{name} cpu {strategy}", [
                Impl("1 process", step_single, baseline=True),
                Impl(f"fastgen[{strategy} x2 gloo]", step_pair),
            ], check=_finite, params=dict(kw, strategy=strategy))  # fmt: skip
        finally:
            dist.broadcast(cmd.fill_(0), 0)
            dist.destroy_process_group()
            helper.join(timeout=10)
            if helper.is_alive():  # it has left the group; do not wait on its interpreter's shutdown
                helper.terminate()
                helper.join(timeout=10)
            torch.set_num_threads(threads)


if __name__ == "__main__":
    raise SystemExit(main(only=["train"]))
