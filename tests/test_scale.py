"""Scale (issue 16): gradient checkpointing gives the same loss and gradients while keeping fewer activations."""

import json

import pytest
import torch

from conftest import TINY_VIT, tiny_config
from test_clm import gpt2_config
from test_user_files import assert_bad_input, cli_run
from graft import load_config
from graft.run import Run


def step(conf, checkpointing):
    """(loss, {name: grad}, bytes of tensors autograd kept for backward) of one training step's first batch."""
    conf = {**conf, "train": {**conf["train"], "gradient_checkpointing": checkpointing}}
    run = Run(load_config(conf, where="c.toml"))
    run.model.train()
    batch = next(iter(run.loader("train", train=True)))
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run.strategy.training_step(run.model, batch)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
    return loss.item(), grads, sum(kept)


@pytest.mark.parametrize("family", ["hf", "timm"])
def test_gradient_checkpointing_same_step_less_memory(family, tmp_path):
    if family == "hf":
        corpus = tmp_path / "c.txt"
        corpus.write_text("".join(f"the film number {i % 9} was good and the movie {i % 4} was bad\n"
                                  for i in range(200)))
        conf = gpt2_config(corpus)
        conf["backbone"]["config"].update(n_layer=4)
    else:
        vit = {**TINY_VIT, "model_kwargs": {**TINY_VIT["model_kwargs"], "depth": 4}}
        conf = tiny_config(backbone=vit, train={"batch_size": 64})
    plain_loss, plain_grads, plain_kept = step(conf, False)
    ckpt_loss, ckpt_grads, ckpt_kept = step(conf, True)
    assert abs(plain_loss - ckpt_loss) <= 1e-6
    assert plain_grads.keys() == ckpt_grads.keys()
    assert max((plain_grads[k] - ckpt_grads[k]).abs().max().item() for k in plain_grads) <= 1e-6
    assert ckpt_kept < plain_kept / 2, (ckpt_kept, plain_kept)


def test_gradient_checkpointing_on_a_model_without_it(tmp_path):
    from conftest import write_config

    conf = tiny_config(backbone={"plugin": "timm", "model": "coat_lite_tiny"},
                       train={"max_steps": 1, "gradient_checkpointing": True})
    cfg = write_config(tmp_path / "c.toml", conf)
    assert_bad_input(*cli_run("train", cfg, "--out", tmp_path / "run"), "gradient_checkpointing",
                     "coat_lite_tiny", "Set it to false")


