"""Per-step cost of distillation: student alone vs distilled with the teacher cache vs distilled online.

Same student, data, batch and steps; the teacher (a ResNet-18 run on digits) is trained first, and the cache is
built by a warm-up run so that the timed runs only read it. The three loops run step by step in turn
(``harness.compare_steps``); the figures are the median ratios to the student alone over runs, with 95% bootstrap
intervals.

    python benchmarks/distill.py [--steps 40] [--budget 240] [--student test_resnet] [--json out.json]
"""

import argparse
import tempfile
from pathlib import Path

import harness
from loop_overhead import ticking

from graft import load_config, train

QUIET = {"progress": False, "plot": False, "eval_every": 10**6, "keep_checkpoints": 1}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds of runs at most")
    ap.add_argument("--student", default="test_resnet")
    ap.add_argument("--teacher", default="resnet18")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    teacher = work / "teacher"
    train(load_config({"backbone": {"plugin": "timm", "model": a.teacher}, "strategy": {"plugin": "finetune"},
                       "data": {"plugin": "digits", "image_size": 32},
                       "train": {"epochs": 1, "batch_size": 64, **QUIET}}, where="teacher"), teacher,
          echo=lambda m: None)
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
    confs = {k: load_config(v, where=k) for k, v in confs.items()}
    train(confs["cached"], work / "warm", echo=lambda m: None)  # builds the cache

    def contender(name):
        def run(tick):
            with tempfile.TemporaryDirectory(dir=work) as d:
                train(confs[name], d, echo=lambda m: None, prepare=lambda r: ticking(r, tick))
        return run

    print(f"student {a.student}, teacher {a.teacher}, batch 32, {a.steps} steps per run (first {a.warmup} untimed); "
          f"{harness.machine()}")
    result = harness.compare_steps({k: contender(k) for k in confs}, "alone", warmup=a.warmup, budget_s=a.budget,
                                   converge_on=["cached"])  # the online teacher's ratio has no goal
    ms = {k: 1000 * v for k, v in result["costs"].items()}
    print("  " + ", ".join(f"{k} {v:.2f} ms/step" for k, v in ms.items()) + " (medians)")
    harness.emit([
        harness.row(f"distill, cached teacher / student alone ({a.student})", result, "cached", 1.02,
                    note=f"{ms['alone']:.1f} vs {ms['cached']:.1f} ms/step"),
        harness.row(f"distill, online {a.teacher} teacher / student alone", result, "online",
                    note=f"{ms['online']:.1f} ms/step")], {"result": result}, a.json)


if __name__ == "__main__":
    main()
