"""The run directory's format: its file names, the lock a run holds on it, the resolved config, labels and summary
read and written, the metrics log (cut back on resume), data report and plots; the backbone a finished run hands on
to later runs (``exported_backbone``); and the experiment trackers (``[train] loggers``) fed beside the log. Only the
main process writes here. Checkpoints (``checkpoints/``) are ``graft.checkpoint``'s; exports ``graft.export``'s.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from .errors import GraftError, warn
from .files import atomic_write_text

CONFIG = "config.toml"  # the resolved config, written before the first step
LABELS = "labels.json"  # {"task", "label_names"(, "tasks")}: enough to predict without reading the data
SUMMARY = "summary.json"  # what a finished run (or a compression) measured
METRICS = "metrics.jsonl"
DATA_REPORT = "data.json"
WEIGHTS = "model.safetensors"  # the best weights (the last ones in last.safetensors)
LAST_WEIGHTS = "last.safetensors"
BACKBONE = "backbone"  # the backbone in its family's format: the hand-off to later runs
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"


def read_config(run_dir: Path, overrides=(), registry=None):
    """The resolved config a run saved, with ``--set``-style ``overrides``."""
    from .config import load_config

    return load_config(Path(run_dir) / CONFIG, list(overrides), registry)


def data_info(data) -> dict:
    """What a data source must know to predict without reading data: ``task``, ``label_names`` and, for a task
    mixture, each task's (``tasks``)."""
    info = {"task": data.task, "label_names": list(data.label_names or [])}
    if hasattr(data, "tasks_info"):
        info["tasks"] = data.tasks_info()
    return info


def read_labels(run_dir: Path) -> dict | None:
    """{"task", "label_names"} of a finished run; None for a run that saved none."""
    path = Path(run_dir) / LABELS
    return json.loads(path.read_text()) if path.is_file() else None


def read_summary(run_dir: Path) -> dict | None:
    path = Path(run_dir) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_text(Path(run_dir) / SUMMARY, json.dumps(summary, indent=2) + "\n")


def training_summary(run, state, run_dir: Path, metric: str, results: dict, measured: dict) -> dict:
    """What summary.json holds for a finished training run (and ``graft.train`` returns): its settings, how far it
    got (``state``, a ``TrainState``), the val/test ``results``, the strategy's report, data and parameters, and what
    the loop ``measured`` (wall time, memory, the adapter it saved)."""
    t, params = run.config.train, [(p.numel(), p.requires_grad) for p in run.model.parameters()]
    summary = {
        "run_dir": str(run_dir), "strategy": run.strategy.name, "backbone": run.backbone.name,
        "steps": state.step, "epochs_completed": state.epoch, "world_size": run.dist.world_size,
        "device": str(run.device), "precision": t.precision, "metric": metric, "best": state.best,
        "stopped_early": state.stopped_early, "skipped_steps": state.skipped_steps, "train_time_s": state.train_time,
        "wall_time_s": measured["wall_time_s"], "train_samples_per_s": state.samples / max(state.train_time, 1e-9),
        "weights": WEIGHTS if state.best is None else f"{WEIGHTS} (best on val)",
        **{k: v for k, v in results.items() if v is not None}, **measured["strategy"]}
    if run.data.report():
        summary["data"] = run.data.report()
    summary["parameters"] = {"total": sum(n for n, _ in params), "trainable": sum(n for n, t in params if t)}
    summary["peak_memory_bytes"] = measured["peak_memory_bytes"]
    summary["training_state_bytes"] = measured["training_state_bytes"]
    for key in ("adapter", "predictions"):
        if measured.get(key):
            summary[key] = measured[key]
    return summary


def is_finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished PyTorch run: its config and best weights."""
    return (Path(run_dir) / CONFIG).is_file() and (Path(run_dir) / WEIGHTS).is_file()


class RunLock:
    """An exclusive lock on a run directory for the length of a run: a second ``graft train`` (or ``--resume``) on
    the same directory refuses instead of interleaving checkpoints. The operating system drops it when the process
    ends, however it ends, so no stale lock survives a kill."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.file = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks; runs are not protected there
            return self
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.file.close()
            self.file = None
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return self  # a filesystem without flock (some network mounts): run unprotected rather than refuse
            raise GraftError(f"Run directory {self.path.parent} is in use by another graft process (it holds "
                             f"{self.path}). Wait for it to finish, or choose another --out.") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # closing releases the lock


