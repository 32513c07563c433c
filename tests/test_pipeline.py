"""Pipelines (issue 17): stages from one file, references to earlier stages, skipping and resuming by stage."""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import assert_same_records, assert_same_weights, read_metrics, reviews, wait_for_lines, weights
from test_user_files import assert_bad_input, cli_run

BERT = 'config = { model_type = "bert", vocab_size = 60, hidden_size = 32, num_hidden_layers = 2, ' \
       'num_attention_heads = 2, intermediate_size = 64, max_position_embeddings = 64, hidden_dropout_prob = 0.0, ' \
       'attention_probs_dropout_prob = 0.0 }'


def pipeline_file(tmp_path, finetune_steps=12, extra=""):
    data = reviews(tmp_path / "r.jsonl", n=160)
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(json.loads(x)["text"] + "\n" for x in data.read_text().splitlines()))
    text = f"""
[pipeline]
out = "{tmp_path / 'runs'}"

[[stage]]
name = "adapt"
set = ["train.max_steps=6"]
[stage.backbone]
plugin = "hf"
{BERT}
[stage.strategy]
plugin = "mlm"
[stage.data]
plugin = "corpus"
path = "{corpus}"
block_size = 16
[stage.train]
batch_size = 8
progress = false
plot = false

[[stage]]
name = "finetune"
[stage.backbone]
plugin = "hf"
weights = "@adapt"
[stage.strategy]
plugin = "finetune"
[stage.data]
plugin = "text"
path = "{data}"
max_length = 16
[stage.train]
max_steps = {finetune_steps}
batch_size = 8
eval_every = 4
checkpoint_every = 1
log_every = 1
optimizer = "sgd"
lr = 0.1
progress = false
plot = false

[[stage]]
name = "distill"
[stage.backbone]
plugin = "hf"
weights = "@adapt"
overrides = {{ num_hidden_layers = 1 }}
[stage.strategy]
plugin = "distill"
teacher = "@finetune"
cache = "off"
[stage.loss]
plugin = "kd"
[stage.data]
plugin = "text"
path = "{data}"
max_length = 16
[stage.train]
max_steps = 6
batch_size = 8
progress = false
plot = false
{extra}"""
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


def test_a_pipeline_runs_its_stages_in_order_and_skips_finished_ones(tmp_path):
    path = pipeline_file(tmp_path)
    code, out = cli_run("pipeline", path)
    assert code == 0, out
    runs = tmp_path / "runs"
    for name in ("adapt", "finetune", "distill"):
        assert (runs / name / "summary.json").is_file()
    # the references became run directories: the fine-tune started from the adapted encoder, the student learned
    # from the fine-tuned run, and the student is the smaller model
    ft = (runs / "finetune" / "config.toml").read_text()
    assert str(runs / "adapt") in ft and str(runs / "finetune") in (runs / "distill" / "config.toml").read_text()
    rep = json.loads((runs / "pipeline.json").read_text())
    assert [r["stage"] for r in rep["stages"]] == ["adapt", "finetune", "distill"]
    assert rep["stages"][2]["parameters"]["total"] < rep["stages"][1]["parameters"]["total"]
    assert "STAGE" in out and "distill" in out and (runs / "pipeline.png").is_file()
    stamp = {n: (runs / n / "summary.json").stat().st_mtime_ns for n in ("adapt", "finetune", "distill")}
    code, out = cli_run("pipeline", path)
    assert code == 0 and out.count("up to date") == 3, out
    # a changed stage runs again, and so does the one that uses it; the one before it does not
    path.write_text(path.read_text().replace("max_steps = 12", "max_steps = 8"))
    code, out = cli_run("pipeline", path)
    assert code == 0, out
    after = {n: (runs / n / "summary.json").stat().st_mtime_ns for n in stamp}
    assert after["adapt"] == stamp["adapt"] and after["finetune"] != stamp["finetune"]
    assert after["distill"] != stamp["distill"]
    assert json.loads((runs / "finetune" / "summary.json").read_text())["steps"] == 8


def test_killed_in_stage_two_the_rerun_resumes_it_and_ends_like_an_uninterrupted_pipeline(tmp_path):
    from conftest import graft

    # every run with one thread, as the killed process: another thread count adds in another order
    whole = tmp_path / "whole"
    whole.mkdir()
    graft("pipeline", pipeline_file(whole, finetune_steps=40), check=True)
    cut = tmp_path / "cut"
    cut.mkdir()
    path = pipeline_file(cut, finetune_steps=40)
    proc = subprocess.Popen([sys.executable, "-m", "graft.cli", "pipeline", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_lines(cut / "runs" / "finetune", 15, proc, timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    adapt_time = (cut / "runs" / "adapt" / "summary.json").stat().st_mtime_ns
    assert not (cut / "runs" / "finetune" / "summary.json").exists()
    out = graft("pipeline", path, check=True).stdout
    assert "[adapt] up to date" in out and "[finetune] resuming" in out
    assert (cut / "runs" / "adapt" / "summary.json").stat().st_mtime_ns == adapt_time
    for name in ("finetune", "distill"):
        assert_same_weights(weights(whole / "runs" / name), weights(cut / "runs" / name), atol=1e-6)
    ignore = {"samples_per_s"}
    a = [{k: v for k, v in r.items() if k not in ignore} for r in read_metrics(whole / "runs" / "finetune")]
    b = [{k: v for k, v in r.items() if k not in ignore} for r in read_metrics(cut / "runs" / "finetune")]
    assert_same_records(a, b)


@pytest.mark.parametrize("change, bad, hint", [
    ('weights = "@adapt"', 'weights = "@adpt"', 'Did you mean "adapt"'),
    ('weights = "@adapt"', 'weights = "@distill"', "comes later"),
    ('teacher = "@finetune"', 'teacher = "@distill"', "refers to the stage itself"),
])
def test_bad_references_stop_before_anything_runs(tmp_path, change, bad, hint):
    path = pipeline_file(tmp_path)
    path.write_text(path.read_text().replace(change, bad, 1))
    assert_bad_input(*cli_run("pipeline", path), str(path), hint)
    assert not (tmp_path / "runs").exists()


def test_dry_run_from_and_only(tmp_path):
    path = pipeline_file(tmp_path)
    code, out = cli_run("pipeline", path, "--dry-run")
    assert code == 0 and "# stage adapt: run" in out and "# stage distill: run" in out and "(uses adapt, finetune)" in out
    assert not (tmp_path / "runs").exists()
    assert_bad_input(*cli_run("pipeline", path, "--only", "distill"), "'adapt', 'finetune' not finished")
    assert_bad_input(*cli_run("pipeline", path, "--from", "fine"), "no such stage", "finetune")
    assert cli_run("pipeline", path)[0] == 0
    stamp = (tmp_path / "runs" / "adapt" / "summary.json").stat().st_mtime_ns
    code, out = cli_run("pipeline", path, "--only", "distill")
    assert code == 0 and "[distill] training" in out and "[finetune]" not in out, out
    assert (tmp_path / "runs" / "adapt" / "summary.json").stat().st_mtime_ns == stamp


def test_a_folder_the_pipeline_did_not_write_is_never_replaced(tmp_path):
    path = pipeline_file(tmp_path)
    mine = tmp_path / "runs" / "finetune"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my own run")
    assert_bad_input(*cli_run("pipeline", path), str(mine), "not written by a pipeline")
    assert (mine / "notes.txt").read_text() == "my own run" and not (tmp_path / "runs" / "adapt").exists()
