"""Time per training step: graft's loop against a minimal hand-written PyTorch loop.

Same model (built by the same plugins), same data, batch, optimizer (fused AdamW, graft's default) and order of
examples; both timed the same
way (the sum of per-step wall times, data loading included, evaluation and set-up excluded). Runs alternate,
and the ratio of medians over repeats is printed.

    python benchmarks/loop_overhead.py [--steps 60] [--repeats 7] [--model test_resnet resnet18]

Run it alone: a second busy process distorts CPU timings (OMP_WAIT_POLICY=PASSIVE is set here for that reason).
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from graft import Run, load_config, train  # noqa: E402

WINDOW = 10  # steps per timing window (graft's log_every)


def config(model, steps, batch):
    return load_config({
        "backbone": {"plugin": "timm", "model": model},
        "strategy": {"plugin": "finetune"},
        "loss": {"plugin": "cross_entropy"},
        "data": {"plugin": "digits", "image_size": 32},
        "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-3, "eval_every": 10**6, "progress": False,
                  "plot": False, "log_every": WINDOW, "keep_checkpoints": 1},
    }, where="benchmark")


def hand_loop(conf, steps):
    """The classic loop, on a model built exactly as graft builds it."""
    run = Run(conf)
    model, loss_fn = run.model, run.loss
    # the same optimizer implementation as graft's default (fused AdamW), so the ratio is the loop's own cost
    opt = torch.optim.AdamW(model.parameters(), lr=conf.train.lr, weight_decay=conf.train.weight_decay,
                            fused=conf.train.fused_optimizer)
    loader = torch.utils.data.DataLoader(run.data.dataset("train"), batch_size=conf.train.batch_size, shuffle=True,
                                         collate_fn=run.data.collate)
    model.train()
    times = []
    while len(times) < steps:
        it = iter(loader)
        while len(times) < steps:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            loss = loss_fn(model(batch["inputs"]), batch["targets"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            times.append(time.perf_counter() - t0)
    return per_step([sum(times[i:i + WINDOW]) / WINDOW for i in range(0, steps, WINDOW)])


def graft_loop(conf, steps):
    with tempfile.TemporaryDirectory() as d:
        train(conf, d, echo=lambda m: None)
        records = [json.loads(x) for x in Path(d, "metrics.jsonl").read_text().splitlines()]
    batch = conf.train.batch_size
    return per_step([batch / r["samples_per_s"] for r in records if r["split"] == "train"])


def per_step(windows):
    """Median time per step over logging windows of WINDOW steps, the first (warm-up) window left out."""
    return statistics.median(windows[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", nargs="+", default=["test_resnet", "resnet18"])
    a = ap.parse_args()
    for model in a.model:
        conf = config(model, a.steps, a.batch)
        hand, ours = [], []
        for i in range(a.repeats):
            for fn, out in ((hand_loop, hand), (graft_loop, ours))[:: 1 if i % 2 else -1]:
                out.append(fn(conf, a.steps))
        h, g = statistics.median(hand), statistics.median(ours)
        print(f"model {model}, batch {a.batch}, {a.steps} steps x {a.repeats} repeats, "
              f"{torch.get_num_threads()} threads")
        print(f"  hand-written loop: {h * 1000:.1f} ms/step (median)")
        print(f"  graft loop:        {g * 1000:.1f} ms/step (median)")
        print(f"  ratio graft/hand:  {g / h:.3f}   (absolute: {(g - h) * 1000:+.2f} ms/step)")


if __name__ == "__main__":
    main()
