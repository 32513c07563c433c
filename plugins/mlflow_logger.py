"""The ``mlflow`` logger: an MLflow run per graft run, in a local SQLite store unless told otherwise."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from graft import Logger, hookimpl, option, read_metrics

KEYS = ("step", "epoch", "split")
STATE = "mlflow.json"  # in the run directory: the MLflow run a resumed graft run continues


@dataclass
class MLflowOptions:
    tracking_uri: str = option("", "MLflow tracking URI; default $MLFLOW_TRACKING_URI, else the local SQLite file "
                                   "sqlite:///<folder of the run directory>/mlflow.db (mlflow ui --backend-store-uri "
                                   "that URI shows it). MLflow's plain-folder store is in maintenance mode.")
    experiment: str = option("graft", "Experiment name.")
    run_name: str = option("", "Name of the MLflow run; default the run directory's name.")


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.1}} -> {"train.lr": "0.1"}: MLflow params are flat strings."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # whole or not at all: a resume reads it back
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def _metrics(record: dict) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(f"{record['split']}/{k}", float(v), now, record["step"]) for k, v in record.items()
            if k not in KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)]


class MLflowLogger(Logger):
    """MLflow (local SQLite store by default): params from the resolved config, metrics by step, summary and plots."""

    Options = MLflowOptions

    def start(self, run_dir, config, resume_step):
        import logging

        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # creating the SQLite tables logs at INFO on every first run
            logging.getLogger(name).setLevel(logging.WARNING)

        run_dir = Path(run_dir)
        uri = self.options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
            f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"
        self.client = MlflowClient(uri)
        state = run_dir / STATE
        old = json.loads(state.read_text()) if resume_step is not None and state.is_file() else {}
        # every MLflow run an earlier attempt made for this run directory (one cut while replaying too)
        replacing = [r for r in (old.get("run_id"), *old.get("replacing", ())) if r]
        earlier = replacing[0] if replacing else None
        experiment = self.client.get_experiment_by_name(self.options.experiment)
        if experiment is None:
            artifacts = (run_dir.resolve().parent / "mlflow-artifacts").as_uri() if uri.startswith("sqlite:") else None
            experiment_id = self.client.create_experiment(self.options.experiment, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        tags = {"graft.run_dir": str(run_dir.resolve()), **({"graft.resumed_from": earlier} if earlier else {})}
        run = self.client.create_run(experiment_id, run_name=self.options.run_name or run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        _write_state(state, {"run_id": self.run_id, "tracking_uri": uri, "replacing": replacing})
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        if resume_step is not None:
            # MLflow cannot delete metric points, and the interrupted attempt logged steps past the checkpoint
            # that the resumed run logs again (mlflow#4248): this new MLflow run replays what metrics.jsonl kept and
            # the earlier ones are deleted (MLflow's soft delete; `mlflow gc` purges them).
            metrics = [m for record in read_metrics(run_dir) for m in _metrics(record)]
            for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
                self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
            for run_id in replacing:
                try:
                    self.client.delete_run(run_id)
                except Exception:  # noqa: BLE001 - gone already, or another store: the new run holds the truth
                    pass
            _write_state(state, {"run_id": self.run_id, "tracking_uri": uri})

    def log(self, record):
        metrics = _metrics(record)
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, run_dir, summary):
        for name in ("summary.json", "config.toml", "curves.png", "confusion.png", "labels.json"):
            path = Path(run_dir) / name
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id)
        self.finished = True

    def close(self):
        if not getattr(self, "finished", False):  # interrupted or failed: resumable, so not FINISHED
            self.client.set_terminated(self.run_id, status="KILLED")


@hookimpl
def register_loggers(register):
    register(MLflowLogger, name="mlflow")
