"""The ``tensorboard`` logger: TensorBoard event files through ``torch.utils.tensorboard``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from graft import Logger, hookimpl, option, read_metrics

KEYS = ("step", "epoch", "split")


@dataclass
class TensorBoardOptions:
    log_dir: str = option("", "Folder of the event files; default RUN_DIR/tensorboard (point tensorboard --logdir at "
                              "the folder of many runs to compare them).", path=True)


class TensorBoardLogger(Logger):
    """TensorBoard event files: every metric as SPLIT/NAME by step, the resolved config, the confusion matrix."""

    Options = TensorBoardOptions

    def start(self, run_dir, config, resume_step):
        from torch.utils.tensorboard import SummaryWriter

        # On a resume metrics.jsonl is the truth: an event file may have lost its last unflushed events to a kill,
        # and holds steps past the checkpoint. purge_step=0 makes readers drop every earlier event; the log replays.
        self.writer = SummaryWriter(self.options.log_dir or str(Path(run_dir) / "tensorboard"),
                                    purge_step=None if resume_step is None else 0)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        if resume_step is not None:
            for record in read_metrics(run_dir):
                self._add(record)
            self.writer.flush()

    def _add(self, record):
        for key, value in record.items():
            if key not in KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{record['split']}/{key}", value, record["step"])

    def log(self, record):
        self._add(record)
        self.writer.flush()

    def finish(self, run_dir, summary):
        final = summary.get("test") or summary.get("val") or {}
        if "confusion_matrix" in final:
            image = _confusion_image(Path(run_dir) / "confusion.png", final["confusion_matrix"])
            if image is not None:
                self.writer.add_image("confusion_matrix", image, summary.get("steps", 0), dataformats="HWC")

    def close(self):
        self.writer.close()


def _confusion_image(png: Path, matrix):
    """The run's confusion.png as an HxWx3 uint8 array, or the bare matrix drawn as an image without matplotlib."""
    import numpy as np

    if png.is_file():
        from PIL import Image

        return np.asarray(Image.open(png).convert("RGB"))
    m = np.asarray(matrix, dtype=np.float64)
    if m.size == 0:
        return None
    grey = (255 * (1 - m / max(m.max(), 1))).astype(np.uint8)
    big = np.kron(grey, np.ones((16, 16), dtype=np.uint8))
    return np.stack([big] * 3, axis=-1)


@hookimpl
def register_loggers(register):
    register(TensorBoardLogger, name="tensorboard")
