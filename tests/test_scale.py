"""Scale (issue 16): gradient checkpointing gives the same loss and gradients while keeping fewer activations."""

import pytest
import torch

from conftest import TINY_VIT, tiny_config
from test_clm import gpt2_config
from test_user_files import assert_bad_input, cli_run
from graft.config import resolve
from graft.run import Run


def step(conf, checkpointing):
    """(loss, {name: grad}, bytes of tensors autograd kept for backward) of one training step's first batch."""
    conf = {**conf, "train": {**conf["train"], "gradient_checkpointing": checkpointing}}
    run = Run(resolve(conf, "c.toml"))
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
