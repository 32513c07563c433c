"""The optimizer and the learning-rate schedule, built from a strategy's parameter groups and [train]."""

from __future__ import annotations

import math

import torch

from .config import TrainOptions
from .errors import GraftError


def lr_lambda(t: TrainOptions, total_steps: int):
    """Multiplier of the base learning rate at optimizer step ``step``: linear warmup, then the schedule."""
    warmup = t.warmup_steps or int(t.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if t.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 1.0 - progress if t.scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * shape

    return f


def build_optimizer(t: TrainOptions, groups: list[dict], merge: bool = True) -> torch.optim.Optimizer:
    """One optimizer group per strategy group and decay class (biases and norm weights get no weight decay); with
    ``merge``, groups whose settings are the same become one. A ResNet's six layer-wise groups at layer_decay 1 cost
    ten extra optimizer kernel launches and their Python per step (about 1 ms on this project's 2-core CPU, 0.8% of
    a ResNet-18 step: issue 27). ``optimizer.graft_unmerged()`` builds the unmerged layout a checkpoint from before the
    merge holds (``checkpoint.restore_training``)."""
    param_groups = []
    seen = set()
    for g in groups:
        params = [p for p in g["params"] if id(p) not in seen]
        seen.update(id(p) for p in params)
        wd = g.get("weight_decay", t.weight_decay)
        decayed = [p for p in params if p.ndim > 1 and not getattr(p, "no_weight_decay", False)]
        for suffix, ps, decay in (("", decayed, wd),
                                  (".no_decay", [p for p in params if all(p is not q for q in decayed)], 0.0)):
            if ps:
                param_groups.append({"params": ps, "weight_decay": decay, "lr": t.lr * g.get("lr_scale", 1.0),
                                     "lr_scale": g.get("lr_scale", 1.0), "name": g.get("name", "group") + suffix})
    if not param_groups:
        raise GraftError("The strategy gave the optimizer no parameters.")
    unmerged = len(param_groups)
    # Not SGD: torch's fused SGD takes a group's momentum buffers all made or all missing, and a gradual unfreezing
    # schedule opens one layer-wise group at a time (AdamW makes each parameter's state on its first gradient).
    if merge and t.optimizer != "sgd":
        param_groups = _merged(param_groups)
    # The fused kernels (one pass over all tensors) run on CPU and CUDA; on this project's 2-core CPU they make the
    # AdamW step of a ResNet-18 about 2.5x faster than torch's default per-tensor loop.
    fused = {"fused": True} if t.fused_optimizer and _fused_ok(param_groups, t) else {}
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(param_groups, lr=t.lr, momentum=t.momentum, **fused)
    else:
        opt = torch.optim.AdamW(param_groups, lr=t.lr, betas=tuple(t.betas), **fused)
    opt.graft_unmerged = (lambda: build_optimizer(t, groups, merge=False)) if len(param_groups) < unmerged else None
    return opt


def _merged(param_groups: list[dict]) -> list[dict]:
    """Groups with equal weight decay and learning-rate scale joined, in order of first appearance."""
    out: dict[tuple, dict] = {}
    for g in param_groups:
        key = (g["weight_decay"], g["lr_scale"])
        if key in out:
            out[key]["params"] = out[key]["params"] + g["params"]
            out[key]["name"] += "+" + g["name"]
        else:
            out[key] = dict(g)
    return list(out.values())


def _fused_ok(groups, t: TrainOptions) -> bool:
    params = [p for g in groups for p in g["params"]]
    if t.optimizer == "sgd" and any(hasattr(p, "to_local") for p in params):
        return False  # FSDP's DTensor parameters have no fused SGD kernel (fused AdamW has one)
    if t.optimizer == "sgd" and t.momentum and t.precision == "fp16":
        # torch's fused SGD allocates its momentum buffers uninitialised (empty_like) on the first step and fills
        # them in the kernel, which a GradScaler skips on an overflow -- the usual first fp16 step: the garbage
        # then counts as momentum and the weights blow up. The per-tensor SGD makes no buffer on a skipped step.
        return False
    types = {p.device.type for p in params}
    return len(types) == 1 and types <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
