"""Run configuration: TOML tables, ``--set`` overrides, validation against the plugins' option dataclasses.

A config has one table per plugin kind -- ``[backbone]``, ``[strategy]``, ``[loss]``, ``[data]`` -- each naming
its plugin with ``plugin = "..."``, and a ``[train]`` table read by the loop (``TrainOptions``); a strategy that
adapts to a target domain also takes ``[target]``, a second data source, and a multi-task strategy takes one
``[tasks.NAME]`` data table per task in place of ``[data]``. Configs are data only: nothing in them is executed.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from . import options as opts
from .errors import GraftError, did_you_mean
from .files import read_text
from .options import option
from .registry import KINDS, Registry, get_registry


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """The [train] table: everything about running, shared by every strategy. Frozen, as the whole resolved config:
    ``Config.replace(train={...})`` gives a changed copy."""

    seed: int = option(0, "Seed for Python, NumPy and torch RNGs and for data order.")
    deterministic: bool = option(False, "Ask torch for deterministic algorithms (slower on GPU).")
    device: str = option("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "fp32; bf16 = autocast to bfloat16; fp16 = autocast to float16 with a gradient scaler.")
    epochs: int = option(1, "Passes over the training split (ignored when max_steps > 0).")
    max_steps: int = option(0, "Optimizer steps to run; 0 means use epochs.")
    batch_size: int = option(32, "Examples per process per micro-batch.")
    eval_batch_size: int = option(0, "Batch size for evaluation; 0 means batch_size.")
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step.")
    clip_grad_norm: float = option(0.0, "Clip the global gradient norm to this value; 0 disables.")
    optimizer: Literal["adamw", "sgd"] = option("adamw", "Optimizer.")
    lr: float = option(1e-3, "Base learning rate; strategies scale it per parameter group.")
    weight_decay: float = option(0.01, "Decoupled weight decay (AdamW) or L2 (SGD).")
    momentum: float = option(0.9, "SGD momentum.")
    fused_optimizer: bool = option(True, "Use torch's fused AdamW/SGD kernels where the parameters allow it.")
    betas: list[float] = option(default_factory=lambda: [0.9, 0.999], help="AdamW betas.")
    scheduler: Literal["constant", "linear", "cosine"] = option("constant", "Learning-rate schedule after warmup.")
    warmup_steps: int = option(0, "Linear warmup length in optimizer steps.")
    warmup_ratio: float = option(0.0, "Warmup as a fraction of all steps (used when warmup_steps is 0).")
    min_lr_ratio: float = option(0.0, "Final learning rate of linear/cosine schedules, as a fraction of lr.")
    eval_every: int = option(0, "Evaluate every N optimizer steps; 0 means at the end of every epoch.")
    eval_at_start: bool = option(False, "Also evaluate before the first step (a baseline in metrics.jsonl).")
    log_every: int = option(10, "Write a metrics.jsonl line every N optimizer steps.")
    metric: str = option("", "Validation metric for best weights and early stopping; empty = the strategy's.")
    metric_mode: Literal["auto", "max", "min"] = option("auto", "Whether the metric improves upward; auto asks the "
                                                                "strategy (its declared metric directions).")
    patience: int = option(0, "Stop after this many evaluations without improvement; 0 disables.")
    checkpoint_every: int = option(0, "Also checkpoint every N optimizer steps (always at each epoch end).")
    keep_checkpoints: int = option(2, "How many recent checkpoints to keep.")
    on_nan: Literal["stop", "skip"] = option("stop", "On a non-finite loss: stop the run, or skip that step.")
    find_unused_parameters: bool = option(
        True, "Distributed runs: let DDP find parameters a step does not use (a pooler under mean pooling, frozen "
              "layers, a teacher's unused head), as HF Trainer does by default. false saves a graph traversal per "
              "step when every trainable parameter is used in every step.")
    parallel: Literal["ddp", "fsdp"] = option(
        "ddp", "Several processes: ddp keeps a whole model in each (DistributedDataParallel); fsdp shards parameters, "
               "gradients and optimizer state across them (FSDP2 fully_shard per layer group; sharded checkpoints "
               "through torch.distributed.checkpoint). One process: no difference.")
    compile: bool = option(False, "Run the model through torch.compile.")
    gradient_checkpointing: bool = option(False, "Recompute the backbone's activations during backward instead of "
                                                 "keeping them: less memory, about a third more time per step.")
    channels_last: bool = option(False, "Use channels_last memory format (CNNs on GPU).")
    num_workers: int = option(0, "DataLoader worker processes.")
    progress: bool = option(True, "Show a progress bar.")
    plot: bool = option(True, "Write curves.png at the end (needs matplotlib).")
    loggers: list[str] = option(default_factory=list, help="Experiment trackers fed beside metrics.jsonl, e.g. "
                                "[\"tensorboard\", \"mlflow\"]; options in [loggers.NAME] tables.")

    def validate(self):
        if self.parallel == "fsdp" and self.precision == "fp16":
            raise ValueError("parallel = \"fsdp\" takes precision = \"bf16\" or \"fp32\" (fp16's gradient scaler "
                             "is DDP's); bf16 needs no scaler.")
        for key in ("epochs", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}.")
        for key in ("max_steps", "eval_batch_size", "warmup_steps", "eval_every", "patience",
                    "checkpoint_every", "num_workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must not be negative, got {getattr(self, key)}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}.")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}.")
        if self.clip_grad_norm < 0 or self.weight_decay < 0 or not 0.0 <= self.momentum < 1.0:
            raise ValueError("clip_grad_norm and weight_decay must not be negative, and momentum must be in [0, 1).")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")


PLUGIN_TABLES = tuple(k for k in KINDS if k not in ("logger", "task"))  # backbone, strategy, loss, data, adapter
#: tables holding a data source beside [data], for the strategies that take them (``graft.capabilities.TargetData``)
DATA_TABLES = ("target",)
#: a multi-task config's [tasks.NAME] tables, each a data source (in place of [data]; ``graft.capabilities.TaskData``)
TASKS = "tasks"
TABLES = PLUGIN_TABLES + DATA_TABLES + (TASKS, "train", "loggers")


@dataclasses.dataclass(frozen=True)
class PluginSpec:
    """One resolved plugin table: the plugin's class and its checked options. ``instantiate`` makes the plugin;
    ``dataclasses.replace(spec, options=...)`` a changed copy."""

    kind: str
    name: str
    cls: type
    options: Any

    def table(self) -> dict:
        return {"plugin": self.name, **dataclasses.asdict(self.options)}

    def instantiate(self, **kwargs):
        """The plugin instance, named (strategies take ``backbone=``, ``loss=``, ``data=``)."""
        obj = self.cls(self.options, **kwargs)
        obj.name = self.name
        return obj


def plugin_spec(kind: str, table: dict, where: str, registry: Registry | None = None, name: str = "") -> PluginSpec:
    """A ``[kind]`` table (``plugin = "NAME"`` and that plugin's options) checked against the registry and the
    plugin's option dataclass. Raises GraftError naming ``where``, the table (``name``, default ``kind``: [target]
    holds a data source) and the key."""
    registry = registry or get_registry()
    table, label = dict(table), name or kind
    if "plugin" not in table:
        known = ", ".join(e.name for e in registry.list(kind))
        raise GraftError(f"{where}: [{label}] needs plugin = \"NAME\". Available: {known or '(none)'}.")
    name = table.pop("plugin")
    if not isinstance(name, str):
        raise GraftError(f"{where}: [{label}] plugin must be a string, got {name!r}.")
    try:
        cls = registry.get(kind, name)
    except GraftError as e:
        raise GraftError(f"{where}: [{label}] plugin = {name!r}: {e}") from None
    return PluginSpec(kind, name, cls, opts.build(cls.Options, table, f"{where}: [{label}]"))


def create(kind: str, table: dict, *, where: str = "", registry: Registry | None = None, **kwargs):
    """A plugin instance from a config table, options validated -- graftkit's ``timm.create_model``::

        backbone = graft.create("backbone", {"plugin": "timm", "model": "resnet18"})
        backbone.build()                      # backbones are returned unbuilt; data sources un-set-up
        loss = graft.create("loss", {"plugin": "kd", "temperature": 2.0})

    ``kind`` is backbone, strategy, loss, data or adapter (strategies also take ``backbone=``, ``loss=``,
    ``data=``).
    Raises GraftError for an unknown kind, plugin or key, or a bad value, naming ``where`` (e.g. the config
    table that held ``table``), with a did-you-mean where one fits.
    """
    from .registry import canonical_kind

    kind = canonical_kind(kind)
    return plugin_spec(kind, table, where or "graft.create", registry).instantiate(**kwargs)


class FrozenDict(dict):
    """A dict that refuses changes: a resolved config's ``plugins``."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("A resolved config is immutable: Config.replace(plugins={...}) gives a changed copy.")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):
        return FrozenDict, (dict(self),)


