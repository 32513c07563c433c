"""The shared loop: accumulation, resume, crash safety, non-finite losses, precision, devices, distributed."""

import json
import os
import signal
import subprocess
import sys
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import (start_train, wait_for_lines, assert_same_records, assert_same_weights, graft, read_metrics,
                      tiny_config, weights, write_config)
from graft import GraftError, Loss
from graft import checkpoint as ckpt
from graft import load_config
from graft.device import select_device
from graft import train
from graft.optim import lr_lambda
from graft.run import Run
from graft.registry import Entry, get_registry


def run(tmp_path, name, **tables):
    conf = load_config(tiny_config(**tables), where=f"{name}.toml")
    out = tmp_path / name
    summary = train(conf, out, echo=lambda m: None)
    return out, summary


def test_run_directory_contents(tmp_path):
    out, summary = run(tmp_path, "r", train={"plot": True})
    for f in ("config.toml", "metrics.jsonl", "summary.json", "model.safetensors", "last.safetensors",
              "curves.png", "labels.json", "checkpoints/latest"):
        assert (out / f).exists(), f
    assert summary["test"]["accuracy"] == json.loads((out / "summary.json").read_text())["test"]["accuracy"]
    assert 'model = "vit_tiny_patch16_224"' in (out / "config.toml").read_text()
    assert 'scheduler = "constant"' in (out / "config.toml").read_text()  # defaults are resolved into it
    splits = {r["split"] for r in read_metrics(out)}
    assert splits == {"train", "val", "test"}
    assert not any(k.startswith(("_orig_mod", "module.")) for k in weights(out, "model.safetensors"))


def test_accumulation_matches_large_batch(tmp_path):
    # SGD keeps the comparison tight: Adam's normalisation amplifies float rounding in near-zero gradients.
    sgd = {"optimizer": "sgd", "lr": 0.1, "max_steps": 3}
    big, _ = run(tmp_path, "big", train={**sgd, "batch_size": 32, "grad_accum": 1})
    acc, _ = run(tmp_path, "acc", train={**sgd, "batch_size": 8, "grad_accum": 4})
    assert_same_weights(weights(big), weights(acc), atol=1e-6)
    one, _ = run(tmp_path, "one", train={**sgd, "batch_size": 8, "grad_accum": 1})
    with pytest.raises(AssertionError):  # the comparison can fail: 3 steps of 8 differ from 3 steps of 32
        assert_same_weights(weights(big), weights(one), atol=1e-6)


