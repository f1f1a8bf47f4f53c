"""fastgen.train under torch.distributed: 2 gloo processes on CPU (spawned from pytest) against one
process over the same global batches. The model is float64, so the only difference between the runs is
the order of a few float64 additions (all-reduce of 2 shards vs one batch): oracles hold to 1e-12."""

import os
import socket
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from fastgen.train import CheckpointError, FineTuneConfig, Trainer
from fastgen.train.distributed import shard_batch

TOL = dict(rtol=1e-10, atol=1e-12)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(2))
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(self.norm(x))


def _loss(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def _recording_loss(seen):
    def loss(model, batch):
        seen.append(batch[0].clone())
        return _loss(model, batch)

    return loss


def _poisoned_loss(rank):
    calls = []

    def loss(model, batch):
        calls.append(1)
        x = batch[0].clone()
        if rank == 1 and len(calls) == 3:  # step 2, first micro-batch
            x[0, 0] = float("nan")
        return _loss(model, (x, batch[1]))

    return loss


def _trainer(strategy, world_rank=0, loss=_loss, **kw):
    """Identical model and data on every rank; the RNG after construction differs per rank on purpose
    (the trainer must broadcast rank 0's, or the ranks would shuffle differently)."""
    torch.manual_seed(0)
    model = Net().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 6, generator=g, dtype=torch.float64), torch.randn(24, 3, generator=g).double()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)
    val = [(x[:4] * 0.5, y[:4]), (x[4:8] * 0.5, y[4:8])]
    torch.manual_seed(1000 + world_rank)
    cfg = dict(max_steps=5, lr=0.05, grad_accum=2, warmup_steps=1, grad_clip=0.5, val_every=2, patience=10,
               progress=False, verbose=False, plot=False, strategy=strategy)  # fmt: skip
    cfg.update(kw)
    return Trainer(model, data, loss, FineTuneConfig(**cfg), val_data=val)


def _full_state(trainer):
    out = {}
    for k, v in trainer.model.state_dict().items():
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return out


