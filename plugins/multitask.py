"""The ``multitask`` strategy: several tasks on one shared backbone, each task's data a ``[tasks.NAME]`` table (any
data source; its task plugin -- classification, token tags, regression, segmentation ... -- gives its head, loss and
metrics). A config with [tasks.NAME] tables has no [data].

Each training batch holds one task's examples (``graft.data.TaskMixture``: proportional, temperature or round-robin
sampling across tasks); the task's loss is weighted by ``weights`` or learned from each task's homoscedastic
uncertainty (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
Semantics", CVPR 2018: exp(-s_t) L_t + s_t / 2 with s_t = log sigma_t^2 learned, their classification form).
Evaluation scores every task (``NAME/accuracy`` ...); best weights by ``task_mean``, the mean of the tasks' own
metrics, or -- given finished single-task runs (``single_task``) -- by Delta-m, the mean relative change of each
task's metric against its single-task run, signed so that higher is better (Maninis, Radosavovic & Kokkinos,
"Attentive Single-Tasking of Multiple Tasks", CVPR 2019). ``graft predict`` answers every task; the export writes
backbone/ and one head per task (heads/NAME.safetensors, tasks.json).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from graft import UNLABELLED, GraftError, Strategy, hookimpl, option
from graft.data import TaskMixture
from graft.supervised import task_for


@dataclass
class MultitaskOptions:
    head: Literal["linear", "mlp"] = option("linear", "Each task's head: linear, or mlp (one hidden layer).")
    head_hidden: int = option(0, "Hidden width of mlp heads; 0 means the backbone's feature width.")
    dropout: float = option(0.0, "Dropout before each head's output layer.")
    sampling: Literal["proportional", "temperature", "round_robin"] = option(
        "proportional", "Which task each batch comes from: proportional (each task's examples once per epoch, in "
                        "random order), temperature (task t's share of an epoch proportional to n_t^(1/temperature)),"
                        " round_robin (each task's examples once per epoch, the tasks taking turns).")
    temperature: float = option(2.0, "sampling = \"temperature\": 1 is proportional, larger flattens towards equal "
                                     "shares (small tasks repeated, large ones cut).")
    weighting: Literal["fixed", "uncertainty"] = option(
        "fixed", "Task loss weights: fixed (``weights``), or learned from each task's uncertainty (Kendall et al. "
                 "2018).")
    weights: dict = option(help="Fixed loss weight per task, e.g. { upos = 1.0, xpos = 0.5 }; a task not named "
                                "weighs 1.", default_factory=dict)
    single_task: dict = option(help="Finished single-task runs to compare with, per task, e.g. { upos = "
                                    "\"runs/upos\" }: every task named gives Delta-m (the metric for best weights).",
                               default_factory=dict)
    head_lr_scale: float = option(1.0, "Learning-rate multiplier of the heads.")
    backbone_lr_scale: float = option(1.0, "Learning-rate multiplier of the shared backbone.")

    def validate(self):
        if not 0.0 <= self.dropout < 1.0 or self.head_hidden < 0:
            raise ValueError("dropout must be in [0, 1) and head_hidden not negative.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")
        for name, w in self.weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w >= 0 and math.isfinite(w)):
                raise ValueError(f"weights.{name} must be a number >= 0, got {w!r}.")
        for name, path in self.single_task.items():
            if not isinstance(path, str) or not path:
                raise ValueError(f"single_task.{name} must be a run directory's path, got {path!r}.")


def multi_model(backbone_module, heads: dict, features: dict, uncertainty: bool):
    """The shared backbone and one head per task. ``forward(inputs, task)``: that task's outputs (its head on the
    pooled features ``[B, D]``, every token's ``[B, T, D]``, or the feature maps); with uncertainty weighting
    ``(outputs, s_task)``, the task's learned log-variance (inside forward, so DDP sees it used)."""
    import torch
    from torch import nn

    names = list(heads)

    class MultiModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.heads = backbone_module, nn.ModuleDict(heads)
            self.log_vars = nn.Parameter(torch.zeros(len(names))) if uncertainty else None

        def forward(self, inputs, task=None):
            task = task or names[0]
            kind, head = features[task], self.heads[task]
            if kind == "maps":
                out = head(self.backbone(inputs, dense=True), inputs.shape[-2:])
            elif kind == "tokens":
                out = head(self.backbone(inputs, dense=True))
            else:
                out = head(self.backbone(inputs))
            if self.log_vars is not None and self.training:
                return out, self.log_vars[names.index(task)]
            return out

    return MultiModel()


class _TaskView:
    """One task's network as its Task plugin calls it (``view(inputs)``), for prediction."""

    def __init__(self, model, name):
        self.model, self.name = model, name

    def __call__(self, inputs):
        return self.model(inputs, self.name)


