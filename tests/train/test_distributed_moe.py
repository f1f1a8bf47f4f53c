"""GLaM's train_step under expert x data parallelism on a 2-D (dp, ep) mesh, 2 gloo processes: the step
equals the single-process step on the mean of the ranks' losses (each rank its own tokens)."""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastgen.models.glam import GLaM, from_name, train_step
from fastgen.train.distributed import moe_mesh

MESHES = [(1, 2), (2, 1)]  # (dp, ep)


def _setup():
    cfg = from_name("glam-tiny-8e", capacity_factor=None, jitter_eps=0.0)
    torch.manual_seed(0)
    dense = GLaM(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (4, 9), generator=torch.Generator().manual_seed(1))
    return cfg, dense, tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, outdir, meshes):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg, dense, tokens = _setup()
        out = {}
        for dp, ep in meshes:
            mesh = moe_mesh(dp, ep)
            model = GLaM(cfg, process_group=mesh.get_group("ep"))
            model.load_dense_state_dict(dense.state_dict())
            opt = torch.optim.SGD(model.parameters(), lr=1.0)
            n = tokens.shape[0] // world
            train_step(model, tokens[n * rank : n * rank + n], opt, dp_group=mesh.get_group("dp"))
            out[(dp, ep)] = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "world,meshes", [(2, MESHES), pytest.param(4, [(2, 2)], marks=pytest.mark.slow, id="4-2x2")]
)
def test_glam_train_step_expert_x_data_parallel_equals_single_process(world, meshes):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, _free_port(), d, meshes), nprocs=world, join=True)
        res = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]
    cfg, dense, tokens = _setup()
    opt = torch.optim.SGD(dense.parameters(), lr=1.0)
    opt.zero_grad()
    n = tokens.shape[0] // world
    for r in range(world):  # the objective: the mean of the ranks' losses (GShard groups)
        _, loss, _ = dense(tokens[n * r : n * r + n, :-1], tokens[n * r : n * r + n, 1:])
        (loss / world).backward()
    opt.step()
    want = dense.state_dict()
    for dp, ep in meshes:
        el = cfg.num_experts // ep
        for r in range(world):
            lo = (r % ep) * el  # mesh rank r = dp_index * ep + ep_index
            for k, v in res[r][(dp, ep)].items():
                w = want[k][lo : lo + el] if ".moe.w" in k or ".moe.b" in k else want[k]
                torch.testing.assert_close(v, w, atol=1e-5, rtol=1e-5, msg=f"{dp}x{ep} rank {r}: {k}")
