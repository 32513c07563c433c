"""A run's objects, built from a config in one of its modes (train, eval, predict, rebuild, serve): plugins, model,
data, device. Also a finished PyTorch run loaded back (``load_trained``; ``graft.load_run`` chooses between it and
an ONNX export in ``graft.export``) and prediction on raw inputs."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed, predictions, rundir
from .batches import Stream, make_loader, move
from .capabilities import DistinctBatches, PreparesBackbone
from .config import Config
from .device import autocast_dtype, seed_everything, select_device
from .errors import GraftError


MODES = ("train", "eval", "predict", "rebuild", "serve")


class Run:
    """Everything built from a config: plugins, model, data, device, process info. One constructor for every way a
    run is assembled; ``mode`` says which:

    - ``train``: before training (``graft.train``, ``graft.Run(config)``): processes from the environment, RNGs
      seeded, the data read.
    - ``eval``: a finished run loaded back to score (``graft.load_run``): one process, the data read.
    - ``predict``: a finished run loaded back to predict on raw inputs: one process, no data read when
      ``data_info`` ({"task", "label_names"}, as a run saves in labels.json) is given.
    - ``rebuild``: a sharded run's model built again whole in one process on the CPU (``rebuilt_alone``).
    - ``serve``: a run served from an ONNX file (``graft.export.ExportedRun``, which supplies the network).

    Only ``train`` touches the global RNGs: the others leave them as they were, so loading a run (a teacher, say)
    inside another changes nothing there. Raises GraftError for a config the plugins refuse."""

    def __init__(self, config: Config, dist: distributed.Dist | None = None, device: torch.device | None = None,
                 *, mode: str = "train", data_info: dict | None = None):
        if mode not in MODES:
            raise ValueError(f"Run mode {mode!r}: one of {', '.join(MODES)}.")
        self.config, self.mode = config, mode
        t = config.train
        self.dist = dist or (distributed.from_env() if mode == "train" else distributed.Dist())
        on_cpu = mode in ("rebuild", "serve")
        self.device = device or (torch.device("cpu") if on_cpu else select_device(t.device, self.dist.local_rank))
        if mode == "train":
            seed_everything(t.seed, t.deterministic)
            self._assemble(data_info)
            return
        # only the device this run builds on: forking every GPU's RNG would start CUDA for a CPU rebuild or serve
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            state = random.getstate(), np.random.get_state()
            self._assemble(data_info)
            random.setstate(state[0])
            np.random.set_state(state[1])

    def _assemble(self, data_info: dict | None) -> None:
        specs, t = self.config.plugins, self.config.train
        self.backbone = self._backbone()
        if self.mode != "serve" and isinstance(specs["strategy"].cls, PreparesBackbone):
            specs["strategy"].cls.prepare_backbone(specs["strategy"].options, self.backbone)
        self.adapter = None
        if "adapter" in specs:
            if not specs["strategy"].cls.supports_adapters:
                raise GraftError(f"[adapter] plugin = {specs['adapter'].name!r}: strategy "
                                 f"{specs['strategy'].name!r} does not train its backbone, so an adapter has nothing "
                                 f"to stand in for. Remove the [adapter] table, or use finetune, distill or mlm.")
            if self.mode != "serve":  # a served network has the adapter merged in
                self.adapter = specs["adapter"].instantiate()
                self.backbone.adapter_frozen = frozenset(self.adapter.apply(self.backbone))
        tasks = {k.split(".", 1)[1]: spec.instantiate() for k, spec in specs.items() if k.startswith("tasks.")}
        # a multi-task config has no [data]: its strategy makes one source of the [tasks.NAME] sources
        self.data = specs["strategy"].cls.task_data(specs["strategy"].options, tasks) if tasks \
            else specs["data"].instantiate()
        self.data.seed = t.seed
        if data_info is None:
            self.data.setup(self.backbone, t.seed)
        else:
            self.data.task, self.data.label_names = data_info["task"], data_info["label_names"]
            if "tasks" in data_info:
                self.data.restore(data_info["tasks"])
        self.loss = specs["loss"].instantiate() if "loss" in specs else None
        self.strategy = self._strategy(specs["strategy"].instantiate(backbone=self.backbone, loss=self.loss,
                                                                     data=self.data))
        self.strategy.predicting = data_info is not None
        self.sources = {}  # data sources beside [data] that evaluation covers too: name -> source
        if "target" in specs and self.mode in ("train", "eval"):
            self._target(specs["target"])
        self.model = self._model()

    def _target(self, spec) -> None:
        """The [target] data source, set up like [data], handed to the strategy with its batch stream."""
        t = self.config.train
        target = self.sources["target"] = spec.instantiate()
        target.seed = t.seed
        target.setup(self.backbone, t.seed)
        # seed + 1: the target's order is not the source's order replayed on another length
        stream = Stream(target, "train", t.batch_size, t.seed + 1, self.dist, self.device, where="[target]") \
            if self.mode == "train" else None
        self.strategy.set_target(target, stream)

    # The parts a served run (graft.export.ExportedRun) supplies itself: its preprocessing, serving strategy, network.
    def _backbone(self):
        backbone = self.config.plugins["backbone"].instantiate()
        backbone.build()
        if self.config.train.gradient_checkpointing:
            backbone.enable_gradient_checkpointing()
        return backbone

    def _strategy(self, strategy):
        return strategy

    def _model(self):
        model = self.strategy.build().to(self.device)
        if self.config.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def load_weights(self, path: Path, state: dict | None = None) -> None:
        """The weights file ``path`` (or its ``state``, already read) into the model; one rebuilt only to predict may
        lack modules that only training used (``Strategy.predicting``), but needs every tensor it has. Raises
        GraftError for a missing or damaged file, or one that lacks tensors of the model."""
        state = move(ckpt.load_weights(path) if state is None else state, self.device)
        if not self.strategy.predicting:
            self.model.load_state_dict(state)
            return
        missing = self.model.load_state_dict(state, strict=False).missing_keys
        if missing:
            raise GraftError(f"{path} lacks {len(missing)} tensors of the model, e.g. {missing[0]}: was the run's "
                             f"config.toml edited?")

    def loader(self, split: str, train: bool, batch_size: int | None = None):
        """The DataLoader of ``split`` (None when the split is empty): training order seeded per epoch and split
        across processes, evaluation in order; a strategy with ``batch_keys`` keeps clashing examples apart."""
        keys = self.strategy.batch_keys(split) if train and isinstance(self.strategy, DistinctBatches) else None
        return make_loader(self.data, split, train, self.config.train, self.dist, self.device, batch_size, keys)

    def autocast(self):
        dtype = autocast_dtype(self.config.train.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def evaluate(self, model, split: str, strategy=None, records: list | None = None) -> dict | None:
        """Metrics of ``split`` (scored by ``strategy``, default the run's). Pass the unwrapped model: processes may
        hold different numbers of batches, and DDP's forward would wait for the others. ``records``: a list that
        receives one record per example (``graft.predictions``; a [target]'s too; gathered on every process) when
        the strategy scores examples one by one (``per_example``); the metrics are then those of the records' sums."""
        strategy = strategy or self.strategy
        if records is not None and not getattr(strategy, "per_example", False):
            records = None
        # A sharded model's forward is collective: every process must run the same batches, so each evaluates the
        # whole split (and needs no gathering after).
        sharded = distributed.fsdp(self.config.train, self.dist)
        loaders = {name: make_loader(source, split, False, self.config.train,
                                     distributed.Dist() if sharded else self.dist, self.device, None)
                   for name, source in {"": self.data, **self.sources}.items()}
        if loaders[""] is None:
            return None
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        ids = {name: source.example_ids(split) if hasattr(source, "example_ids") else None
               for name, source in {"": self.data, **self.sources}.items()}
        for name, loader in loaders.items():
            for batch in loader or ():
                batch = move(batch, self.device)
                if name:  # a source beside [data] (the [target])
                    batch["source"] = name
                with self.autocast():
                    if records is not None:
                        each = predictions.per_example(strategy, model, batch)
                        records += predictions.records(strategy, batch, each, ids[name], name)
                        out = predictions.total(each)
                    else:
                        out = strategy.eval_step(model, batch)
                for k, v in out.items():
                    if isinstance(v, torch.Tensor):
                        v = v.detach().float() if v.is_floating_point() else v.detach().double()
                    if isinstance(v, list):  # JSON-able records (detection's boxes), concatenated
                        sums.setdefault(k, []).extend(v)
                    else:
                        sums[k] = sums[k] + v if k in sums else v
        model.train(was_training)
        if self.dist.enabled and not sharded:
            # Gathered as dicts, not reduced key by key: a process may have had fewer batches, or none.
            import torch.distributed as td

            parts = [None] * self.dist.world_size
            td.all_gather_object(parts, {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in sums.items()})
            if records is not None:
                mine = [None] * self.dist.world_size
                td.all_gather_object(mine, list(records))
                records[:] = sorted((r for part in mine for r in part), key=predictions.order)
            sums = {}
            for part in parts:
                for k, v in part.items():
                    sums[k] = sums[k] + v if k in sums else v
            if not sums:
                return None
        return {k: (float(v) if _is_scalar(v) else v) for k, v in strategy.compute_metrics(sums).items()}


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float)) or isinstance(v, torch.Tensor) and v.numel() == 1


