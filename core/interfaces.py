"""The plugin interfaces: Backbone, Strategy, Loss, SoftTargetLoss, DataSource, Adapter, Logger (``graft.Task`` is in
``task.py``; what only some plugins provide, in ``graft.capabilities``). ``docs/plugins.md`` explains each kind.

Importing this module never imports torch (``graft list`` / ``describe`` import plugins without paying for it);
implementations import torch inside methods. A plugin's ``name`` is the name it was registered under: ``create``
sets it on the instance it builds from a config table (a class keeps its own ``name``, "" unless it sets one).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from .errors import GraftError
from .options import NoOptions

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

#: class target of a training example kept without its label (torch's ignore_index): losses skip it, distill uses it
UNLABELLED = -100


class Plugin:
    """Base of every plugin class. ``Options`` is a dataclass: each field is one key of the config table."""

    Options: ClassVar[type] = NoOptions
    #: the name it was registered under, set on the instances a run builds (``create``)
    name: ClassVar[str] = ""

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()


class Backbone(Plugin):
    """A (pretrained) network mapping prepared inputs to features ``[batch, num_features]``. ``build()`` creates
    ``self.module`` (an ``nn.Module``: image inputs ``[B, C, H, W]``, text inputs a dict of tensors) and sets
    ``self.num_features``; ``self.module(inputs, hidden=True)`` returns ``(features, [h_0, h_1, ...])``, one pooled
    ``[batch, width_i]`` per layer, input side first (feature distillation; else NotImplementedError). Optional
    capabilities (a pretraining head, a settable tokenizer, ...) are in ``graft.capabilities``.
    """

    #: "image" or "text": which preprocessing a DataSource must apply
    modality: ClassVar[str] = "image"

    module: "nn.Module"
    num_features: int
    #: ids of parameters an adapter froze for good (set by the run): freezing schedules must leave them frozen
    adapter_frozen: frozenset = frozenset()
    #: what ``self.module(inputs, dense=True)`` returns, if anything: "tokens" ``[batch, tokens, num_features]`` (token
    #: classification); "maps", a list of ``[batch, C_i, H_i, W_i]``, input side first (segmentation)
    dense_features: str | None = None

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in backward (Chen et al. 2016); GraftError when the model cannot."""
        raise GraftError(f"[train] gradient_checkpointing = true: backbone {self.name!r} has no gradient "
                         f"checkpointing. Set it to false.")

    def native_model(self) -> "nn.Module":
        """The family's own model inside ``self.module`` (a ``transformers`` model, a timm model): adapters go in
        here, and are saved with its parameter names."""
        return self.module

    def build(self) -> "nn.Module":
        raise NotImplementedError

    def image_config(self) -> dict:
        """Image preprocessing: ``{"size": (H, W), "mean": (...), "std": (...), "channels": C}``."""
        raise NotImplementedError(f"backbone {self.name!r} takes no images")

    def tokenizer(self):
        """A Hugging Face (fast) tokenizer, for text backbones; None when a random-init model has none yet."""
        raise NotImplementedError(f"backbone {self.name!r} takes no text")

    def limits(self) -> dict:
        """What inputs the network takes, checked by data sources at setup (``graft.data.check_limits``):
        ``max_tokens``, ``vocab_size``, a fixed ``image_size`` (H, W), ``decoder`` (bool: a decoder-only text model).
        An absent key is no limit."""
        return {}

    def layer_groups(self) -> list[list[str]]:
        """Parameter names of ``self.module``, grouped from the input side (stem/embeddings) to the output
        side (last stage/layer). Freezing schedules and layer-wise LR decay use these groups."""
        return [[n for n, _ in self.module.named_parameters()]]

    @classmethod
    def reload_options(cls, options, export_dir, trust_remote_code: bool):
        """Options to rebuild this backbone for a finished run: point weights at ``export_dir`` (the run's
        ``backbone/``, or None); never let a run's options alone turn on code execution (``trust_remote_code``)."""
        return options

    def export(self, directory: str) -> None:
        """Save the network into ``directory`` in its family's format, which ``weights = DIR`` reads back."""
        from safetensors.torch import save_file

        from .checkpoint import clean_state_dict

        save_file(clean_state_dict(self.module.state_dict()), f"{directory}/model.safetensors")


