"""Causal language models (issue 15, first part): next-token training of an hf decoder, the loss normalised over
the whole optimizer step, perplexity, and graft generate."""

import json

import pytest

from conftest import assert_same_weights, one_step_weights, read_metrics, tiny_config, write_config
from test_user_files import assert_bad_input, cli_run
from graft import load_config
from graft import train

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("".join(f"the film number {i % 9} was good and the movie {i % 4} was very bad\n"
                            for i in range(400)))
    return path


def gpt2_config(corpus, **train_options):
    return {"backbone": {"plugin": "hf", "config": {"model_type": "gpt2", "vocab_size": 300, "n_embd": 32,
                                                    "n_layer": 2, "n_head": 2, "n_positions": 64, **NO_DROPOUT}},
            "strategy": {"plugin": "clm"},
            "data": {"plugin": "corpus", "path": str(corpus), "block_size": 32, "val_fraction": 0.1},
            "train": {"max_steps": 40, "batch_size": 8, "lr": 3e-3, "eval_every": 20, "eval_at_start": True,
                      "progress": False, "plot": False, "log_every": 5, **train_options}}


def test_clm_from_scratch_lowers_held_out_perplexity_and_generates(corpus, tmp_path):
    summary = train(load_config(gpt2_config(corpus), where="c.toml"), tmp_path / "run", echo=lambda m: None)
    val = [r for r in read_metrics(tmp_path / "run") if r["split"] == "val"]
    assert val[0]["perplexity"] > 50 and val[-1]["perplexity"] < val[0]["perplexity"] / 4, val
    assert summary["metric"] == "perplexity" and (tmp_path / "run" / "lm" / "config.json").is_file()
    code, out = cli_run("generate", tmp_path / "run", "the film", "--max-new-tokens", "5", "--json")
    assert code == 0, out
    assert json.loads(out.splitlines()[-1])["text"].strip()
    code, out = cli_run("generate", tmp_path / "run", "the movie", "--max-new-tokens", "4", "--temperature", "0.8")
    assert code == 0 and out.strip(), out
    assert_bad_input(*cli_run("generate", tmp_path / "run", "   "), "prompt is empty")


def test_generate_on_a_run_that_is_not_a_language_model(tmp_path):
    cfg = write_config(tmp_path / "c.toml", tiny_config(train={"max_steps": 1}))
    assert cli_run("train", cfg, "--out", tmp_path / "run")[0] == 0
    assert_bad_input(*cli_run("generate", tmp_path / "run", "hello"), "does not generate", "clm")


def test_clm_accumulation_matches_the_large_batch(corpus, tmp_path):
    def conf(batch, accum):
        return gpt2_config(corpus, max_steps=1, batch_size=batch, grad_accum=accum, optimizer="sgd", lr=0.5,
                           eval_at_start=False)

    big, acc, half = one_step_weights(conf, tmp_path, (6, 1), (3, 2), (3, 1))
    assert_same_weights(big, acc, atol=1e-6)
    with pytest.raises(AssertionError):  # the comparison can fail: half the batch is another update
        assert_same_weights(big, half, atol=1e-6)


