import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastgen.train import (
    FineTuneConfig,
    RandomResizedCropFlip,
    Trainer,
    apply_freeze,
    finetune,
    load_checkpoint,
    lr_multiplier,
    param_groups,
    save_checkpoint,
)


class Net(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(4, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.drop(self.encoder(x)))


def mse_loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def make_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]])).sin() + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def loader(x, y, bs=8, shuffle=True):
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=shuffle)


def cfg(**kw):
    base = dict(max_steps=10, lr=1e-2, progress=False, verbose=False, plot=False)
    base.update(kw)
    return FineTuneConfig(**base)


def test_freeze_patterns_and_summary():
    m = Net()
    frozen = apply_freeze(m, freeze=["encoder.*"], unfreeze=["encoder.3"])
    assert frozen == ["encoder.0.weight", "encoder.0.bias", "encoder.1.weight", "encoder.1.bias"]
    assert m.encoder[3].weight.requires_grad and m.head.weight.requires_grad
    assert not m.encoder[0].weight.requires_grad
    with pytest.raises(ValueError, match="matches no parameter"):
        apply_freeze(Net(), freeze=["encodr.*"])
    m = Net()
    t = Trainer(m, loader(*make_data()), mse_loss, cfg(freeze=["encoder"]))
    s = t.summary
    n_enc = sum(p.numel() for p in m.encoder.parameters())
    assert s["frozen"] == n_enc and s["trainable"] == s["total"] - n_enc
    assert s["modules"]["encoder"] == {"total": n_enc, "trainable": 0}
    assert all(not p.requires_grad for p in m.encoder.parameters())


def test_param_groups_lr_and_no_decay():
    m = Net()
    c = cfg(lr=1e-3, pretrained_lr_scale=0.1, new_params=["head.*"], weight_decay=0.05)
    groups = {g["name"]: g for g in param_groups(m, c)}
    assert set(groups) == {"new/decay", "new/no_decay", "pretrained/decay", "pretrained/no_decay"}
    assert groups["new/decay"]["param_names"] == ["head.weight"]
    assert groups["new/no_decay"]["param_names"] == ["head.bias"]
    assert groups["pretrained/decay"]["param_names"] == ["encoder.0.weight", "encoder.3.weight"]
    # the LayerNorm weight is 1-d and a norm parameter: no decay
    assert "encoder.1.weight" in groups["pretrained/no_decay"]["param_names"]
    assert groups["new/decay"]["lr"] == 1e-3 and groups["pretrained/decay"]["lr"] == pytest.approx(1e-4)
    assert groups["new/decay"]["weight_decay"] == 0.05 and groups["new/no_decay"]["weight_decay"] == 0.0
    t = Trainer(m, loader(*make_data()), mse_loss, c)
    assert {g["name"]: g["lr"] for g in t.optimizer.param_groups} == {k: g["lr"] for k, g in groups.items()}


def test_warmup_cosine_lr_values():
    w, total, r = 5, 25, 0.1
    assert lr_multiplier(0, w, total, r) == pytest.approx(1 / 5)
    assert lr_multiplier(4, w, total, r) == pytest.approx(1.0)
    assert lr_multiplier(5, w, total, r) == pytest.approx(1.0)
    assert lr_multiplier(15, w, total, r) == pytest.approx(r + (1 - r) * 0.5)
    assert lr_multiplier(25, w, total, r) == pytest.approx(r)
    m = Net()
    c = cfg(max_steps=total, warmup_steps=w, min_lr_ratio=r, lr=2e-3, grad_clip=None)
    res = finetune(m, loader(*make_data()), mse_loss, c)
    lrs = [h["lr"] for h in res.history]
    expect = [2e-3 * lr_multiplier(s, w, total, r) for s in range(total)]
    assert lrs == pytest.approx(expect, rel=1e-12)
    assert max(lrs) == pytest.approx(2e-3) and lrs[-1] == pytest.approx(
        2e-3 * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * 19 / 20)))
    )


def test_grad_clipping():
    m = Net()
    x, y = make_data()
    c = cfg(max_steps=1, grad_clip=0.01)
    res = finetune(m, loader(x, 100 * y), mse_loss, c)
    pre = res.history[0]["grad_norm"]
    post = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters()]))
    assert pre > 0.01
    assert float(post) == pytest.approx(0.01, rel=1e-4)