def scalars(metrics: dict) -> dict:
    """The numbers of a metrics dict (reports such as per-class tables and confusion matrices left out)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def rebuilt_alone(run: Run, weights: Path) -> Run:
    """``run``'s model built again in this process alone on the CPU, holding ``weights`` (a safetensors file): the
    exports of a sharded run need a whole model. No data is read; the tokenizer (one trained on a corpus, say) is
    handed over."""
    from .capabilities import SettableTokenizer

    plain = Run(run.config, mode="rebuild", data_info=rundir.data_info(run.data))
    if isinstance(plain.backbone, SettableTokenizer) and run.backbone.modality == "text" and \
            run.backbone.tokenizer() is not None:
        plain.backbone.set_tokenizer(run.backbone.tokenizer())
    plain.load_weights(weights)
    return plain


def load_trained(run_dir: Path, overrides=(), for_prediction: bool = False, device: str | None = None,
                 registry=None, trust_remote_code: bool = False) -> Run:
    """A finished PyTorch run rebuilt from its resolved config.toml with its best weights (``graft.load_run``, in
    ``graft.export``, also takes ONNX exports). Raises GraftError when ``run_dir`` is no finished run."""
    run_dir = Path(run_dir)
    if not rundir.is_finished(run_dir):
        raise GraftError(f"{run_dir} is not a finished graft run (it needs {rundir.CONFIG} and {rundir.WEIGHTS}, or "
                         f"model.onnx for an export).")
    conf = rundir.read_config(run_dir, overrides, registry)
    spec = conf.plugins["backbone"]
    export = run_dir / rundir.BACKBONE
    spec = dataclasses.replace(spec, options=spec.cls.reload_options(spec.options, export if export.is_dir() else None,
                                                                      trust_remote_code))
    conf = conf.replace(plugins={"backbone": spec}, train={"device": device} if device else None)
    info = rundir.read_labels(run_dir)
    run = Run(conf, mode="predict" if for_prediction else "eval", data_info=info if for_prediction else None)
    run.load_weights(run_dir / rundir.WEIGHTS)
    run.model.eval()
    return run


@torch.no_grad()
def predict(run: Run, items: list[str]) -> list[dict]:
    """The strategy's predictions for raw inputs (image paths, texts), in eval batches."""
    out = []
    size = run.config.train.eval_batch_size or run.config.train.batch_size
    for i in range(0, len(items), size):
        inputs = move(run.data.encode(run.backbone, items[i:i + size]), run.device)
        with run.autocast():
            out += run.strategy.predict(run.model, inputs)
    return out