@dataclasses.dataclass(frozen=True)
class Config:
    """A resolved config: immutable once resolved, so every holder (a run, a sweep's trials, a pipeline's
    fingerprint) sees the config that was checked. ``replace`` gives a changed copy."""

    path: str
    train: TrainOptions
    plugins: dict[str, PluginSpec]
    loggers: tuple[PluginSpec, ...] = ()  # [train] loggers, in order

    def __post_init__(self):
        object.__setattr__(self, "plugins", FrozenDict(self.plugins))
        object.__setattr__(self, "loggers", tuple(self.loggers))

    def replace(self, *, train: dict | None = None, plugins: dict | None = None, loggers=None) -> Config:
        """A copy with ``train`` keys changed (``{"metric": "f1"}``), ``plugins`` entries swapped (kind ->
        PluginSpec) and ``loggers`` (PluginSpecs) in place of the list. Nothing is validated again: the caller
        changes what it knows to be valid."""
        return Config(path=self.path, train=dataclasses.replace(self.train, **(train or {})),
                      plugins={**self.plugins, **(plugins or {})},
                      loggers=self.loggers if loggers is None else tuple(loggers))

    def to_dict(self) -> dict:
        out = {k: spec.table() for k, spec in self.plugins.items() if not k.startswith(TASKS + ".")}
        tasks = {k.split(".", 1)[1]: spec.table() for k, spec in self.plugins.items() if k.startswith(TASKS + ".")}
        if tasks:
            out[TASKS] = tasks
        out["train"] = dataclasses.asdict(self.train)
        tables = {spec.name: dataclasses.asdict(spec.options) for spec in self.loggers}
        if any(tables.values()):
            out["loggers"] = {k: v for k, v in tables.items() if v}
        return out

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())


