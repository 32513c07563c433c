"""The ``Task`` interface: what differs between supervised tasks (classification, multi-label, regression, token
classification, segmentation, a third party's). A data source's ``task`` names it; strategies, exports and
compression ask it. ``docs/plugins.md`` ("Writing a task") says the same for plugin authors.

Importing this module never imports torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .interfaces import Backbone, DataSource, Plugin

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

class Task(Plugin):
    """What one supervised task is: the head on the backbone's features, the loss's inputs, the evaluation sums and
    metrics, the metric for best weights, how a prediction is shown and what an export outputs.

    A data source's ``task`` (e.g. "classification") names the task plugin; ``Supervised`` (finetune), ``distill``,
    exports and compression ask it instead of branching on task names. The registry's class is instantiated once
    per strategy with the data source: ``self.data`` has ``label_names`` and ``num_outputs`` (and, when not only
    predicting, its splits). Tasks have no config table of their own. Shapes below: ``B`` batch, ``K`` outputs
    (``outputs()``), ``N`` scored targets (examples, tokens or pixels). Methods import torch inside.
    """

    #: which features of the backbone the head reads: "pooled" ``[B, D]``; "tokens" ``[B, T, D]`` (one per input
    #: token, ``Backbone.dense_features``); "maps" -- a list of ``[B, C_i, H_i, W_i]`` feature maps
    features: ClassVar[str] = "pooled"
    #: the loss plugins that fit the task; the first scores exported and compressed models. A config naming the loss
    #: of another task is refused; empty: any loss
    losses: ClassVar[tuple[str, ...]] = ()
    #: the metric for best weights and early stopping, unless ``[train] metric`` names another; None: the
    #: strategy's ``primary_metric``
    primary_metric: ClassVar[str | None] = None
    #: which way each metric of ``compute_metrics`` improves: "max" or "min"
    metric_modes: ClassVar[dict[str, str]] = {}
    #: True: the loss is a mean over the labelled targets of each example (tokens, pixels), normalised over the whole
    #: optimizer step (``Strategy.step_targets``); False: a mean over the micro-batch's examples
    per_target: ClassVar[bool] = False
    #: True when ``distill_logits`` turns outputs into class logits that a soft-target loss (kd) compares
    distillable: ClassVar[bool] = False
    #: True when ``feature_maps`` gives the maps the head computed in a model's last forward (detection's FPN
    #: levels): ``distill`` then teaches those maps beside the task's own loss (feature distillation)
    distill_maps: ClassVar[bool] = False
    #: True when every metric is a function of sums over examples, so runs keep per-example predictions for graft
    #: compare (``graft.predictions``); False for a metric of records such as detection's mAP
    per_example: ClassVar[bool] = True
    #: the output names of an ONNX / TorchScript export (its first output is what ``predict`` reads back)
    output_names: ClassVar[tuple[str, ...]] = ("logits",)
    #: the output's axes, for export.json and the docs, e.g. "[batch, classes]"
    output_shape: ClassVar[str] = "[batch, outputs]"

    def __init__(self, options=None, *, data: DataSource | None = None):
        super().__init__(options)
        self.data = data

    @property
    def label_names(self) -> list:
        return list(self.data.label_names or []) if self.data is not None else []

    def outputs(self) -> int:
        """Width ``K`` of the head's output: one per label by default."""
        return self.data.num_outputs

    def check(self, backbone: Backbone) -> None:
        """Refuse a backbone whose features the head cannot read (GraftError naming it and what would fit)."""
        from .errors import GraftError

        if self.features == "pooled" or backbone.dense_features == self.features:
            return
        need, fix = {"tokens": ("one feature vector per token", "an hf text backbone."),
                     "maps": ("multi-scale feature maps", "a timm model with forward_intermediates.")}[self.features]
        raise GraftError(f"[data] task {self.name!r} needs {need}, and backbone {backbone.name!r} gives none; use "
                         f"{fix}")

    def check_targets(self, targets: "torch.Tensor") -> None:
        """Refuse targets the task cannot score (a collated training batch's ``targets``): GraftError naming the
        values and what fits. Called on the first training examples when the strategy is built."""

    def head(self, backbone: Backbone, options) -> "nn.Module":
        """The head on ``backbone``'s features: ``[B, D]`` (or ``[B, T, D]``) -> ``[B, (T,) K]``; a "maps" task's is
        called ``head(maps, (H, W))``. ``options``: the strategy's (``head`` "linear" or "mlp", ``head_hidden``,
        ``dropout``). The default is the linear or mlp head on ``backbone.num_features``."""
        from torch import nn

        width, out = backbone.num_features, self.outputs()
        if options.head == "linear":
            return nn.Sequential(nn.Dropout(options.dropout), nn.Linear(width, out))
        hidden = options.head_hidden or width
        return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(options.dropout), nn.Linear(hidden, out))

    def loss_inputs(self, outputs: "torch.Tensor", targets: "torch.Tensor") -> tuple:
        """The model's outputs and the batch's targets as the loss plugin takes them (per-token / per-pixel tasks
        flatten them to ``[N, K]`` and ``[N]``). Default: as they are."""
        return outputs, targets

    def eval_sums(self, outputs: "torch.Tensor", targets: "torch.Tensor") -> dict:
        """Summable statistics of one batch (tensors, summed over batches and processes; a list of JSON-able
        records is concatenated instead, e.g. detection's boxes for mAP); ``"count"`` (a float tensor) is the number
        of scored targets, which the mean loss is weighted by."""
        raise NotImplementedError

    def compute_metrics(self, sums: dict) -> dict:
        """The summed ``eval_sums`` (with ``"loss_sum"``) -> metrics (floats; ``per_class`` and ``confusion_matrix``
        may be nested). The strategy adds ``loss``."""
        raise NotImplementedError

    def metric(self) -> str | None:
        """The metric for best weights for this data (e.g. entity F1 only for entity tags); default
        ``primary_metric``."""
        return self.primary_metric

    def distill_logits(self, student: "torch.Tensor", teacher: "torch.Tensor", targets: "torch.Tensor") -> tuple:
        """For distillation: student and teacher outputs as class logits ``[N, C]`` at the same targets ``[N]``
        (``distillable`` tasks; the teacher's may differ in size, e.g. another image resolution). Raises GraftError
        otherwise."""
        from .errors import GraftError

        raise GraftError(f"The {self.name!r} task has no class logits to distil.")

    def feature_maps(self, model: "nn.Module") -> list:
        """The head's feature maps ``[B, C, H_l, W_l]`` from ``model``'s (the unwrapped model's) last forward, for
        ``distill_maps`` tasks. Raises GraftError otherwise."""
        from .errors import GraftError

        raise GraftError(f"The {self.name!r} task keeps no feature maps to distil.")

    def score(self, outputs: "torch.Tensor") -> float | None:
        """The confidence of one example's prediction (its outputs, batch axis of 1) for ``predictions/*.jsonl``
        (``graft.predictions``), e.g. a classifier's top probability; None: the task has none."""
        return None

    def describe(self, sums: dict) -> dict:
        """One example's JSON fields for ``predictions/*.jsonl`` from its ``eval_sums`` (tensors): ``target``,
        ``prediction`` (label names) and ``correct`` when it has one label (a one-count ``confusion``); else none."""
        cm = sums.get("confusion")
        if cm is None or float(sums.get("count", 0)) != 1:
            return {}
        truth, pred = divmod(int(cm.reshape(-1).argmax()), cm.shape[-1])
        names = self.label_names or list(range(cm.shape[-1]))
        return {"target": names[truth], "prediction": names[pred], "correct": truth == pred}

    def predict(self, model: "nn.Module", inputs) -> list[dict]:
        """One JSON-able dict per input of an encoded batch (``DataSource.encode``)."""
        raise NotImplementedError

    def show(self, result: dict, item: str, out_dir: str) -> tuple[dict, str]:
        """How ``graft predict`` shows ``result`` for the raw input ``item``: the JSON record (without the input) and
        the line of text. A task whose predictions are files (masks) writes them under ``out_dir`` and names them in
        the record. Default: "label, probability, input" when the result has a label, else its JSON."""
        import json

        if "label" in result:
            return result, f"{result['label']}\t{result['probability']:.4f}\t{item}"
        if set(result) == {"text"}:  # generated text (seq2seq): one output per line, as a translation file has
            return result, result["text"].replace("\n", " ")
        return result, f"{json.dumps({k: v for k, v in result.items() if k != 'probabilities'})}\t{item}"
