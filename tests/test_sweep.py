"""Issue 19, ``graft sweep``: Optuna over any config keys, pruning from the loop's validations, each trial a run
directory, the study in SQLite so that a killed sweep continues."""

import json
import signal
import time

import pytest

from conftest import graft, tiny_config, write_config
from graft.config import load
from graft.loop import train

optuna = pytest.importorskip("optuna")

SPACE = """
[train.lr]
distribution = "log-uniform"
low = 1e-4
high = 3e-2

[loss.label_smoothing]
distribution = "uniform"
low = 0.0
high = 0.2
"""


def _files(tmp_path, **train_options):
    conf = tiny_config(train={"epochs": 2, "eval_every": 10, **train_options})
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    return write_config(tmp_path / "c.toml", conf), space


def test_eight_trials_prune_and_the_best_reproduces_alone(tmp_path):
    from graft.sweep import sweep

    config, space = _files(tmp_path)
    result = sweep(config, space, 8, tmp_path / "sweep", echo=lambda m: None)
    states = [t["state"] for t in result["trials"]]
    assert len(states) == 8 and states.count("PRUNED") >= 1 and states.count("COMPLETE") >= 3
    pruned = next(t for t in result["trials"] if t["state"] == "PRUNED")
    summary = json.loads((tmp_path / "sweep" / f"trial-{pruned['number']:03d}" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] < 80  # ended at a validation, like early stopping
    best = result["best"]
    assert best["value"] == max(t["value"] for t in result["trials"] if t["state"] == "COMPLETE")
    alone = train(load(best["config"]), tmp_path / "alone", echo=lambda m: None)
    assert alone["best"] == pytest.approx(best["value"], abs=1e-9)
    trial_conf = load(best["config"])
    assert trial_conf.train.lr == pytest.approx(best["params"]["train.lr"])
    assert trial_conf.plugins["loss"].options.label_smoothing == pytest.approx(best["params"]["loss.label_smoothing"])
    assert {"optimization_history.png", "intermediate_values.png"} <= set(result["plots"])
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["best"]["number"] == best["number"]


def test_a_killed_sweep_continues_its_study(tmp_path):
    import subprocess
    import sys
    import os

    config, space = _files(tmp_path, epochs=3)
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "graft.cli", "sweep", str(config), "--space", str(space), "--trials", "4",
            "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "trial-001" / "metrics.jsonl").is_file():  # the second trial has begun
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = optuna.load_study(study_name="graft", storage=f"sqlite:///{out / 'study.db'}")
    finished = [t for t in first.trials if t.state.name in ("COMPLETE", "PRUNED")]
    cut = [t for t in first.trials if t.state.name == "RUNNING"]
    assert len(cut) == 1 and len(finished) >= 1
    stamp = (out / "trial-000" / "summary.json").stat().st_mtime_ns

    again = graft("sweep", config, "--space", space, "--trials", "4", "--out", out, check=True)
    assert f"Trial {cut[0].number} was cut short" in again.stdout
    study = optuna.load_study(study_name="graft", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 4 and states.count("FAIL") == 1
    rerun = next(t for t in study.trials if t.user_attrs.get("requeued_from") == cut[0].number)
    assert rerun.params == cut[0].params  # the interrupted trial ran again with its values
    assert (out / "trial-000" / "summary.json").stat().st_mtime_ns == stamp  # finished trials are kept


def test_bad_spaces_exit_2_naming_the_table(tmp_path):
    config, _ = _files(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text('[train.lr]\ndistribution = "log-unifrom"\nlow = 1e-4\nhigh = 1e-2\n')
    proc = graft("sweep", config, "--space", bad, "--trials", "2", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "[train.lr]" in proc.stderr and 'Did you mean "log-uniform"' in proc.stderr
    bad.write_text('[train.lrate]\ndistribution = "uniform"\nlow = 0.1\nhigh = 0.2\n')
    proc = graft("sweep", config, "--space", bad, "--trials", "2", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "lrate" in proc.stderr and "Traceback" not in proc.stderr
    bad.write_text('[train.lr]\ndistribution = "log-uniform"\nlow = 0\nhigh = 0.2\n')
    proc = graft("sweep", config, "--space", bad, "--trials", "2", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "low > 0" in proc.stderr
