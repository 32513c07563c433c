"""Optional capabilities: what only some plugins provide, beyond their interface (``graft.interfaces``).

A capability is a ``typing.Protocol``: a plugin has it by defining its members, without inheriting anything. Code
that needs one asks ``isinstance(plugin, Capability)``, or ``require(plugin, Capability, asked)``, which raises a
GraftError naming the plugin and what the config asked for. ``docs/plugins.md`` lists who uses each. Importing this
module never imports torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import GraftError
from .interfaces import Adapter, Backbone, DataSource, Logger, Loss, Strategy

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["BatchGeneration", "DistinctBatches", "FreshParameters", "PretrainedFolder", "PreparesBackbone",
           "SavedTokenizer", "ServingModel", "SettableTokenizer", "TargetData", "TaskData", "TaskModel",
           "TextGeneration", "Views", "require"]


# -- backbones ---------------------------------------------------------------------------------------------------

@runtime_checkable
class TaskModel(Protocol):
    """Give its network with a pretraining head (``task_model``).

    ``task_model(task, **options)``: this network with the head of ``task`` ("masked-lm", "causal-lm" or
    "seq2seq-lm"), sharing the backbone's own modules (training it trains the backbone), with the pretrained head when
    the weights had one, and parameters it does not use (a pooler) frozen. Its forward takes ``input_ids`` and
    ``attention_mask`` ``[batch, tokens]`` (seq2seq: and ``decoder_input_ids``) and returns ``.logits`` ``[batch,
    tokens, vocab]``; GraftError when the network has no such form. ``mlm``, ``clm`` and ``seq2seq`` train it (the hf
    backbone has it; its "seq2seq-lm" of an encoder is an encoder-decoder warm-started from it, with the option
    ``tie_encoder_decoder``).
    """

    def task_model(self, task: str, **options) -> "nn.Module": ...


@runtime_checkable
class SettableTokenizer(Protocol):
    """Take a tokenizer made elsewhere (``set_tokenizer``).

    ``set_tokenizer(tokenizer)``: from now on ``tokenizer()`` returns it. The ``corpus`` source trains one for a
    random-init text model; a run rebuilt in one process after sharded training hands its tokenizer over.
    """

    def set_tokenizer(self, tokenizer: Any) -> None: ...


@runtime_checkable
class SavedTokenizer(Protocol):
    """Load its tokenizer from saved files (``load_tokenizer``).

    The classmethod ``load_tokenizer(directory)`` reads back what the tokenizer's ``save_pretrained`` wrote into
    ``directory`` (an export's ``preprocessing/``): an ONNX export of a text model is served with it.
    """

    @classmethod
    def load_tokenizer(cls, directory: str) -> Any: ...


@runtime_checkable
class PretrainedFolder(Protocol):
    """Name the local folder its pretrained weights came from (``source_dir``).

    ``source_dir``: that folder (a ``save_pretrained`` folder), or None for a random-init network. A peft adapter
    records it as its base model.
    """

    source_dir: Any


@runtime_checkable
class FreshParameters(Protocol):
    """Name the parameters its checkpoint did not hold (``fresh_parameters``).

    ``fresh_parameters``: names in ``native_model()`` of parameters that start random in a pretrained network (a
    warm-started decoder's cross-attention). An adapter stands in for pretrained weights only, so it trains these
    whole (peft's ``modules_to_save``).
    """

    fresh_parameters: frozenset


# -- strategies --------------------------------------------------------------------------------------------------

@runtime_checkable
class TextGeneration(Protocol):
    """Generate text (``generate``).

    ``generate(model, prompt, max_new_tokens, temperature, top_p, stream, raw)``: text continuing ``prompt`` (greedy
    at temperature 0); ``stream(text)`` receives it as it is made; ``raw`` passes the prompt as it is, without the
    template of the run's instruction data. ``graft generate`` calls it (``clm`` has it).
    """

    def generate(self, model: "nn.Module", prompt: str, max_new_tokens: int = 50, temperature: float = 0.0,
                 top_p: float = 1.0, stream=None, raw: bool = False) -> str: ...


@runtime_checkable
class BatchGeneration(Protocol):
    """Answer many prompts in batches (``generate_batch``).

    ``generate_batch(model, prompts, max_new_tokens, temperature, top_p, seed, raw) -> list[str]``: one answer per
    prompt (text, or a chat: a list of {role, content} messages), greedy at temperature 0, else sampled from
    ``seed``. ``graft generate RUN --file F`` calls it (``clm`` has it); a pipeline's generate stage too.
    """

    def generate_batch(self, model: "nn.Module", prompts: list, max_new_tokens: int = 50, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int = 0, raw: bool = False) -> list[str]: ...


@runtime_checkable
class PreparesBackbone(Protocol):
    """Give the backbone the form the strategy trains before an adapter goes in (``prepare_backbone``).

    The classmethod ``prepare_backbone(options, backbone)`` is called once the backbone is built, before an
    [adapter] is put into ``backbone.native_model()``: ``seq2seq`` turns an encoder into an encoder-decoder there, so
    that LoRA reaches both halves.
    """

    @classmethod
    def prepare_backbone(cls, options: Any, backbone: Backbone) -> None: ...


@runtime_checkable
class DistinctBatches(Protocol):
    """Keep examples that share a key out of one training step (``batch_keys``).

    ``batch_keys(split)``: one ``frozenset`` of hashable keys per example of ``split`` (its texts), or None. The
    training order is then rearranged so that no two examples of one step (all processes) share a key
    (``graft.batches.distinct_order``): ``contrastive`` uses it, since a duplicate among in-batch negatives is a
    false negative.
    """

    def batch_keys(self, split: str) -> list | None: ...


@runtime_checkable
class ServingModel(Protocol):
    """Give the network to export when it is not a task's classifier (``serving_model``).

    ``serving_model(model) -> (module, output_names, output_shape)``: a module mapping the data's prepared inputs
    (``collate``'s "inputs") to its outputs, their names and a description of their shape. ``graft export --format
    onnx`` / ``torchscript`` export it and check it in onnxruntime; ``contrastive`` gives its encoder with pooling
    (``embeddings`` ``[batch, dim]``).
    """

    def serving_model(self, model: "nn.Module") -> tuple: ...


@runtime_checkable
class TargetData(Protocol):
    """Train on a target domain's data beside [data] (``set_target``).

    ``set_target(source, stream)``: the config's [target] data source, set up with the run's backbone and seed (its
    labels, if it has any, are for evaluation only), and ``stream``, a ``graft.batches.Stream`` of its training split
    (``stream.next()``: the next batch, on the run's device -- seeded, split across processes like the training
    loader; a checkpoint keeps ``stream.position``). Called before ``build`` when a run trains (``stream`` given) or
    is scored (``stream`` None); a run rebuilt to predict or export reads no target. Evaluation then covers the
    target's val and test splits too, their batches carrying ``batch["source"] = "target"``. ``adapt`` has it.
    """

    def set_target(self, source: DataSource, stream: Any) -> None: ...


@runtime_checkable
class TaskData(Protocol):
    """Train several tasks on one backbone, each task's data a [tasks.NAME] table (``task_data``).

    The classmethod ``task_data(options, sources) -> DataSource``: the run's data, made of the [tasks.NAME] sources
    (name -> an instance not yet set up), e.g. a ``graft.data.TaskMixture`` sampled as the strategy's ``options``
    say. A config with [tasks.NAME] tables has no [data]. ``multitask`` has it.
    """

    @classmethod
    def task_data(cls, options: Any, sources: dict) -> DataSource: ...


# -- data sources ------------------------------------------------------------------------------------------------

@runtime_checkable
class Views(Protocol):
    """Say which options prepare examples for one backbone (``view_options``, ``training_options``).

    Class attributes (tuples of option names): ``view_options`` say how examples are prepared for one backbone (image
    size, token length); ``training_options`` change only the training split (which training examples, their labels,
    augmentation), never validation or test. ``distill`` gives its teacher a second instance of the source, set up
    with the teacher's backbone: it takes the view options from the teacher's run (when that used the same source)
    and warns when an option that is neither differs between the runs (they split differently). A source without
    them is viewed with all of the student's options, and any difference counts.
    """

    view_options: tuple[str, ...]
    training_options: tuple[str, ...]


_KINDS = ((Backbone, "backbone"), (Strategy, "strategy"), (DataSource, "data source"), (Adapter, "adapter"),
          (Loss, "loss"), (Logger, "logger"))


def require(plugin, capability: type, asked: str, fix: str = ""):
    """``plugin`` (an instance, or a class for classmethods) when it has ``capability``. Otherwise raises GraftError:
    ``asked`` (what the config or command asked for, e.g. ``[strategy] plugin = "mlm"``), the plugin that lacks it,
    what it lacks (the capability's first docstring line) and ``fix``."""
    if isinstance(plugin, capability):
        return plugin
    cls = plugin if isinstance(plugin, type) else type(plugin)
    kind = next((k for base, k in _KINDS if issubclass(cls, base)), "plugin")
    does = capability.__doc__.strip().splitlines()[0].rstrip(".").replace("``", "")
    name = plugin.name or cls.__name__  # a class's registered name is set on the instances a run builds
    raise GraftError(f"{asked}: {kind} {name!r} does not {does[0].lower()}{does[1:]}. {fix}".rstrip())
