"""The ``distill`` method: a student learns from a teacher's softened predictions (and hidden features)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from graft import UNLABELLED, GraftError, SoftTargetLoss, create, option
from graft.supervised import Supervised, SupervisedOptions

from . import cache as teacher_cache
from .teacher import load_teacher, same_view, teacher_view


@dataclass
class DistillOptions(SupervisedOptions):
    teacher: str = option("", "A finished graft run directory (e.g. a finetune run) whose model teaches.", path=True)
    teacher_backbone: dict = option(default_factory=dict, help="Instead of a run: a backbone table, e.g. { plugin = "
                                    "\"timm\", model = \"resnet50\", weights = \"r50.safetensors\" }, with ...")
    teacher_head: str = option("", "... a safetensors file holding its linear head (weight [classes, features], bias).",
                               path=True)
    feature_layers: list[list[int]] = field(default_factory=list, metadata={
        "help": "Feature distillation: [[student_layer, teacher_layer], ...] indices into each backbone's hidden "
                "layers (negative counts from the end); a learned projection bridges different widths."})
    feature_loss: Literal["feature_mse", "feature_cosine"] = option("feature_mse", "Loss between hidden features.")
    feature_weight: float = option(1.0, "Weight of the feature loss (when feature_layers is set).")
    cache: Literal["auto", "on", "off"] = option(
        "auto", "Teacher cache: auto = on unless the data is randomly augmented (then the teacher runs online).")
    cache_dir: str = option("", "Where teacher caches live; default $GRAFT_CACHE_DIR or ~/.cache/graftkit.",
                            path=True)

    def validate(self):
        super().validate()
        if bool(self.teacher) == bool(self.teacher_backbone):
            raise ValueError("set teacher = \"runs/<finished run>\", or teacher_backbone = { plugin = ... } with "
                             "teacher_head = \"head.safetensors\" (one of the two).")
        if self.teacher_backbone and not self.teacher_head:
            raise ValueError("teacher_backbone needs teacher_head: the safetensors file of its linear head.")
        if any(len(pair) != 2 for pair in self.feature_layers):
            raise ValueError("feature_layers takes pairs: [[student_layer, teacher_layer], ...].")


class Distill(Supervised):
    """Distil a finished run (the teacher) into any student backbone: soft targets, features, a teacher cache."""

    Options = DistillOptions
    default_loss = "kd"
    metric_modes = {**Supervised.metric_modes, "teacher_accuracy": "max", "agreement": "max"}

    def build(self):
        import torch
        from torch import nn

        o = self.options
        try:
            task = self.task
        except GraftError as e:
            raise GraftError(f"{e} To distil a language model, use [strategy] plugin = \"clm\" with teacher = "
                             f"\"runs/<clm run>\" and [loss] plugin = \"kd\".") from None
        # a task without class logits may offer its head's feature maps (detection's FPN): those are taught
        self.maps = not task.distillable and task.distill_maps
        if not task.distillable and not self.maps:
            raise GraftError("[strategy] plugin = \"distill\" distils tasks whose outputs are class logits "
                             "(classification, token classification, segmentation, a task plugin with distillable = "
                             f"True) or feature maps (detection); the [data] task is {self.data.task!r}.")
        self.dense = task.features != "pooled"  # per token / per pixel: outputs as large as the inputs
        if self.dense and (o.feature_layers or o.cache == "on"):
            raise GraftError("[strategy] distill of a per-token / per-pixel task takes no feature_layers and no cache "
                             "= \"on\" (the teacher runs online: its outputs are as large as the inputs).")
        if self.maps and isinstance(self.loss, SoftTargetLoss):
            raise GraftError(f"[strategy] distill of the {task.name} task teaches the head's feature maps beside the "
                             f"task's own loss: set [loss] plugin = {task.losses[0]!r} (or leave [loss] out).")
        if not self.maps and not isinstance(self.loss, SoftTargetLoss):
            raise GraftError("[strategy] plugin = \"distill\" needs a soft-target loss: [loss] plugin = \"kd\" (or a "
                             "graft.SoftTargetLoss of a plugin's).")
        if self.predicting:  # the student alone: no teacher, no data to view
            self.projections, self.use_cache = [], False
            return super().build()
        teacher = load_teacher(o, self.data, task.outputs())
        self.teacher, self.teacher_backbone_obj, self.teacher_conf = teacher.model, teacher.backbone, teacher.config
        self.teacher_data = teacher_view(self.data, teacher, o.teacher)
        model = super().build()
        self.projections = []
        if self.maps:
            self._map_projections(model)
        if o.feature_layers:
            with torch.no_grad():
                probe = self._teacher_inputs("train", [0])
                _, t_hidden = self.teacher(probe, hidden=True)
                s_inputs = self.data.collate([self.data.dataset("train")[0]])["inputs"]
                _, s_hidden = self.backbone.module(s_inputs, hidden=True)
            self.pairs = [(s, t) for s, t in o.feature_layers]
            for s, t in self.pairs:
                try:
                    ws, wt = s_hidden[s].shape[-1], t_hidden[t].shape[-1]
                except IndexError:
                    raise GraftError(f"[strategy] feature_layers pair [{s}, {t}] is out of range: the student has "
                                     f"{len(s_hidden)} hidden layers, the teacher {len(t_hidden)}.") from None
                self.projections.append(nn.Linear(ws, wt) if ws != wt else nn.Identity())
            model.projections = nn.ModuleList(self.projections)
            self.feature_loss = create("loss", {"plugin": o.feature_loss}, where="[strategy] feature_loss")
        augmented = getattr(self.teacher_data.options, "augment", False)
        self.use_cache = not self.dense and (o.cache == "on" or (o.cache == "auto" and not augmented))
        if o.cache == "on" and augmented:
            raise GraftError("[strategy] cache = \"on\" with augmented data would teach stale views; use cache = "
                             "\"auto\" (the teacher then runs online).")
        self.cache: dict | None = None
        self.progress = 0.0
        self.same_view = same_view(self.data, self.backbone, self.teacher_data, self.teacher_backbone_obj)
        if task.features == "tokens" and not self.same_view:
            raise GraftError("[strategy] per-token distillation needs the teacher's tokens: give the student the "
                             "teacher's tokenizer ([backbone] tokenizer = \"<teacher run>/backbone\") and the same "
                             "[data] options, so both see the same pieces.")
        return model

    def _map_projections(self, model):
        """1x1 convolutions from each of the student's maps to the teacher's width (identity where they match), from
        one example through both in eval mode."""
        import torch
        from torch import nn

        with torch.no_grad():
            self.teacher(self._teacher_inputs("train", [0]))
            was = model.training
            model.eval()
            model(self.data.collate([self.data.dataset("train")[0]])["inputs"])
            model.train(was)
        s_maps, t_maps = self.task.feature_maps(model), self.task.feature_maps(self.teacher)
        if len(s_maps) != len(t_maps):
            raise GraftError(f"[strategy] the student's head has {len(s_maps)} feature levels, the teacher's "
                             f"{len(t_maps)}: feature distillation pairs them level by level.")
        self.projections = [nn.Conv2d(s.shape[1], t.shape[1], 1) if s.shape[1] != t.shape[1] else nn.Identity()
                            for s, t in zip(s_maps, t_maps)]
        model.projections = nn.ModuleList(self.projections)
        self.feature_loss = create("loss", {"plugin": self.options.feature_loss}, where="[strategy] feature_loss")

    def _map_loss(self):
        """Feature distillation of the head's maps, level by level: each map standardised per example and channel
        (zero mean, unit variance over its positions) before the feature loss -- PKD (Cao et al., "PKD: General
        Distillation Framework for Object Detectors via Pearson Correlation Coefficient", NeurIPS 2022) with
        feature_mse; the teacher's map is resized to the student's when their inputs differ in size."""
        import torch.nn.functional as F

        def standard(x):
            x = x.float()
            return (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True, correction=0) + 1e-6)

        total = 0.0
        s_maps, t_maps = self.task.feature_maps(self.model), self.task.feature_maps(self.teacher)
        for proj, s, t in zip(self.model.projections, s_maps, t_maps):
            s = standard(proj(s))
            if t.shape[-2:] != s.shape[-2:]:
                t = F.interpolate(t.float(), size=s.shape[-2:], mode="bilinear", align_corners=False)
            t = standard(t)
            total = total + self.feature_loss(s.permute(0, 2, 3, 1).flatten(0, 2), t.permute(0, 2, 3, 1).flatten(0, 2))
        return total / len(s_maps)

    def param_groups(self, model):
        groups = super().param_groups(model)
        if self.projections:
            groups.append({"params": list(self.model.projections.parameters()), "lr_scale": self.options.head_lr_scale,
                           "name": "projections"})
        return groups

    def _teacher_inputs(self, split, indices):
        self.teacher_data.set_epoch(self.data.epoch)  # the same augmentation draw as the student's view
        ds = self.teacher_data.dataset(split)
        return self.teacher_data.collate([ds[int(i)] for i in indices])["inputs"]

    def _device(self):
        return next(self.model.parameters()).device

    def _run_teacher(self, split, indices, inputs=None):
        """Teacher logits (and hidden layers) for examples ``indices`` of ``split`` (or for ready ``inputs``)."""
        import torch

        from graft import move

        device = self._device()
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            if inputs is None:
                inputs = move(self._teacher_inputs(split, indices), device)
            if self.options.feature_layers:
                logits, hidden = self.teacher(inputs, hidden=True)
                return logits.float(), [hidden[t].float() for _, t in self.pairs]
            return self.teacher(inputs).float(), []

    # -- the teacher cache ---------------------------------------------------------------------------------
    def cache_path(self) -> Path:
        if getattr(self, "_cache_path", None) is None:
            key = teacher_cache.cache_key(self.teacher, self.teacher_backbone_obj, self.teacher_data, self.data.seed,
                                          [t for _, t in getattr(self, "pairs", [])])
            self._cache_path = teacher_cache.cache_path(self.options.cache_dir, key)
        return self._cache_path

    def teacher_outputs(self, split, index, inputs=None):
        if not self.use_cache:
            if inputs is not None and self.same_view:
                return self._run_teacher(split, None, inputs)
            return self._run_teacher(split, index.tolist())
        if self.cache is None:
            self.cache = teacher_cache.load_or_build(self.cache_path(), self._run_teacher, self.teacher_data,
                                                     self._device())
        index = index.to(self.cache[f"{split}.logits"].device)
        hidden = [self.cache[f"{split}.hidden.{j}"][index] for j in range(len(getattr(self, "pairs", [])))]
        return self.cache[f"{split}.logits"][index], hidden

    # -- steps ---------------------------------------------------------------------------------------------
    def on_step_start(self, step, total_steps):
        self.progress = step / max(1, total_steps - 1)

    def _logits(self, outputs, t_logits, y):
        """Student and teacher outputs as class logits ``[N, K]`` at targets ``[N]`` (``Task.distill_logits``); of a
        per-token / per-pixel task only the labelled positions."""
        s, t, y = self.task.distill_logits(outputs, t_logits, y)
        if self.dense:
            keep = y != UNLABELLED
            s, t, y = s[keep], t[keep], y[keep]
        return s, t, y

    def training_step(self, model, batch):
        t_logits, t_hidden = self.teacher_outputs(batch["split"], batch["index"], batch["inputs"])
        if self.maps:  # the task's own loss, and the teacher's maps (its forward just ran) taught to the student's
            task_loss = self.loss(*self.task.loss_inputs(model(batch["inputs"]), batch["targets"]))
            feat = self._map_loss()
            return {"loss": task_loss + self.options.feature_weight * feat, "task_loss": task_loss.detach(),
                    "feature_loss": feat.detach()}
        if self.dense:  # soft targets at every labelled token or pixel, normalised over the whole step
            s, t, y = self._logits(model(batch["inputs"]), t_logits, batch["targets"])
            if not len(y):
                return {"loss": s.sum() * 0.0}
            kd = self.loss(s, {"teacher": t, "labels": y, "progress": self.progress})
            return {"loss": kd * len(y) / batch["step_targets"]}
        if not self.options.feature_layers:
            s, t, y = self._logits(model(batch["inputs"]), t_logits, batch["targets"])
            return {"loss": self.loss(s, {"teacher": t, "labels": y, "progress": self.progress})}
        logits, hidden = model(batch["inputs"], hidden=True)
        student, teacher, y = self._logits(logits, t_logits, batch["targets"])
        kd = self.loss(student, {"teacher": teacher, "labels": y, "progress": self.progress})
        proj = self.model.projections
        feat = sum(self.feature_loss(proj[i](hidden[s]), t_hidden[i]) for i, (s, _) in enumerate(self.pairs))
        feat = feat / len(self.pairs)
        return {"loss": kd + self.options.feature_weight * feat, "kd_loss": kd.detach(), "feature_loss": feat.detach()}

    def eval_step(self, model, batch):
        if self.maps:  # the student's own metrics (mAP): no class logits to compare with the teacher's
            return super().eval_step(model, batch)
        outputs = model(batch["inputs"]).float()
        t_logits, _ = self.teacher_outputs(batch["split"], batch["index"], batch["inputs"])
        s, t, y = self._logits(outputs, t_logits, batch["targets"])
        if len(y) or not self.dense:
            kd = self.loss(s, {"teacher": t, "labels": y, "progress": self.progress})
        else:
            kd = s.sum() * 0.0
        sums = self.eval_sums(outputs, batch["targets"], loss=kd)
        labelled = y != UNLABELLED  # the same targets eval_sums counts
        sums["teacher_correct"] = (t.argmax(1) == y).sum()
        sums["agree"] = ((t.argmax(1) == s.argmax(1)) & labelled).sum()
        return sums

    def compute_metrics(self, sums):
        m = super().compute_metrics(sums)
        if "teacher_correct" not in sums:
            return m
        n = float(sums["count"])
        m["teacher_accuracy"] = float(sums["teacher_correct"]) / n
        m["agreement"] = float(sums["agree"]) / n
        return m

    def report(self, model):
        """Parameter counts and inference throughput (examples/s on this device) of student and teacher."""
        import torch

        from graft import move

        split = next(s for s in ("test", "val", "train") if self.data.dataset(s))
        val = self.data.dataset(split)
        idx = list(range(min(64, len(val))))
        device = self._device()
        s_inputs = move(self.data.collate([val[i] for i in idx])["inputs"], device)
        t_inputs = move(self._teacher_inputs(split, idx), device)
        self.teacher.to(device)

        def throughput(module, inputs):
            was = module.training
            module.eval()
            with torch.no_grad():
                module(inputs)
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    module(inputs)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
            module.train(was)
            return len(idx) / sorted(times)[1]

        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        student_params = count(self.model) - sum(count(p) for p in self.projections)
        return {"distill": {
            "student_params": student_params, "teacher_params": count(self.teacher),
            "student_examples_per_s": throughput(self.model, s_inputs),
            "teacher_examples_per_s": throughput(self.teacher, t_inputs),
            "teacher": str(self.options.teacher or self.options.teacher_backbone),
            "teacher_cache": str(self.cache_path()) if self.use_cache else None,
        }}

