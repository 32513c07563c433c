"""Distillation on real digits: does a small student learn more from a fine-tuned teacher than from labels alone?

Trains a ResNet-18 teacher (32x32 inputs, 11.2M parameters), then timm's small test_resnet as the student (16x16
inputs) for the same budget twice per seed -- alone (finetune) and distilled (distill: alpha 0.5, T 2) -- and
prints the mean test accuracy over seeds. Each seed's teacher uses that seed too, so no student test example was
seen by its teacher. Run: python examples/distill_digits.py [--seeds 0 1 2] [--out runs/distill-digits]
"""

import argparse
import json
import statistics
from pathlib import Path

from graft.config import resolve
from graft.loop import train

STUDENT = {"plugin": "timm", "model": "test_resnet"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--out", default="runs/distill-digits")
    a = ap.parse_args()
    out = Path(a.out)
    quiet = {"progress": False, "plot": False}
    results = {"alone": [], "distilled": [], "teacher": []}
    for seed in a.seeds:
        teacher = out / f"teacher-{seed}"  # same seed as its students: the same test examples stay unseen
        if not (teacher / "summary.json").exists():
            train(resolve({"backbone": {"plugin": "timm", "model": "resnet18"}, "strategy": {"plugin": "finetune"},
                           "data": {"plugin": "digits", "image_size": 32},
                           "train": {"seed": seed, "epochs": 6, "batch_size": 64, "lr": 2e-3, "scheduler": "cosine",
                                     **quiet}}, "teacher"), teacher, echo=print)
        results["teacher"].append(json.loads((teacher / "summary.json").read_text())["test"]["accuracy"])
        budget = {"seed": seed, "epochs": a.epochs, "batch_size": 32, "lr": 2e-3, "scheduler": "cosine", **quiet}
        data = {"plugin": "digits", "image_size": 16}
        alone = train(resolve({"backbone": STUDENT, "strategy": {"plugin": "finetune"}, "data": data,
                               "train": budget}, "alone"), out / f"alone-{seed}", echo=print)
        distilled = train(resolve({"backbone": STUDENT, "strategy": {"plugin": "distill", "teacher": str(teacher)},
                                   "loss": {"plugin": "kd", "temperature": 2.0, "alpha": 0.5}, "data": data,
                                   "train": budget}, "distilled"), out / f"distilled-{seed}", echo=print)
        results["alone"].append(alone["test"]["accuracy"])
        results["distilled"].append(distilled["test"]["accuracy"])
        print(f"seed {seed}: teacher {results['teacher'][-1]:.4f}  alone {results['alone'][-1]:.4f}  "
              f"distilled {results['distilled'][-1]:.4f}")
    print(json.dumps({k: {"mean": statistics.mean(v), "runs": v} for k, v in results.items()}, indent=2))
    print(f"student params {distilled['distill']['student_params']}, teacher {distilled['distill']['teacher_params']}")


if __name__ == "__main__":
    main()
