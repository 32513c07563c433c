"""A run's objects, built from a config: plugins, model, data, device. Also a finished run loaded back
(``load_run``) and prediction on raw inputs."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed
from .batches import make_loader, move
from .config import Config
from .device import autocast_dtype, seed_everything, select_device
from .errors import GraftError


class Run:
    """Everything built from a config, before training: plugins, model, data, device, process info."""

    def __init__(self, config: Config, dist: distributed.Dist | None = None, device: torch.device | None = None,
                 data_info: dict | None = None, reseed: bool = True):
        """``data_info`` ({"task", "label_names"}, as a run saves in labels.json) skips reading the data: enough
        to rebuild a trained model for prediction."""
        self.config = config
        t = config.train
        self.dist = dist or distributed.from_env()
        self.device = device or select_device(t.device, self.dist.local_rank)
        if reseed:
            seed_everything(t.seed, t.deterministic)
        specs = config.plugins
        self.backbone = specs["backbone"].create()
        self.backbone.build()
        if t.gradient_checkpointing:
            self.backbone.enable_gradient_checkpointing()
        self.adapter = None
        if "adapter" in specs:
            if not specs["strategy"].cls.supports_adapters:
                raise GraftError(f"[adapter] plugin = {specs['adapter'].name!r}: strategy "
                                 f"{specs['strategy'].name!r} does not train its backbone, so an adapter has nothing "
                                 f"to stand in for. Remove the [adapter] table, or use finetune, distill or mlm.")
            self.adapter = specs["adapter"].create()
            self.backbone.adapter_frozen = frozenset(self.adapter.apply(self.backbone))
        self.data = specs["data"].create()
        self.data.seed = t.seed
        if data_info is None:
            self.data.setup(self.backbone, t.seed)
        else:
            self.data.task, self.data.label_names = data_info["task"], data_info["label_names"]
        self.loss = specs["loss"].create() if "loss" in specs else None
        self.strategy = specs["strategy"].create(backbone=self.backbone, loss=self.loss, data=self.data)
        self.strategy.predicting = data_info is not None
        self.model = self.strategy.build().to(self.device)
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def loader(self, split: str, train: bool, batch_size: int | None = None):
        """The DataLoader of ``split`` (None when the split is empty): training order seeded per epoch and split
        across processes, evaluation in order."""
        return make_loader(self.data, split, train, self.config.train, self.dist, self.device, batch_size)

    def autocast(self):
        dtype = autocast_dtype(self.config.train.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def evaluate(self, model, split: str, strategy=None) -> dict | None:
        """Metrics of ``split`` (scored by ``strategy``, default the run's). Pass the unwrapped model: processes may
        hold different numbers of batches, and DDP's forward would wait for the others."""
        strategy = strategy or self.strategy
        # A sharded model's forward is collective: every process must run the same batches, so each evaluates the
        # whole split (and needs no gathering after).
        sharded = distributed.fsdp(self.config.train, self.dist)
        loader = make_loader(self.data, split, False, self.config.train, distributed.Dist() if sharded else self.dist,
                             self.device, None)
        if loader is None:
            return None
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        for batch in loader:
            batch = move(batch, self.device)
            with self.autocast():
                out = strategy.eval_step(model, batch)
            for k, v in out.items():
                v = v.detach().float() if v.is_floating_point() else v.detach().double()
                sums[k] = sums[k] + v if k in sums else v
        model.train(was_training)
        if self.dist.enabled and not sharded:
            # Gathered as dicts, not reduced key by key: a process may have had fewer batches, or none.
            import torch.distributed as td

            parts = [None] * self.dist.world_size
            td.all_gather_object(parts, {k: v.cpu() for k, v in sums.items()})
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

    info = {"task": run.data.task, "label_names": list(run.data.label_names or [])}
    plain = Run(run.config, dist=distributed.Dist(), device=torch.device("cpu"), data_info=info, reseed=False)
    if isinstance(plain.backbone, SettableTokenizer) and run.backbone.modality == "text" and \
            run.backbone.tokenizer() is not None:
        plain.backbone.set_tokenizer(run.backbone.tokenizer())
    _load(plain, ckpt.load_weights(weights), weights)
    return plain


def _load(run: Run, state: dict, path: Path) -> None:
    """``state`` into ``run``'s model; one rebuilt only to predict may lack modules that only training used
    (``Strategy.predicting``), but needs every tensor it has."""
    if not run.strategy.predicting:
        run.model.load_state_dict(state)
        return
    missing = run.model.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise GraftError(f"{path} lacks {len(missing)} tensors of the model, e.g. {missing[0]}: was the run's "
                         f"config.toml edited?")


def load_run(run_dir: str | Path, overrides=(), for_prediction: bool = False, device: str | None = None,
             registry=None, trust_remote_code: bool = False) -> Run:
    """Rebuild a finished run's model with its best weights, from its resolved config.toml. Global RNG state
    is left as it was, so loading a run (e.g. a teacher) inside another run changes nothing there."""
    from . import config as cfg

    run_dir = Path(run_dir)
    if (run_dir / "config.toml").is_file() and (run_dir / "model.onnx").is_file():  # an ONNX export or compression
        from .export import load_exported

        return load_exported(run_dir, overrides, for_prediction, registry)
    if not (run_dir / "config.toml").is_file() or not (run_dir / "model.safetensors").is_file():
        raise GraftError(f"{run_dir} is not a finished graft run (it needs config.toml and model.safetensors, or "
                         f"model.onnx for an export).")
    conf = cfg.load(run_dir / "config.toml", overrides, registry)
    spec = conf.plugins["backbone"]
    export = run_dir / "backbone"
    spec.options = spec.cls.reload_options(spec.options, export if export.is_dir() else None, trust_remote_code)
    if device:
        conf.train.device = device
    info = json.loads((run_dir / "labels.json").read_text()) if (run_dir / "labels.json").is_file() else None
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        state = random.getstate(), np.random.get_state()
        run = Run(conf, dist=distributed.Dist(), data_info=info if for_prediction else None, reseed=False)
        random.setstate(state[0])
        np.random.set_state(state[1])
    _load(run, move(ckpt.load_weights(run_dir / "model.safetensors"), run.device), run_dir / "model.safetensors")
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
