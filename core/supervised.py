"""Supervised transfer's building blocks: a head on a backbone, freezing schedules (linear probe, frozen groups,
LP-FT, gradual unfreezing), layer-wise learning-rate decay, and helpers of the task plugins (heads, confusion-matrix
and entity metrics, per-token / per-pixel flattening).

What differs between tasks (classification, multi-label, regression, token classification, segmentation, a third
party's) is a ``graft.Task`` plugin that the data's ``task`` names (``plugins/task_*.py``); ``Supervised`` asks it and
never branches on a task name.

``Supervised`` is a complete strategy (the built-in ``finetune`` registers it as it is); ``distill`` and
third-party strategies subclass it and change the step. LP-FT: Kumar et al., "Fine-Tuning can Distort Pretrained
Features and Underperform Out-of-Distribution" (ICLR 2022); gradual unfreezing: Howard & Ruder, ULMFiT (ACL 2018);
layer-wise LR decay: Clark et al., ELECTRA (ICLR 2020) / BEiT.

Also here for strategy authors: ``CausalGeneration``, the generation mixin of decoder strategies (``clm``,
``preference``): ``graft generate`` with and without ``--file``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import GraftError
from .generate import CausalGeneration  # noqa: F401 - public here
from .interfaces import UNLABELLED, Strategy
from .options import option
from .registry import get_registry
from .task import Task

#: tag prefixes of entity schemes (BIO / IOB2, BIOES / IOBES): tags like "B-PER" get entity-level metrics
ENTITY_PREFIXES = ("B-", "I-", "E-", "S-")


@dataclass
class SupervisedOptions:
    head: Literal["linear", "mlp"] = option("linear", "linear, or mlp (one hidden layer with GELU and dropout).")
    head_hidden: int = option(0, "Hidden width of the mlp head; 0 means the backbone's feature width. Segmentation: "
                                 "the decoder's width (0 = 64).")
    dropout: float = option(0.0, "Dropout before the head's output layer.")
    freeze: Literal["none", "backbone", "groups"] = option(
        "none", "none; backbone (linear probe: only the head trains); groups (the first freeze_groups layer groups). "
                "A frozen layer's BatchNorm keeps and uses its running statistics.")
    freeze_groups: int = option(0, "With freeze = \"groups\": how many layer groups, from the input side, stay frozen.")
    freeze_patterns: list[str] = field(default_factory=list, metadata={
        "help": "Glob patterns over parameter names (e.g. \"backbone.*.bn*\") frozen for the whole run."})
    lp_epochs: int = option(0, "LP-FT: train only the head for this many epochs, then unfreeze per `freeze`.")
    unfreeze_every: int = option(0, "Gradual unfreezing: start with the backbone frozen and unfreeze one more layer "
                                    "group, from the output side, every N epochs.")
    layer_decay: float = option(1.0, "Layer-wise LR decay: group i of G gets lr * layer_decay**(G-1-i); 1 = off.")
    head_lr_scale: float = option(1.0, "Learning-rate multiplier of the head.")
    backbone_lr_scale: float = option(1.0, "Learning-rate multiplier of the whole backbone (before layer decay).")

    def validate(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}.")
        if min(self.freeze_groups, self.lp_epochs, self.unfreeze_every, self.head_hidden) < 0:
            raise ValueError("freeze_groups, lp_epochs, unfreeze_every and head_hidden must not be negative.")


def classifier(backbone_module, head, dense: str | None = None):
    """backbone -> head as one module; ``forward(inputs, hidden=True)`` also returns the backbone's hidden layers.
    ``dense`` "tokens": the head applies to every token's features (``[B, T, D]`` -> ``[B, T, outputs]``); "maps":
    the head fuses the feature maps into per-pixel logits at the input's size (``[B, outputs, H, W]``)."""
    from torch import nn

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = backbone_module, head

        def forward(self, inputs, hidden=False):
            if dense == "maps":
                return self.head(self.backbone(inputs, dense=True), inputs.shape[-2:])
            if dense:
                return self.head(self.backbone(inputs, dense=True))
            if hidden:
                features, layers = self.backbone(inputs, hidden=True)
                return self.head(features), layers
            return self.head(self.backbone(inputs))

    return Classifier()


