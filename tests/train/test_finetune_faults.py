"""Faults of the fine-tuning loop: non-finite losses / gradients, corrupt, truncated or mismatched
checkpoints, and crash-safe checkpoint writes."""

import math
import os
import re
import stat
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastgen.train import CheckpointError, FineTuneConfig, Trainer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.ReLU())
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.encoder(x))


def mse_loss(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def make_data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return x, x[:, :1].sin() + 0.1 * torch.randn(n, 1, generator=g)


def loader(x, y, bs=8, shuffle=True):
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=shuffle)


def cfg(**kw):
    return FineTuneConfig(**{"lr": 1e-2, "progress": False, "verbose": False, "plot": False, **kw})


def _snapshot(t):
    return {
        "model": {k: v.clone() for k, v in t.model.state_dict().items()},
        "ema": {k: v.clone() for k, v in t.ema_model.state_dict().items()} if t.ema_model is not None else {},
        "opt": {
            (i, k): v.clone()
            for i, s in t.optimizer.state_dict()["state"].items()
            for k, v in s.items()
            if isinstance(v, torch.Tensor)
        },
        "step": t.step,
    }


def _assert_unchanged(t, snap):
    now = _snapshot(t)
    assert now["step"] == snap["step"]
    for part in ("model", "ema", "opt"):
        assert now[part].keys() == snap[part].keys(), part
        for k, v in snap[part].items():
            assert torch.equal(now[part][k], v), (part, k)


def _bad_data(kind):
    """64 rows in 8 batches of 8 (no shuffling); row 10 (in the second batch) is poisoned."""
    x, y = make_data()
    if kind == "inf_input":
        x[10, 1] = float("inf")
    elif kind == "nan_target":
        y[10, 0] = float("nan")
    return loader(x, y, shuffle=False)


def _nan_grad_loss(model, batch):
    # finite loss, NaN gradient: d sqrt(u) / du = inf at u = 0, times a zero chain factor
    out = model(batch[0])
    return F.mse_loss(out, batch[1]) + torch.sqrt(((out - out.detach()) ** 2).sum())


@pytest.mark.parametrize(
    "kind, what",
    [("inf_input", "loss"), ("nan_target", "loss"), ("nan_grad", "gradient norm")],
)
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_nonfinite_raises_before_the_step(kind, what, grad_accum):
    data = _bad_data(kind)
    loss_fn = mse_loss
    if kind == "nan_grad":
        calls = []

        def loss_fn(model, batch):
            calls.append(1)
            return _nan_grad_loss(model, batch) if len(calls) == 2 else mse_loss(model, batch)

    t = Trainer(Net(), data, loss_fn, cfg(max_steps=8, ema_decay=0.5, grad_accum=grad_accum))
    if grad_accum == 1:
        t.train_step()  # the poisoned micro-batch comes in the second step
    snap = _snapshot(t)
    step = t.step + 1
    with pytest.raises(FloatingPointError, match=rf"non-finite {what} \((nan|inf)\) at step {step}\b"):
        t.fit()
    _assert_unchanged(t, snap)
    assert all(torch.isfinite(p).all() for p in [*t.model.parameters(), *t.ema_model.parameters()])


def test_nonfinite_skip_leaves_weights_and_ema_untouched():
    t = Trainer(
        Net(), _bad_data("nan_target"), mse_loss, cfg(max_steps=4, ema_decay=0.5, on_nonfinite="skip")
    )
    t.train_step()
    snap = _snapshot(t)
    with pytest.warns(RuntimeWarning, match="skipped step 2: non-finite loss"):
        row = t.train_step()
    assert row["skipped"] == 1.0 and math.isnan(row["loss"]) and t.skipped_steps == 1
    snap["step"] += 1  # a skipped step counts as a step
    _assert_unchanged(t, snap)
    res = t.fit()
    assert res.steps == 4 and res.skipped_steps == 1
    assert [("skipped" in h) for h in res.history] == [False, True, False, False]
    assert all(math.isfinite(h["loss"]) for i, h in enumerate(res.history) if i != 1)
    assert all(torch.isfinite(p).all() for p in [*t.model.parameters(), *t.ema_model.parameters()])
    assert not torch.equal(t.model.head.weight, snap["model"]["head.weight"])  # training went on