def exported_backbone(path: Path) -> Path:
    """A graft run directory stands for the backbone it exported (``<run>/backbone``); other paths are themselves.

    This is the hand-off between runs: ``weights = "runs/<mlm-run>"`` continues from that run's backbone. Raises
    GraftError for a run directory without ``backbone/``: not finished, or made by a strategy that exports none."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG).is_file() and (path / METRICS).is_file():
        if (path / BACKBONE).is_dir():
            return path / BACKBONE
        summary = read_summary(path)
        strategy = summary.get("strategy", "?") if summary is not None else None
        why = (f"its strategy {strategy!r} exported no backbone (a strategy hands its backbone on by writing "
               f"RUN/backbone in export(): docs/plugins.md, \"Handing the backbone on\")" if strategy else
               "the run has not finished (backbone/ is written at its end; resume it with --resume)")
        raise GraftError(f"weights = {str(path)!r} is a graft run directory without backbone/: {why}. Point "
                         f"weights at a run that has one, or at a weights file.")
    return path


class RunDir:
    """Writes the files of one run directory and feeds the config's loggers (each isolated: one that raises is
    reported once and switched off)."""

    def __init__(self, path: Path, enabled: bool = True, config=None):
        self.path, self.enabled, self.config = Path(path), enabled, config
        self.loggers = [spec.instantiate() for spec in config.loggers] if enabled and config is not None else []

    def _each(self, method: str, *args) -> list:
        results = []
        for logger in list(self.loggers):
            try:
                results.append(getattr(logger, method)(*args))
            except Exception as e:  # noqa: BLE001 - a tracker never stops training
                self.loggers.remove(logger)
                warn(f"[train] loggers: {logger.name!r} failed in {method}() and is switched off for this run: "
                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return results

    def log(self, record: dict) -> None:
        """Append one line to metrics.jsonl and hand it to the loggers."""
        if self.enabled:
            with open(self.path / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self._each("log", dict(record))

    def should_stop(self, dist, model) -> bool:
        """Whether a logger asks to end training (after a validation). Collective: the main process decides for all
        (``model``: where the flag is reduced, on its device)."""
        import torch

        from . import distributed

        first = next(model.parameters(), None)
        asked = torch.tensor(float(any(self._each("should_stop"))), device=first.device if first is not None else "cpu")
        return bool(distributed.all_reduce_sum(asked, dist))

    def finish(self, summary: dict) -> None:
        self._each("finish", str(self.path), summary)

    def close(self) -> None:
        """Every logger's ``close`` once, however the run ended (after ``finish`` when it finished)."""
        self._each("close")
        self.loggers = []

    def start(self, resume_step: int | None) -> None:
        """A fresh run starts a fresh log (even in a directory an earlier attempt left behind); a resumed one drops
        what was logged after the checkpoint it resumes from. The loggers start."""
        if not self.enabled:
            return
        if resume_step is None:
            (self.path / METRICS).unlink(missing_ok=True)
        else:
            truncate_metrics(self.path / METRICS, resume_step)
        if self.loggers:
            self._each("start", str(self.path), self.config.to_dict(), resume_step)

    def write_json(self, name: str, data: dict) -> None:
        if self.enabled:
            atomic_write_text(self.path / name, json.dumps(data, indent=2) + "\n")

    def write_config(self, config) -> None:
        if self.enabled:
            atomic_write_text(self.path / CONFIG, config.to_toml())

    def write_labels(self, data) -> None:
        self.write_json(LABELS, data_info(data))

    def write_data_report(self, report: dict) -> None:
        self.write_json(DATA_REPORT, report)

    def write_summary(self, summary: dict) -> None:
        if self.enabled:
            write_summary(self.path, summary)

    def plots(self, label_names, results: dict) -> None:
        """curves.png, and confusion.png when the final metrics have a confusion matrix."""
        if not self.enabled:
            return
        plot_curves(self.path)
        final = results.get("test") or results.get("val")
        if final and "confusion_matrix" in final:
            plot_confusion(final["confusion_matrix"], label_names, self.path / "confusion.png")


def read_metrics(run_dir) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl`` in order (a line cut short by a kill is skipped). On a resume, what
    a logger must hold once ``start`` returns."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Drop what was logged after the checkpoint we resume from, so the file reads as one run."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path.parent) if r["step"] <= step and r.get("split") != "test"]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None  # plots are an optional extra: pip install graftkit[plots]
    return plt


def plot_confusion(matrix, labels, path: Path) -> None:
    """A confusion matrix as a PNG: rows are true labels, columns predictions. Any strategy that reports a
    ``confusion_matrix`` gets one."""
    plt = _pyplot()
    if plt is None:
        return
    k = len(matrix)
    labels = list(labels or range(k))
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * k, 0.8 + 0.5 * k))
    ax.imshow(matrix, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(matrix[i][j])), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(k), [str(x) for x in labels], rotation=45, ha="right")
    ax.set_yticks(range(k), [str(x) for x in labels])
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(run_dir: Path) -> None:
    plt = _pyplot()
    if plt is None:
        return
    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    keys = [k for k in (val[0] if val else {}) if k not in ("step", "epoch", "split")
            and isinstance(val[0][k], (int, float))]
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4 * (1 + len(keys)), 3.2), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val and "loss" in val[0]:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], label="val")
    ax.set_title("loss"), ax.set_xlabel("step"), ax.legend()
    for ax, k in zip(axes[0][1:], keys):
        ax.plot([r["step"] for r in val], [r[k] for r in val], marker="o")
        ax.set_title(f"val {k}"), ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)
