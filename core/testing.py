"""Checks a plugin author runs in their own tests.

    from graft.testing import check_strategy

    def test_my_strategy(tmp_path):
        check_strategy(MyStrategy, tmp_path, options={"weight": 0.5})

``check_strategy`` drives the strategy through the shared loop with a tiny backbone on real data (scikit-learn's
digits by default): build, parameter groups, training, evaluation, prediction where it exists, saving, its own
checkpoint state, and an interrupted-and-resumed run that must reproduce an uninterrupted one. It raises one
AssertionError that lists everything that broke, so a failure reads as a to-do list.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

TINY_BACKBONE = {"plugin": "timm", "model": "vit_tiny_patch16_224",
                 "model_kwargs": {"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}}
TINY_DATA = {"plugin": "digits", "image_size": 8}


def registry_with(cls, kind: str = "strategy", name: str | None = None):
    """The plugin registry with ``cls`` added under ``name`` (for testing a class before it is installed)."""
    from .registry import KINDS, Entry, Registry, summary_of

    reg = Registry()
    name = name or cls.name or cls.__name__.lower()
    if not issubclass(cls, KINDS[kind][1]):
        raise AssertionError(f"{cls.__name__} is not a graft.{KINDS[kind][1].__name__}")
    reg.entries[kind][name] = Entry(kind, name, cls, "graft.testing", summary_of(cls))
    return reg


def check_strategy(cls, workdir, options: dict | None = None, backbone: dict | None = None,
                   data: dict | None = None, loss: dict | None = None, steps: int = 6, name: str = "under_test"):
    """Run ``cls`` through train / eval / save / resume with a tiny model; raise AssertionError listing problems."""
    from safetensors.torch import load_file

    from .config import resolve
    from .errors import GraftError
    from .interfaces import Strategy
    from .loop import train
    from .export import load_run
    from .run import Run, predict

    workdir = Path(workdir)
    problems: list[str] = []
    reg = registry_with(cls, "strategy", name)
    if not dataclasses.is_dataclass(cls.Options):
        raise AssertionError(f"{cls.__name__}.Options must be a dataclass")
    missing_help = [f.name for f in dataclasses.fields(cls.Options) if not f.metadata.get("help")]
    if missing_help:
        problems.append(f"options without help text (graft describe shows them bare): {', '.join(missing_help)}")
    conf = {"backbone": copy.deepcopy(backbone or TINY_BACKBONE),
            "strategy": {"plugin": name, **(options or {})},
            "data": copy.deepcopy(data or TINY_DATA),
            "train": {"seed": 0, "max_steps": steps, "batch_size": 16, "lr": 1e-3, "eval_every": steps // 2,
                      "log_every": 1, "progress": False, "plot": False, "checkpoint_every": steps // 2}}
    if loss:
        conf["loss"] = copy.deepcopy(loss)

    def resolved(**train):
        c = copy.deepcopy(conf)
        c["train"].update(train)
        return resolve(c, f"{name}.toml", reg)

    try:
        run = Run(resolved())
    except GraftError:
        raise
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"building the strategy failed: {type(e).__name__}: {e}") from e
    problems += _group_problems(run)

    # train, evaluate, save
    full = workdir / "full"
    try:
        summary = train(resolved(), full, echo=lambda m: None)
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"training failed: {type(e).__name__}: {e}") from e
    problems += _training_problems(run, summary, full)
    final = load_file(str(full / "last.safetensors"))

    # an interrupted run, resumed, must reproduce the uninterrupted one
    cut = workdir / "cut"
    try:
        train(resolved(max_steps=steps // 2), cut, echo=lambda m: None)
        train(resolved(), cut, resume=True, echo=lambda m: None)
        resumed = load_file(str(cut / "last.safetensors"))
        worst = max((resumed[k].float() - final[k].float()).abs().max().item() for k in final)
        if worst > 1e-5:
            problems.append(f"resume does not reproduce the uninterrupted run (weights differ by {worst:.2e}); "
                            f"keep all of the strategy's state in state_dict()/load_state_dict() and make "
                            f"on_epoch_start/on_step_start depend only on their arguments and that state")
    except Exception as e:  # noqa: BLE001
        problems.append(f"resume failed: {type(e).__name__}: {e}")

    # a finished run loads back; prediction, where the strategy offers it
    try:
        loaded = load_run(full, for_prediction=True, registry=reg)
        if type(loaded.strategy).predict is not Strategy.predict and (data or TINY_DATA)["plugin"] == "digits":
            out = predict(loaded, [_digit_image(workdir)])
            if not (isinstance(out, list) and len(out) == 1 and isinstance(out[0], dict)):
                problems.append("predict() must return one dict per input")
    except GraftError as e:
        problems.append(f"loading the finished run failed: {e}")
    if problems:
        raise AssertionError(f"{cls.__name__} has {len(problems)} problem(s):\n- " + "\n- ".join(problems))
    return summary


def _group_problems(run) -> list[str]:
    """What is wrong with the strategy's parameter groups."""
    problems = []
    params = {id(p) for p in run.model.parameters()}
    groups = run.strategy.param_groups(run.model)
    grouped = [id(p) for g in groups for p in g["params"]]
    if len(grouped) != len(set(grouped)):
        problems.append("param_groups lists a parameter twice")
    if not set(grouped) <= params:
        problems.append("param_groups holds parameters that are not in the model build() returned "
                        "(the loop would train but never save them)")
    if any("lr_scale" not in g for g in groups):
        problems.append("a parameter group has no lr_scale")
    return problems