def entity_counts(gold: list[list[str]], predicted: list[list[str]]) -> tuple[int, int, int]:
    """(correct, predicted, gold) entity counts of tag sequences, entities read by seqeval's ``get_entities``
    (conlleval's rules: an I- tag after O or another type starts an entity) -- summed over batches they give
    seqeval's default micro precision, recall and F1. Raises GraftError without seqeval."""
    try:
        from seqeval.metrics.sequence_labeling import get_entities
    except ImportError:
        raise GraftError("Entity-level metrics of BIO / BIOES tags need seqeval: pip install 'graftkit[seqeval]'.") \
            from None
    tp = n_pred = n_gold = 0
    for g, p in zip(gold, predicted):
        ge, pe = set(get_entities(g)), set(get_entities(p))
        tp, n_pred, n_gold = tp + len(ge & pe), n_pred + len(pe), n_gold + len(ge)
    return tp, n_pred, n_gold


class Supervised(Strategy):
    """Fine-tune a backbone with a new head: classification, multi-label or regression."""

    Options = SupervisedOptions
    default_loss = "cross_entropy"
    primary_metric = "accuracy"
    supports_adapters = True
    #: the strategy's own metrics; each task adds its own (``Task.metric_modes``)
    metric_modes = {"loss": "min", "accuracy": "max"}

    @property
    def task(self) -> Task:
        """The task plugin the data's ``task`` names (built once). Raises GraftError when no task plugin has that
        name, listing those that exist."""
        task = getattr(self, "_task", None)
        if task is None or task.data is not self.data or task.name != self.data.task:
            self._task = task_for(self.data, f"[strategy] plugin = \"{self.name}\"")
        return self._task

    def metric_mode(self, metric: str) -> str:
        try:
            task_modes = self.task.metric_modes
        except GraftError:
            task_modes = {}
        if metric in task_modes and metric not in type(self).metric_modes:
            return task_modes[metric]
        return super().metric_mode(metric)

    def build(self):
        o = self.options
        task = self.task
        fitting = {loss for entry in get_registry().list("task") for loss in entry.cls.losses}
        if task.losses and self.loss is not None and self.loss.name in fitting and self.loss.name not in task.losses:
            raise GraftError(f"[loss] plugin = {self.loss.name!r} does not fit the {task.name} task of [data]; use "
                             f"{' or '.join(repr(x) for x in sorted(task.losses))}.")
        self.primary_metric = self.task_metric()
        task.check(self.backbone)
        head = task.head(self.backbone, o)

        if self.backbone.adapter_frozen and o.freeze == "backbone":
            raise GraftError(f"[strategy] freeze = \"backbone\" would freeze the [adapter] too (only the head would "
                             f"train). Drop the adapter for a linear probe, or use freeze = \"none\".")
        self.model = self.make_model(head)
        names = {n for n, _ in self.model.named_parameters()}
        self.groups = [[f"backbone.{n}" for n in g if f"backbone.{n}" in names] for g in self.backbone.layer_groups()]
        self.groups = [g for g in self.groups if g]
        grouped = {n for g in self.groups for n in g}
        stray = [n for n in names if n.startswith("backbone.") and n not in grouped]
        if stray:  # parameters the backbone left out of its groups train with the last group
            self.groups[-1:] = [(self.groups[-1] if self.groups else []) + stray]
        self.patterns_frozen = {n for n in names if any(fnmatch.fnmatch(n, p) for p in o.freeze_patterns)}
        if o.freeze_patterns and not self.patterns_frozen:
            raise GraftError(f"[strategy] freeze_patterns {o.freeze_patterns} match no parameter; names look like "
                             f"{sorted(names)[0]!r}.")
        if not self.predicting:
            self._check_targets()
        return self.model

    def make_model(self, head):
        """The module ``build`` returns: ``classifier`` of the backbone and ``head``. A subclass may add modules of its
        own (``adapt``'s domain discriminator) beside ``backbone`` and ``head``, whose names the freezing schedules
        and parameter groups read; its ``forward(inputs)`` must stay the classifier's."""
        task = self.task
        return classifier(self.backbone.module, head, dense=None if task.features == "pooled" else task.features)

    def _check_targets(self):
        """The task's check of the first training examples' targets (a bad label fails here, not mid-run)."""
        train = self.data.dataset("train")
        if train:
            self.task.check_targets(self.data.collate([train[i] for i in range(min(len(train), 64))])["targets"])

    # -- which parameters train, at which learning rate -------------------------------------------------
    def frozen_groups(self, epoch: int) -> int:
        """How many backbone layer groups (from the input side) are frozen during ``epoch``."""
        o, g = self.options, len(self.groups)
        if epoch < o.lp_epochs:
            return g
        if o.unfreeze_every:
            return max(0, g - (epoch - o.lp_epochs) // o.unfreeze_every)
        if o.freeze == "backbone":
            return g
        if o.freeze == "groups":
            return min(o.freeze_groups, g)
        return 0

    def on_epoch_start(self, epoch, model):
        n = self.frozen_groups(epoch)
        frozen = {name for group in self.groups[:n] for name in group} | self.patterns_frozen
        for name, p in self.model.named_parameters():
            p.requires_grad_(name not in frozen and id(p) not in self.backbone.adapter_frozen)
        self._freeze_norms(frozen)

    def _freeze_norms(self, frozen: set[str]) -> None:
        """BatchNorm layers whose parameters the schedule froze (``freeze``, ``lp_epochs``, gradual unfreezing,
        ``freeze_patterns``; not an adapter's freezing) normalise with their running statistics and stop updating
        them, as a frozen layer should: in train mode a linear probe would renormalise every batch and drift the
        pretrained statistics (timm's ``freeze_batch_norm_2d``, torchvision's ``FrozenBatchNorm2d``). A forward
        pre-hook keeps them in eval mode, since the loop puts the whole model back in train mode after evaluating."""
        import torch

        if not hasattr(self, "_norms"):
            if not frozen:  # nothing frozen yet: no hooks (a plain fine-tune never has them)
                return
            self._norms = {}
            for name, m in self.model.named_modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                    m.register_forward_pre_hook(_frozen_norm_stays_in_eval)
                    self._norms[name] = m
        for name, m in self._norms.items():
            was = getattr(m, "graft_frozen", False)
            m.graft_frozen = all(f"{name}.{p}" in frozen for p, _ in m.named_parameters(recurse=False))
            if was and not m.graft_frozen:  # unfrozen (LP-FT, gradual unfreezing): train mode again
                m.train(self.model.training)

    def param_groups(self, model):
        o = self.options
        params = dict(self.model.named_parameters())
        g = len(self.groups)
        groups = [{"params": [params[n] for n in names], "name": f"backbone.{i}",
                   "lr_scale": o.backbone_lr_scale * o.layer_decay ** (g - 1 - i)}
                  for i, names in enumerate(self.groups)]
        groups.append({"params": list(self.model.head.parameters()), "name": "head", "lr_scale": o.head_lr_scale})
        return groups

    # -- steps and metrics -------------------------------------------------------------------------------
    def step_targets(self, batch):
        """Per-token and per-pixel tasks (``Task.per_target``): the labelled tokens / pixels of the micro-batch, so
        the loss is normalised over the whole optimizer step (accumulation and process count do not change the
        update)."""
        if self.task.per_target:
            return int((batch["targets"] != UNLABELLED).sum())
        return None

    def training_step(self, model, batch):
        outputs, y = self.task.loss_inputs(model(batch["inputs"]), batch["targets"])
        if "step_targets" not in batch:
            return {"loss": self.loss(outputs, y)}
        labelled = (y != UNLABELLED).sum()
        mean = self.loss(outputs, y) if bool(labelled) else outputs.sum() * 0.0  # the mean over labelled targets
        return {"loss": mean * labelled / batch["step_targets"]}

    def task_metric(self) -> str:
        """The metric for best weights that the data's task calls for (``Task.metric``: rmse for regression, miou
        for segmentation, entity_f1 for entity tags ...), else the class's ``primary_metric``. ``build`` and the
        serving copies of exports both use it."""
        return self.task.metric() or type(self).primary_metric

    def eval_step(self, model, batch):
        return self.eval_sums(model(batch["inputs"]).float(), batch["targets"])

    def eval_sums(self, outputs, y, loss=None):
        """Summable statistics of one batch's outputs (as the model returns them) against targets ``y``: the
        task's (``Task.eval_sums``) and ``loss_sum`` (``loss``: the batch's mean loss, when the strategy computes
        it differently)."""
        loss = self.loss(*self.task.loss_inputs(outputs, y)) if loss is None else loss
        sums = self.task.eval_sums(outputs, y)
        return {"count": sums["count"], "loss_sum": loss.float() * sums["count"], **sums}

    #: per-token / per-pixel outputs need nothing else now: the task reads their shape
    dense_sums = eval_sums

    @property
    def per_example(self) -> bool:
        """graft.predictions: runs keep per-example predictions when the task's metrics are sums over examples."""
        return self.task.per_example

    def example_sums(self, model, batch):
        """Each example's ``eval_sums`` from one forward of the batch, with its ``_score`` (``Task.score``); None
        when a subclass scores otherwise (its ``eval_step`` then runs on each example alone)."""
        if type(self).eval_step is not Supervised.eval_step:
            return None
        outputs, y = model(batch["inputs"]).float(), batch["targets"]
        out = []
        for i in range(len(y)):
            sums = self.eval_sums(outputs[i:i + 1], y[i:i + 1])
            score = self.task.score(outputs[i:i + 1])
            out.append(sums if score is None else {**sums, "_score": score})
        return out

    def compute_metrics(self, sums):
        return {"loss": float(sums["loss_sum"]) / float(sums["count"]), **self.task.compute_metrics(sums)}

    def predict(self, model, inputs):
        return self.task.predict(model, inputs)

    def export(self, model, directory):
        """backbone/ in its family's native format, and head.safetensors."""
        from safetensors.torch import save_file

        from .checkpoint import clean_state_dict

        Path(directory, "backbone").mkdir(exist_ok=True)
        self.backbone.export(str(Path(directory, "backbone")))
        save_file(clean_state_dict(self.model.head.state_dict()),
                  str(Path(directory, "head.safetensors")))


def task_for(data, where: str) -> Task:
    """The task plugin ``data.task`` names, instantiated on ``data``. Raises GraftError naming ``where`` and the
    tasks that exist when there is none of that name (the data of a language-model strategy, a missing plugin)."""
    registry = get_registry()
    try:
        cls = registry.get("task", data.task)
    except GraftError as e:
        raise GraftError(f"{where} does not handle data task {data.task!r}: {e} A task is a plugin (`graft list "
                         f"task`); language-model data (mlm, sft) goes with [strategy] plugin = \"mlm\" or "
                         f"\"clm\".") from None
    task = cls(data=data)
    task.name = data.task
    return task


def map_channels(backbone) -> list[int]:
    """Channels of each feature map of a "maps" backbone, from one blank image through it."""
    return [channels for channels, _ in map_layout(backbone)]


def _frozen_norm_stays_in_eval(module, args) -> None:
    if module.graft_frozen and module.training:
        module.training = False


def map_layout(backbone) -> list[tuple[int, int]]:
    """(channels, stride) of each feature map of a "maps" backbone -- the stride in input pixels per map pixel (4,
    8, 16 ...) -- from one blank image through it."""
    import torch

    cfg = backbone.image_config()
    module = backbone.module
    was_training = module.training
    module.eval()  # a probe in train mode would move BatchNorm's running statistics towards a blank image
    try:
        with torch.no_grad():
            maps = module(torch.zeros(1, cfg["channels"], *cfg["size"]), dense=True)
    finally:
        module.train(was_training)
    return [(m.shape[1], max(1, round(cfg["size"][0] / m.shape[-2]))) for m in maps]


def check_class_ids(targets, data, task: str) -> None:
    """Class ids (any shape) must index ``data``'s labels, or be UNLABELLED: an id past them would fail deep inside
    the loss (an index error, or a device-side assert on a GPU). Class-probability targets (floats) pass. Raises
    GraftError naming the data plugin."""
    if targets.is_floating_point():
        return
    k = data.num_outputs
    bad = targets[(targets != UNLABELLED) & ((targets < 0) | (targets >= k))]
    if len(bad):
        names = [str(n) for n in (data.label_names or [])]
        raise GraftError(f"[data] plugin = \"{data.name}\" gives class id {int(bad[0])} for the {task} task, but "
                         f"it has {k} labels ({', '.join(names[:8])}{' ...' if k > 8 else ''}): a target must be one "
                         f"of 0..{k - 1}, or {UNLABELLED} for no label. Check the data's labels.")


def confusion_sums(pred, y, k: int) -> dict:
    """Predicted class ids against true ones (any equal shapes: ``[N]``, ``[B, T]``, ``[B, H, W]``; UNLABELLED
    targets left out) over ``k`` classes: ``count`` and the ``[K, K]`` ``confusion`` matrix (rows: truth, columns:
    prediction). Take ``pred`` as ``logits.argmax(class_dim)``: no flattened copy of the logits is needed."""
    import torch

    pred, y = pred.reshape(-1), y.reshape(-1)
    if not bool((y != UNLABELLED).all()):
        pred, y = pred[y != UNLABELLED], y[y != UNLABELLED]  # few labels, padding, ignored pixels: score the labelled
    return {"count": torch.tensor(float(y.shape[0]), device=pred.device),
            "confusion": torch.bincount(y * k + pred, minlength=k * k).reshape(k, k)}


def confusion_metrics(sums: dict, label_names) -> dict:
    """accuracy, macro_f1, per_class (precision, recall, f1, support) and confusion_matrix of summed
    ``confusion_sums``."""
    cm = sums["confusion"].double()
    tp = cm.diag()
    precision = tp / cm.sum(0).clamp(min=1)
    recall = tp / cm.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    m = {"accuracy": float(tp.sum() / cm.sum()), "macro_f1": float(f1.mean())}
    names = list(label_names or range(len(tp)))
    m["per_class"] = {str(names[i]): {"precision": float(precision[i]), "recall": float(recall[i]),
                                      "f1": float(f1[i]), "support": int(cm.sum(1)[i])} for i in range(len(tp))}
    m["confusion_matrix"] = cm.long().tolist()
    return m


def flatten_dense(outputs, y):
    """Token classification's ``[B, T, K]`` logits and ``[B, T]`` targets, or segmentation's ``[B, K, H, W]`` and
    ``[B, H, W]``, as ``[N, K]`` and ``[N]``."""
    if outputs.ndim == 4:
        return outputs.permute(0, 2, 3, 1).flatten(0, 2), y.flatten()
    if outputs.ndim == 3:
        return outputs.flatten(0, 1), y.flatten()
    return outputs, y


def segmentation_head(channels: list[int], classes: int, width: int = 64, dropout: float = 0.0):
    """A light FPN-style decoder (Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019, semantic
    branch, simplified): each feature map -> 1x1 conv to ``width`` channels, upsampled to the finest map and summed;
    3x3 conv + BatchNorm + ReLU; 1x1 conv to ``classes``; bilinear upsampling to the input size. Call
    ``head(maps, size)``: maps ``[B, C_i, H_i, W_i]`` -> logits ``[B, classes, H, W]``."""
    import torch.nn.functional as F
    from torch import nn

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
            self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True), nn.Dropout2d(dropout))
            self.classify = nn.Conv2d(width, classes, 1)

        def forward(self, maps, size):
            finest = max(maps, key=lambda m: m.shape[-1] * m.shape[-2]).shape[-2:]
            x = sum(F.interpolate(lat(m), size=finest, mode="bilinear", align_corners=False)
                    for lat, m in zip(self.lateral, maps))
            return F.interpolate(self.classify(self.fuse(x)), size=tuple(size), mode="bilinear", align_corners=False)

    return Head()