def test_two_nodes_on_localhost_match_one_process(tmp_path):
    """2 nodes x 1 process through torchrun's c10d rendezvous (the multi-node command line of the README, both
    nodes on this machine) end where 1 process with the same global batch does."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import assert_same_weights, graft, weights, write_config

    conf = tiny_config(train={"max_steps": 4, "optimizer": "sgd", "lr": 0.1, "batch_size": 8})
    cfg = write_config(tmp_path / "c.toml", conf)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=graft-test",
                               f"--rdzv-conf=is_host={'true' if node == 0 else 'false'}",
                               "-m", "graft.cli", "train", str(cfg), "--out", str(tmp_path / "two")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in range(2)]
    for p in nodes:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    summary = (tmp_path / "two" / "summary.json").read_text()
    assert '"world_size": 2' in summary
    graft("train", cfg, "--out", tmp_path / "one", "--set", "train.batch_size=16", check=True)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-5)


# -- FSDP2 on CPU (gloo) -----------------------------------------------------------------------------------------
def fsdp_tables(family, tmp_path, tiny_bert):
    from test_ddp import family_tables

    tables = family_tables(family, tmp_path, tiny_bert)
    if family == "hf":  # LoRA: a frozen base with trainable adapter matrices inside the sharded layers
        tables["adapter"] = {"plugin": "lora", "r": 4}
    return tables


def two_process_losses(cfg, out, *extra):
    from conftest import graft, read_metrics

    proc = graft("train", cfg, "--nproc", "2", "--out", out, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r["loss"] for r in read_metrics(out) if r["split"] == "train"], proc


@pytest.mark.parametrize("family, optimizer, weights_atol", [("timm", "sgd", 1e-5), ("hf", "adamw", 2e-3)])
def test_fsdp_matches_ddp_over_20_steps(family, optimizer, weights_atol, tmp_path, tiny_bert):
    """The same losses to 1e-5. With SGD the weights agree as closely; AdamW divides each update by the root of
    its second moment, which turns last-bit differences of tiny gradients (DDP's all-reduce and FSDP's
    reduce-scatter add in different orders) into visible ones, so its weights are compared loosely."""
    from conftest import assert_same_weights, weights, write_config

    conf = tiny_config(**fsdp_tables(family, tmp_path, tiny_bert),
                       train={"max_steps": 20, "batch_size": 8, "lr": 0.1 if optimizer == "sgd" else 3e-3,
                              "optimizer": optimizer, "log_every": 1, "grad_accum": 2, "clip_grad_norm": 1.0,
                              "eval_every": 10})
    cfg = write_config(tmp_path / "c.toml", conf)
    ddp, _ = two_process_losses(cfg, tmp_path / "ddp")
    fsdp, proc = two_process_losses(cfg, tmp_path / "fsdp", "--set", "train.parallel=fsdp")
    assert "FSDP: 2 processes" in proc.stdout + proc.stderr
    assert len(ddp) == len(fsdp) == 20
    assert max(abs(a - b) for a, b in zip(ddp, fsdp)) <= 1e-5, list(zip(ddp, fsdp))
    assert_same_weights(weights(tmp_path / "ddp"), weights(tmp_path / "fsdp"), atol=weights_atol)
    assert (tmp_path / "fsdp" / "backbone").is_dir()  # the exports come from the whole model
    if family == "hf":
        assert (tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors").is_file()


def test_fsdp_checkpoint_resumes_on_one_process(tmp_path):
    """A sharded checkpoint of 2 processes (torch.distributed.checkpoint) continues on 1 process with the same
    global batch, and ends where the 2-process run did."""
    import shutil

    from conftest import assert_same_weights, graft, weights, write_config
    from graft import checkpoint as ckpt

    conf = tiny_config(train={"max_steps": 10, "batch_size": 8, "checkpoint_every": 5, "keep_checkpoints": 2,
                              "parallel": "fsdp", "optimizer": "sgd", "lr": 0.1})
    cfg = write_config(tmp_path / "c.toml", conf)
    two_process_losses(cfg, tmp_path / "two")
    step5 = tmp_path / "two" / "checkpoints" / "step-00000005"
    assert (step5 / "dcp" / ".metadata").is_file() and not (step5 / "model.safetensors").exists()
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "two", cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000010")  # as if killed between steps 5 and 10
    (cut / "checkpoints" / "latest").write_text("step-00000005\n")
    proc = graft("train", cfg, "--resume", cut, "--set", "train.batch_size=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(weights(tmp_path / "two"), weights(cut), atol=1e-5)
    assert ckpt.latest(cut / "checkpoints").name == "step-00000010"


def test_sigkill_during_sharded_checkpoints_leaves_a_loadable_one(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import graft, wait_for_lines, write_config
    from graft import checkpoint as ckpt

    conf = tiny_config(train={"epochs": 40, "batch_size": 16, "checkpoint_every": 1, "keep_checkpoints": 2,
                              "parallel": "fsdp"})
    cfg = write_config(tmp_path / "c.toml", conf)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "graft.cli", "train", str(cfg), "--nproc", "2", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_lines(out, 6, proc, timeout=120)
    time.sleep(0.37)
    # the launcher and both workers (torchrun starts them in sessions of their own), wherever they are in a save
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if str(out).encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    proc.communicate(timeout=60)
    latest = ckpt.latest(out / "checkpoints")
    model_state, state = ckpt.load_checkpoint(latest)
    assert model_state is None and (latest / "dcp" / ".metadata").is_file()
    assert state["position"]["step"] == int(latest.name.split("-")[1])
    step = state["position"]["step"]
    done = graft("train", cfg, "--nproc", "2", "--resume", out, "--set", f"train.max_steps={step + 2}", "--set",
                 "train.checkpoint_every=0")  # two more steps from the surviving checkpoint, then finish
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 2


def test_fsdp_with_gradual_unfreezing_matches_one_process(tmp_path, tiny_bert):
    """Layers thaw one per epoch: the sharded parameters start taking gradients mid-run, as in DDP."""
    from conftest import assert_same_weights
    from test_ddp import family_tables, one_vs_two

    tables = family_tables("hf", tmp_path, tiny_bert)
    data = {**tables["data"], "val_fraction": 0.1, "test_fraction": 0.1}
    conf = tiny_config(backbone=tables["backbone"], data=data, strategy={"unfreeze_every": 1},
                       train={"epochs": 3, "optimizer": "sgd", "lr": 0.05, "parallel": "fsdp"})
    one, two = one_vs_two(tmp_path, conf)
    assert_same_weights(one, two, atol=1e-5)
