"""The ``distill`` strategy: a finished run (the teacher) taught into any student backbone.

The teacher and the student may be of different families and sizes: each gets its own preprocessing, because
the teacher's inputs come from a second instance of the same data source, set up with the teacher's backbone and
the same seed (so example i is the same example for both). Teacher outputs are computed once per dataset and
kept as safetensors (the teacher cache), unless the data is randomly augmented: then it runs online, on the
student's own augmented batch when both preprocess alike, else on its own view of the same random draw (data
sources draw augmentation from ``example_seed``, so the teacher's 64x64 view shows the student's 32x32 warp).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from graft import UNLABELLED, GraftError, GraftWarning, hookimpl, option

from .finetune import Finetune, FinetuneOptions, classifier


@dataclass
class DistillOptions(FinetuneOptions):
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


class Distill(Finetune):
    """Distil a finished run (the teacher) into any student backbone: soft targets, features, a teacher cache."""

    Options = DistillOptions
    default_loss = "kd"

    def build(self):
        import torch
        from torch import nn

        from graft.loop import load_run

        o = self.options
        if self.data.task != "classification":
            raise GraftError("[strategy] plugin = \"distill\" distils classifiers; the [data] task is "
                             f"{self.data.task!r}.")
        if self.loss is None or not hasattr(self.loss, "at"):
            raise GraftError("[strategy] plugin = \"distill\" needs [loss] plugin = \"kd\" (or a loss with the same "
                             "interface).")
        if o.teacher:
            run = load_run(Path(o.teacher), for_prediction=True, device="cpu")
            teacher_labels = list(run.data.label_names or [])
            self.teacher = run.model
            self.teacher_backbone_obj, self.teacher_conf = run.backbone, run.config
        else:
            self.teacher, self.teacher_backbone_obj = self._teacher_from_tables()
            teacher_labels = list(self.data.label_names or [])
            self.teacher_conf = None
        if teacher_labels != list(self.data.label_names or []):
            raise GraftError(f"[strategy] teacher {o.teacher!r} predicts labels {teacher_labels}, but the data has "
                             f"{list(self.data.label_names or [])}.")
        self.teacher.eval().requires_grad_(False)
        self.teacher_data = self._teacher_data()
        model = super().build()
        self.projections = []
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
            from graft.registry import get_registry

            self.feature_loss = get_registry().get("loss", o.feature_loss)()
        self.use_cache = o.cache == "on" or (o.cache == "auto" and not getattr(self.teacher_data.options, "augment",
                                                                                 False))
        if o.cache == "on" and getattr(self.teacher_data.options, "augment", False):
            raise GraftError("[strategy] cache = \"on\" with augmented data would teach stale views; use cache = "
                             "\"auto\" (the teacher then runs online).")
        self.cache: dict | None = None
        self.progress = 0.0
        self.same_view = self._same_view()
        return model

    def param_groups(self, model):
        groups = super().param_groups(model)
        if self.projections:
            groups.append({"params": list(self.model.projections.parameters()), "lr_scale": self.options.head_lr_scale,
                           "name": "projections"})
        return groups

    def _same_view(self) -> bool:
        """True when the teacher would get exactly the student's inputs (same data options and preprocessing):
        then an online teacher runs on the student's batch itself -- the same augmented view, no second load."""
        import torch

        s, t = self.backbone, self.teacher_backbone_obj
        if s.modality != t.modality or repr(self.teacher_data.options) != repr(self.data.options):
            return False
        if s.modality == "text":
            st, tt = s.tokenizer(), t.tokenizer()
            if type(st) is not type(tt) or st.get_vocab() != tt.get_vocab():
                return False
        # The prepared inputs decide, not the backbones' nominal input sizes: a data source may resize both.
        split = next(sp for sp in ("val", "test", "train") if self.data.dataset(sp))
        n = min(8, len(self.data.dataset(split)))
        a = self.data.collate([self.data.dataset(split)[i] for i in range(n)])["inputs"]
        b = self._teacher_inputs(split, range(n))
        a, b = (x if isinstance(x, dict) else {"": x} for x in (a, b))
        return a.keys() == b.keys() and all(
            torch.is_tensor(a[k]) and torch.is_tensor(b[k]) and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
            for k in a)

    def _teacher_from_tables(self):
        """A teacher from a backbone table and a linear head's weights."""
        import torch
        from safetensors.torch import load_file

        from graft import options as opts
        from graft.registry import get_registry

        table = dict(self.options.teacher_backbone)
        name = table.pop("plugin", None)
        if not name:
            raise GraftError("[strategy] teacher_backbone needs plugin = \"...\" like a [backbone] table.")
        cls = get_registry().get("backbone", name)
        backbone = cls(opts.build(cls.Options, table, "[strategy] teacher_backbone"))
        backbone.name = name
        with torch.random.fork_rng(devices=[]):  # the student's initialisation must not depend on the teacher's
            backbone.build()
            head = torch.nn.Linear(backbone.num_features, self.data.num_outputs)
        head_state = load_file(self.options.teacher_head) if Path(self.options.teacher_head).is_file() else None
        if head_state is None:
            raise GraftError(f"[strategy] teacher_head {self.options.teacher_head!r} does not exist.")
        w = next((v for k, v in head_state.items() if k.endswith("weight")), None)
        b = next((v for k, v in head_state.items() if k.endswith("bias")), None)
        classes = self.data.num_outputs
        if w is None or tuple(w.shape) != (classes, backbone.num_features):
            raise GraftError(f"[strategy] teacher_head must hold a linear layer's weight of shape [{classes}, "
                             f"{backbone.num_features}] (the data's classes x the teacher's features); found "
                             f"{ {k: tuple(v.shape) for k, v in head_state.items()} }.")
        if b is None:
            b = torch.zeros(classes)
        head.load_state_dict({"weight": w, "bias": b})

        return classifier(backbone.module, head), backbone

    def _teacher_data(self):
        """The student's data source, set up again with the teacher's backbone and the same seed, so example i is
        the same example for both. Which examples, labels and augmentation come from this run's options; how they
        are prepared (the source's ``view_options``, e.g. image_size) from the teacher run's, when it used the
        same data plugin -- a teacher trained on few labels can then teach all the student's examples."""
        import dataclasses

        spec = self.teacher_conf.plugins["data"] if self.teacher_conf is not None else None
        options = self.data.options
        if spec is not None and spec.name == self.data.name:
            options = dataclasses.replace(options, **{k: getattr(spec.options, k) for k in self.data.view_options})
            self._warn_if_teacher_split_differs(spec.options)
        td = type(self.data)(options)
        td.name, td.seed = self.data.name, self.data.seed
        td.setup(self.teacher_backbone_obj, self.data.seed)
        for split in ("train", "val", "test"):
            a, b = self.data.dataset(split), td.dataset(split)
            if (a is None) != (b is None) or (a is not None and len(a) != len(b)):
                raise GraftError(f"[strategy] the teacher's view of the data splits differently ({split}: "
                                 f"{len(b) if b else 0} vs {len(a) if a else 0} examples): data source "
                                 f"{self.data.name!r} must split the same way whatever the backbone.")
        return td

    def _warn_if_teacher_split_differs(self, theirs):
        """The teacher run may have trained on this run's validation and test examples: another seed, or other
        options that decide the splits (anything but how examples are prepared or what the training split holds)."""
        import dataclasses
        import warnings

        ours, src = self.data.options, self.data
        keys = [f.name for f in dataclasses.fields(ours) if f.name not in src.view_options + src.training_options
                and getattr(theirs, f.name, None) != getattr(ours, f.name)]
        why = [f"[data] {k} = {getattr(theirs, k, None)!r} there, {getattr(ours, k)!r} here" for k in keys]
        if self.teacher_conf.train.seed != src.seed:
            why.insert(0, f"seed {self.teacher_conf.train.seed} there, {src.seed} here")
        if why:
            warnings.warn(f"[strategy] teacher {self.options.teacher!r} split its data differently ({'; '.join(why)}"
                          f"), so it may have trained on this run's validation and test examples and flatter the "
                          f"student. Use the teacher run's [train] seed and [data] split settings.", stacklevel=2)

    def _teacher_inputs(self, split, indices):
        self.teacher_data.set_epoch(self.data.epoch)  # the same augmentation draw as the student's view
        ds = self.teacher_data.dataset(split)
        return self.teacher_data.collate([ds[int(i)] for i in indices])["inputs"]

    def _device(self):
        return next(self.model.parameters()).device

    def _run_teacher(self, split, indices, inputs=None):
        """Teacher logits (and hidden layers) for examples ``indices`` of ``split`` (or for ready ``inputs``)."""
        import torch

        from graft.loop import move

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
    def cache_key(self) -> str:
        """Teacher weights + data + preprocessing: any change makes a new cache."""
        import torch

        if getattr(self, "_cache_key", None):
            return self._cache_key
        h = hashlib.sha256()
        for v in self.teacher.state_dict().values():  # values, not names: one teacher, however it was given
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        b = self.teacher_backbone_obj
        if b.modality == "image":
            preprocessing = repr(sorted(b.image_config().items()))
        else:
            tok = b.tokenizer()
            preprocessing = f"{type(tok).__name__}:{len(tok)}:{getattr(tok, 'init_kwargs', {}).get('do_lower_case')}"
        spec = {"data": self.teacher_data.name, "options": repr(self.teacher_data.options),
                "preprocessing": preprocessing,
                "seed": self.data.seed, "layers": [t for _, t in getattr(self, "pairs", [])],
                "sizes": [len(self.teacher_data.dataset(s) or []) for s in ("train", "val", "test")]}
        h.update(json.dumps(spec, sort_keys=True).encode())
        self._cache_key = h.hexdigest()[:24]
        return self._cache_key

    def cache_path(self) -> Path:
        root = self.options.cache_dir or os.environ.get("GRAFT_CACHE_DIR") or Path.home() / ".cache" / "graftkit"
        return Path(root) / "teacher" / f"{self.cache_key()}.safetensors"

    def _load_or_build_cache(self):
        import torch
        from safetensors.torch import load_file, save_file

        path = self.cache_path()
        if path.is_file():
            flat = load_file(str(path), device=str(self._device()))
        else:
            flat = {}
            for split in ("train", "val", "test"):
                n = len(self.teacher_data.dataset(split) or [])
                logits, hidden = [], []
                for start in range(0, n, 64):
                    out, hs = self._run_teacher(split, range(start, min(n, start + 64)))
                    logits.append(out)
                    hidden.append(hs)
                if n:
                    flat[f"{split}.logits"] = torch.cat(logits)
                    for j in range(len(hidden[0])):
                        flat[f"{split}.hidden.{j}"] = torch.cat([hs[j] for hs in hidden])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({k: v.cpu().contiguous() for k, v in flat.items()}, str(tmp))
            os.replace(tmp, path)  # whole or absent, even with several processes writing
        self.cache = flat

    def teacher_outputs(self, split, index, inputs=None):
        if not self.use_cache:
            if inputs is not None and self.same_view:
                return self._run_teacher(split, None, inputs)
            return self._run_teacher(split, index.tolist())
        if self.cache is None:
            self._load_or_build_cache()
        index = index.to(self.cache[f"{split}.logits"].device)
        hidden = [self.cache[f"{split}.hidden.{j}"][index] for j in range(len(getattr(self, "pairs", [])))]
        return self.cache[f"{split}.logits"][index], hidden

    # -- steps ---------------------------------------------------------------------------------------------
    def on_step_start(self, step, total_steps):
        self.progress = step / max(1, total_steps - 1)

    def training_step(self, model, batch):
        t_logits, t_hidden = self.teacher_outputs(batch["split"], batch["index"], batch["inputs"])
        targets = {"teacher": t_logits, "labels": batch["targets"], "progress": self.progress}
        if not self.options.feature_layers:
            logits = model(batch["inputs"])
            return {"loss": self.loss(logits, targets)}
        logits, hidden = model(batch["inputs"], hidden=True)
        kd = self.loss(logits, targets)
        proj = self.model.projections
        feat = sum(self.feature_loss(proj[i](hidden[s]), t_hidden[i]) for i, (s, _) in enumerate(self.pairs))
        feat = feat / len(self.pairs)
        return {"loss": kd + self.options.feature_weight * feat, "kd_loss": kd.detach(), "feature_loss": feat.detach()}

    def eval_step(self, model, batch):
        outputs = model(batch["inputs"]).float()
        t_logits, _ = self.teacher_outputs(batch["split"], batch["index"], batch["inputs"])
        kd = self.loss(outputs, {"teacher": t_logits, "labels": batch["targets"], "progress": self.progress})
        sums = self.eval_sums(outputs, batch["targets"], loss=kd)
        labelled = batch["targets"] != UNLABELLED  # the same examples eval_sums counts
        sums["teacher_correct"] = (t_logits.argmax(1) == batch["targets"]).sum()
        sums["agree"] = ((t_logits.argmax(1) == outputs.argmax(1)) & labelled).sum()
        return sums

    def compute_metrics(self, sums):
        m = super().compute_metrics(sums)
        n = float(sums["count"])
        m["teacher_accuracy"] = float(sums["teacher_correct"]) / n
        m["agreement"] = float(sums["agree"]) / n
        return m

    def report(self, model):
        """Parameter counts and inference throughput (examples/s on this device) of student and teacher."""
        import torch

        from graft.loop import move

        val = self.data.dataset("test") or self.data.dataset("val") or self.data.dataset("train")
        idx = list(range(min(64, len(val))))
        device = self._device()
        s_inputs = move(self.data.collate([val[i] for i in idx])["inputs"], device)
        t_inputs = move(self._teacher_inputs("test" if self.data.dataset("test") else "val", idx), device)
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


@hookimpl
def register_strategies(register):
    register(Distill, name="distill")