def read_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise GraftError(f"Config file {str(p)!r} does not exist." if not p.exists()
                         else f"Config path {str(p)!r} is not a file.")
    # read_text: an editor's byte-order mark is dropped, and bytes that are not UTF-8 are named with their line
    text = read_text(p, "utf-8", "Config file", fix="Config files are UTF-8 (TOML): save it as UTF-8.")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise GraftError(f"{p}: not valid TOML: {e}. Fix the syntax at that line.") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``table.key=value``; value is a TOML literal, or taken as a bare string when it is not one."""
    if "=" not in text:
        raise GraftError(f"--set {text!r}: expected TABLE.KEY=VALUE, e.g. --set train.lr=3e-4.")
    key, raw = text.split("=", 1)
    path = [k.strip() for k in key.strip().split(".")]
    if len(path) < 2 or not all(path):
        raise GraftError(f"--set {text!r}: the key must name a table and a key, e.g. train.lr.")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``data`` with ``TABLE.KEY=VALUE`` overrides, as a new dict: tables that other configs share (a pipeline's
    or a matrix's stages) are never changed in place."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for k in path[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise GraftError(f"--set {text!r}: {k!r} is not a table.")
        node[path[-1]] = value
    return data


def resolve(data: dict, where: str, registry: Registry | None = None) -> Config:
    """Validate a parsed config; every error names ``where`` (the file), the table and the key."""
    registry = registry or get_registry()
    for table in data:
        if table not in TABLES:
            raise GraftError(f"{where}: unknown table [{table}].{did_you_mean(table, TABLES)} "
                             f"Tables: {', '.join('[' + t + ']' for t in TABLES)}.")
        if not isinstance(data[table], dict):
            raise GraftError(f"{where}: {table} must be a table ([{table}]), got {data[table]!r}.")
    plugins = {}
    for kind in PLUGIN_TABLES:
        table = dict(data.get(kind, {}))
        if not table and (kind in ("loss", "adapter") or kind == "data" and TASKS in data):
            continue  # the strategy's default loss applies, or it needs none; an adapter is optional
        plugins[kind] = plugin_spec(kind, table, where, registry)
    for name in DATA_TABLES:
        if name in data:
            plugins[name] = _data_table(name, data[name], plugins["strategy"], where, registry)
    if TASKS in data:
        plugins.update(_task_tables(data, plugins["strategy"], where, registry))
    if "loss" not in plugins and "data" in plugins:
        default = _fitting_loss(plugins["strategy"].cls.default_loss, plugins["data"].cls, registry)
        if default:
            cls = registry.get("loss", default)
            plugins["loss"] = PluginSpec("loss", default, cls, cls.Options())
    train = opts.build(TrainOptions, data.get("train", {}), f"{where}: [train]")
    return Config(path=where, train=train, plugins=plugins, loggers=_loggers(train, data.get("loggers", {}), where,
                                                                           registry))


def _data_table(name: str, table: dict, strategy: PluginSpec, where: str, registry: Registry) -> PluginSpec:
    """A data source's table beside [data] ([target]), for a strategy that takes it."""
    from .capabilities import TargetData

    if not isinstance(strategy.cls, TargetData):
        raise GraftError(f"{where}: [{name}] is data of a target domain, and [strategy] plugin = {strategy.name!r} "
                         f"does not train on one. Domain adaptation does: [strategy] plugin = \"adapt\"; or remove "
                         f"the [{name}] table.")
    return plugin_spec("data", table, where, registry, name=name)