def _record(trainer):
    return {"model": _full_state(trainer), "losses": trainer.losses if hasattr(trainer, "losses") else
            [h["loss"] for h in trainer.history], "val": [v["metric"] for v in trainer.val_history]}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        out, seen, reductions = {}, [], []
        t = _trainer(None, rank, loss=_recording_loss(seen))  # strategy None: DDP under a process group
        assert t.strategy == "ddp"

        def counting_hook(state, bucket):
            reductions.append(1)
            return allreduce_hook(dist.group.WORLD, bucket)

        t.ddp.register_comm_hook(None, counting_hook)
        t.fit(until=2)
        t.save_checkpoint(os.path.join(outdir, "ddp_step2"))
        t.fit()
        out["ddp"] = _record(t)
        out["seen"], out["reductions"] = seen, len(reductions)
        t = _trainer("ddp", rank)  # same world size: exact resume
        t.load_checkpoint(os.path.join(outdir, "ddp_step2"))
        t.fit()
        out["ddp_resumed"] = _record(t)
        t = _trainer("ddp", rank)  # 1 -> 2: the single-process checkpoint
        t.load_checkpoint(os.path.join(outdir, "single_step2"))
        t.fit()
        out["from_single"] = _record(t)
        t = _trainer("fsdp", rank)
        assert t.fsdp_blocks == ["blocks.0", "blocks.1"]
        t.fit(until=2)
        t.save_checkpoint(os.path.join(outdir, "fsdp_step2"))
        t.fit()
        out["fsdp"] = _record(t)
        t = _trainer("fsdp", rank, precision="bf16", max_steps=2, val_every=0)  # MixedPrecisionPolicy
        t.fit()
        out["fsdp_bf16"] = _record(t)
        # a NaN in rank 1's half of one batch: every rank skips that step, none diverges or hangs
        t = _trainer("ddp", rank, loss=_poisoned_loss(rank), on_nonfinite="skip", val_every=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            t.fit()
        out["skip"] = dict(_record(t), skipped=[h.get("skipped", 0.0) for h in t.history])
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp_equal_single_process_and_resume_across_world_sizes():
    seen = []
    single = _trainer("none", loss=_recording_loss(seen))
    single.fit(until=2)
    ref2 = _record(single)
    with tempfile.TemporaryDirectory() as d:
        single.save_checkpoint(os.path.join(d, "single_step2"), format="dcp")
        single.fit()
        ref = _record(single)
        mp.spawn(_worker, args=(2, _free_port(), d), nprocs=2, join=True)
        res = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]
        resumed = {}
        for name in ("ddp_step2", "fsdp_step2"):  # 2 -> 1
            t = _trainer("none")
            t.load_checkpoint(os.path.join(d, name))
            t.fit()
            resumed[name] = _record(t)
    # every micro-batch (train and val) is split over the ranks: distinct rows, the single run's batch
    assert len(res[0]["seen"]) == len(res[1]["seen"]) == len(seen)
    for a, b, want in zip(res[0]["seen"], res[1]["seen"], seen):
        assert a.shape[0] == b.shape[0] == want.shape[0] // 2 and torch.equal(torch.cat([a, b]), want)
    assert (
        res[0]["reductions"] == 5
    )  # grad_accum=2: one all-reduce per step (no_sync on the first micro-step)
    for run in ("ddp", "ddp_resumed", "from_single", "fsdp"):
        for k, v in ref["model"].items():
            assert torch.equal(res[0][run]["model"][k], res[1][run]["model"][k]), (run, k)  # ranks agree
            torch.testing.assert_close(res[0][run]["model"][k], v, **TOL, msg=f"{run}: {k}")
        assert res[0][run]["losses"] == pytest.approx(ref["losses"], rel=1e-10), run
        assert res[0][run]["val"] == pytest.approx(ref["val"], rel=1e-10), run
    for r in range(2):
        assert res[r]["skip"]["skipped"] == [0.0, 1.0, 0.0, 0.0, 0.0], r
        for k, v in res[0]["skip"]["model"].items():
            assert torch.isfinite(v).all() and torch.equal(res[1]["skip"]["model"][k], v)
        assert len(res[r]["fsdp_bf16"]["losses"]) == 2
        for k, v in res[0]["fsdp_bf16"]["model"].items():
            assert v.dtype == torch.float64 and torch.equal(res[1]["fsdp_bf16"]["model"][k], v)
            torch.testing.assert_close(v, ref2["model"][k], atol=0.02, rtol=0)  # bf16 compute, 2 steps
    for k in ref["model"]:
        assert torch.equal(res[0]["ddp_resumed"]["model"][k], res[0]["ddp"]["model"][k])  # exact resume
    for name, r in resumed.items():
        for k, v in ref["model"].items():
            torch.testing.assert_close(r["model"][k], v, **TOL, msg=f"{name} -> 1 process: {k}")
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-10), name


# ---- single process: DCP format, sharding and argument checks -------------------------------------------


def test_dcp_checkpoint_single_process_exact_resume_and_corruption(tmp_path):
    full = _trainer("none", ema_decay=0.9)
    full.fit()
    t = _trainer("none", ema_decay=0.9)
    t.fit(until=3)
    path = t.save_checkpoint(str(tmp_path / "ck"), format="dcp")
    assert os.path.isdir(path) and not os.path.exists(path + ".tmp")
    again = t.save_checkpoint(path, format="dcp")  # over an existing checkpoint: replaced whole
    u = _trainer("none", ema_decay=0.9)
    u.load_checkpoint(again)
    u.fit()
    for k, v in _full_state(full).items():
        assert torch.equal(_full_state(u)[k], v), k
        assert torch.equal(u.ema_model.state_dict()[k], full.ema_model.state_dict()[k]), k
    assert u.best_step == full.best_step and u.best_metric == full.best_metric
    assert [h["loss"] for h in u.history] == [h["loss"] for h in full.history]
    shard = next(f for f in sorted(os.listdir(path)) if f.endswith(".distcp"))
    with open(os.path.join(path, shard), "r+b") as f:  # one flipped byte
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    fresh = _trainer("none")
    before = _full_state(fresh)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        fresh.load_checkpoint(path)
    assert all(torch.equal(v, before[k]) for k, v in _full_state(fresh).items()) and not fresh.optimizer.state
    os.remove(os.path.join(path, "fastgen_trainer.pt"))
    with pytest.raises(CheckpointError, match="not a fastgen DCP checkpoint"):
        fresh.load_checkpoint(path)


