"""The plugin interfaces: Backbone, Strategy, Loss (and SoftTargetLoss), DataSource, Adapter, Logger, Task.

Importing this module never imports torch: plugins subclass these at import time, and ``graft list`` /
``graft describe`` import plugins without paying for torch. Implementations import torch inside methods.

Who owns what:
- Backbone: a pretrained network -> one feature vector per example, plus its preprocessing, input limits, ordered
  layer groups and native export. Knows nothing of tasks, heads or training.
- Strategy: the transfer method -- which modules exist, which parameters train at what LR scale, the loss of
  one batch, evaluation statistics and which way each metric improves, its own checkpoint state and exports. Never
  touches devices, precision, optimizers or distributed processes; it writes files only in ``export`` (into the run
  directory) and in caches of its own (distill's teacher cache).
- Loss: a configurable function of outputs and targets.
- DataSource: train/val/test splits and batch collation using the backbone's preprocessing; a second view of the
  same examples for another backbone (``view``).
- Adapter: parameter-efficient modules put into a backbone (LoRA, IA3, ...), saved in their library's format.
- Task: what differs between supervised tasks (classification, multi-label, regression, token classification,
  segmentation): the head, the loss's inputs, evaluation sums and metrics, the metric for best weights, how a
  prediction is shown, an export's outputs. The data source's ``task`` names it; strategies ask it.
The loop (``graft.loop``) owns everything about running and never special-cases a strategy by name. Every plugin's
``name`` is the name it was registered under: the registry sets it on the class, a run sets it on the instance it
builds from a config table.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from .options import NoOptions

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

#: class target of a training example kept without its label (torch's ignore_index): losses skip it, strategies
#: that learn from inputs alone (distill's soft targets) use it
UNLABELLED = -100


class Plugin:
    """Base of every plugin class. ``Options`` is a dataclass: each field is one key of the config table."""

    Options: ClassVar[type] = NoOptions
    #: set by the registry to the name the class was registered under
    name: ClassVar[str] = ""

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()


class Backbone(Plugin):
    """A (pretrained) network mapping prepared inputs to features of shape ``[batch, num_features]``.

    ``build()`` creates ``self.module`` (an ``nn.Module``) and sets ``self.num_features``. For image
    backbones the inputs are a float tensor ``[B, C, H, W]``; for text backbones a dict of tensors
    (``input_ids``, ``attention_mask``, ...). ``self.module(inputs, hidden=True)`` returns
    ``(features, [h_0, h_1, ...])``: one pooled ``[batch, width_i]`` tensor per layer, input side first (feature
    distillation uses these; a backbone that cannot give them raises NotImplementedError).
    """

    #: "image" or "text": which preprocessing a DataSource must apply
    modality: ClassVar[str] = "image"

    module: "nn.Module"
    num_features: int
    #: Hugging Face backbones: the underlying ``transformers.PreTrainedModel`` (None for other families). Strategies
    #: that need a task head of the same architecture (mlm's masked-LM head) build on it.
    hf_model: Any = None
    #: the local folder the pretrained weights came from (a ``save_pretrained`` folder), or None
    source_dir: Any = None
    #: ids of parameters an adapter froze for good (set by the run): freezing schedules must leave them frozen
    adapter_frozen: frozenset = frozenset()
    #: the dense features ``self.module(inputs, dense=True)`` returns, or None when it has none: "tokens" -- one
    #: vector per input token, ``[batch, tokens, num_features]`` (text models; token classification uses them);
    #: "maps" -- a list of feature maps ``[batch, C_i, H_i, W_i]``, input side first (image models; segmentation)
    dense_features: str | None = None

    def enable_gradient_checkpointing(self) -> None:
        """Keep only each block's inputs in the forward pass and recompute the rest during backward (Chen et al.
        2016, "Training Deep Nets with Sublinear Memory Cost"): activation memory falls from all layers' to about
        one block's, for roughly one more forward pass per step. The gradients are the same. Raises GraftError when
        the network has no such mode."""
        from .errors import GraftError

        raise GraftError(f"[train] gradient_checkpointing = true: backbone {self.name!r} has no gradient "
                         f"checkpointing. Set it to false.")

    def task_model(self, task: str) -> "nn.Module":
        """This network with a pretraining head: ``task`` "masked-lm" or "causal-lm". The returned model shares
        the backbone's own modules (training it trains the backbone), carries the pretrained head when the weights
        had one, and leaves parameters it does not use (a pooler) frozen. Its forward takes ``input_ids`` and
        ``attention_mask`` ``[batch, tokens]`` and returns ``.logits`` ``[batch, tokens, vocab]``. Raises
        GraftError when the backbone has no such form."""
        from .errors import GraftError

        raise GraftError(f"backbone {self.name!r} has no {task} form; use an hf text backbone.")

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

    def set_tokenizer(self, tokenizer) -> None:
        """Attach a tokenizer made elsewhere (a data source trains one on its corpus for a random-init model).
        Raises GraftError for backbones that cannot take one."""
        from .errors import GraftError

        raise GraftError(f"backbone {self.name!r} has no tokenizer and cannot take one.")

    def limits(self) -> dict:
        """What inputs the network can take, for data sources to check at setup instead of failing mid-step:
        ``"max_tokens"`` (int) usable positions of a text model, ``"vocab_size"`` (int) rows of its token embedding
        table, ``"image_size"`` ((H, W)) the one input size of a fixed-size image model, ``"decoder"`` (bool) a
        decoder-only text model (a corpus then trains it a byte-level BPE tokenizer). An absent key is no limit."""
        return {}

    def layer_groups(self) -> list[list[str]]:
        """Parameter names of ``self.module``, grouped from the input side (stem/embeddings) to the output
        side (last stage/layer). Freezing schedules and layer-wise LR decay use these groups."""
        return [[n for n, _ in self.module.named_parameters()]]

    @classmethod
    def reload_options(cls, options, export_dir, trust_remote_code: bool):
        """Options to rebuild this backbone for a finished run (eval, predict, a distill teacher). ``export_dir``
        is the run's ``backbone/`` export (or None): point weights there so the run survives its original weights
        moving. A run directory may come from someone else, so never let its options alone turn on code
        execution unless ``trust_remote_code`` is given."""
        return options

    def save_preprocessing(self, directory: str) -> None:
        """Write what encoding raw inputs for this network takes into the (existing) ``directory``:
        ``preprocessing.json`` (modality, ``limits()``, and ``image_config()`` for image models) and, for text
        models, the tokenizer's own files (its ``save_pretrained``). An exported network (ONNX) is served from these
        without the network itself (``graft eval`` / ``predict`` on an export). Raises GraftError when a text model
        has no tokenizer."""
        import json
        from pathlib import Path

        from .errors import GraftError

        info = {"backbone": self.name, "modality": self.modality, "limits": self.limits()}
        if self.modality == "image":
            info["image_config"] = self.image_config()
        else:
            tokenizer = self.tokenizer()
            if tokenizer is None:
                raise GraftError(f"backbone {self.name!r} has no tokenizer to save beside its export.")
            tokenizer.save_pretrained(directory)
        Path(directory, "preprocessing.json").write_text(json.dumps(info, indent=2))

    @classmethod
    def load_tokenizer(cls, directory: str):
        """The tokenizer ``save_preprocessing`` wrote into ``directory``. Raises GraftError for backbones that take
        no text."""
        from .errors import GraftError

        raise GraftError(f"backbone {cls.name!r} takes no text, so {directory} holds no tokenizer of its.")

    def export(self, directory: str) -> None:
        """Save the network in its family's native format into the (existing) ``directory``, so that the
        family's own loader -- or this backbone's ``weights`` option -- reads it back."""
        from safetensors.torch import save_file

        from .checkpoint import clean_state_dict

        save_file(clean_state_dict(self.module.state_dict()), f"{directory}/model.safetensors")


class Loss(Plugin):
    """A named, configurable function ``loss(outputs, targets) -> scalar tensor``."""

    def __call__(self, outputs: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
        raise NotImplementedError


class SoftTargetLoss(Loss):
    """A distillation loss: ``loss(student_logits, {"teacher": teacher_logits, "labels": class ids or None,
    "progress": float in [0, 1]})`` -> scalar, with ``at(progress) -> (alpha, temperature)`` giving its schedule
    (soft-target weight and softening temperature at that point of the run). Logits are ``[batch, classes]``;
    labels equal to ``UNLABELLED`` contribute soft targets only. The ``distill`` strategy takes any such loss."""

    def at(self, progress: float) -> tuple[float, float]:
        raise NotImplementedError


class DataSource(Plugin):
    """Reads data into splits and collates batches with the backbone's preprocessing.

    After ``setup``: ``dataset(split)`` returns a sized, indexable collection (or None when the split does
    not exist), ``collate(examples)`` returns ``{"inputs": ..., "targets": ...}``, and the attributes
    ``task`` and ``label_names`` describe targets. ``task`` names a task plugin (``graft list task``:
    classification, multilabel, regression, token_classification, segmentation, or a third party's), or the
    unlabelled data of a language-model strategy ("mlm", "sft").
    """

    task: str = "classification"
    label_names: Sequence[str] | None = None
    #: the run's seed, set by the loop before ``setup`` (a second instance set up with it gets the same splits)
    seed: int = 0
    #: the training epoch about to run, set by ``set_epoch``
    epoch: int = 0
    #: option names that say how examples are prepared for one backbone (image size, token length): ``view`` takes
    #: these from the other run, everything else (which examples, splits, labels, augmentation) from this one
    view_options: ClassVar[tuple[str, ...]] = ()
    #: option names that change only the training split (which training examples, their labels, augmentation),
    #: never validation or test: ``split_differences`` ignores them
    training_options: ClassVar[tuple[str, ...]] = ()

    def view(self, backbone: Backbone, prepared_like=None) -> "DataSource":
        """The same examples prepared for another ``backbone`` (a distill teacher's view): a new, set-up instance of
        this source with this one's seed and options, except the ``view_options`` (how examples are prepared, e.g.
        ``image_size``), taken from ``prepared_like`` -- the options of another run of this source -- when given.
        Example i of every split is then the same example in both; augmentation draws match through
        ``example_seed``. Raises GraftError when the new instance splits differently (a source whose splits
        depend on the backbone)."""
        import dataclasses

        from .errors import GraftError

        options = self.options
        if prepared_like is not None:
            options = dataclasses.replace(options, **{k: getattr(prepared_like, k) for k in self.view_options})
        other = type(self)(options)
        other.name, other.seed = self.name, self.seed
        other.setup(backbone, self.seed)
        for split in ("train", "val", "test"):
            a, b = self.dataset(split), other.dataset(split)
            if (a is None) != (b is None) or (a is not None and len(a) != len(b)):
                raise GraftError(f"The view of data source {self.name!r} for backbone {backbone.name!r} splits "
                                 f"differently ({split}: {len(b) if b else 0} vs {len(a) if a else 0} examples): a "
                                 f"data source must split the same way whatever the backbone.")
        return other

    def split_differences(self, options, seed: int) -> list[str]:
        """Why a run of this source with ``options`` and ``seed`` could have put other examples in validation or
        test than this one (one phrase per difference; empty when the splits match): another seed, or another value
        of an option that is neither a view option nor a training option."""
        import dataclasses

        diffs = [f"seed {seed} there, {self.seed} here"] if seed != self.seed else []
        return diffs + [f"[data] {f.name} = {getattr(options, f.name, None)!r} there, "
                        f"{getattr(self.options, f.name)!r} here" for f in dataclasses.fields(self.options)
                        if f.name not in self.view_options + self.training_options
                        and getattr(options, f.name, None) != getattr(self.options, f.name)]

    def set_epoch(self, epoch: int) -> None:
        """Called by the loop before each training epoch starts its loader (again on resume)."""
        self.epoch = epoch

    def example_seed(self, index: int) -> int:
        """A seed for random augmentation of example ``index`` of the training split in the current epoch.

        Drawing augmentation from it, rather than from a worker's RNG, makes the draw the same with any number
        of loader workers or processes, after a resume, and in a second instance of the source (a distill
        teacher's view of the same example, at its own resolution).
        """
        import hashlib

        # a hash, not arithmetic: any seed fits torch's 64-bit seeds, and no (epoch, index) pair collides with another
        digest = hashlib.blake2b(f"{self.seed}:{self.epoch}:{int(index)}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    def setup(self, backbone: Backbone, seed: int) -> None:
        raise NotImplementedError

    def require(self, backbone: Backbone, modality: str) -> None:
        """Refuse a backbone of the wrong modality with a message naming both plugins."""
        if backbone.modality != modality:
            from .errors import GraftError

            raise GraftError(f"[data] plugin = \"{self.name}\" needs a{'n' if modality[0] in 'aeiou' else ''} "
                             f"{modality} backbone; [backbone] plugin = \"{backbone.name}\" takes {backbone.modality}.")

    def check_limits(self, backbone: Backbone, *, where: str, tokens: int | None = None, tokens_key: str = "",
                     tokenizer=None, image_size: tuple[int, int] | None = None, image_key: str = "") -> int | None:
        """Check what this source will feed ``backbone`` against ``backbone.limits()``: ``tokens`` per example
        (option ``tokens_key``), the ``tokenizer``'s vocabulary, and ``image_size`` (option ``image_key``).

        Returns the backbone's usable token count (None: no limit). Raises GraftError naming ``where``, both numbers
        and the key to change when something does not fit -- an index error in the first step otherwise.
        """
        from .errors import GraftError

        limits = backbone.limits()
        max_tokens = limits.get("max_tokens")
        if tokens is not None and max_tokens is not None and tokens > max_tokens:
            raise GraftError(f"{where}: {tokens_key} = {tokens}, but backbone {backbone.name!r} takes at most "
                             f"{max_tokens} tokens per example{limits.get('max_tokens_why', '')}. Set {tokens_key} "
                             f"to {max_tokens} or less.")
        vocab = limits.get("vocab_size")
        if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
            raise GraftError(f"{where}: the tokenizer has {len(tokenizer)} tokens, but backbone {backbone.name!r}'s "
                             f"embedding table has {vocab} rows, so some token ids would not exist. Use the model's "
                             f"own tokenizer ([backbone] tokenizer = \"DIR\") or a model with vocab_size >= "
                             f"{len(tokenizer)}.")
        fixed = limits.get("image_size")
        if image_size is not None and fixed is not None and tuple(image_size) != tuple(fixed):
            raise GraftError(f"{where}: {image_key} = {image_size[0]} gives {image_size[0]}x{image_size[1]} images, "
                             f"but backbone {backbone.name!r} takes only {fixed[0]}x{fixed[1]}. Set {image_key} = "
                             f"{fixed[0]} (or 0 for the backbone's own size).")
        return max_tokens

    def report(self) -> dict:
        """Facts about the data for the run directory (``data.json`` and summary.json), e.g. skipped files."""
        return {}

    def dataset(self, split: str) -> Sequence | None:
        raise NotImplementedError

    def collate(self, examples: list) -> dict:
        raise NotImplementedError

    def encode(self, backbone: Backbone, items: list[str]):
        """Raw inputs (image paths, texts) -> what ``collate`` puts under "inputs"; used by ``graft predict``.
        Must work without ``setup``: only ``task`` and ``label_names`` are restored. Segmentation sources may give
        ``{"images": that, "sizes": [B, 2]}`` with each image's own (height, width): the masks come back at that
        size."""
        from .errors import GraftError

        raise GraftError(f"data source {self.name!r} cannot prepare raw inputs for prediction.")

    @property
    def num_outputs(self) -> int:
        return len(self.label_names or ())


class Adapter(Plugin):
    """Parameter-efficient modules put into a backbone (LoRA, IA3, bias-only...): after ``apply`` only the adapter's
    parameters of the backbone train; the strategy's own modules (heads) train as usual.

    - ``apply(backbone)`` puts the modules into ``backbone.native_model()`` in place (after ``backbone.build()``,
      before the strategy builds its model) and returns the set of ``id()`` of the backbone parameters that must
      never train; the loop's run stores it as ``backbone.adapter_frozen`` for strategies' freezing schedules.
    - ``save(directory, backbone)`` writes the adapter in its library's own format (peft: ``adapter_config.json``
      + ``adapter_model.safetensors``, loadable with ``peft.PeftModel.from_pretrained`` on the base model) and
      returns its size on disk in bytes.
    - ``merged(backbone)`` is a context manager: inside it the native model holds merged weights with the family's
      own module layout (so ``backbone.export`` writes a plain model); leaving it restores the adapter.
    Raises GraftError (e.g. target modules the model does not have, with the names that could match).
    """

    def apply(self, backbone: Backbone) -> set[int]:
        raise NotImplementedError

    def save(self, directory: str, backbone: Backbone) -> int:
        raise NotImplementedError

    def merged(self, backbone: Backbone):
        import contextlib

        return contextlib.nullcontext()


class Logger(Plugin):
    """An experiment tracker (TensorBoard, MLflow, ...) fed by the loop's main process beside ``metrics.jsonl``,
    which stays the source of truth. Chosen with ``[train] loggers = ["NAME", ...]``; options in ``[loggers.NAME]``.

    - ``start(run_dir, config, resume_step)``: the run begins (``config``: the resolved config as nested dicts;
      ``resume_step``: the step a resumed run continues from, else None). A resumed run asks this of a logger: once
      ``start`` returns, it holds exactly what ``metrics.jsonl`` holds, which has been cut back to the checkpoint's
      step by then (``graft.read_metrics(run_dir)`` reads it). What the interrupted attempt logged after
      that step (its steps past the checkpoint, a test record) is dropped -- TensorBoard purges it, MLflow starts
      a new run that replays the records kept -- since the resumed run logs those steps again.
    - ``log(record)``: one ``metrics.jsonl`` record -- ``step``, ``epoch``, ``split`` ("train", "val" or "test") and
      numbers.
    - ``finish(run_dir, summary)``: the run's summary (what summary.json holds) once its files -- summary.json,
      plots, weights -- are written.
    - ``should_stop()``: asked after each validation; True ends training as early stopping does (an Optuna
      pruner's hook). Default False.
    - ``close()``: called once whatever ended the run -- finished, interrupted or failed -- after ``finish`` when it
      finished: release files and connections, mark an unfinished tracker run as such.
    Any exception a logger raises is reported once, as a warning naming it, and the logger is switched off: a
    tracker never stops training.
    """

    def start(self, run_dir: str, config: dict, resume_step: int | None) -> None:
        pass

    def log(self, record: dict) -> None:
        pass

    def finish(self, run_dir: str, summary: dict) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def close(self) -> None:
        pass


class Strategy(Plugin):
    """A transfer-learning method, run by the shared loop.

    The loop gives every strategy AMP, accumulation, clipping, schedulers, distributed training, evaluation,
    checkpoints and resume. A strategy only says what the model is and what one step computes:

    - ``build()`` returns the ``nn.Module`` holding everything with parameters (backbone, heads, teacher...).
      The loop moves it to the device, may wrap it (DDP, torch.compile) and saves its state dict.
    - ``param_groups(model)`` returns ``[{"params": [...], "lr_scale": float, "name": str}, ...]``; include
      frozen parameters too so a later unfreeze needs no new optimizer.
    - ``on_epoch_start(epoch, model)`` applies schedules (freezing); it is called again on resume, so it must
      depend only on ``epoch`` and the strategy's own state.
    - ``on_step_start(step, total_steps)`` precedes every optimizer step, for schedules of the strategy's own.
    - Batches are what the DataSource's ``collate`` returns, plus ``batch["index"]`` (a long tensor ``[batch]``:
      the examples' positions in their split, stable across epochs and runs, e.g. for caches) and
      ``batch["split"]`` ("train", "val" or "test").
    - ``training_step(model, batch)`` returns ``{"loss": tensor, **other scalars to log}``. Call ``model(...)``
      (the wrapped module you were given) so that distributed gradient sync sees the forward pass.
    - ``eval_step(model, batch)`` returns a dict of tensors that are *summed* over batches and processes;
      ``compute_metrics(sums)`` turns the sums into floats.
    - ``state_dict()`` / ``load_state_dict()`` hold extra state (tensors and plain values) for checkpoints.
    - ``export(model, directory)`` writes the finished model's artifacts into the run directory (main process
      only).
    - ``predict(model, inputs)`` turns a batch of encoded raw inputs into JSON-able results.
    """

    #: metric used for "best" weights and early stopping unless the [train] table names another
    primary_metric: ClassVar[str] = "loss"
    #: the loss plugin a config without a [loss] table gets (None: the strategy needs none, or builds its own)
    default_loss: ClassVar[str | None] = None
    #: whether the strategy trains the backbone it is given, so that an [adapter] can stand in for its weights
    supports_adapters: ClassVar[bool] = False
    #: True when the run is rebuilt only to predict (``graft predict``, ``load_run(for_prediction=True)``): the data
    #: source is not set up (it has ``task`` and ``label_names`` only), so ``build`` must not read its splits, and may
    #: leave out modules that only training uses (distill's teacher and feature projections)
    predicting: bool = False
    #: which way each metric of ``compute_metrics`` improves: "max" or "min". The loop reads it for best weights
    #: and early stopping; ``[train] metric_mode`` overrides it.
    metric_modes: ClassVar[dict[str, str]] = {"loss": "min"}

    def metric_mode(self, metric: str) -> str:
        """The direction of ``metric``: "max" or "min". Raises GraftError when the strategy does not declare it."""
        from .errors import GraftError

        modes = {**Strategy.metric_modes, **type(self).metric_modes}
        if metric not in modes:
            raise GraftError(f"Strategy {self.name!r} does not say whether metric {metric!r} improves upward. Set "
                             f"[train] metric_mode = \"max\" or \"min\".")
        return modes[metric]

    def __init__(self, options=None, *, backbone: Backbone, loss: Loss | None, data: DataSource):
        super().__init__(options)
        self.backbone = backbone
        self.loss = loss
        self.data = data

    def build(self) -> "nn.Module":
        raise NotImplementedError

    def param_groups(self, model: "nn.Module") -> list[dict]:
        return [{"params": list(model.parameters()), "lr_scale": 1.0, "name": "all"}]

    def on_epoch_start(self, epoch: int, model: "nn.Module") -> None:
        pass

    def on_step_start(self, step: int, total_steps: int) -> None:
        """Called before each optimizer step (``step`` counts from 0); for schedules of the strategy's own."""

    def step_targets(self, batch: dict) -> int | None:
        """For token-level losses: the number of targets (e.g. masked or next tokens) in this micro-batch, or None
        (the default: the loss is a mean per micro-batch). Called for every micro-batch of an optimizer step before
        any forward pass; it may add to ``batch`` (e.g. the masks it drew). When it returns a number, the loop puts
        the step's total over all micro-batches and processes in ``batch["step_targets"]`` (a float tensor) and
        ``training_step`` must return its summed loss divided by it -- then batch 3 x accumulation 2 (or 2
        processes) gives the same update as batch 6 (the normalisation transformers adopted in v4.46)."""
        return None

    def training_step(self, model: "nn.Module", batch: dict) -> dict:
        raise NotImplementedError

    def eval_step(self, model: "nn.Module", batch: dict) -> dict:
        raise NotImplementedError

    def compute_metrics(self, sums: dict) -> dict:
        raise NotImplementedError

    def predict(self, model: "nn.Module", inputs) -> list[dict]:
        """One JSON-able dict per input (e.g. label and probability), for ``graft predict``."""
        from .errors import GraftError

        raise GraftError(f"strategy {self.name!r} does not predict.")

    def generate(self, model: "nn.Module", prompt: str, max_new_tokens: int = 50, temperature: float = 0.0,
                 top_p: float = 1.0, stream=None, raw: bool = False) -> str:
        """Text continuing ``prompt``, for ``graft generate``; ``stream(text)`` receives it as it is made; ``raw``
        passes the prompt as it is, without the template of the run's instruction data. Raises GraftError for
        strategies that do not generate."""
        from .errors import GraftError

        raise GraftError(f"strategy {self.name!r} does not generate text; graft generate needs a run of a language "
                         f"model strategy (clm).")

    def report(self, model: "nn.Module") -> dict:
        """Extra facts for summary.json at the end of a run (e.g. parameter counts)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def export(self, model: "nn.Module", directory: str) -> None:
        pass