def _task_tables(data: dict, strategy: PluginSpec, where: str, registry: Registry) -> dict[str, PluginSpec]:
    """A multi-task config's [tasks.NAME] tables (data sources, in place of [data]) as "tasks.NAME" -> PluginSpec."""
    import re

    from .capabilities import TaskData

    if not isinstance(strategy.cls, TaskData):
        raise GraftError(f"{where}: [tasks.*] tables give several tasks' data, and [strategy] plugin = "
                         f"{strategy.name!r} trains one task. Multi-task training does: [strategy] plugin = "
                         f"\"multitask\"; or give one task's data as [data].")
    if "data" in data:
        raise GraftError(f"{where}: a multi-task config gives each task's data as a [tasks.NAME] table; remove "
                         f"[data] (or make it one of the tasks).")
    tables = data[TASKS]
    if not tables or not all(isinstance(v, dict) for v in tables.values()):
        raise GraftError(f"{where}: [tasks] must hold one table per task, e.g. [tasks.upos] with plugin = \"conll\" "
                         f"and its options; got {tables!r}.")
    specs = {}
    for name, table in tables.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise GraftError(f"{where}: [tasks.{name}]: a task's name takes letters, digits, _ and - only (it "
                             f"prefixes the task's metrics, e.g. {name}/accuracy).")
        specs[f"{TASKS}.{name}"] = plugin_spec("data", table, where, registry, name=f"{TASKS}.{name}")
    return specs


def _fitting_loss(default: str | None, data_cls, registry: Registry) -> str | None:
    """The strategy's default loss, or the first loss of the data's task where the default cannot serve it: a task
    loss of another task (finetune's cross_entropy for detection: fcos), or a soft-target loss for a task with no
    class logits to soften (distill's kd for detection, whose maps are taught beside its own loss)."""
    name = getattr(data_cls, "task", None)
    if not default or not name or name not in registry.entries["task"]:
        return default
    task = registry.get("task", name)
    if not task.losses or default in task.losses:
        return default
    task_losses = {loss for entry in registry.list("task") for loss in entry.cls.losses}
    if default in task_losses or (not task.distillable and task.distill_maps):
        return task.losses[0]
    return default


def _loggers(train: TrainOptions, tables: dict, where: str, registry: Registry) -> list[PluginSpec]:
    """``[train] loggers`` with their ``[loggers.NAME]`` option tables."""
    stray = [name for name in tables if name not in train.loggers]
    if stray:
        raise GraftError(f"{where}: [loggers.{stray[0]}] configures a logger that [train] loggers does not list; add "
                         f"\"{stray[0]}\" to loggers = [...] or remove the table.")
    if len(set(train.loggers)) != len(train.loggers):
        raise GraftError(f"{where}: [train] loggers lists a logger twice: {train.loggers}.")
    specs = []
    for name in train.loggers:
        table = tables.get(name, {})
        if not isinstance(table, dict):
            raise GraftError(f"{where}: loggers.{name} must be a table ([loggers.{name}]), got {table!r}.")
        try:
            specs.append(plugin_spec("logger", {"plugin": name, **table}, where, registry))
        except GraftError as e:
            raise GraftError(str(e).replace("[logger] plugin", "[train] loggers: logger")) from None
    return specs


def load_config(source, overrides: list[str] = (), registry: Registry | None = None, where: str = "") -> Config:
    """The public way to get a resolved config (``graft.load_config``): ``source`` is a TOML file's path or the
    same tables as a dict (``{"backbone": {...}, "strategy": {...}, "train": {...}}``); ``overrides`` are
    ``--set``-style ``"train.lr=1e-3"`` strings. ``where`` names a dict's origin in messages (default
    ``"<config dict>"``). Raises GraftError naming the file (or ``where``), table and key for bad input."""
    if isinstance(source, dict):  # apply_overrides copies it: the caller's dict is never changed
        return resolve(apply_overrides(source, list(overrides)), where or "<config dict>", registry)
    return resolve(apply_overrides(read_toml(source), list(overrides)), where or str(source), registry)


# -- a small TOML writer for resolved configs (plain values, lists and tables only) ---------------------
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return repr(v)
    if isinstance(v, str):
        return '"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 32 or ord(c) == 127 else c)
                             for c in v) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def dumps_toml(data: dict) -> str:
    lines = []
    for table, values in data.items():
        lines.append(f"[{_toml_key(table)}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)