def _training_problems(run, summary: dict, full: Path) -> list[str]:
    """What is wrong with a finished training run: losses, metrics, unchanged weights, uncheckpointable state."""
    import torch
    from safetensors.torch import load_file

    from . import checkpoint as ckpt

    problems = []
    train_logs = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    if not all(math.isfinite(r["loss"]) for r in train_logs if r["split"] == "train"):
        problems.append("training produced a non-finite loss")
    for split in ("val", "test"):
        metrics = summary.get(split)
        if not metrics:
            problems.append(f"no {split} metrics: eval_step/compute_metrics returned nothing")
        elif not any(isinstance(v, float) for v in metrics.values()):
            problems.append(f"{split} metrics hold no numbers: {metrics}")
    if summary.get("metric") and summary.get("val") and summary["metric"] not in summary["val"]:
        problems.append(f"primary_metric {summary['metric']!r} is not among the metrics")
    init = run.model.state_dict()
    final = load_file(str(full / "last.safetensors"))
    if all(torch.equal(init[k].cpu(), final[k]) for k in final if k in init):
        problems.append("no weight changed during training (is anything trainable? does the loss reach them?)")
    # the strategy's own checkpoint state must survive the trip through safetensors + JSON
    try:
        tensors: dict = {}
        ckpt.unpack(json.loads(json.dumps(ckpt.pack(run.strategy.state_dict(), tensors))), tensors)
    except Exception as e:  # noqa: BLE001
        problems.append(f"state_dict() cannot be checkpointed ({e}); use tensors, numbers, strings, lists, dicts")
    return problems


def _digit_image(workdir: Path) -> str:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    path = workdir / "digit.png"
    img = (255 - load_digits().images[0] * 255 / 16).astype(np.uint8)
    Image.fromarray(img).resize((32, 32)).save(path)
    return str(path)


def check_adapter(cls, workdir, options: dict | None = None, backbone: dict | None = None, data: dict | None = None,
                  steps: int = 6, name: str = "under_test"):
    """Run adapter ``cls`` through ``finetune`` with a tiny model: what ``apply`` freezes stays frozen and unchanged
    while something of the backbone trains, ``save`` writes files, ``merged`` leaves the model exactly as it was,
    an interrupted run resumes exactly and the finished run loads back. Raises one AssertionError listing problems;
    returns the run's summary."""
    import torch
    from safetensors.torch import load_file

    from .config import resolve
    from .loop import train
    from .export import load_run
    from .run import Run

    workdir = Path(workdir)
    reg = registry_with(cls, "adapter", name)
    conf = {"backbone": copy.deepcopy(backbone or TINY_BACKBONE), "strategy": {"plugin": "finetune"},
            "data": copy.deepcopy(data or TINY_DATA), "adapter": {"plugin": name, **(options or {})},
            "train": {"seed": 0, "max_steps": steps, "batch_size": 16, "lr": 1e-2, "log_every": 1,
                      "progress": False, "plot": False, "checkpoint_every": steps // 2}}

    def resolved(**train_options):
        c = copy.deepcopy(conf)
        c["train"].update(train_options)
        return resolve(c, f"{name}.toml", reg)

    run = Run(resolved())
    frozen = run.backbone.adapter_frozen
    problems = []
    backbone_params = dict(run.model.named_parameters())
    if not frozen:
        problems.append("apply() returned no frozen parameters: it trains every backbone parameter")
    if any(id(p) in frozen and p.requires_grad for p in backbone_params.values()):
        problems.append("apply() returned parameters as frozen that still require grad")
    if not any(p.requires_grad and n.startswith("backbone.") for n, p in backbone_params.items()):
        problems.append("apply() left no backbone parameter trainable")
    problems += _merge_problems(run)
    full = workdir / "full"
    summary = train(resolved(), full, echo=lambda m: None)
    if not summary.get("adapter", {}).get("size_bytes"):
        problems.append("save() wrote nothing (or returned no size)")
    final = load_file(str(full / "last.safetensors"))
    changed = [n for n, p in backbone_params.items() if id(p) in frozen and not torch.equal(p.detach(), final[n])]
    if changed:
        problems.append(f"frozen parameters changed in training, e.g. {changed[0]}")
    cut = workdir / "cut"
    train(resolved(max_steps=steps // 2), cut, echo=lambda m: None)
    train(resolved(), cut, resume=True, echo=lambda m: None)
    resumed = load_file(str(cut / "last.safetensors"))
    if any(not torch.allclose(resumed[k], final[k], atol=1e-6) for k in final):
        problems.append("resume does not reproduce the uninterrupted run")
    load_run(full, for_prediction=True, registry=reg)
    if problems:
        raise AssertionError(f"{cls.__name__} has {len(problems)} problem(s):\n- " + "\n- ".join(problems))
    return summary


def _merge_problems(run) -> list[str]:
    """merged() must compute what the adapted model computes, and leave it exactly as it was. The adapter's
    parameters are moved off their initial values first (LoRA's B starts at zero: merging would change nothing)."""
    import torch

    native = run.backbone.native_model()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in native.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    ds = run.data.dataset("val") or run.data.dataset("train")
    inputs = run.data.collate([ds[i] for i in range(min(4, len(ds)))])["inputs"]
    before = {k: v.clone() for k, v in native.state_dict().items()}
    run.model.eval()
    with torch.no_grad():
        adapted = run.backbone.module(inputs)
        with run.adapter.merged(run.backbone):
            merged = run.backbone.module(inputs)
        again = run.backbone.module(inputs)
    after = native.state_dict()
    problems = []
    if not torch.allclose(adapted, merged, atol=1e-4):
        problems.append(f"inside merged() the model computes something else (max difference "
                        f"{(adapted - merged).abs().max().item():.2e})")
    if before.keys() != after.keys() or any(not torch.equal(before[k], after[k]) for k in before) or \
            not torch.equal(adapted, again):
        problems.append("merged() did not leave the model exactly as it was")
    return problems