def test_sigterm_then_resume_reproduces_uninterrupted_run(tmp_path):
    tables = dict(train={"epochs": 3, "batch_size": 16, "scheduler": "cosine", "warmup_steps": 5},
                  strategy={"dropout": 0.1})  # dropout draws on the RNG, which resume must restore
    cfg = write_config(tmp_path / "c.toml", tiny_config(**tables))
    graft("train", cfg, "--out", tmp_path / "full", check=True)

    proc = start_train(cfg, tmp_path / "cut")
    wait_for_lines(tmp_path / "cut", 40, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Interrupted at step" in err and not (tmp_path / "cut" / "summary.json").exists()
    graft("train", cfg, "--resume", tmp_path / "cut", check=True)

    assert_same_records(read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut"))
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"), atol=1e-6)


def test_sigkill_during_checkpoints_leaves_a_loadable_one(tmp_path):
    cfg = write_config(tmp_path / "c.toml", tiny_config(train={"epochs": 20, "batch_size": 16,
                                                               "checkpoint_every": 1, "keep_checkpoints": 2}))
    out = tmp_path / "run"
    for lines in (15, 40):
        proc = start_train(cfg, out, *(["--resume", str(out)] if (out / "checkpoints").exists() else []))
        wait_for_lines(out, lines, proc)
        time.sleep(0.05 * lines % 0.13)
        proc.kill()
        proc.communicate()
        latest = ckpt.latest(out / "checkpoints")
        model_state, state = ckpt.load_checkpoint(latest)
        assert state["position"]["step"] == int(latest.name.split("-")[1]) and model_state
    proc = graft("train", cfg, "--resume", out, "--set", "train.epochs=1")  # fewer epochs: just finish
    assert proc.returncode == 0, proc.stderr


class NaNAfter(Loss):
    """Cross-entropy that turns NaN from the 6th call on (a test loss)."""

    calls = 0

    def __call__(self, outputs, targets):
        import torch.nn.functional as F

        type(self).calls += 1
        loss = F.cross_entropy(outputs.float(), targets)
        return loss * float("nan") if type(self).calls > 5 else loss


@pytest.fixture
def nan_loss():
    reg = get_registry()
    reg.entries["loss"]["nan_after"] = Entry("loss", "nan_after", NaNAfter, "tests", "NaN after 5 calls")
    NaNAfter.calls = 0
    yield
    del reg.entries["loss"]["nan_after"]


def test_nan_loss_stops_and_keeps_good_checkpoint(tmp_path, nan_loss):
    with pytest.raises(GraftError, match="Non-finite loss"):
        run(tmp_path, "nan", loss={"plugin": "nan_after"}, train={"checkpoint_every": 2, "max_steps": 10})
    latest = ckpt.latest(tmp_path / "nan" / "checkpoints")
    assert latest.name == "step-00000004"
    model_state, _ = ckpt.load_checkpoint(latest)
    assert all(torch.isfinite(v).all() for v in model_state.values())


def test_nan_loss_skip(tmp_path, nan_loss):
    out, summary = run(tmp_path, "skip", loss={"plugin": "nan_after"},
                       train={"on_nan": "skip", "max_steps": 8, "eval_every": 100})
    assert summary["skipped_steps"] == 8 - 5 and summary["steps"] == 8
    assert all(torch.isfinite(v).all() for v in weights(out).values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_cpu(tmp_path, precision):
    conf = load_config(tiny_config(train={"precision": precision}), where="x.toml")
    r = Run(conf)
    x = torch.randn(4, 3, 8, 8)
    with r.autocast():
        out = r.model(x)
    assert out.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    _, summary = run(tmp_path, precision, train={"precision": precision, "max_steps": 10})
    assert summary["test"]["loss"] == pytest.approx(summary["test"]["loss"])  # finite, not NaN
    assert torch.isfinite(torch.tensor(summary["test"]["loss"]))


class OverflowFirst(Loss):
    """Cross-entropy, 1e8 times larger on the first call: the fp16 gradient scaler skips that step, as it usually
    skips a real model's first step (a test loss)."""

    calls = 0

    def __call__(self, outputs, targets):
        import torch.nn.functional as F

        type(self).calls += 1
        return F.cross_entropy(outputs.float(), targets) * (1e8 if type(self).calls == 1 else 1.0)


def test_fp16_with_sgd_trains_like_fp32(tmp_path):
    """Issue 25.8: fp16 + SGD (momentum) with a skipped first step. The old code used torch's fused SGD, whose
    momentum buffers stay uninitialised memory when the GradScaler skips that step: "Non-finite loss at step 3"
    (GraftError blaming the learning rate). The per-tensor SGD trains like fp32."""
    reg = get_registry()
    reg.entries["loss"]["overflow_first"] = Entry("loss", "overflow_first", OverflowFirst, "tests", "")
    try:
        losses = {}
        for precision, loss in (("fp16", "overflow_first"), ("fp32", "cross_entropy")):
            OverflowFirst.calls = 0
            _, summary = run(tmp_path, precision, loss={"plugin": loss},
                             train={"precision": precision, "optimizer": "sgd", "lr": 0.05, "max_steps": 12,
                                    "eval_every": 100})
            losses[precision] = summary["test"]["loss"]
            assert all(torch.isfinite(v).all() for v in weights(tmp_path / precision).values())
    finally:
        del reg.entries["loss"]["overflow_first"]
    # fp16 lost its first step to the scaler (one update fewer) and otherwise trains as fp32 does
    assert losses["fp16"] == pytest.approx(losses["fp32"], abs=0.15), losses


def test_fused_sgd_is_not_given_an_fp16_scaler_that_skips_its_first_step():
    """The torch bug itself, through graft's own optimizer choice: a GradScaler skips SGD's first step and the
    momentum buffers must stay clean. Fails if graft hands fp16 runs the fused SGD while torch's kernel still leaves
    its buffers uninitialised."""
    from graft.config import TrainOptions
    from graft.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    t = TrainOptions(optimizer="sgd", precision="fp16", momentum=0.9, lr=0.1)
    optimizer = build_optimizer(t, [{"params": list(model.parameters())}])
    scaler = torch.amp.GradScaler("cpu")
    junk = [torch.full((1 << 20,), 1e30) for _ in range(4)]  # freed memory full of huge numbers, for empty_like
    del junk
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(torch.randn(8, 16)).float().pow(2).mean() * (1e8 if step == 0 else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    buffers = [s["momentum_buffer"] for s in optimizer.state.values() if s.get("momentum_buffer") is not None]
    assert buffers and all(b.abs().max() < 1e3 for b in buffers)


def test_device_selection():
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(GraftError, match="no CUDA GPU"):
            select_device("cuda")
    with pytest.raises(GraftError, match="not a device name"):
        select_device("gpu0")


def test_schedules_with_warmup():
    conf = load_config(tiny_config(train={"scheduler": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1}), where="x")
    f = lr_lambda(conf.train, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    conf = load_config(tiny_config(train={"scheduler": "linear", "warmup_ratio": 0.5}), where="x")
    f = lr_lambda(conf.train, 100)
    assert f(49) == pytest.approx(1.0) and f(75) == pytest.approx(0.5)


def test_compiled_state_dict_is_saved_without_prefix():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    compiled = torch.compile(m)  # not run: wrapping alone adds the prefix
    outer = torch.nn.ModuleDict({"inner": compiled})
    assert any("_orig_mod." in k for k in outer.state_dict())
    assert set(ckpt.clean_state_dict(outer.state_dict())) == {"inner.0.weight", "inner.0.bias"}
    assert ckpt.unwrap(compiled) is m


def test_two_processes_match_one_with_double_batch(tmp_path):
    tables = dict(train={"max_steps": 4, "batch_size": 8, "eval_every": 2, "optimizer": "sgd", "lr": 0.1})
    cfg = write_config(tmp_path / "c.toml", tiny_config(**tables))
    two = graft("train", cfg, "--nproc", "2", "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    graft("train", cfg, "--set", "train.batch_size=16", "--out", tmp_path / "one", check=True)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-6)
    # evaluation is reduced over both processes: same metrics as one process seeing everything
    val = [[r for r in read_metrics(tmp_path / d) if r["split"] != "train"] for d in ("one", "two")]
    assert val[0]
    assert_same_records(*val, rel=1e-4)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2


def test_early_stopping_with_patience(tmp_path):
    # "max" on a falling loss: the first evaluation is the best, the next one is worse -> stop
    out, summary = run(tmp_path, "es", train={"epochs": 6, "metric": "loss", "metric_mode": "max", "patience": 1})
    assert summary["stopped_early"] and summary["epochs_completed"] == 2
    vals = [r for r in read_metrics(out) if r["split"] == "val"]
    assert len(vals) == 2 and summary["best"] == vals[0]["loss"]
    # model.safetensors holds the best (first) evaluation's weights, last.safetensors the final ones
    assert not torch.equal(weights(out, "model.safetensors")["head.1.weight"], weights(out)["head.1.weight"])


def test_fresh_run_in_a_used_directory_starts_a_fresh_log(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 999, "split": "train", "loss": 1.0}\n')
    conf = load_config(tiny_config(train={"max_steps": 2}), where="x.toml")
    train(conf, out, echo=lambda m: None)
    assert all(r["step"] <= 2 for r in read_metrics(out))


def test_channels_last_cnn(tmp_path):
    conf = load_config(tiny_config(backbone={"plugin": "timm", "model": "test_resnet"}, data={"image_size": 16},
                                   train={"channels_last": True, "max_steps": 2}), where="x.toml")
    r = Run(conf)
    conv = r.model.backbone.model.conv1[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    _, summary = run(tmp_path, "cl", backbone={"plugin": "timm", "model": "test_resnet"}, data={"image_size": 16},
                     train={"channels_last": True, "max_steps": 2})
    assert summary["steps"] == 2


def test_steps_after_the_last_evaluation_are_evaluated(tmp_path):
    out, summary = run(tmp_path, "tail", train={"max_steps": 50})  # one epoch is 40 steps of 32
    vals = [r["step"] for r in read_metrics(out) if r["split"] == "val"]
    assert vals == [40, 50] and summary["steps"] == 50


def test_resume_of_an_early_stopped_run_does_not_train_on(tmp_path):
    conf = load_config(tiny_config(train={"epochs": 6, "metric": "loss", "metric_mode": "max", "patience": 1}),
                       where="x")
    first = train(conf, tmp_path / "r", echo=lambda m: None)
    again = train(conf, tmp_path / "r", resume=True, echo=lambda m: None)
    assert first["stopped_early"] and again["stopped_early"] and again["steps"] == first["steps"]


def test_resume_with_another_batch_layout_is_refused(tmp_path):
    conf = load_config(tiny_config(train={"max_steps": 3}), where="x")
    train(conf, tmp_path / "r", echo=lambda m: None)
    other = load_config(tiny_config(train={"max_steps": 6, "batch_size": 16}), where="x")
    with pytest.raises(GraftError, match="batch_size = 32, this config says batch_size = 16"):
        train(other, tmp_path / "r", resume=True, echo=lambda m: None)


def test_checkpoint_resave_same_step_and_damaged_files(tmp_path):
    d = tmp_path / "ck"
    ckpt.save_checkpoint(d, 5, {"w": torch.ones(2)}, {"position": {"step": 5}}, keep=1)
    ckpt.save_checkpoint(d, 5, {"w": torch.zeros(2)}, {"position": {"step": 5}}, keep=1)
    latest = ckpt.latest(d)
    assert latest.name == "step-00000005" and [p.name for p in d.iterdir() if p.is_dir()] == [latest.name]
    assert torch.equal(ckpt.load_checkpoint(latest)[0]["w"], torch.zeros(2))
    (latest / "model.safetensors").write_bytes((latest / "model.safetensors").read_bytes()[:20])
    with pytest.raises(GraftError, match="unreadable"):
        ckpt.load_checkpoint(latest)


def test_bad_train_values_are_config_errors(tmp_path):
    for key, value in (("clip_grad_norm", -1.0), ("momentum", 1.5), ("betas", [0.9, 1.2])):
        with pytest.raises(GraftError, match=key):
            load_config(tiny_config(train={key: value}), where="x.toml")


def test_optimizer_groups_with_equal_settings_merge_and_older_checkpoints_still_resume(tmp_path, monkeypatch):
    """Issue 27: the six layer-wise groups of a ViT at layer_decay 1 x two decay classes become two optimizer groups
    (ten fewer kernel launches per step); a run checkpointed by the unmerged layout resumes into the merged one and
    ends as an uninterrupted run does."""
    import functools

    import graft.loop
    from graft import Run, load_config
    from graft.optim import build_optimizer

    conf = load_config(tiny_config(train={"epochs": 2, "batch_size": 64, "keep_checkpoints": 3}))
    run = Run(conf)
    opt = build_optimizer(conf.train, run.strategy.param_groups(run.model))
    unmerged = opt.graft_unmerged()
    assert len(opt.param_groups) == 2 and len(unmerged.param_groups) > 2
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for g in unmerged.param_groups for p in g["params"]}
    scaled = load_config(tiny_config(strategy={"layer_decay": 0.8}))
    run = Run(scaled)
    opt = build_optimizer(scaled.train, run.strategy.param_groups(run.model))
    settings = [(g["weight_decay"], g["lr_scale"]) for g in opt.graft_unmerged().param_groups]
    assert len(opt.param_groups) == len(set(settings)) > 2  # layer-wise rates: only the equal ones (last block, head)

    train(conf, tmp_path / "full", echo=lambda m: None)
    with monkeypatch.context() as m:  # the layout of checkpoints written before the merge
        m.setattr(graft.loop, "build_optimizer", functools.partial(build_optimizer, merge=False))
        train(conf, tmp_path / "old", echo=lambda m: None)
    checkpoints = sorted((tmp_path / "old" / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) >= 2
    shutil.rmtree(checkpoints[-1])  # back to the end of epoch 1
    for name in ("summary.json", "last.safetensors"):
        (tmp_path / "old" / name).unlink()
    train(conf, tmp_path / "old", resume=True, echo=lambda m: None)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "old"), atol=1e-6)
