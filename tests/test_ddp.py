"""Two processes (DDP on gloo) for every strategy on both backbone families (issue 12, report 5): parameters a
configuration never uses (a BERT pooler under mean pooling, frozen or later-unfrozen groups, a teacher) must neither
crash DDP's reducer nor change the result: 2 processes with batch B end where 1 process with batch 2B does."""

import pytest

from conftest import TINY_VIT, assert_same_weights, graft, reviews, tiny_config, weights, write_config
from graft.config import resolve
from graft.loop import train

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def family_tables(family, tmp_path, bert):
    if family == "hf":
        return {"backbone": {"plugin": "hf", "weights": str(bert), "overrides": NO_DROPOUT},
                "data": {"plugin": "text", "path": str(reviews(tmp_path / "r.jsonl")), "max_length": 16}}
    return {"backbone": dict(TINY_VIT), "data": {"plugin": "digits", "image_size": 8}}


def teacher_run(family, tmp_path, bert):
    conf = tiny_config(**family_tables(family, tmp_path, bert), train={"max_steps": 3})
    train(resolve(conf, "teacher.toml"), tmp_path / "teacher", echo=lambda m: None)
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


def test_two_processes_masked_lm(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"the film {i % 7} was good and the movie {i % 5} was bad\n" for i in range(300)))
    conf = {"backbone": {"plugin": "hf", "config": {"model_type": "bert", "vocab_size": 120, "hidden_size": 32,
                                                    "num_hidden_layers": 2, "num_attention_heads": 2,
                                                    "intermediate_size": 64, "max_position_embeddings": 64}},
            "strategy": {"plugin": "mlm"}, "data": {"plugin": "corpus", "path": str(corpus), "block_size": 32},
            "train": {"max_steps": 4, "batch_size": 4, "progress": False, "plot": False, "grad_accum": 2}}
    two = graft("train", write_config(tmp_path / "m.toml", conf), "--nproc", "2", "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr  # masks are drawn per process, so no 1-process comparison here


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
