"""Issue 19, ``graft sweep``: Optuna over any config keys, pruning from the loop's validations, each trial a run
directory, the study in SQLite so that a killed sweep continues."""

import json
import signal
import time

import pytest

from conftest import graft, tiny_config, write_config
from graft import load_config
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
    alone = train(load_config(best["config"]), tmp_path / "alone", echo=lambda m: None)
    assert alone["best"] == pytest.approx(best["value"], abs=1e-9)
    trial_conf = load_config(best["config"])
    assert trial_conf.train.lr == pytest.approx(best["params"]["train.lr"])
    assert trial_conf.plugins["loss"].options.label_smoothing == pytest.approx(best["params"]["loss.label_smoothing"])
    assert {"optimization_history.png", "intermediate_values.png"} <= set(result["plots"])
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["best"]["number"] == best["number"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_cut_sweep_continues_its_study_like_one_never_cut(tmp_path, sig):
    """Issue 25.1, the reported input: 4 trials, a signal during trial 1, the same command again. The old code
    (a) recorded a SIGINT-cut trial as FAIL and never ran it again, and (b) after either signal drew trials 2 and 3
    with trial 0's and 1's exact values (a fresh sampler, same seed, replayed its start-up draws)."""
    import os
    import subprocess
    import sys

    from graft.sweep import sweep

    config, space = _files(tmp_path, epochs=2)
    space.write_text(SPACE + '\n[sweep]\npruner = "none"\n')  # every trial completes: counts compare exactly
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "graft.cli", "sweep", str(config), "--space", str(space), "--trials", "4",
            "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "trial-001" / "metrics.jsonl").is_file():  # the second trial has begun
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    first = optuna.load_study(study_name="graft", storage=f"sqlite:///{out / 'study.db'}")
    cut = [t for t in first.trials if t.state.name in ("RUNNING", "FAIL")]
    assert len(cut) == 1 and cut[0].number == 1, [(t.number, t.state.name) for t in first.trials]
    stamp = (out / "trial-000" / "summary.json").stat().st_mtime_ns

    again = graft("sweep", config, "--space", space, "--trials", "4", "--out", out, check=True)
    assert "Trial 1 was cut short" in again.stdout
    said = []
    sweep(config, space, 4, out, echo=said.append)  # nothing left to do
    assert not any("was cut short" in m for m in said), said
    study = optuna.load_study(study_name="graft", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 4 and states.count("FAIL") == 1 and len(states) == 5, states
    reruns = [t for t in study.trials if t.user_attrs.get("requeued_from") == 1]
    assert len(reruns) == 1 and reruns[0].params == cut[0].params  # the cut trial ran again with its values, once
    complete = [tuple(sorted(t.params.items())) for t in study.trials if t.state.name == "COMPLETE"]
    assert len(set(complete)) == 4, complete  # no trial repeats another's values
    assert (out / "trial-000" / "summary.json").stat().st_mtime_ns == stamp  # finished trials are kept


def test_a_sweep_never_cut_is_reproducible(tmp_path):
    """The resumed sweep's seed offset leaves an uncut sweep as it was: the same seed draws the same values."""
    from graft.sweep import sweep

    config, space = _files(tmp_path, epochs=1)
    space.write_text(SPACE + '\n[sweep]\npruner = "none"\n')
    a, b = (sweep(config, space, 2, tmp_path / name, echo=lambda m: None) for name in ("a", "b"))
    assert [t["params"] for t in a["trials"]] == [t["params"] for t in b["trials"]]


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