def test_dcp_checkpoint_refuses_another_model(tmp_path):
    t = _trainer("none")
    t.fit(until=1)
    path = t.save_checkpoint(str(tmp_path / "ck"), format="dcp")
    net = Net().double()
    net.head = nn.Linear(6, 4).double()  # another head width, same names
    data = [(torch.zeros(4, 6).double(), torch.zeros(4, 4).double())]
    other = Trainer(net, data, _loss, FineTuneConfig(progress=False, verbose=False))
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"model\.head\.weight: checkpoint \(3, 6\) vs \(4, 6\)"):
        other.load_checkpoint(path)
    assert not other.optimizer.state and other.step == 0  # untouched
    assert all(torch.equal(v, before[k]) for k, v in other.model.state_dict().items())


def test_shard_batch_and_strategy_errors():
    x, y = torch.arange(12).view(6, 2), torch.arange(6)
    a, b = shard_batch({"x": x, "y": (y, "tag")}, 1, 2)["x"], shard_batch((x, y), 1, 3)
    assert torch.equal(a, x[3:]) and torch.equal(b[0], x[2:4]) and torch.equal(b[1], y[2:4])
    with pytest.raises(ValueError, match="6 rows cannot be split evenly over 4 ranks"):
        shard_batch(x, 0, 4)
    with pytest.raises(ValueError, match="strategy must be one of"):
        FineTuneConfig(strategy="deepspeed")
    with pytest.raises(ValueError, match=r"needs a torch\.distributed process group"):
        _trainer("ddp")
    with pytest.raises(ValueError, match="format must be"):
        _trainer("none").save_checkpoint("x", format="safetensors")


@pytest.mark.slow
def test_bench_rows():
    from fastgen.train.bench import run

    rows = run(steps=2, warmup=1, width=16, depth=1, batch=8)
    assert [r["world"] for r in rows[:3]] == [1, 2, 2] and all(r["steps_per_s"] > 0 for r in rows)


def test_distributed_sampler_gets_the_epoch():
    """Rank-specific data (shard_data=False): a DistributedSampler is told each epoch, also on resume."""
    ds = torch.utils.data.TensorDataset(torch.randn(16, 6).double(), torch.randn(16, 3).double())
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=3)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler)  # 2 batches per epoch
    torch.manual_seed(0)
    t = Trainer(Net().double(), dl, _loss, FineTuneConfig(max_steps=5, progress=False, verbose=False))
    t.fit(until=3)
    sd = t.state_dict()
    assert sampler.epoch == 1 and t.epoch == 1
    t.fit()
    assert sampler.epoch == 2
    t.load_state_dict(sd)
    t.fit()  # replays epoch 1's order
    assert sampler.epoch == 2 and t.step == 5


def _gpu_worker(rank, world, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        out = {}
        for strategy, kw in (("ddp", {}), ("fsdp", {"precision": "bf16"})):
            t = _trainer(strategy, rank, device="cuda", max_steps=3, **kw)
            t.fit(until=2)
            t.save_checkpoint(os.path.join(outdir, f"{strategy}_step2"))
            t.fit()
            u = _trainer(strategy, rank, device="cuda", max_steps=3, **kw)
            u.load_checkpoint(os.path.join(outdir, f"{strategy}_step2"))
            u.fit()
            out[strategy] = (_record(t), _record(u))
        torch.save(out, os.path.join(outdir, f"gpu{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_gpu_nccl_ddp_and_fsdp_bf16_one_process():
    """One GPU: a 1-rank nccl group (DDP equals plain exactly; FSDP2 with bf16 compute), DCP resume exact."""
    plain = _trainer("none", device="cuda", max_steps=3)
    plain.fit()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_gpu_worker, args=(1, _free_port(), d), nprocs=1, join=True)
        res = torch.load(os.path.join(d, "gpu0.pt"))
    for strategy, (full, resumed) in res.items():
        for k, v in full["model"].items():
            assert torch.equal(resumed["model"][k], v), (strategy, k)
            if strategy == "ddp":
                assert torch.equal(v.cpu(), plain.model.state_dict()[k].cpu()), k
            else:
                torch.testing.assert_close(v.cpu(), plain.model.state_dict()[k].cpu(), atol=0.02, rtol=0)