def test_too_many_consecutive_skips_raise():
    x, y = make_data()
    y[::8] = float("nan")  # every batch
    t = Trainer(Net(), loader(x, y, shuffle=False), mse_loss,
                cfg(max_steps=10, on_nonfinite="skip", max_consecutive_skips=2))  # fmt: skip
    snap = _snapshot(t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(FloatingPointError, match=r"3 consecutive steps skipped.*max_consecutive_skips=2"):
            t.fit()
    snap["step"] = 2
    _assert_unchanged(t, snap)
    with pytest.raises(ValueError, match="on_nonfinite"):
        cfg(on_nonfinite="ignore")


def test_fp16_keeps_grad_scaler_skips_but_raises_on_nonfinite_loss():
    m = Net()
    hook = m.head.weight.register_hook(lambda g: g * float("inf"))
    t = Trainer(m, loader(*make_data()), mse_loss, cfg(max_steps=3, precision="fp16"))
    scale = t.scaler.get_scale()
    snap = _snapshot(t)
    row = t.train_step()  # inf gradient under fp16: the scaler skips and lowers the scale, no error
    assert row["skipped"] == 1.0 and t.scaler.get_scale() < scale
    snap["step"] = 1
    _assert_unchanged(t, snap)
    hook.remove()
    t.train_step()
    assert not torch.equal(m.head.weight, snap["model"]["head.weight"])
    t = Trainer(Net(), _bad_data("nan_target"), mse_loss, cfg(max_steps=3, precision="fp16"))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        t.fit()
    assert t.step == 1


@pytest.mark.parametrize(
    "mode, metrics, best", [("min", [math.nan, 2.0, 1.0], 1.0), ("max", [math.nan, 1.0, 2.0], 2.0)]
)
def test_nan_validation_metric_is_never_the_best(mode, metrics, best):
    it = iter(metrics)
    t = Trainer(Net(), loader(*make_data()), mse_loss, cfg(max_steps=3, val_every=1, mode=mode, patience=5),
                metric_fn=lambda m: next(it))  # fmt: skip
    with pytest.warns(RuntimeWarning, match="validation metric is NaN at step 1"):
        res = t.fit()
    assert (res.best_metric, res.best_step) == (best, 3)
    assert math.isnan(res.val_history[0]["best"]) and t.bad_evals == 0


# ---- checkpoints --------------------------------------------------------------------------------


def _trainer(model=None, **kw):
    return Trainer(model or Net(), loader(*make_data()), mse_loss, cfg(max_steps=4, **kw))


def test_bit_flip_in_weights_is_detected(tmp_path):
    t = _trainer()
    with torch.no_grad():  # distinctive values, so that their bytes occur once in the file
        t.model.head.weight.copy_(torch.arange(1, 17, dtype=torch.float32).reshape(1, 16) / 7 + 100)
    path = t.save_checkpoint(str(tmp_path / "ck.pt"))
    raw = bytearray(Path(path).read_bytes())
    needle = t.model.head.weight.detach().numpy().tobytes()
    at = raw.find(needle)
    assert at >= 0 and raw.find(needle, at + 1) < 0
    fresh = _trainer()
    fresh.load_checkpoint(path)  # the intact file loads
    assert torch.equal(fresh.model.head.weight, t.model.head.weight)
    raw[at + 21] ^= 0x04  # one bit in the mantissa of head.weight[5]
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(raw))
    fresh = _trainer()
    snap = _snapshot(fresh)
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(bad))}.*checksum mismatch in model/head\.weight\b"
    ):
        fresh.load_checkpoint(str(bad))
    _assert_unchanged(fresh, snap)


class WideHead(Net):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 2)