class Multitask(Strategy):
    """Several tasks on one backbone: a head per [tasks.NAME] table, task sampling, fixed or learned loss weights."""

    Options = MultitaskOptions
    supports_adapters = True
    primary_metric = "task_mean"
    metric_modes = {"loss": "min", "task_mean": "max", "delta_m": "max"}

    @classmethod
    def task_data(cls, options, sources):
        return TaskMixture(sources, options.sampling, options.temperature)

    def build(self):
        import graft

        o, mixture = self.options, self.data
        if not isinstance(mixture, TaskMixture):
            raise GraftError("[strategy] plugin = \"multitask\" takes each task's data as a [tasks.NAME] table "
                             "(e.g. [tasks.upos] plugin = \"conll\"), in place of [data].")
        unknown = sorted((set(o.weights) | set(o.single_task)) - set(mixture.names))
        if unknown:
            raise GraftError(f"[strategy] weights / single_task name {unknown[0]!r}, which is no task; the tasks are "
                             f"{', '.join(mixture.names)} ([tasks.NAME] tables).")
        self.tasks = {name: task_for(source, f"[tasks.{name}]") for name, source in mixture.sources.items()}
        heads = {}
        for name, task in self.tasks.items():
            task.check(self.backbone)
            heads[name] = task.head(self.backbone, o)
            ds = None if self.predicting else mixture.sources[name].dataset("train")
            if ds:  # a bad label fails here, naming the task, not mid-run
                task.check_targets(mixture.sources[name].collate([ds[i] for i in range(min(len(ds), 64))])["targets"])
        self.losses = {name: graft.create("loss", {"plugin": task.losses[0] if task.losses else "cross_entropy"},
                                          where=f"[tasks.{name}]") for name, task in self.tasks.items()}
        self.model = multi_model(self.backbone.module, heads, {n: t.features for n, t in self.tasks.items()},
                                 o.weighting == "uncertainty")
        self.metric_of = {name: task.metric() or "accuracy" for name, task in self.tasks.items()}
        self.references = {} if self.predicting else self._references()
        if self.references and set(self.references) == set(self.tasks):
            self.primary_metric = "delta_m"
        elif any(self.mode_of(n, m) == "min" for n, m in self.metric_of.items()):
            self.primary_metric = "loss"  # a mean of metrics that improve in opposite directions means nothing
        self._split = "val"
        return self.model

    def _references(self) -> dict:
        """Each single-task run's summary.json (val and test metrics). GraftError when one is missing or lacks the
        task's metric."""
        refs = {}
        for name, folder in self.options.single_task.items():
            path = Path(folder) / "summary.json"
            if not path.is_file():
                raise GraftError(f"[strategy] single_task.{name} = {folder!r} is no finished run (no summary.json): "
                                 f"train that task alone first (finetune with [data] = [tasks.{name}]).")
            summary = json.loads(path.read_text(encoding="utf-8"))
            metric = self.metric_of[name]
            if not all(metric in (summary.get(split) or {}) for split in ("val", "test")):
                raise GraftError(f"[strategy] single_task.{name}: {path} has no val and test {metric!r}, the "
                                 f"metric of task {name!r}; is it a run of that task?")
            refs[name] = {split: summary[split][metric] for split in ("val", "test")}
            if not all(refs[name].values()):
                raise GraftError(f"[strategy] single_task.{name}: {path} has {metric} = 0, and Delta-m is a change "
                                 f"relative to it; compare with a run that learned something.")
            if not self.data.sources[name].dataset("val"):
                raise GraftError(f"[strategy] single_task.{name}: Delta-m picks weights on validation, and "
                                 f"[tasks.{name}] has no validation split; give it one (val_fraction).")
        return refs

    def mode_of(self, name: str, metric: str) -> str:
        task = self.tasks[name]
        return task.metric_modes.get(metric) or {"loss": "min", "accuracy": "max"}.get(metric, "max")

    def metric_mode(self, metric):
        if "/" in metric and hasattr(self, "tasks") and metric.split("/", 1)[0] in self.tasks:
            return self.mode_of(*metric.split("/", 1))
        return super().metric_mode(metric)

    def param_groups(self, model):
        o = self.options
        groups = [{"params": list(self.model.backbone.parameters()), "name": "backbone",
                   "lr_scale": o.backbone_lr_scale},
                  {"params": list(self.model.heads.parameters()), "name": "heads", "lr_scale": o.head_lr_scale}]
        if self.model.log_vars is not None:
            self.model.log_vars.no_weight_decay = True  # a log-variance decayed towards 0 would bias the weights
            groups.append({"params": [self.model.log_vars], "name": "log_vars", "lr_scale": o.head_lr_scale})
        return groups

    def on_epoch_start(self, epoch, model):
        frozen = self.backbone.adapter_frozen
        for p in self.model.parameters():
            p.requires_grad_(id(p) not in frozen)

    # -- steps ---------------------------------------------------------------------------------------------
    def step_targets(self, batch):
        """When every task is scored per token / pixel, the labelled targets of the micro-batch (the loop then
        normalises over the whole step, as finetune does for one such task)."""
        if all(t.per_target for t in self.tasks.values()):
            return sum(int((sub["targets"] != UNLABELLED).sum()) for sub in batch["tasks"].values())
        return None

    def training_step(self, model, batch):
        o = self.options
        total, logs = 0.0, {}
        for name, sub in batch["tasks"].items():
            out = model(sub["inputs"], name)
            out, log_var = out if isinstance(out, tuple) else (out, None)
            outputs, y = self.tasks[name].loss_inputs(out, sub["targets"])
            if "step_targets" in batch:
                labelled = (y != UNLABELLED).sum()
                mean = self.losses[name](outputs, y) if bool(labelled) else outputs.sum() * 0.0
                loss = mean * labelled / batch["step_targets"]
            else:
                loss = self.losses[name](outputs, y)
            logs[f"{name}/loss"] = loss.detach()
            if log_var is not None:  # a share of the step, as the loss is: the regulariser counts once per step
                share = labelled / batch["step_targets"] if "step_targets" in batch else 1.0
                loss = (-log_var).exp() * loss + log_var / 2 * share
            total = total + o.weights.get(name, 1.0) * loss
        return {"loss": total, **logs}

    def eval_step(self, model, batch):
        self._split = batch.get("split", "val")
        sums = {}
        for name, sub in batch["tasks"].items():
            outputs = model(sub["inputs"], name).float()
            task, y = self.tasks[name], sub["targets"]
            loss = self.losses[name](*task.loss_inputs(outputs, y))
            s = task.eval_sums(outputs, y)
            sums.update({f"{name}/{k}": v for k, v in s.items()})
            sums[f"{name}/loss_sum"] = loss.float() * s["count"]
        return sums

    def compute_metrics(self, sums):
        metrics, means, loss = {}, [], 0.0
        for name, task in self.tasks.items():
            own = {k.split("/", 1)[1]: v for k, v in sums.items() if k.startswith(name + "/")}
            if not own or float(own["count"]) == 0:
                continue
            m = {"loss": float(own["loss_sum"]) / float(own["count"]), **task.compute_metrics(own)}
            metrics.update({f"{name}/{k}": v for k, v in m.items() if isinstance(v, (int, float))})
            loss += self.options.weights.get(name, 1.0) * m["loss"]
            means.append(m[self.metric_of[name]])
        metrics["loss"] = loss
        if means:
            metrics["task_mean"] = sum(means) / len(means)
        split = "test" if self._split == "test" else "val"
        if self.references:
            changes = []
            for name, ref in self.references.items():
                value, base = metrics.get(f"{name}/{self.metric_of[name]}"), ref[split]
                if value is not None and base:
                    sign = -1.0 if self.mode_of(name, self.metric_of[name]) == "min" else 1.0
                    changes.append(sign * (value - base) / abs(base) * 100.0)
                    metrics[f"{name}/single_task"] = base
            if len(changes) == len(self.references):
                metrics["delta_m"] = sum(changes) / len(changes)
        return metrics

    def predict(self, model, inputs):
        per_task = {name: task.predict(_TaskView(model, name), inputs) for name, task in self.tasks.items()}
        n = len(next(iter(per_task.values())))
        return [{name: results[i] for name, results in per_task.items()} for i in range(n)]

    def report(self, model):
        out = {"tasks": {name: t.name for name, t in self.tasks.items()}, "sampling": self.options.sampling}
        if self.data.dataset("train") is not None:
            parts = self.data.parts("train")
            out["examples_per_epoch"] = dict(zip([n for n, _ in parts], self.data.shares([len(d) for _, d in parts])))
        if self.model.log_vars is not None:  # the learned weights exp(-s_t)
            log_vars = self.model.log_vars.detach().tolist()
            out["learned_weights"] = {n: math.exp(-s) for n, s in zip(self.tasks, log_vars)}
        return out

    def export(self, model, directory):
        """backbone/ in its family's native format, heads/NAME.safetensors and tasks.json (each task's kind and
        labels)."""
        from safetensors.torch import save_file

        from graft import clean_state_dict

        Path(directory, "backbone").mkdir(exist_ok=True)
        self.backbone.export(str(Path(directory, "backbone")))
        Path(directory, "heads").mkdir(exist_ok=True)
        for name, head in self.model.heads.items():
            save_file(clean_state_dict(head.state_dict()), str(Path(directory, "heads", f"{name}.safetensors")))
        Path(directory, "tasks.json").write_text(json.dumps(self.data.tasks_info(), indent=2) + "\n",
                                                 encoding="utf-8")


@hookimpl
def register_strategies(register):
    register(Multitask, name="multitask")
