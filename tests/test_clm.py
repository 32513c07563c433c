"""Causal language models (issue 15, first part): next-token training of an hf decoder, the loss normalised over
the whole optimizer step, perplexity, and graft generate."""

import json

import pytest

from conftest import assert_same_weights, one_step_weights, read_metrics, tiny_config, write_config
from test_user_files import assert_bad_input, cli_run
from graft.config import resolve
from graft.loop import train

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("".join(f"the film number {i % 9} was good and the movie {i % 4} was very bad\n"
                            for i in range(400)))
    return path


def gpt2_config(corpus, **train_options):
    return {"backbone": {"plugin": "hf", "config": {"model_type": "gpt2", "vocab_size": 120, "n_embd": 32,
                                                    "n_layer": 2, "n_head": 2, "n_positions": 64, **NO_DROPOUT}},
            "strategy": {"plugin": "clm"},
            "data": {"plugin": "corpus", "path": str(corpus), "block_size": 32, "val_fraction": 0.1},
            "train": {"max_steps": 40, "batch_size": 8, "lr": 3e-3, "eval_every": 20, "eval_at_start": True,
                      "progress": False, "plot": False, "log_every": 5, **train_options}}


def test_clm_from_scratch_lowers_held_out_perplexity_and_generates(corpus, tmp_path):
    summary = train(resolve(gpt2_config(corpus), "c.toml"), tmp_path / "run", echo=lambda m: None)
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
    summary = train(resolve(conf, "c.toml"), tmp_path / "run", echo=lambda m: None)
    assert 0 < summary["parameters"]["trainable"] < summary["parameters"]["total"] / 2
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    code, out = cli_run("generate", tmp_path / "run", "the film", "--max-new-tokens", "3", "--json")
    assert code == 0, out