@pytest.mark.parametrize(
    "saved_kw, load_kw, match",
    [
        ({}, {"model": "wide"}, r"model\.head\.weight: checkpoint \(1, 16\) vs \(2, 16\)"),
        ({"freeze": ["encoder.0"]}, {}, "trainable parameters differ"),
        ({}, {"ema_decay": 0.9}, "EMA: off in the checkpoint, on here"),
        ({}, {"precision": "fp16"}, "no GradScaler state"),
    ],
    ids=["model", "freeze", "ema", "precision"],
)
def test_mismatched_checkpoint_changes_nothing(tmp_path, saved_kw, load_kw, match):
    src = _trainer(**saved_kw)
    src.fit(until=2)
    path = src.save_checkpoint(str(tmp_path / "ck.pt"))
    wide = load_kw.pop("model", None) == "wide"
    dst = _trainer(WideHead() if wide else None, **load_kw)
    if wide:
        dst.loss_fn = lambda m, b: F.mse_loss(m(b[0])[:, :1], b[1])
    dst.train_step()  # optimizer state exists, so that a half restore would show
    snap = _snapshot(dst)
    with pytest.raises(
        CheckpointError, match=rf"(?s){re.escape(str(tmp_path))}.*nothing was loaded.*{match}"
    ):
        dst.load_checkpoint(path)
    _assert_unchanged(dst, snap)


def test_optimizer_state_of_wrong_shape_changes_nothing(tmp_path):
    src = _trainer()
    src.fit(until=2)
    sd = src.state_dict()
    sd["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
    sd["rng"] = {"torch": sd["rng"]["torch"]}  # restored last: failing there would leave a half restore
    dst = _trainer()
    dst.train_step()
    snap = _snapshot(dst)
    shape = r"exp_avg of encoder\.0\.weight: checkpoint \(3,\) vs \(16, 4\)"
    with pytest.raises(CheckpointError, match=shape) as e:
        dst.load_state_dict(sd)
    assert "rng: not an RNG state" in str(e.value)
    _assert_unchanged(dst, snap)


def test_unreadable_files_name_the_path(tmp_path):
    t = _trainer()
    good = t.save_checkpoint(str(tmp_path / "good.pt"))
    raw = Path(good).read_bytes()
    cases = {"truncated.pt": raw[: len(raw) // 2], "garbage.pt": b"not a checkpoint" * 10, "empty.pt": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    for name in [*cases, "other.pt"]:
        with pytest.raises(CheckpointError, match=rf"load_checkpoint: .*{re.escape(str(tmp_path / name))}"):
            _trainer().load_checkpoint(str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        _trainer().load_checkpoint(str(tmp_path / "missing.pt"))


def test_checkpoint_without_checksum_from_older_version_loads(tmp_path):
    t = _trainer()
    t.fit(until=2)
    sd = t.state_dict()
    sd["version"] = 1
    del sd["param_names"], sd["nonfinite"]
    torch.save(sd, tmp_path / "v1.pt")
    fresh = _trainer()
    with pytest.warns(UserWarning, match="no checksum"):
        fresh.load_checkpoint(str(tmp_path / "v1.pt"))
    assert fresh.step == 2 and torch.equal(fresh.model.head.weight, t.model.head.weight)
    sd["version"] = 2  # a current file must carry its checksum
    torch.save(sd, tmp_path / "v2.pt")
    with pytest.raises(CheckpointError, match="checksum entry is missing"):
        _trainer().load_checkpoint(str(tmp_path / "v2.pt"))


def test_atomic_save_fsyncs_cleans_stale_tmp_and_survives_a_failed_write(tmp_path, monkeypatch):
    t = _trainer()
    path = str(tmp_path / "ck.pt")
    stale = ["ck.pt.tmp", "ck.pt.4242.0123abcd.tmp"]
    keep = ["ck.pt.notes.tmp", "other.pt.tmp", "ck.pt"]
    for name in stale + keep:
        (tmp_path / name).write_bytes(b"x")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_mode), real_fsync(fd))[1])
    t.save_checkpoint(path)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
    assert any(stat.S_ISREG(m) for m in synced) and any(stat.S_ISDIR(m) for m in synced)
    good = Path(path).read_bytes()

    real_save = torch.save

    def failing_save(obj, f, *a, **kw):
        f.write(b"partial")
        raise RuntimeError("disk full")

    t.train_step()
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        t.save_checkpoint(path)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == sorted(keep) and Path(path).read_bytes() == good


def test_save_refuses_nonfinite_weights(tmp_path):
    t = _trainer(ema_decay=0.9)
    path = t.save_checkpoint(str(tmp_path / "ck.pt"))
    good = Path(path).read_bytes()
    with torch.no_grad():
        t.ema_model.head.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"ema parameters \['head\.bias'\].*was not written"):
        t.save_checkpoint(path)
    assert Path(path).read_bytes() == good
