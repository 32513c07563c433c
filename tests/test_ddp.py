"""Two processes (DDP on gloo) for every strategy on both backbone families (issue 12, report 5): parameters a
configuration never uses (a BERT pooler under mean pooling, frozen or later-unfrozen groups, a teacher) must neither
crash DDP's reducer nor change the result: 2 processes with batch B end where 1 process with batch 2B does."""

import json

import pytest

from conftest import TINY_VIT, assert_same_weights, graft, reviews, tiny_config, weights, write_config
from graft import load_config
from graft import train

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def family_tables(family, tmp_path, bert):
    if family == "hf":
        return {"backbone": {"plugin": "hf", "weights": str(bert), "overrides": NO_DROPOUT},
                "data": {"plugin": "text", "path": str(reviews(tmp_path / "r.jsonl")), "max_length": 16}}
    return {"backbone": dict(TINY_VIT), "data": {"plugin": "digits", "image_size": 8}}


def teacher_run(family, tmp_path, bert):
    conf = tiny_config(**family_tables(family, tmp_path, bert), train={"max_steps": 3})
    train(load_config(conf, where="teacher.toml"), tmp_path / "teacher", echo=lambda m: None)
    return tmp_path / "teacher"


def one_vs_two(tmp_path, conf, batch=8):
    """Weights of 2 processes with ``batch`` and of 1 process with 2 * ``batch``."""
    cfg = write_config(tmp_path / "c.toml", conf)
    two = graft("train", cfg, "--nproc", "2", "--out", tmp_path / "two", "--set", f"train.batch_size={batch}")
    assert two.returncode == 0, two.stderr
    assert "Expected to have finished reduction" not in two.stderr
    graft("train", cfg, "--out", tmp_path / "one", "--set", f"train.batch_size={2 * batch}", check=True)
    return weights(tmp_path / "one"), weights(tmp_path / "two")


@pytest.mark.parametrize("strategy, family", [("finetune", "hf"), ("distill", "hf"), ("distill", "timm")])
def test_two_processes_match_one_for_every_strategy_and_family(tmp_path, tiny_bert, strategy, family):
    tables = family_tables(family, tmp_path, tiny_bert)
    if strategy == "distill":
        tables["strategy"] = {"plugin": "distill", "teacher": str(teacher_run(family, tmp_path, tiny_bert)),
                              "cache_dir": str(tmp_path / "cache")}
        tables["loss"] = {"plugin": "kd", "temperature": 2.0}
    conf = tiny_config(**tables, train={"max_steps": 4, "optimizer": "sgd", "lr": 0.1, "grad_accum": 2})
    one, two = one_vs_two(tmp_path, conf)
    assert_same_weights(one, two, atol=1e-5)
    # the per-example predictions are gathered from both processes: every example once, in order, the same answers
    rows = [[json.loads(x) for x in (tmp_path / n / "predictions" / "test.jsonl").read_text().splitlines()]
            for n in ("one", "two")]
    assert [(r["id"], r["prediction"]) for r in rows[0]] == [(r["id"], r["prediction"]) for r in rows[1]]
    assert len({r["id"] for r in rows[1]}) == len(rows[1]) > 0


def test_two_processes_masked_lm(tmp_path):
    """Masks drawn per example and the loss normalised over the step's masked tokens in all processes: 2 processes
    with batch 4 end where 1 process with batch 8 does."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"the film {i % 7} was good and the movie {i % 5} was bad\n" for i in range(300)))
    conf = {"backbone": {"plugin": "hf", "config": {"model_type": "bert", "vocab_size": 120, "hidden_size": 32,
                                                    "num_hidden_layers": 2, "num_attention_heads": 2,
                                                    "intermediate_size": 64, "max_position_embeddings": 64,
                                                    **NO_DROPOUT}},
            "strategy": {"plugin": "mlm"}, "data": {"plugin": "corpus", "path": str(corpus), "block_size": 32},
            "train": {"max_steps": 4, "progress": False, "plot": False, "grad_accum": 2, "optimizer": "sgd",
                      "lr": 0.5}}
    one, two = one_vs_two(tmp_path, conf, batch=4)
    assert_same_weights(one, two, atol=1e-5)


@pytest.mark.parametrize("family, strategy", [("hf", {"unfreeze_every": 1}), ("timm", {"lp_epochs": 1})])
def test_two_processes_with_a_trainable_set_that_changes(tmp_path, tiny_bert, family, strategy):
    tables = family_tables(family, tmp_path, tiny_bert)
    epochs = 3 if family == "hf" else 2
    data = {**tables["data"], "val_fraction": 0.1, "test_fraction": 0.1} if family == "hf" else \
        {**tables["data"], "train_fraction": 0.1}
    conf = tiny_config(backbone=tables["backbone"], data=data, strategy=strategy,
                       train={"epochs": epochs, "optimizer": "sgd", "lr": 0.05})
    one, two = one_vs_two(tmp_path, conf)
    assert_same_weights(one, two, atol=1e-5)


def test_unused_parameters_keep_their_values_under_adamw_with_accumulation(tmp_path, tiny_bert):
    """The pooler (unused under mean pooling) gets no gradient in either run, so AdamW's decoupled weight decay
    must not touch it in two processes when it does not in one; accumulation (no_sync) and the re-wrap of gradual
    unfreezing, whose second epoch makes the pooler trainable, included."""
    import torch
    from safetensors.torch import load_file

    conf = tiny_config(**family_tables("hf", tmp_path, tiny_bert), strategy={"unfreeze_every": 1},
                       train={"epochs": 3, "grad_accum": 2, "lr": 3e-3})  # AdamW, weight_decay 0.01
    one, two = one_vs_two(tmp_path, conf)
    assert_same_weights(one, two, atol=1e-4)  # AdamW divides by sqrt(v): float noise shows more than with SGD
    pooler = load_file(str(tiny_bert / "model.safetensors"))["pooler.dense.weight"]
    assert torch.equal(one["backbone.model.pooler.dense.weight"], pooler)
    assert torch.equal(two["backbone.model.pooler.dense.weight"], pooler)


def test_two_processes_with_a_lora_adapter(tmp_path, tiny_bert):
    conf = tiny_config(**family_tables("hf", tmp_path, tiny_bert), adapter={"plugin": "lora", "r": 4},
                       train={"max_steps": 4, "optimizer": "sgd", "lr": 0.1, "grad_accum": 2})
    one, two = one_vs_two(tmp_path, conf)
    assert_same_weights(one, two, atol=1e-5)
    assert any("lora_" in k for k in two)


def test_a_tokenizer_trained_on_the_corpus_is_the_same_in_every_process(tmp_path):
    """The WordPiece trainer's threads can order pieces differently per process; a distributed from-scratch run
    must still tokenize alike everywhere."""
    import os
    import subprocess
    import sys

    script = tmp_path / "vocab.py"
    script.write_text(
        "import hashlib, torch.distributed as td\n"
        "from graft.plugins.corpus import train_wordpiece\n"
        "td.init_process_group('gloo')\n"
        "texts = [f'the film {i % 7} was good and the movie {i % 5} was bad {i % 11} times' for i in range(300)]\n"
        "tok = train_wordpiece(texts, 90)\n"
        "digest = hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()\n"
        "seen = [None, None]\n"
        "td.all_gather_object(seen, digest)\n"
        "assert seen[0] == seen[1], seen\n"
        "td.destroy_process_group()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 or "terminate called without an active exception" in proc.stderr, proc.stderr
    assert "AssertionError" not in proc.stderr, proc.stderr
