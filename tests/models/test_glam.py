"""GLaM: forward / loss / router statistics, KV-cache generation == recomputation, backends, expert
parallelism (2 processes over gloo) == the single-process model, errors, parameter counts."""

import math
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastgen
from fastgen.models.glam import GLaM, GLaMConfig, from_name, train_step

PRESETS = ["glam-tiny", "glam-tiny-8e"]


def _model(name="glam-tiny", **overrides):
    torch.manual_seed(0)
    return GLaM(from_name(name, **overrides))


def _tokens(cfg, b=2, s=12, seed=1):
    return torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", PRESETS)
def test_forward_backward_aux_loss_and_router_grads(name):
    model = _model(name)
    cfg = model.config
    tokens = _tokens(cfg, s=13)
    logits, loss, info = model(tokens[:, :-1], tokens[:, 1:])
    assert logits.shape == (2, 12, cfg.vocab_size) and torch.isfinite(logits).all()
    n_moe = len(cfg.moe_layers())
    assert info["moe_layers"] == cfg.moe_layers() and n_moe == cfg.n_layers // 2
    assert info["expert_counts"].shape == (n_moe, cfg.num_experts)
    assert (info["expert_counts"].sum(1) == 2 * 24).all()  # policy "all": 2 assignments per token
    assert (
        info["dropped"].shape == (n_moe,)
        and info["capacity"] == [math.ceil(1.25 * 24 * 2 / cfg.num_experts)] * n_moe
    )
    assert info["aux_loss"] > 0
    torch.testing.assert_close(loss, info["lm_loss"] + info["aux_loss"])
    loss.backward()
    for moe in model.moe_layers():
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
        assert moe.w1.grad.abs().sum() > 0
    # the aux loss alone reaches the routers too (it is part of the loss, not just reported)
    model.zero_grad()
    model(tokens)[2]["aux_loss"].backward()
    assert all(m.router.weight.grad.abs().sum() > 0 for m in model.moe_layers())
    assert model.tok_emb.weight.grad is None or model.tok_emb.weight.grad.abs().sum() > 0


def test_no_targets_ignore_index_and_eval_capacity():
    model = _model()
    tokens = _tokens(model.config)
    logits, loss, info = model(tokens)
    assert loss is None and info["lm_loss"] is None
    targets = tokens.clone()
    targets[:, :6] = -100
    _, loss, info = model(tokens, targets)
    ref = torch.nn.functional.cross_entropy(logits[:, 6:].flatten(0, 1), tokens[:, 6:].flatten())
    torch.testing.assert_close(info["lm_loss"], ref)
    model.eval()  # eval_capacity_factor=None: dropless
    _, _, info = model(tokens)
    assert info["capacity"] == [None] and int(info["dropped"].sum()) == 0


def test_moe_parity_and_layer_placement():
    cfg = from_name("glam-tiny", n_layers=5)
    assert cfg.moe_layers() == [1, 3]
    assert from_name("glam-tiny", n_layers=5, moe_offset=0).moe_layers() == [0, 2, 4]
    assert from_name("glam-tiny", n_layers=6, moe_every=3, moe_offset=2).moe_layers() == [2, 5]
    model = GLaM(from_name("glam-tiny", n_layers=3, moe_offset=0))
    assert [b.moe is not None for b in model.blocks] == [True, False, True]
    assert [b.mlp is not None for b in model.blocks] == [False, True, False]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_kv_cache_generation_equals_recomputation(name, mode):
    model = _model(name)
    prompt = _tokens(model.config, b=3, s=5)
    kw = dict(temperature=0.0) if mode == "greedy" else dict(temperature=0.9, top_k=20, top_p=0.95, seed=7)
    out, logits = model.generate(prompt, 10, output_logits=True, **kw)
    ref, ref_logits = model.generate(prompt, 10, output_logits=True, use_cache=False, **kw)
    assert out.shape == (3, 15) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, ref)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    # every step's logits are the full forward's at that position (eval mode: dropless routing)
    model.eval()
    full = model(out[:, :-1])[0][:, 4:]
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
    assert model.training is False
    model.train()
    model.generate(prompt, 2, temperature=0)
    assert model.training  # generate restores the mode
    if mode == "sampled":
        again = model.generate(prompt, 10, **kw)
        assert torch.equal(again, out)


def test_eos_stops_generation():
    model = _model().eval()
    prompt = _tokens(model.config, b=2, s=4)
    first = model.generate(prompt, 1, temperature=0)[:, -1]
    out = model.generate(prompt, 8, temperature=0, eos_id=int(first[0]))
    row = out[0, 4:]
    assert (row == first[0]).all()  # row 0 emits eos at once and then only eos
    if int(first[1]) == int(first[0]):
        assert out.shape[1] == 5  # every row done after one step
    assert model.generate(prompt, 0).shape == (2, 4)