class Loss(Plugin):
    """A named, configurable function ``loss(outputs, targets) -> scalar tensor``."""

    def __call__(self, outputs: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
        raise NotImplementedError


class SoftTargetLoss(Loss):
    """A distillation loss: ``loss(student_logits [batch, classes], {"teacher": teacher_logits, "labels": ids or None,
    "progress": 0..1})`` -> scalar (labels ``UNLABELLED``: soft targets only); ``at(progress) -> (alpha, temperature)``
    is its schedule (soft-target weight, softening temperature). ``distill`` takes any such loss."""

    def at(self, progress: float) -> tuple[float, float]:
        raise NotImplementedError


class DataSource(Plugin):
    """Reads data into splits and collates batches with the backbone's preprocessing. ``task`` names a task plugin
    (``graft list task``) or a language model's unlabelled data ("mlm", "sft"). Capabilities: graft.capabilities."""

    task: str = "classification"
    label_names: Sequence[str] | None = None
    #: the run's seed, set by the loop before ``setup`` (a second instance set up with it gets the same splits)
    seed: int = 0
    #: the training epoch about to run, set by ``set_epoch``
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the loop before each training epoch starts its loader (again on resume)."""
        self.epoch = epoch

    def example_seed(self, index: int) -> int:
        """A seed for random augmentation of example ``index`` of the training split in the current epoch: the same
        draw with any number of loader workers or processes, after a resume, and in a second instance of the source
        (a distill teacher's view of the same example, at its own resolution)."""
        import hashlib

        # a hash, not arithmetic: any seed fits torch's 64-bit seeds, and no (epoch, index) pair collides with another
        digest = hashlib.blake2b(f"{self.seed}:{self.epoch}:{int(index)}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    def setup(self, backbone: Backbone, seed: int) -> None:
        """Read the data, split it with ``seed``, prepare it with ``backbone.image_config()`` / ``tokenizer()``."""
        raise NotImplementedError

    def require(self, backbone: Backbone, modality: str) -> None:
        """Refuse a backbone of the wrong modality with a message naming both plugins."""
        if backbone.modality != modality:
                raise GraftError(f"[data] plugin = \"{self.name}\" needs a{'n' if modality[0] in 'aeiou' else ''} "
                             f"{modality} backbone; [backbone] plugin = \"{backbone.name}\" takes {backbone.modality}.")

    def report(self) -> dict:
        """Facts about the data for the run directory (``data.json`` and summary.json), e.g. skipped files."""
        return {}

    def dataset(self, split: str) -> Sequence | None:
        """"train", "val" or "test" after ``setup``: a sized, indexable collection, or None when there is none."""
        raise NotImplementedError

    def collate(self, examples: list) -> dict:
        """``{"inputs": ..., "targets": ...}`` of a batch of examples."""
        raise NotImplementedError

    def encode(self, backbone: Backbone, items: list[str]):
        """Raw inputs (image paths, texts) -> what ``collate`` puts under "inputs", for ``graft predict``; works
        without ``setup`` (only ``task`` and ``label_names`` are restored). docs/plugins.md: segmentation's sizes."""
        raise GraftError(f"data source {self.name!r} cannot prepare raw inputs for prediction.")

    @property
    def num_outputs(self) -> int:
        return len(self.label_names or ())


class Adapter(Plugin):
    """Parameter-efficient modules put into a backbone (LoRA, IA3, bias-only...): after ``apply`` only the adapter's
    parameters of the backbone train; the strategy's own modules (heads) train as usual. Methods raise GraftError
    for bad input (e.g. target modules the model does not have). See docs/plugins.md, ``register_adapters``."""

    def apply(self, backbone: Backbone) -> set[int]:
        """Put the modules into ``backbone.native_model()`` in place (after ``build``, before the strategy builds its
        model); return the ``id()``s of the backbone parameters that must never train (``backbone.adapter_frozen``)."""
        raise NotImplementedError

    def save(self, directory: str, backbone: Backbone) -> int:
        """Write the adapter in its library's own format (peft's for peft); return its size on disk in bytes."""
        raise NotImplementedError

    def merged(self, backbone: Backbone):
        """A context manager: inside it the native model holds merged weights in the family's own layout (so
        ``backbone.export`` writes a plain model); leaving it restores the adapter."""
        import contextlib

        return contextlib.nullcontext()


class Logger(Plugin):
    """An experiment tracker (TensorBoard, MLflow, ...) fed by the loop's main process beside ``metrics.jsonl``,
    which stays the source of truth; ``[train] loggers = ["NAME", ...]``, options in ``[loggers.NAME]``. Any exception
    it raises is reported once, as a warning naming it, and the logger is switched off: a tracker never stops
    training. docs/plugins.md (``register_loggers``) says what a resumed run asks of ``start``.
    """

    def start(self, run_dir: str, config: dict, resume_step: int | None) -> None:
        """The run begins (``config``: nested dicts; ``resume_step``: where a resumed run continues, else None). Once
        it returns, it holds exactly the records ``graft.read_metrics(run_dir)`` gives (cut back to that step)."""

    def log(self, record: dict) -> None:
        """One ``metrics.jsonl`` record: ``step``, ``epoch``, ``split`` ("train", "val" or "test") and numbers."""

    def finish(self, run_dir: str, summary: dict) -> None:
        """The run's summary (what summary.json holds), once its files are written."""

    def should_stop(self) -> bool:
        """Asked after each validation; True ends training as early stopping does (an Optuna pruner's hook)."""
        return False

    def close(self) -> None:
        """Called once whatever ended the run (after ``finish`` when it finished): release files and connections."""


class Strategy(Plugin):
    """A transfer-learning method: what the model is and what one step computes. The shared loop gives it AMP,
    accumulation, distributed training, evaluation, checkpoints and resume; docs/plugins.md (``register_strategies``)
    says what it expects of each method. Batches are what ``collate`` returns, plus ``batch["index"]`` (``[batch]``:
    the examples' positions in their split, stable across epochs and runs) and ``batch["split"]``."""

    #: metric used for "best" weights and early stopping unless the [train] table names another
    primary_metric: ClassVar[str] = "loss"
    #: the loss plugin a config without a [loss] table gets (None: the strategy needs none, or builds its own)
    default_loss: ClassVar[str | None] = None
    #: whether the strategy trains the backbone it is given, so that an [adapter] can stand in for its weights
    supports_adapters: ClassVar[bool] = False
    #: True when the run is rebuilt only to predict: the data source has only ``task`` and ``label_names``, so
    #: ``build`` must not read its splits, and may leave out modules only training uses (distill's teacher)
    predicting: bool = False
    #: which way each metric of ``compute_metrics`` improves, "max" or "min" (``[train] metric_mode`` overrides it)
    metric_modes: ClassVar[dict[str, str]] = {"loss": "min"}

    def metric_mode(self, metric: str) -> str:
        """The direction of ``metric``: "max" or "min". Raises GraftError when the strategy does not declare it."""
        modes = {**Strategy.metric_modes, **type(self).metric_modes}
        if metric not in modes:
            raise GraftError(f"Strategy {self.name!r} does not say whether metric {metric!r} improves upward. Set "
                             f"[train] metric_mode = \"max\" or \"min\".")
        return modes[metric]

    def __init__(self, options=None, *, backbone: Backbone, loss: Loss | None, data: DataSource):
        super().__init__(options)
        self.backbone, self.loss, self.data = backbone, loss, data

    def build(self) -> "nn.Module":
        """The module holding everything with parameters; the loop moves it, may wrap it, and saves its state."""
        raise NotImplementedError

    def param_groups(self, model: "nn.Module") -> list[dict]:
        """``[{"params": [...], "lr_scale": float, "name": str}, ...]``, frozen parameters included."""
        return [{"params": list(model.parameters()), "lr_scale": 1.0, "name": "all"}]

    def on_epoch_start(self, epoch: int, model: "nn.Module") -> None:
        """Schedules (freezing); called again on resume, so depend only on ``epoch`` and the strategy's state."""

    def on_step_start(self, step: int, total_steps: int) -> None:
        """Called before each optimizer step (``step`` counts from 0); for schedules of the strategy's own."""

    def step_targets(self, batch: dict) -> int | None:
        """For token-level losses: the targets in this micro-batch (it may draw masks into ``batch``), or None (the
        loss is a mean per micro-batch). The loop then puts the step's total over micro-batches and processes in
        ``batch["step_targets"]``, and ``training_step`` returns its summed loss divided by it."""
        return None

    def training_step(self, model: "nn.Module", batch: dict) -> dict:
        """``{"loss": tensor, **scalars to log}``; call ``model(...)`` (the wrapped module) for distributed sync."""
        raise NotImplementedError

    def eval_step(self, model: "nn.Module", batch: dict) -> dict:
        """Tensors that are summed over batches and processes."""
        raise NotImplementedError

    def compute_metrics(self, sums: dict) -> dict:
        """The summed ``eval_step`` results -> floats (and reports such as ``confusion_matrix``)."""
        raise NotImplementedError

    def predict(self, model: "nn.Module", inputs) -> list[dict]:
        """One JSON-able dict per input (e.g. label and probability), for ``graft predict``."""
        raise GraftError(f"strategy {self.name!r} does not predict.")

    def report(self, model: "nn.Module") -> dict:
        """Extra facts for summary.json at the end of a run (e.g. parameter counts)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Extra state for checkpoints: tensors and plain values."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def export(self, model: "nn.Module", directory: str) -> None:
        """Artifacts of the finished run into the run directory (main process only), e.g. ``backbone/``."""
