"""Issue 19, trackers: loggers as a plugin kind (TensorBoard, MLflow, third-party), fed beside metrics.jsonl; a failing
one is switched off with one warning; one may end training (a pruner's hook)."""

import json

import pytest

from conftest import graft, read_metrics, tiny_config, write_config
from graft import Logger
from graft import load_config
from graft import train
from graft.testing import registry_with

QUIET = lambda m: None  # noqa: E731


def numbers(record):
    return {k: v for k, v in record.items() if k not in ("step", "epoch", "split") and isinstance(v, (int, float))}


def test_tensorboard_and_mlflow_hold_what_metrics_jsonl_holds(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    conf = tiny_config(train={"epochs": 2, "log_every": 5, "loggers": ["tensorboard", "mlflow"]})
    run = tmp_path / "runs" / "a"
    summary = train(load_config(conf, where="c.toml"), run, echo=QUIET)
    records = read_metrics(run)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    expected = {(f"{r['split']}/{k}", r["step"]): v for r in records for k, v in numbers(r).items()}
    found = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert found.keys() == expected.keys()
    assert all(found[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())  # float32 in event files
    assert "confusion_matrix" in events.Tags()["images"]
    assert "config/text_summary" in events.Tags()["tensors"]

    from mlflow.tracking import MlflowClient

    state = json.loads((run / "mlflow.json").read_text())
    assert state["tracking_uri"] == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    client = MlflowClient(state["tracking_uri"])
    got = client.get_run(state["run_id"])
    assert got.info.status == "FINISHED" and got.info.run_name == "a"
    assert got.data.params["train.lr"] == str(conf["train"]["lr"])
    assert got.data.params["backbone.model"] == conf["backbone"]["model"]
    assert got.data.metrics["test/accuracy"] == pytest.approx(summary["test"]["accuracy"])
    val = [r for r in records if r["split"] == "val"]
    history = client.get_metric_history(state["run_id"], "val/accuracy")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["accuracy"])) for r in val]
    assert {"summary.json", "config.toml", "labels.json"} <= {a.path for a in client.list_artifacts(state["run_id"])}


def _tracked(run):
    """What TensorBoard and MLflow hold for ``run``: {(SPLIT/NAME, step): [values]} each (lists: a step logged twice
    shows)."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    tb = {}
    for tag in events.Tags()["scalars"]:
        for e in events.Scalars(tag):
            tb.setdefault((tag, e.step), []).append(e.value)
    state = json.loads((run / "mlflow.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    mlf = {}
    for key in client.get_run(state["run_id"]).data.metrics:
        for m in client.get_metric_history(state["run_id"], key):
            mlf.setdefault((key, m.step), []).append(m.value)
    return tb, mlf, client, state


def test_after_a_kill_and_resume_trackers_hold_what_metrics_jsonl_holds(tmp_path):
    """Issue 25.2, the reported input: MLflow, SIGKILL between checkpoints, --resume. The old code continued the same
    MLflow run, so the steps between the checkpoint and the kill were logged twice (131 points against 120 lines);
    TensorBoard purged from the checkpoint's own step, losing the validation metrics.jsonl keeps there."""
    import signal

    from conftest import start_train, wait_for_lines

    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    conf = tiny_config(train={"epochs": 2, "log_every": 1, "eval_every": 10, "checkpoint_every": 20,
                              "loggers": ["tensorboard", "mlflow"]})
    cfg = write_config(tmp_path / "c.toml", conf)
    run = tmp_path / "runs" / "a"
    proc = start_train(cfg, run)
    wait_for_lines(run, 27, proc)  # step 25 or so: past the checkpoint at step 20
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cut = read_metrics(run)
    tb, mlf, client, first = _tracked(run)
    assert max(r["step"] for r in cut) > 20 and (("train/loss", 21) in mlf)  # the kill landed past the checkpoint

    summary = train(load_config(conf, where=str(cfg)), run, resume=True, echo=QUIET)
    records = read_metrics(run)
    expected = {}
    for r in records:
        for k, v in numbers(r).items():
            expected.setdefault((f"{r['split']}/{k}", r["step"]), []).append(v)
    tb, mlf, client, state = _tracked(run)
    for found in (tb, mlf):
        assert found.keys() == expected.keys()
        assert all(found[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())
    assert len(records) > 0 and summary["steps"] == max(r["step"] for r in records)
    assert state["run_id"] != first["run_id"]  # a new MLflow run replayed the records kept ...
    assert client.get_run(first["run_id"]).info.lifecycle_stage == "deleted"  # ... and the earlier one is gone
    got = client.get_run(state["run_id"])
    assert got.info.status == "FINISHED" and got.data.tags["graft.resumed_from"] == first["run_id"]
    assert got.data.params["train.lr"] == str(conf["train"]["lr"])


def test_a_failing_logger_is_reported_once_and_training_goes_on(tmp_path):
    pytest.importorskip("mlflow")
    conf = tiny_config(train={"max_steps": 4, "loggers": ["mlflow"]})
    conf["loggers"] = {"mlflow": {"tracking_uri": "nosuchscheme://tracker"}}
    proc = graft("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("'mlflow' failed in start()") == 1 and "switched off" in proc.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4


class Pruner(Logger):
    """A third-party logger that asks to stop after the second validation, and counts what it saw."""

    seen: list = []

    def log(self, record):
        type(self).seen.append(record["split"])

    def should_stop(self):
        return type(self).seen.count("val") >= 2


def test_a_third_party_logger_can_end_training(tmp_path):
    Pruner.seen = []
    conf = tiny_config(train={"epochs": 3, "eval_every": 5, "loggers": ["pruner"]})
    summary = train(load_config(conf, registry=registry_with(Pruner, "logger", "pruner"), where="c.toml"),
                    tmp_path / "run", echo=QUIET)
    assert summary["stopped_early"] and summary["steps"] == 10
    assert Pruner.seen.count("val") == 2 and Pruner.seen[-1] == "test"


def test_logger_config_errors_name_the_key(tmp_path):
    conf = tiny_config(train={"loggers": ["tensorbord"]})
    proc = graft("train", write_config(tmp_path / "a.toml", conf))
    assert proc.returncode == 2 and 'Did you mean "tensorboard"' in proc.stderr and "[train] loggers" in proc.stderr
    conf = tiny_config(train={"loggers": ["tensorboard"]})
    conf["loggers"] = {"mlflow": {"experiment": "x"}}
    proc = graft("train", write_config(tmp_path / "b.toml", conf))
    assert proc.returncode == 2 and "[loggers.mlflow]" in proc.stderr and "does not list" in proc.stderr
