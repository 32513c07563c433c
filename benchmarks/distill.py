"""Per-step cost of distillation: student alone vs distilled with the teacher cache vs distilled online.

Same student, data, batch and steps; the teacher (a ResNet-18 run on digits) is trained first, and the cache is
built by a warm-up run so that the timed runs only read it. Time per step is the loop's own per-step wall time
(summary.json's train_time_s / steps); medians over repeats, printed as ratios to the student alone.

    python benchmarks/distill.py [--steps 40] [--repeats 5] [--student test_resnet]
"""

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from graft import load_config, train  # noqa: E402

QUIET = {"progress": False, "plot": False, "eval_every": 10**6}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--student", default="test_resnet")
    ap.add_argument("--teacher", default="resnet18")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    teacher = work / "teacher"
    train(load_config({"backbone": {"plugin": "timm", "model": a.teacher}, "strategy": {"plugin": "finetune"},
                   "data": {"plugin": "digits", "image_size": 32},
                   "train": {"epochs": 1, "batch_size": 64, **QUIET}}, where="teacher"), teacher, echo=lambda m: None)
    student = {"plugin": "timm", "model": a.student}
    data = {"plugin": "digits", "image_size": 32}
    budget = {"max_steps": a.steps, "batch_size": 32, **QUIET}
    confs = {
        "alone": {"backbone": student, "strategy": {"plugin": "finetune"}, "data": data, "train": budget},
        "cached": {"backbone": student, "strategy": {"plugin": "distill", "teacher": str(teacher), "cache": "on",
                                                     "cache_dir": str(work / "cache")},
                   "loss": {"plugin": "kd"}, "data": data, "train": budget},
        "online": {"backbone": student, "strategy": {"plugin": "distill", "teacher": str(teacher), "cache": "off"},
                   "loss": {"plugin": "kd"}, "data": data, "train": budget},
    }
    train(load_config(confs["cached"], where="warm"), work / "warm", echo=lambda m: None)  # builds the cache
    per_step = {k: [] for k in confs}
    for r in range(a.repeats):
        for name in (list(confs) if r % 2 else list(confs)[::-1]):
            s = train(load_config(confs[name], where=name), work / f"{name}-{r}", echo=lambda m: None)
            per_step[name].append(s["train_time_s"] / s["steps"])
    med = {k: statistics.median(v) for k, v in per_step.items()}
    print(f"student {a.student}, teacher {a.teacher}, batch 32, {a.steps} steps x {a.repeats} repeats")
    for k, v in med.items():
        print(f"  {k:7s} {v * 1000:7.1f} ms/step  ratio to alone {v / med['alone']:.3f}")


if __name__ == "__main__":
    main()
