"""Time per training step: graft's loop against a minimal hand-written PyTorch loop.

Same model (built by the same plugins), same data, batch, optimizer and order of examples; both timed the same
way (the sum of per-step wall times, data loading included, evaluation and set-up excluded). Runs alternate,
and the ratio of medians over repeats is printed.

    python benchmarks/loop_overhead.py [--steps 40] [--repeats 5] [--model resnet18]

Run it alone: a second busy process distorts CPU timings (OMP_WAIT_POLICY=PASSIVE is set here for that reason).
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from graft.config import resolve  # noqa: E402
from graft.loop import Run, train  # noqa: E402


def config(model, steps, batch):
    return resolve({
        "backbone": {"plugin": "timm", "model": model},
        "strategy": {"plugin": "finetune"},
        "loss": {"plugin": "cross_entropy"},
        "data": {"plugin": "digits", "image_size": 32},
        "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-3, "eval_every": 10**6, "progress": False,
                  "plot": False, "log_every": 10, "keep_checkpoints": 1},
    }, "benchmark")


def hand_loop(conf, steps):
    """The classic loop, on a model built exactly as graft builds it."""
    run = Run(conf)
    model, loss_fn = run.model, run.loss
    opt = torch.optim.AdamW(model.parameters(), lr=conf.train.lr, weight_decay=conf.train.weight_decay)
    loader = torch.utils.data.DataLoader(run.data.dataset("train"), batch_size=conf.train.batch_size, shuffle=True,
                                         collate_fn=run.data.collate)
    model.train()
    total, done = 0.0, 0
    while done < steps:
        it = iter(loader)
        while done < steps:
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
            total += time.perf_counter() - t0
            done += 1
    return total / steps


def graft_loop(conf, steps):
    with tempfile.TemporaryDirectory() as d:
        summary = train(conf, d, echo=lambda m: None)
    return summary["train_time_s"] / summary["steps"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--model", default="resnet18")
    a = ap.parse_args()
    conf = config(a.model, a.steps, a.batch)
    hand, ours = [], []
    for i in range(a.repeats):
        for name, fn, out in (("hand", hand_loop, hand), ("graft", graft_loop, ours))[:: 1 if i % 2 else -1]:
            out.append(fn(conf, a.steps))
    h, g = statistics.median(hand), statistics.median(ours)
    print(f"model {a.model}, batch {a.batch}, {a.steps} steps x {a.repeats} repeats, {torch.get_num_threads()} threads")
    print(f"hand-written loop: {h * 1000:.1f} ms/step (median)")
    print(f"graft loop:        {g * 1000:.1f} ms/step (median)")
    print(f"ratio graft/hand:  {g / h:.3f}")


if __name__ == "__main__":
    main()
