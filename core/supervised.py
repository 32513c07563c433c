"""Supervised transfer's building blocks: a head on a backbone, freezing schedules (linear probe, frozen groups,
LP-FT, gradual unfreezing), layer-wise learning-rate decay, and classification / multi-label / regression metrics.

``Supervised`` is a complete strategy (the built-in ``finetune`` registers it as it is); ``distill`` and
third-party strategies subclass it and change the step. LP-FT: Kumar et al., "Fine-Tuning can Distort Pretrained
Features and Underperform Out-of-Distribution" (ICLR 2022); gradual unfreezing: Howard & Ruder, ULMFiT (ACL 2018);
layer-wise LR decay: Clark et al., ELECTRA (ICLR 2020) / BEiT.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import GraftError
from .interfaces import UNLABELLED, Strategy
from .options import option

TASK_LOSSES = {"classification": {"cross_entropy"}, "multilabel": {"bce"}, "regression": {"mse"},
               "token_classification": {"cross_entropy"}, "segmentation": {"cross_entropy"}}
#: tasks scored by a confusion matrix over examples, tokens or pixels
CONFUSION_TASKS = ("classification", "token_classification", "segmentation")
#: tag prefixes of entity schemes (BIO / IOB2, BIOES / IOBES): tags like "B-PER" get entity-level metrics
ENTITY_PREFIXES = ("B-", "I-", "E-", "S-")


@dataclass
class SupervisedOptions:
    head: Literal["linear", "mlp"] = option("linear", "linear, or mlp (one hidden layer with GELU and dropout).")
    head_hidden: int = option(0, "Hidden width of the mlp head; 0 means the backbone's feature width. Segmentation: "
                                 "the decoder's width (0 = 64).")
    dropout: float = option(0.0, "Dropout before the head's output layer.")
    freeze: Literal["none", "backbone", "groups"] = option(
        "none", "none; backbone (linear probe: only the head trains); groups (the first freeze_groups layer groups).")
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
    metric_modes = {"loss": "min", "accuracy": "max", "macro_f1": "max", "micro_f1": "max", "exact_match": "max",
                    "mae": "min", "rmse": "min", "entity_f1": "max", "entity_precision": "max", "entity_recall": "max",
                    "miou": "max", "pixel_accuracy": "max"}

    def build(self):
        from torch import nn

        o = self.options
        task = self.data.task
        if task not in TASK_LOSSES:
            raise GraftError(f"[strategy] plugin = \"{self.name}\" does not handle data task {task!r}.")
        if self.loss is not None and self.loss.name in set().union(*TASK_LOSSES.values()) \
                and self.loss.name not in TASK_LOSSES[task]:
            raise GraftError(f"[loss] plugin = {self.loss.name!r} does not fit the {task} task of [data]; use "
                             f"{' or '.join(repr(x) for x in sorted(TASK_LOSSES[task]))}.")
        self.primary_metric = self.task_metric()
        dense = {"token_classification": "tokens", "segmentation": "maps"}.get(task)
        if dense and self.backbone.dense_features != dense:
            raise GraftError(f"[data] task {task!r} needs " + ("one feature vector per token" if dense == "tokens" else
                             "multi-scale feature maps") + f", and backbone {self.backbone.name!r} gives none; use "
                             + ("an hf text backbone." if dense == "tokens" else "a timm model with "
                                                                                 "forward_intermediates."))
        out = 1 if task == "regression" else self.data.num_outputs
        width = self.backbone.num_features
        if task == "segmentation":
            head = segmentation_head(self._map_channels(), out, o.head_hidden or 64, o.dropout)
        elif o.head == "linear":
            head = nn.Sequential(nn.Dropout(o.dropout), nn.Linear(width, out))
        else:
            hidden = o.head_hidden or width
            head = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(o.dropout), nn.Linear(hidden, out))

        if self.backbone.adapter_frozen and o.freeze == "backbone":
            raise GraftError(f"[strategy] freeze = \"backbone\" would freeze the [adapter] too (only the head would "
                             f"train). Drop the adapter for a linear probe, or use freeze = \"none\".")
        self.model = classifier(self.backbone.module, head, dense=dense)
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
        return self.model

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
        """Per-token and per-pixel tasks: the labelled tokens / pixels of the micro-batch, so the loss is normalised
        over the whole optimizer step (accumulation and process count do not change the update)."""
        if self.data.task in ("token_classification", "segmentation"):
            return int((batch["targets"] != UNLABELLED).sum())
        return None

    def training_step(self, model, batch):
        outputs, y = flatten_dense(model(batch["inputs"]), batch["targets"])
        if "step_targets" not in batch:
            return {"loss": self.loss(outputs, y)}
        labelled = (y != UNLABELLED).sum()
        mean = self.loss(outputs, y) if bool(labelled) else outputs.sum() * 0.0  # the mean over labelled targets
        return {"loss": mean * labelled / batch["step_targets"]}

    def _map_channels(self) -> list[int]:
        """Channels of each feature map, from one blank image through the backbone."""
        import torch

        cfg = self.backbone.image_config()
        module = self.backbone.module
        was_training = module.training
        module.eval()  # a probe in train mode would move BatchNorm's running statistics towards a blank image
        try:
            with torch.no_grad():
                maps = module(torch.zeros(1, cfg["channels"], *cfg["size"]), dense=True)
        finally:
            module.train(was_training)
        return [m.shape[1] for m in maps]

    def task_metric(self) -> str:
        """The metric for best weights that the data's task calls for: rmse (regression), miou (segmentation),
        entity_f1 (entity tags), else the class's ``primary_metric``. ``build`` and the serving copies of exports
        both use it."""
        task = self.data.task
        if task == "regression":
            return "rmse"
        if task == "segmentation":
            return "miou"
        return "entity_f1" if self.entities else type(self).primary_metric

    @property
    def token_level(self) -> bool:
        return self.data.task == "token_classification"

    @property
    def entities(self) -> bool:
        """Token tags of an entity scheme (B-PER, I-PER, O ...): entity-level metrics besides token accuracy."""
        return self.token_level and any(str(n).startswith(ENTITY_PREFIXES) for n in self.data.label_names or [])

    def eval_step(self, model, batch):
        outputs, y = model(batch["inputs"]).float(), batch["targets"]
        if self.data.task in ("segmentation", "token_classification"):
            return self.dense_sums(outputs, y)
        return self.eval_sums(outputs, y)

    def dense_sums(self, outputs, y, loss=None):
        """``eval_sums`` of per-token ``[B, T, K]`` or per-pixel ``[B, K, H, W]`` logits, plus entity counts of
        BIO-tagged tokens."""
        import torch

        sums = self.eval_sums(*flatten_dense(outputs, y), loss=loss)
        if not self.token_level:
            return sums
        if self.entities:  # per sentence: the tags of the words (their first pieces), in order
            names, pred, y = list(self.data.label_names), outputs.argmax(-1).cpu(), y.cpu()  # one copy per batch
            rows = [(y[b][y[b] != UNLABELLED].tolist(), pred[b][y[b] != UNLABELLED].tolist()) for b in range(len(y))]
            counts = entity_counts([[names[i] for i in g] for g, _ in rows], [[names[i] for i in p] for _, p in rows])
            sums["entities"] = torch.tensor(counts, dtype=torch.float64)
        return sums

    def eval_sums(self, outputs, y, loss=None):
        """Summable statistics of one batch's outputs against targets ``y`` (``loss``: the batch's mean loss,
        when the strategy computes it differently)."""
        import torch

        loss = self.loss(outputs, y) if loss is None else loss
        if self.data.task in CONFUSION_TASKS and not bool((y != UNLABELLED).all()):
            outputs, y = outputs[y != UNLABELLED], y[y != UNLABELLED]  # a few-label training split: score the labelled
        n = torch.tensor(float(y.shape[0]), device=outputs.device)
        sums = {"count": n, "loss_sum": loss.float() * n}
        task = self.data.task
        if task in CONFUSION_TASKS:
            k = outputs.shape[1]
            pred = outputs.argmax(1)
            sums["confusion"] = torch.bincount(y * k + pred, minlength=k * k).reshape(k, k)
        elif task == "multilabel":
            pred = (outputs > 0).long()
            y = y.long()
            sums["tp"] = (pred * y).sum(0)
            sums["fp"] = (pred * (1 - y)).sum(0)
            sums["fn"] = ((1 - pred) * y).sum(0)
            sums["exact"] = (pred == y).all(1).sum()
        else:
            err = outputs.reshape(y.shape) - y.float()
            sums["abs_err"] = err.abs().sum()
            sums["sq_err"] = (err ** 2).sum()
        return sums

    def compute_metrics(self, sums):
        n = float(sums["count"])
        m = {"loss": float(sums["loss_sum"]) / n}
        task = self.data.task
        if "entities" in sums:
            tp, n_pred, n_gold = (float(x) for x in sums["entities"])
            m["entity_precision"], m["entity_recall"] = tp / max(n_pred, 1), tp / max(n_gold, 1)
            m["entity_f1"] = 2 * tp / max(n_pred + n_gold, 1)
        if task in CONFUSION_TASKS:
            cm = sums["confusion"].double()
            tp = cm.diag()
            precision = tp / cm.sum(0).clamp(min=1)
            recall = tp / cm.sum(1).clamp(min=1)
            f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
            m["accuracy"] = float(tp.sum() / cm.sum())
            m["macro_f1"] = float(f1.mean())
            names = list(self.data.label_names or range(len(tp)))
            m["per_class"] = {str(names[i]): {"precision": float(precision[i]), "recall": float(recall[i]),
                                              "f1": float(f1[i]), "support": int(cm.sum(1)[i])}
                              for i in range(len(tp))}
            m["confusion_matrix"] = cm.long().tolist()
            if task == "segmentation":  # per class IoU = tp / (tp + fp + fn), over the classes that occur
                union = cm.sum(0) + cm.sum(1) - tp
                m["pixel_accuracy"] = m["accuracy"]
                m["miou"] = float((tp[union > 0] / union[union > 0]).mean())
        elif task == "multilabel":
            tp, fp, fn = (sums[k].double() for k in ("tp", "fp", "fn"))
            f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
            m["micro_f1"] = float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1))
            m["macro_f1"] = float(f1.mean())
            m["exact_match"] = float(sums["exact"]) / n
        else:
            m["mae"] = float(sums["abs_err"]) / n
            m["rmse"] = (float(sums["sq_err"]) / n) ** 0.5
        return m

    def predict(self, model, inputs):
        import torch

        names = list(self.data.label_names or [])
        if self.data.task == "token_classification":
            return _tag_words(model, inputs, names)
        if self.data.task == "segmentation":
            return _segment(model, inputs, names)
        outputs = model(inputs).float()
        if self.data.task == "regression":
            return [{"value": float(v)} for v in outputs.reshape(-1)]
        if self.data.task == "multilabel":
            probs = torch.sigmoid(outputs)
            return [{"labels": [names[j] for j in range(len(names)) if p[j] > 0.5],
                     "probabilities": {names[j]: float(p[j]) for j in range(len(names))}} for p in probs]
        probs = torch.softmax(outputs, 1)
        top = probs.topk(min(3, probs.shape[1]), dim=1)
        return [{"label": names[int(i[0])], "probability": float(p[0]),
                 "top": [{"label": names[int(j)], "probability": float(q)} for q, j in zip(p, i)]}
                for p, i in zip(top.values, top.indices)]

    def export(self, model, directory):
        """backbone/ in its family's native format, and head.safetensors."""
        from safetensors.torch import save_file

        from .checkpoint import clean_state_dict

        Path(directory, "backbone").mkdir(exist_ok=True)
        self.backbone.export(str(Path(directory, "backbone")))
        save_file(clean_state_dict(self.model.head.state_dict()),
                  str(Path(directory, "head.safetensors")))


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


def _tag_words(model, inputs, names):
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


def _segment(model, inputs, names):
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