def test_accumulation_equals_big_batch():
    x, y = make_data(32)
    torch.manual_seed(1)
    a = Net()
    b = Net()
    b.load_state_dict(a.state_dict())
    ra = finetune(a, loader(x, y, bs=32, shuffle=False), mse_loss, cfg(max_steps=3, grad_clip=0.5))
    rb = finetune(
        b, loader(x, y, bs=8, shuffle=False), mse_loss, cfg(max_steps=3, grad_clip=0.5, grad_accum=4)
    )
    assert rb.losses == pytest.approx(ra.losses, rel=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_ema_weights():
    m = Net()
    init = {k: v.clone() for k, v in m.state_dict().items()}
    d = 0.9
    t = Trainer(m, loader(*make_data()), mse_loss, cfg(max_steps=3, ema_decay=d))
    expect = dict(init)
    for _ in range(3):
        t.train_step()
        expect = {k: d * expect[k] + (1 - d) * v for k, v in m.state_dict().items()}
    for k, v in t.ema_model.state_dict().items():
        torch.testing.assert_close(v, expect[k], rtol=1e-5, atol=1e-6)
    # validation uses the EMA model
    assert t.eval_model is t.ema_model


def test_early_stopping_restores_best():
    m = Net()
    x, y = make_data()
    calls = []
    metrics = [5.0, 3.0, 1.0, 2.0, 4.0, 0.5, 6.0]

    def metric_fn(model):
        calls.append({k: v.clone() for k, v in model.state_dict().items()})
        return metrics[len(calls) - 1]

    c = cfg(max_steps=100, val_every=2, patience=2, mode="min")
    res = finetune(m, loader(x, y), mse_loss, c, metric_fn=metric_fn)
    assert res.stopped_early and res.steps == 10 and len(calls) == 5
    assert res.best_metric == 1.0 and res.best_step == 6
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, calls[2][k], rtol=0, atol=0)
    # mode="max" with val_data: the metric is the validation loss
    res = finetune(
        Net(), loader(x, y), mse_loss, cfg(max_steps=6, val_every=2, mode="max"), val_data=loader(x, y)
    )
    assert [v["step"] for v in res.val_history] == [2, 4, 6]
    assert res.best_metric == max(v["val_loss"] for v in res.val_history)


def _resume_setup(seed_model: int, out):
    torch.manual_seed(seed_model)
    m = Net(dropout=0.2)
    x, y = make_data(60)
    aug = lambda b: (b[0] + 0.01 * torch.randn_like(b[0]), b[1])
    c = cfg(max_steps=17, warmup_steps=3, grad_accum=2, ema_decay=0.8, val_every=3, patience=50,
            augment=aug, new_params=["head.*"], out_dir=str(out))  # fmt: skip
    return Trainer(m, loader(x, y, bs=7), mse_loss, c, val_data=loader(x, y, bs=30, shuffle=False))


def test_exact_resume(tmp_path):
    torch.manual_seed(0)
    full = _resume_setup(0, tmp_path / "a").fit()
    torch.manual_seed(0)
    t = _resume_setup(0, tmp_path / "b")
    t.fit(until=7)  # mid-epoch (9 micro-batches per epoch, 2 per step)
    path = save_checkpoint(t, str(tmp_path / "ck.pt"))
    torch.manual_seed(1234)  # a fresh model, loader and RNG: everything must come from the checkpoint
    fresh = load_checkpoint(_resume_setup(99, tmp_path / "c"), path)
    resumed = fresh.fit()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in full.history]
    assert resumed.val_history == full.val_history
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema_model.state_dict().values(), resumed.ema_model.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh.optimizer.state_dict()["state"].keys() == t.optimizer.state_dict()["state"].keys()


def test_bf16_autocast_cpu():
    seen = []

    def loss_fn(model, batch):
        x, y = batch
        out = model(x)
        seen.append(out.dtype)
        return F.mse_loss(out.float(), y)

    m = Net()
    res = finetune(m, loader(*make_data()), loss_fn, cfg(max_steps=3, precision="bf16"))
    assert seen == [torch.bfloat16] * 3 and all(math.isfinite(v) for v in res.losses)
    assert m.head.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        FineTuneConfig(precision="fp8")


def test_fp16_grad_scaler_cpu():
    m = Net()
    t = Trainer(m, loader(*make_data()), mse_loss, cfg(max_steps=3, precision="fp16"))
    assert t.scaler.is_enabled()
    res = t.fit()
    assert res.steps == 3 and all(math.isfinite(v) for v in res.losses)


def test_logs_and_png_written(tmp_path):
    x, y = make_data()
    c = cfg(max_steps=8, val_every=4, out_dir=str(tmp_path), plot=True, checkpoint_every=4)
    res = finetune(Net(), loader(x, y), mse_loss, c, val_data=loader(x, y, shuffle=False))
    assert set(res.files) == {"csv", "json", "png"}
    with open(res.files["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {"step", "loss", "lr", "grad_norm", "val_loss"} <= set(rows[0])
    assert rows[3]["val_loss"] != "" and rows[0]["val_loss"] == ""
    with open(res.files["json"]) as f:
        log = json.load(f)
    assert len(log["train"]) == 8 and len(log["val"]) == 2 and log["config"]["max_steps"] == 8
    with open(res.files["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "last.pt").exists()


def test_random_resized_crop_flip_sizes():
    aug = RandomResizedCropFlip(sizes=[8, 12, 16], flip_p=1.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(2, 1, 1, 1)
    seen = set()
    for _ in range(20):
        out, lab = aug((x, torch.tensor([0, 1])))
        seen.add(out.shape[-1])
        assert out.shape[:2] == (2, 1) and lab.tolist() == [0, 1]
    assert seen == {8, 12, 16}
    # full-image crop with flip at the input size = the mirrored image
    same = RandomResizedCropFlip(sizes=[4], flip_p=1.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))(x)
    torch.testing.assert_close(same, x.flip(-1))


def test_errors():
    with pytest.raises(ValueError, match="no trainable"):
        Trainer(Net(), loader(*make_data()), mse_loss, cfg(freeze=["*"]))
    with pytest.raises(ValueError, match="val_data or metric_fn"):
        Trainer(Net(), loader(*make_data()), mse_loss, cfg(patience=2))
    with pytest.raises(ValueError, match="no batches"):
        finetune(Net(), [], mse_loss, cfg())