def outside_tag(names) -> str | None:
    """The tag of a word outside any entity: "O" when the tags have it or are an entity scheme (B-PER, I-PER ...),
    else None (a POS tag set has none)."""
    return "O" if "O" in names or any(str(n).startswith(ENTITY_PREFIXES) for n in names) else None


def tag_words(model, inputs, names):
    """One tag per input word, in order: the prediction at the word's first piece. A word with no piece at all
    (the tokenizer normalises it away: U+200B, U+00AD ...) gets the outside tag "O" when the tags have one (or are
    an entity scheme), else None; a word cut off by max_length gets None (probability None for both).

    ``inputs["word_ids"]``: ``[B, T]`` word index of every token, -1 for special and padding tokens;
    ``inputs["word_pieces"]`` (optional): ``[B, W]`` each word's piece count, -1 past the text's last word --
    without it, the words up to the last one with a piece are tagged. Both are taken out before the network sees
    the inputs."""
    import torch

    inputs = dict(inputs)
    word_ids, pieces = inputs.pop("word_ids"), inputs.pop("word_pieces", None)
    outside = outside_tag(names)
    probs = torch.softmax(model(inputs).float(), -1).cpu()
    out = []
    for b in range(word_ids.shape[0]):
        first = {}  # word -> its first piece's position
        for t, w in enumerate(word_ids[b].tolist()):
            if w >= 0 and w not in first:
                first[w] = t
        counts = pieces[b].tolist() if pieces is not None else [1 if w in first else 0
                                                                for w in range(max(first, default=-1) + 1)]
        tags, scores = [], []
        for w, n in enumerate(counts):
            if n < 0:
                break
            if w in first:
                tags.append(names[int(probs[b, first[w]].argmax())])
                scores.append(float(probs[b, first[w]].max()))
            else:
                tags.append(outside if n == 0 else None)
                scores.append(None)
        out.append({"tags": tags, "probabilities": scores})
    return out


