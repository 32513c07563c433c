"""The run directory's files other than checkpoints: the metrics log (cut back on resume), summary, labels, data
report and plots; and the experiment trackers (``[train] loggers``) fed beside the log. Only the main process writes
here."""

from __future__ import annotations

import json
from pathlib import Path

from . import checkpoint as ckpt
from .errors import warn


class RunDir:
    """Writes the files of one run directory and feeds the config's loggers (each isolated: one that raises is
    reported once and switched off)."""

    def __init__(self, path: Path, enabled: bool = True, config=None):
        self.path, self.enabled, self.config = Path(path), enabled, config
        self.loggers = [spec.create() for spec in config.loggers] if enabled and config is not None else []

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
            with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
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
            (self.path / "metrics.jsonl").unlink(missing_ok=True)
        else:
            truncate_metrics(self.path / "metrics.jsonl", resume_step)
        if self.loggers:
            self._each("start", str(self.path), self.config.to_dict(), resume_step)

    def write_json(self, name: str, data: dict) -> None:
        if self.enabled:
            ckpt.atomic_write_text(self.path / name, json.dumps(data, indent=2) + "\n")

    def write_text(self, name: str, text: str) -> None:
        if self.enabled:
            ckpt.atomic_write_text(self.path / name, text)

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
    path = Path(run_dir) / "metrics.jsonl"
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
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill we are recovering from
        if record["step"] <= step and record.get("split") != "test":
            keep.append(line)
    ckpt.atomic_write_text(path, "".join(line + "\n" for line in keep))


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