def test_clm_with_a_lora_adapter(corpus, tmp_path):
    conf = gpt2_config(corpus, max_steps=3, eval_at_start=False)
    conf["adapter"] = {"plugin": "lora", "r": 4}  # GPT-2's default target: the attention's c_attn (a Conv1D)
    summary = train(load_config(conf, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    assert 0 < summary["parameters"]["trainable"] < summary["parameters"]["total"] / 2
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    code, out = cli_run("generate", tmp_path / "run", "the film", "--max-new-tokens", "3", "--json")
    assert code == 0, out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A finished clm run (tiny GPT-2 from scratch, its own byte-level BPE tokenizer)."""
    tmp = tmp_path_factory.mktemp("teacher")
    path = tmp / "c.txt"
    path.write_text("".join(f"the film number {i % 9} was good and the movie {i % 4} was very bad\n"
                            for i in range(400)))
    train(load_config(gpt2_config(path, max_steps=20, eval_at_start=False), where="t.toml"), tmp / "run",
          echo=lambda m: None)
    return tmp / "run", path


def kd_config(teacher_run, corpus, alpha, **backbone):
    conf = gpt2_config(corpus, max_steps=3, eval_at_start=False, log_every=1, lr=1e-3)
    conf["backbone"] = backbone or {"plugin": "hf", "weights": str(teacher_run)}
    conf["strategy"]["teacher"] = str(teacher_run)
    conf["loss"] = {"plugin": "kd", "alpha": alpha, "temperature": 2.0}
    return conf


def test_decoder_distillation_compares_next_token_distributions(teacher, tmp_path):
    """A student that starts as the teacher has nothing to learn from the soft targets (KL 0) but the hard loss
    is the usual next-token cross-entropy; a smaller student with the teacher's tokenizer trains."""
    run, corpus = teacher
    losses = {}
    for alpha in (1.0, 0.0):
        train(load_config(kd_config(run, corpus, alpha), where="k.toml"), tmp_path / f"a{alpha}", echo=lambda m: None)
        losses[alpha] = [r["loss"] for r in read_metrics(tmp_path / f"a{alpha}") if r["split"] == "train"][0]
    assert losses[1.0] < 1e-5 < 0.3 < losses[0.0], losses
    small = {"plugin": "hf", "config": {"model_type": "gpt2", "vocab_size": 300, "n_embd": 16, "n_layer": 1,
                                        "n_head": 2, "n_positions": 64}, "tokenizer": str(run)}
    conf = kd_config(run, corpus, 0.5, **small)
    conf["train"].update(max_steps=30, eval_every=30, eval_at_start=True)
    train(load_config(conf, where="k.toml"), tmp_path / "student", echo=lambda m: None)
    val = [r for r in read_metrics(tmp_path / "student") if r["split"] == "val"]
    assert val[-1]["perplexity"] < val[0]["perplexity"] / 2, val


def test_decoder_distillation_refuses_another_vocabulary(teacher, tmp_path):
    run, corpus = teacher
    own = {"plugin": "hf", "config": {"model_type": "gpt2", "vocab_size": 280, "n_embd": 16, "n_layer": 1,
                                      "n_head": 2, "n_positions": 64}}  # trains its own 90-token tokenizer
    cfg = write_config(tmp_path / "k.toml", kd_config(run, corpus, 0.5, **own))
    assert_bad_input(*cli_run("train", cfg, "--out", tmp_path / "r"), "another vocabulary", "tokenizer = ")


def test_decoder_distillation_bad_tables(teacher, tmp_path):
    run, corpus = teacher
    no_kd = kd_config(run, corpus, 0.5)
    del no_kd["loss"]
    assert_bad_input(*cli_run("train", write_config(tmp_path / "a.toml", no_kd), "--out", tmp_path / "a"),
                     "soft-target loss", "plugin = \"kd\"")
    no_teacher = kd_config(run, corpus, 0.5)
    del no_teacher["strategy"]["teacher"]
    assert_bad_input(*cli_run("train", write_config(tmp_path / "b.toml", no_teacher), "--out", tmp_path / "b"),
                     "[loss] plugin = 'kd'", "teacher")
    finetune = tmp_path / "ft"
    assert cli_run("train", write_config(tmp_path / "f.toml", tiny_config(train={"max_steps": 1})), "--out",
                   finetune)[0] == 0
    wrong = kd_config(finetune, corpus, 0.5)
    wrong["backbone"] = {"plugin": "hf", "weights": str(run)}
    assert_bad_input(*cli_run("train", write_config(tmp_path / "c.toml", wrong), "--out", tmp_path / "c"),
                     "is a 'finetune' run", "causal language model's run (clm, preference)")