def segment_masks(model, inputs, names):
    """One mask per image, as class-index rows, with its pixels per class. ``inputs``: the images ``[B, C, H, W]``,
    or ``{"images": that, "sizes": [B, 2]}`` with each image's own (height, width): its mask is resized there by
    nearest neighbour (class indices stay classes), as the masks it was trained on were resized to the model's."""
    import torch
    import torch.nn.functional as F

    sizes = None
    if isinstance(inputs, dict):
        inputs, sizes = inputs["images"], inputs.get("sizes")
    masks = model(inputs).float().argmax(1)
    out = []
    for b, m in enumerate(masks):
        if sizes is not None and tuple(sizes[b].tolist()) != tuple(m.shape):
            # nearest-exact: pixel centres map to pixel centres ("nearest" shifts the mask by up to a pixel)
            m = F.interpolate(m[None, None].float(), size=tuple(sizes[b].tolist()), mode="nearest-exact")[0, 0].long()
        counts = torch.bincount(m.flatten(), minlength=len(names)).tolist()
        out.append({"mask": m.tolist(), "pixels": {names[c]: n for c, n in enumerate(counts) if n}})
    return out


def write_mask(mask, item: str, folder: str) -> str:
    """``mask`` (``[H, W]`` class indices, nested lists) as ``folder``/STEM.mask.png (8-bit, one class index per
    pixel) for the input ``item``; returns its path. Raises GraftError when it cannot be written."""
    import numpy as np
    from PIL import Image

    path = Path(folder) / f"{Path(item).stem}.mask.png"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L").save(path)
    except OSError as e:
        raise GraftError(f"Cannot write {path}: {e.strerror or e}. Choose another --mask-dir.") from None
    return str(path)
