"""Time per training step: graft's loop against a minimal hand-written PyTorch loop.

Same model (built by the same plugins), data, batch, optimizer (fused AdamW with graft's two groups: no weight decay
on biases and norm weights) and constant learning rate; the two loops run step by step in turn (``harness.interleave``:
a clock read at the start of every step, so a step's cost holds the next batch's loading and collation, the step,
and whatever the loop does between steps -- logging included). The steps stay inside the first epoch. The figure is
the median over windows of 4 steps of graft / hand, with its 95% bootstrap interval.

    python benchmarks/loop_overhead.py [--model resnet18] [--steps 40] [--budget 240] [--json out.json]

Run it alone: a second busy process distorts CPU timings.
"""

import argparse
import tempfile

import harness  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
import torch

from graft import Run, load_config, train


def config(model, steps, batch):
    return load_config({
        "backbone": {"plugin": "timm", "model": model},
        "strategy": {"plugin": "finetune"},
        "loss": {"plugin": "cross_entropy"},
        "data": {"plugin": "digits", "image_size": 32},
        "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-3, "scheduler": "constant", "eval_every": 10**6,
                  "progress": False, "plot": False, "keep_checkpoints": 1},
    }, where="benchmark")


def hand_loop(conf, tick):
    """The classic loop, on a model built exactly as graft builds it."""
    run = Run(conf)
    model, loss_fn, t = run.model, run.loss, conf.train
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=t.lr, fused=t.fused_optimizer)
    loader = torch.utils.data.DataLoader(run.data.dataset("train"), batch_size=t.batch_size, shuffle=True,
                                         collate_fn=run.data.collate)
    if len(loader) < t.max_steps:
        raise SystemExit(f"--steps {t.max_steps} is more than one epoch ({len(loader)} batches)")
    model.train()
    it = iter(loader)
    for _ in range(t.max_steps):
        tick()
        batch = next(it)
        loss = loss_fn(model(batch["inputs"]), batch["targets"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()


def graft_loop(conf, tick):
    with tempfile.TemporaryDirectory() as d:
        train(conf, d, echo=lambda m: None, prepare=lambda run: ticking(run, tick))


def ticking(run, tick):
    """``prepare`` hook: ``tick()`` at the start of every step, before the strategy's own ``on_step_start``."""
    start = run.strategy.on_step_start
    run.strategy.on_step_start = lambda step, total: (tick(), start(step, total))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds of runs at most")
    ap.add_argument("--target", type=float, default=0.02, help="stop when the interval is within +-target")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    conf = config(a.model, a.steps, a.batch)
    print(f"model {a.model}, batch {a.batch}, {a.steps} steps per run (first {a.warmup} untimed); {harness.machine()}")
    result = harness.compare_steps({"hand": lambda tick: hand_loop(conf, tick),
                                    "graft": lambda tick: graft_loop(conf, tick)}, "hand", warmup=a.warmup,
                                   budget_s=a.budget, target=a.target)
    ms = {k: 1000 * v for k, v in result["costs"].items()}
    print(f"  hand-written loop: {ms['hand']:.2f} ms/step, graft loop: {ms['graft']:.2f} ms/step (medians)")
    harness.emit([harness.row(f"graft loop / hand loop ({a.model}, batch {a.batch})", result, "graft", 1.01,
                              note=f"{ms['hand']:.1f} vs {ms['graft']:.1f} ms/step")], {"result": result}, a.json)


if __name__ == "__main__":
    main()