@pytest.mark.parametrize("name", PRESETS)
def test_backends_and_plain_torch_agree(name):
    model = _model(name)
    tokens = _tokens(model.config)
    logits, loss, _ = model(tokens, tokens)
    with fastgen.use_backend("torch"):
        logits_t, loss_t, _ = model(tokens, tokens)
    torch.testing.assert_close(logits_t, logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(loss_t, loss, atol=2e-5, rtol=1e-5)
    model.impl = "torch"  # F.scaled_dot_product_attention + the expert loop
    logits_p, loss_p, _ = model(tokens, tokens)
    torch.testing.assert_close(logits_p, logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(loss_p, loss, atol=2e-5, rtol=1e-5)
    prompt = tokens[:, :4]
    plain = model.generate(prompt, 6, temperature=0)
    model.impl = "fastgen"
    assert torch.equal(plain, model.generate(prompt, 6, temperature=0))


def test_train_step_lowers_the_loss():
    model = _model("glam-tiny-8e")
    batch = _tokens(model.config, b=4, s=17)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stats = [train_step(model, batch, opt, max_grad_norm=1.0) for _ in range(8)]
    assert stats[-1]["loss"] < stats[0]["loss"] - 0.5
    assert set(stats[0]) == {"loss", "lm_loss", "aux_loss", "dropped"}


def test_errors():
    model = _model()
    cfg = model.config
    with pytest.raises(ValueError, match="more than max_seq_len = 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 97\), got values in \[0, 97\]"):
        model(torch.tensor([[0, 97]]))
    with pytest.raises(ValueError, match="got values in"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="batch, seq"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must have the shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must lie"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), cfg.vocab_size))
    with pytest.raises(ValueError, match="> max_seq_len"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), 2, top_p=0.0)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        GLaMConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="norm must be one of"):
        from_name("glam-tiny", norm="batchnorm")
    with pytest.raises(ValueError, match="moe_offset"):
        from_name("glam-tiny", moe_offset=2)
    with pytest.raises(ValueError, match="unknown preset"):
        from_name("glam-huge")


@pytest.mark.parametrize("name", [*PRESETS, "glam-tiny-swiglu-bias"])
def test_param_count_matches_the_module(name):
    cfg = from_name("glam-tiny", activation="swiglu", bias=True) if name.endswith("bias") else from_name(name)
    model = GLaM(cfg)
    counts = model.param_count()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[-1] in ("w1", "w2", "b1", "b2")
                  and ".moe." in n)  # fmt: skip
    assert counts["experts"] == experts
    per_expert = experts // (cfg.num_experts * len(cfg.moe_layers()))
    assert counts["activated"] == counts["total"] - experts + 2 * per_expert * len(cfg.moe_layers())


def test_param_count_paper_sizes():
    """Table 4 of the paper: 0.1B/64E has 1.9B total, 1.7B/64E 27B, 8B/64E 143B (activated: non-embedding)."""
    for name, total, act in (("glam-0.1b-64e", 1.9e9, 0.1e9), ("glam-1.7b-64e", 27e9, 1.7e9),
                             ("glam-8b-64e", 143e9, 8.7e9)):  # fmt: skip
        c = from_name(name).param_count()
        assert abs(c["total"] / total - 1) < 0.1, (name, c)
        assert abs(c["activated_non_embedding"] / act - 1) < 0.15, (name, c)


# ---- expert parallelism: 2 processes over gloo, equal to the single-process model ---------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ep_worker(rank, world, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = from_name("glam-tiny-8e", capacity_factor=None)
        torch.manual_seed(0)
        dense = GLaM(cfg)
        ep = GLaM(cfg, process_group=dist.group.WORLD)
        ep.load_dense_state_dict(dense.state_dict())
        tokens = _tokens(cfg, b=2 * world, s=11)[2 * rank : 2 * rank + 2]  # each rank its own batch
        logits, loss, info = ep(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        out = ep.generate(tokens[:, :4], 5, temperature=0.8, seed=3)
        grads = {n: p.grad for n, p in ep.named_parameters() if ".moe." in n}
        torch.save({"tokens": tokens, "logits": logits.detach(), "loss": loss.detach(), "grads": grads,
                    "counts": info["expert_counts"], "generated": out,
                    "local": ep.blocks[1].moe.num_local_experts},
                   os.path.join(outdir, f"rank{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_expert_parallel_equals_single_process():
    world = 2
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_ep_worker, args=(world, _free_port(), outdir), nprocs=world, join=True)
        res = [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)]
    dense = _model("glam-tiny-8e", capacity_factor=None)
    grads = {}
    for r in range(world):
        assert res[r]["local"] == 4
        dense.zero_grad()
        tokens = res[r]["tokens"]
        logits, loss, info = dense(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.testing.assert_close(res[r]["logits"], logits.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res[r]["loss"], loss.detach(), atol=1e-5, rtol=1e-5)
        assert torch.equal(res[r]["counts"], info["expert_counts"])
        assert torch.equal(res[r]["generated"], dense.generate(tokens[:, :4], 5, temperature=0.8, seed=3))
        for n, p in dense.named_parameters():
            if ".moe." in n:
                grads[n] = grads.get(n, 0) + p.grad
    for r in range(world):  # rank r holds experts [4r, 4r + 4) of each MoE layer and the full router
        for n, g in res[r]["grads"].items():
            if n.endswith("router.weight"):  # replicated: summed over ranks, as DDP would
                got, want = sum(res[q]["grads"][n] for q in range(world)), grads[n]
            else:
                got, want = g, grads[n][4 * r : 4 * r + 4]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
