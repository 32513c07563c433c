"""Time per training step: graft's detection task against torchvision's own FCOS training step.

Same trunk (timm, random init), the same FPN (torchvision's, P3-P7, width 128) and FCOS head (torchvision's, 4
convolutions per tower), the same images (the digit canvases of `examples/digits_canvas.py`, letterboxed to the
same side by graft's data source, the same loader for both), batch and fused AdamW. torchvision's contender is its
`FCOS` model called as its reference training scripts call it -- `loss_dict = model(images, targets)` -- with its
own transform (normalisation, resizing at scale 1, batching) inside the step. The two loops run step by step in turn
(`harness.interleave`; a clock read at each step's start); the figure is the median over paired runs of graft /
torchvision with its 95% bootstrap interval.

    python benchmarks/detection.py [--model resnet18] [--size 128] [--batch 8] [--steps 16] [--budget 240]

Run it alone: a second busy process distorts CPU timings.
"""

import argparse
import tempfile
from pathlib import Path

import harness  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
import torch

from graft import Run, load_config
from loop_overhead import graft_loop

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def config(canvases, model, size, steps, batch):
    return load_config({
        "backbone": {"plugin": "timm", "model": model},
        "strategy": {"plugin": "finetune", "head_hidden": 128},
        "data": {"plugin": "detection", "train": str(canvases / "instances.json"), "image_size": size,
                 "val_fraction": 0.0, "test_fraction": 0.0},
        "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-3, "scheduler": "constant", "eval_every": 10**6,
                  "progress": False, "plot": False, "keep_checkpoints": 1},
    }, where="benchmark")


def torchvision_loop(conf, tick):
    """torchvision's FCOS on the same trunk, FPN width and head; the loader is graft's (same examples)."""
    from collections import OrderedDict

    import timm
    from torch import nn
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    run = Run(conf)  # the data source, set up as graft's contender sets it up
    t, side = conf.train, run.data.side

    class TrunkWithFPN(nn.Module):
        out_channels = 128

        def __init__(self):
            super().__init__()
            self.trunk = timm.create_model(conf.plugins["backbone"].options.model, features_only=True,
                                           out_indices=(-3, -2, -1))
            self.fpn = FeaturePyramidNetwork(self.trunk.feature_info.channels()[-3:], 128,
                                             extra_blocks=LastLevelP6P7(128, 128))

        def forward(self, x):
            return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.trunk(x))))

    anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
    model = FCOS(TrunkWithFPN(), num_classes=len(run.data.label_names), min_size=side, max_size=side,
                 image_mean=[0.0] * 3, image_std=[1.0] * 3, anchor_generator=anchors)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=t.lr, fused=t.fused_optimizer)
    loader = run.loader("train", train=True)
    model.train()
    it = iter(loader)
    for _ in range(t.max_steps):
        tick()
        batch = next(it)
        y = batch["targets"]
        keep = (y["labels"] >= 0) & ~y["crowd"]
        targets = [{"boxes": y["boxes"][b][keep[b]], "labels": y["labels"][b][keep[b]]} for b in range(len(keep))]
        losses = model(list(batch["inputs"]), targets)
        loss = sum(losses.values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds of runs at most")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import sys

    sys.path.insert(0, str(EXAMPLES))
    from digits_canvas import build

    with tempfile.TemporaryDirectory() as d:
        canvases = build(Path(d) / "canvas", count=max(64, a.batch * (a.steps + 1)), seed=0, size=a.size,
                         digit_size=a.size // 3)
        conf = config(canvases, a.model, a.size, a.steps, a.batch)
        print(f"model {a.model}, {a.size} x {a.size}, batch {a.batch}, {a.steps} steps per run (first {a.warmup} "
              f"untimed); {harness.machine()}")
        result = harness.compare_steps({"torchvision": lambda tick: torchvision_loop(conf, tick),
                                        "graft": lambda tick: graft_loop(conf, tick)}, "torchvision",
                                       warmup=a.warmup, budget_s=a.budget)
    ms = {k: 1000 * v for k, v in result["costs"].items()}
    print(f"  torchvision FCOS: {ms['torchvision']:.1f} ms/step, graft detection: {ms['graft']:.1f} ms/step")
    harness.emit([harness.row(f"graft detection / torchvision FCOS step ({a.model}, {a.size} px, batch {a.batch})",
                              result, "graft", 1.05, note=f"{ms['torchvision']:.0f} vs {ms['graft']:.0f} ms/step")],
                 {"result": result}, a.json)


if __name__ == "__main__":
    main()
