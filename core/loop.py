"""The one training loop every strategy runs on.

It owns devices, precision, the optimizer and scheduler, accumulation, clipping, distributed processes,
evaluation, early stopping, checkpoints, resume, signals and logging. It never asks which strategy it runs:
it only calls the Strategy interface (``graft.interfaces``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed
from .config import Config, TrainOptions
from .errors import GraftError


# -- set-up helpers -----------------------------------------------------------------------------------
def select_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks cuda > mps > cpu; explicit names are checked, so a typo or a missing GPU fails early."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise GraftError(f"[train] device = {spec!r} is not a device name. Use auto, cpu, cuda, cuda:N or mps.") \
            from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GraftError(f"[train] device = {spec!r}, but torch sees no CUDA GPU here. Use device = \"auto\" "
                             f"or \"cpu\".")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise GraftError(f"[train] device = {spec!r}, but MPS is not available here.")
    return device


def autocast_dtype(precision: str):
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_lambda(t: TrainOptions, total_steps: int):
    """Multiplier of the base learning rate at optimizer step ``step``: linear warmup, then the schedule."""
    warmup = t.warmup_steps or int(t.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if t.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 1.0 - progress if t.scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * shape

    return f


def build_optimizer(t: TrainOptions, groups: list[dict]) -> torch.optim.Optimizer:
    """One optimizer group per strategy group and decay class; biases and norm weights get no weight decay."""
    param_groups = []
    seen = set()
    for g in groups:
        params = [p for p in g["params"] if id(p) not in seen]
        seen.update(id(p) for p in params)
        wd = g.get("weight_decay", t.weight_decay)
        for suffix, ps, decay in (("", [p for p in params if p.ndim > 1], wd),
                                  (".no_decay", [p for p in params if p.ndim <= 1], 0.0)):
            if ps:
                param_groups.append({"params": ps, "weight_decay": decay, "lr": t.lr * g.get("lr_scale", 1.0),
                                     "lr_scale": g.get("lr_scale", 1.0), "name": g.get("name", "group") + suffix})
    if not param_groups:
        raise GraftError("The strategy gave the optimizer no parameters.")
    # The fused kernels (one pass over all tensors) run on CPU and CUDA; on this project's 2-core CPU they make the
    # AdamW step of a ResNet-18 about 2.5x faster than torch's default per-tensor loop.
    fused = {"fused": True} if t.fused_optimizer and _fused_ok(param_groups) else {}
    if t.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=t.lr, momentum=t.momentum, **fused)
    return torch.optim.AdamW(param_groups, lr=t.lr, betas=tuple(t.betas), **fused)


def _fused_ok(groups) -> bool:
    params = [p for g in groups for p in g["params"]]
    types = {p.device.type for p in params}
    return len(types) == 1 and types <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


class EpochSampler(torch.utils.data.Sampler):
    """Seeded order per epoch, split across processes, able to start mid-epoch (for exact resume).

    Process r of w takes positions r, r+w, r+2w... of the epoch's order, so w processes with batch B see the
    same examples per step as one process with batch w*B. Training pads the order (wrapping around) to a
    multiple of w so every process runs the same number of steps; evaluation does not pad, so nothing is
    counted twice.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, dist, pad: bool):
        self.n, self.shuffle, self.seed, self.dist, self.pad = n, shuffle, seed, dist, pad
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = epoch, skip

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        w = self.dist.world_size
        if self.pad and self.n % w:
            order += order[: w - self.n % w]
        return order[self.dist.rank::w]

    def __iter__(self):
        return iter(self._order()[self.skip:])

    def __len__(self):
        return len(self._order()) - self.skip


class _Indexed:
    """Yields (index, example): every batch says which examples it holds (batch["index"]), e.g. for caches."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return i, self.ds[i]


class _IndexedCollate:
    def __init__(self, collate, split):
        self.collate, self.split = collate, split

    def __call__(self, items):
        batch = self.collate([ex for _, ex in items])
        batch["index"] = torch.tensor([i for i, _ in items], dtype=torch.long)
        batch["split"] = self.split
        return batch


def move(batch, device, non_blocking=True):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move(v, device, non_blocking) for v in batch)
    return batch


def batch_size_of(batch) -> int:
    x = batch["targets"] if isinstance(batch, dict) and "targets" in batch else batch
    while isinstance(x, (dict, list, tuple)):
        x = next(iter(x.values())) if isinstance(x, dict) else x[0]
    return int(x.shape[0])


# -- the run ------------------------------------------------------------------------------------------
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
        self.backbone = specs["backbone"].cls(specs["backbone"].options)
        self.backbone.name = specs["backbone"].name
        self.backbone.build()
        self.data = specs["data"].cls(specs["data"].options)
        self.data.name = specs["data"].name
        self.data.seed = t.seed
        if data_info is None:
            self.data.setup(self.backbone, t.seed)
        else:
            self.data.task, self.data.label_names = data_info["task"], data_info["label_names"]
        self.loss = None
        if "loss" in specs:
            self.loss = specs["loss"].cls(specs["loss"].options)
            self.loss.name = specs["loss"].name
        s = specs["strategy"]
        self.strategy = s.cls(s.options, backbone=self.backbone, loss=self.loss, data=self.data)
        self.strategy.name = s.name
        self.model = self.strategy.build().to(self.device)
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def loader(self, split: str, train: bool, batch_size: int | None = None):
        ds = self.data.dataset(split)
        if ds is None or len(ds) == 0:
            return None
        t = self.config.train
        sampler = EpochSampler(len(ds), shuffle=train, seed=t.seed, dist=self.dist, pad=train)
        # A private generator keeps the DataLoader from drawing on the global RNG, which resume restores.
        return torch.utils.data.DataLoader(
            _Indexed(ds), batch_size=batch_size or (t.batch_size if train else (t.eval_batch_size or t.batch_size)),
            sampler=sampler, collate_fn=_IndexedCollate(self.data.collate, split), num_workers=t.num_workers,
            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(t.seed),
            persistent_workers=False)

    def autocast(self):
        dtype = autocast_dtype(self.config.train.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict | None:
        """Metrics of ``split``. Pass the unwrapped model: processes may hold different numbers of batches,
        and DDP's forward would wait for the others."""
        loader = self.loader(split, train=False)
        if loader is None:
            return None
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        for batch in loader:
            batch = move(batch, self.device)
            with self.autocast():
                out = self.strategy.eval_step(model, batch)
            for k, v in out.items():
                v = v.detach().float() if v.is_floating_point() else v.detach().double()
                sums[k] = sums[k] + v if k in sums else v
        model.train(was_training)
        if self.dist.enabled:
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
        return {k: (float(v) if _is_scalar(v) else v) for k, v in self.strategy.compute_metrics(sums).items()}


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float)) or isinstance(v, torch.Tensor) and v.numel() == 1


def scalars(metrics: dict) -> dict:
    """The numbers of a metrics dict (reports such as per-class tables and confusion matrices left out)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _better(a: float, b: float | None, mode: str) -> bool:
    return b is None or (a > b if mode == "max" else a < b)


def _metric_mode(t: TrainOptions, metric: str) -> str:
    if t.metric_mode != "auto":
        return t.metric_mode
    return "min" if any(w in metric for w in ("loss", "perplexity", "mae", "rmse", "error")) else "max"


class _Signals:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop at the next step boundary."""

    def __init__(self):
        self.requested = 0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = signum
        if signum == signal.SIGINT and self._old.get(signal.SIGINT) is not None:
            # A second Ctrl-C stops at once.
            signal.signal(signal.SIGINT, self._old[signal.SIGINT])

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(config: Config, run_dir: str | Path, resume: bool = False, echo=print) -> dict:
    """Train ``config`` into ``run_dir``; with ``resume`` continue from its latest checkpoint. Returns the summary."""
    t = config.train
    dist = distributed.from_env()
    device = select_device(t.device, dist.local_rank)
    distributed.init(dist, device)
    try:
        return _train(config, Path(run_dir), resume, dist, device, echo)
    finally:
        distributed.shutdown(dist)


def _train(config: Config, run_dir: Path, resume: bool, dist, device, echo) -> dict:
    main = dist.is_main
    ckpt_dir = run_dir / "checkpoints"
    with contextlib.ExitStack() as stack:
        if main:  # before anything slow: a second run on this directory, or one that cannot write, fails at once
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                stack.enter_context(ckpt.RunLock(run_dir))
            except OSError as e:
                raise GraftError(f"Cannot write the run directory {run_dir}: {e.strerror or e}. Choose another --out "
                                 f"(a folder you can write to).") from None
        run = Run(config, dist, device)
        if main:
            if not resume:  # a fresh run starts a fresh log, even in a directory an earlier attempt left behind
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            report = run.data.report()
            if report:
                ckpt.atomic_write_text(run_dir / "data.json", json.dumps(report, indent=2) + "\n")
        return _train_locked(config, run, run_dir, ckpt_dir, resume, dist, device, echo)


def _train_locked(config: Config, run, run_dir: Path, ckpt_dir: Path, resume: bool, dist, device, echo) -> dict:
    t = config.train
    main = dist.is_main
    strategy, base_model = run.strategy, run.model

    train_loader = run.loader("train", train=True)
    if train_loader is None:
        raise GraftError(f"[data] plugin {run.data.name!r} has an empty training split.")
    micro_per_epoch = len(train_loader)
    steps_per_epoch = math.ceil(micro_per_epoch / t.grad_accum)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    optimizer = build_optimizer(t, strategy.param_groups(base_model))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    metric = t.metric or strategy.primary_metric
    mode = _metric_mode(t, metric)

    # Loop position and bookkeeping; all of it goes into checkpoints.
    # What fixes the data order: a resumed run must keep these, or it would skip to the wrong examples.
    layout = {"world_size": dist.world_size, "batch_size": t.batch_size, "grad_accum": t.grad_accum}
    pos = {"epoch": 0, "micro": 0, "step": 0, "best": None, "bad_evals": 0, "skipped_steps": 0,
           "samples": 0, "train_time": 0.0, "stopped_early": False, "last_eval_step": -1, **layout}
    if resume:
        found = ckpt.load_latest(ckpt_dir, echo if main else lambda m: None)
        if found is None:
            raise GraftError(f"--resume {run_dir}: no checkpoint in {ckpt_dir}. Start a new run instead.")
        latest, model_state, state = found
        changed = {k: (state["position"].get(k, v), v) for k, v in layout.items() if state["position"].get(k, v) != v}
        if changed:
            raise GraftError(f"--resume {run_dir}: the run was made with " + ", ".join(
                f"{k} = {a}" for k, (a, _) in changed.items()) + ", this config says " + ", ".join(
                f"{k} = {b}" for k, (_, b) in changed.items()) + ". Resume with the same settings (--nproc too).")
        try:
            base_model.load_state_dict(model_state)
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise GraftError(f"--resume {run_dir}: checkpoint {latest.name} does not fit this config's model or "
                             f"optimizer ({str(e).splitlines()[0]}). Resume with the config the run was made with "
                             f"({run_dir / 'config.toml'}).") from None
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        strategy.load_state_dict(state["strategy"])
        pos.update(state["position"])
        set_rng_state(state["rng"][dist.rank] if dist.rank < len(state["rng"]) else state["rng"][0])
        if main:
            _truncate_metrics(run_dir / "metrics.jsonl", pos["step"])
            echo(f"Resuming {run_dir} from {latest.name} (epoch {pos['epoch']}, step {pos['step']}).")
    if main:
        ckpt.atomic_write_text(run_dir / "config.toml", config.to_toml())

    def wrap(module):
        m = module
        if dist.enabled:
            ids = [device.index] if device.type == "cuda" else None
            m = torch.nn.parallel.DistributedDataParallel(m, device_ids=ids)
        ddp = m if dist.enabled else None
        if t.compile:
            m = torch.compile(m)
        return m, ddp

    def trainable():
        return tuple(p.requires_grad for p in base_model.parameters())

    def save_checkpoint():
        rngs = [rng_state()]
        if dist.enabled:
            import torch.distributed as td

            rngs = [None] * dist.world_size
            td.all_gather_object(rngs, rng_state())
        # Every process checks (the weights are the same everywhere), so all of them stop together.
        bad = [n for n, p in base_model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise GraftError(f"Refusing to checkpoint non-finite weights ({bad[0]}...); the last good "
                             f"checkpoint in {ckpt_dir} is kept.")
        if main:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "strategy": strategy.state_dict(), "rng": rngs,
                     "position": dict(pos)}
            ckpt.save(ckpt_dir, pos["step"], base_model.state_dict(), state, keep=t.keep_checkpoints)
        distributed.barrier(dist)

    def log(record: dict):
        if main:
            with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def save_weights(name: str):
        if main:
            ckpt.atomic_save_file(ckpt.clean_state_dict(base_model.state_dict()), run_dir / name)

    def evaluate_and_track() -> bool:
        """Validation; keeps the best weights; True when early stopping says stop."""
        metrics = run.evaluate(base_model, "val")
        if metrics is None:
            return False
        pos["last_eval_step"] = pos["step"]
        log({"step": pos["step"], "epoch": pos["epoch"], "split": "val", **scalars(metrics)})
        if metric not in scalars(metrics):
            raise GraftError(f"[train] metric = {metric!r} is not among the strategy's metrics: "
                             f"{', '.join(metrics)}.")
        if _better(metrics[metric], pos["best"], mode):
            pos["best"], pos["bad_evals"] = metrics[metric], 0
            save_weights("model.safetensors")
        else:
            pos["bad_evals"] += 1
        return bool(t.patience) and pos["bad_evals"] >= t.patience

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=pos["step"], disable=not (t.progress and main), dynamic_ncols=True,
               mininterval=0.5, desc="train")
    base_model.train()
    strategy.on_epoch_start(pos["epoch"], base_model)
    state_of_grads = trainable()
    model, ddp = wrap(base_model)
    stopped_early, interrupted = pos["stopped_early"], False
    if t.eval_at_start and pos["step"] == 0:
        metrics = run.evaluate(base_model, "val")
        if metrics is not None:
            log({"step": 0, "epoch": 0, "split": "val", **scalars(metrics)})
    window = {"loss": 0.0, "n": 0, "samples": 0, "time": 0.0, "extra": {}}
    t_start = time.perf_counter()
    with _Signals() as signals:
        while pos["step"] < total_steps and not (stopped_early or interrupted):
            sampler = train_loader.sampler
            sampler.set_epoch(pos["epoch"], skip=pos["micro"] * t.batch_size)
            run.data.set_epoch(pos["epoch"])  # before iter(): worker processes copy the source as it is then
            it = iter(train_loader)
            while pos["micro"] < micro_per_epoch and pos["step"] < total_steps:
                t0 = time.perf_counter()
                strategy.on_step_start(pos["step"], total_steps)
                group = min(t.grad_accum, micro_per_epoch - pos["micro"])
                loss_sum = torch.zeros((), device=device)
                n_samples = 0
                extra: dict = {}
                for i in range(group):
                    batch = move(next(it), device)
                    n_samples += batch_size_of(batch)
                    sync = ddp is None or i == group - 1
                    # no_sync must cover the forward pass too: DDP prepares the reduction there.
                    with (contextlib.nullcontext() if sync else ddp.no_sync()):
                        with run.autocast():
                            out = strategy.training_step(model, batch)
                            loss = out["loss"]
                        scaler.scale(loss.float() / group).backward()
                    loss_sum += loss.detach().float()
                    for k, v in out.items():
                        if k != "loss":
                            extra[k] = extra.get(k, 0.0) + float(v) / group
                pos["micro"] += group
                flags = torch.stack([loss_sum / group, torch.tensor(float(signals.requested > 0), device=device)])
                distributed.all_reduce_sum(flags, dist)
                step_loss, stop_asked = (flags / dist.world_size).tolist()
                if not math.isfinite(step_loss):
                    optimizer.zero_grad(set_to_none=True)
                    if t.on_nan == "stop":
                        raise GraftError(
                            f"Non-finite loss ({step_loss}) at step {pos['step'] + 1}, epoch {pos['epoch']}. The "
                            f"last good checkpoint in {ckpt_dir} is untouched. Lower [train] lr, set clip_grad_norm, "
                            f"use precision = \"bf16\" instead of fp16, or set on_nan = \"skip\".")
                    pos["skipped_steps"] += 1
                else:
                    if scaler.is_enabled():
                        scaler.unscale_(optimizer)
                    if t.clip_grad_norm:
                        torch.nn.utils.clip_grad_norm_(base_model.parameters(), t.clip_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                if scaler.is_enabled():
                    with warnings.catch_warnings():  # the scaler skipping an overflowing step is expected
                        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                        scheduler.step()
                else:
                    scheduler.step()
                pos["step"] += 1
                dt = time.perf_counter() - t0
                pos["samples"] += n_samples * dist.world_size
                pos["train_time"] += dt
                window["loss"] += step_loss if math.isfinite(step_loss) else 0.0
                window["n"] += 1
                window["samples"] += n_samples * dist.world_size
                window["time"] += dt
                for k, v in extra.items():
                    window["extra"][k] = window["extra"].get(k, 0.0) + v
                bar.update(1)
                if pos["step"] % t.log_every == 0 or pos["step"] == total_steps:
                    lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0)
                    rec = {"step": pos["step"], "epoch": pos["epoch"], "split": "train",
                           "loss": window["loss"] / window["n"], "lr": lr,
                           "samples_per_s": window["samples"] / max(window["time"], 1e-9)}
                    rec.update({k: v / window["n"] for k, v in window["extra"].items()})
                    log(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}",
                                    sps=f"{rec['samples_per_s']:.0f}", refresh=False)
                    window = {"loss": 0.0, "n": 0, "samples": 0, "time": 0.0, "extra": {}}
                if t.eval_every and pos["step"] % t.eval_every == 0:
                    stopped_early = pos["stopped_early"] = evaluate_and_track()
                if stop_asked > 0:
                    interrupted = True
                if t.checkpoint_every and pos["step"] % t.checkpoint_every == 0 or interrupted:
                    save_checkpoint()
                if stopped_early or interrupted:
                    break
            if pos["micro"] >= micro_per_epoch:  # a whole epoch done
                if not t.eval_every:
                    stopped_early = pos["stopped_early"] = evaluate_and_track()
                pos["epoch"], pos["micro"] = pos["epoch"] + 1, 0
                if pos["step"] < total_steps and not stopped_early:
                    strategy.on_epoch_start(pos["epoch"], base_model)
                    if trainable() != state_of_grads:
                        state_of_grads = trainable()
                        model, ddp = wrap(base_model)  # DDP registers gradient hooks only for trainable params
                    save_checkpoint()
    bar.close()

    if interrupted:
        if main:
            echo(f"Interrupted at step {pos['step']}: checkpoint saved. Continue with "
                 f"`graft train {config.path} --resume {run_dir}`.")
        return {"interrupted": True, "step": pos["step"]}

    if not stopped_early and pos["last_eval_step"] not in (-1, pos["step"]):
        evaluate_and_track()  # the steps since the last evaluation count too
    save_checkpoint()
    save_weights("last.safetensors")
    if pos["best"] is None:
        save_weights("model.safetensors")
    else:
        base_model.load_state_dict(ckpt.load_weights(run_dir / "model.safetensors"))
    results = {split: run.evaluate(base_model, split) for split in ("val", "test")}
    summary = {
        "run_dir": str(run_dir), "strategy": strategy.name, "backbone": run.backbone.name,
        "steps": pos["step"], "epochs_completed": pos["epoch"], "world_size": dist.world_size,
        "device": str(device), "precision": t.precision, "metric": metric, "best": pos["best"],
        "stopped_early": stopped_early, "skipped_steps": pos["skipped_steps"],
        "train_time_s": pos["train_time"], "wall_time_s": time.perf_counter() - t_start,
        "train_samples_per_s": pos["samples"] / max(pos["train_time"], 1e-9),
        "weights": "model.safetensors" if pos["best"] is None else "model.safetensors (best on val)",
        **{k: v for k, v in results.items() if v is not None},
        **strategy.report(base_model),
    }
    if run.data.report():
        summary["data"] = run.data.report()
    if main:
        if results["test"] is not None:
            log({"step": pos["step"], "epoch": pos["epoch"], "split": "test", **scalars(results["test"])})
        info = {"task": run.data.task, "label_names": list(run.data.label_names or [])}
        (run_dir / "labels.json").write_text(json.dumps(info, indent=2) + "\n")
        strategy.export(base_model, str(run_dir))
        ckpt.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if t.plot:
            _plot(run_dir)
            final = results["test"] or results["val"]
            if final and "confusion_matrix" in final:
                plot_confusion(final["confusion_matrix"], run.data.label_names, run_dir / "confusion.png")
    distributed.barrier(dist)
    return summary


# -- using a finished run ---------------------------------------------------------------------------------
def load_run(run_dir: str | Path, overrides=(), for_prediction: bool = False, device: str | None = None,
             registry=None, trust_remote_code: bool = False) -> Run:
    """Rebuild a finished run's model with its best weights, from its resolved config.toml. Global RNG state
    is left as it was, so loading a run (e.g. a teacher) inside another run changes nothing there."""
    from . import config as cfg

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file() or not (run_dir / "model.safetensors").is_file():
        raise GraftError(f"{run_dir} is not a finished graft run (it needs config.toml and model.safetensors).")
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
    run.model.load_state_dict(move(ckpt.load_weights(run_dir / "model.safetensors"), run.device))
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


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop what was logged after the checkpoint we resume from, so the file reads as one run."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill we are recovering from
        if record["step"] <= step and record.get("split") != "test":
            keep.append(line)
    ckpt.atomic_write_text(path, "".join(line + "\n" for line in keep))


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None  # plots are an optional extra: pip install graftkit[plots]
    return plt


def plot_confusion(matrix, labels, path: Path) -> None:
    """A confusion matrix as a PNG: rows are true labels, columns predictions. Any strategy that reports a
    ``confusion_matrix`` gets one."""
    plt = _pyplot()
    if plt is None:
        return
    k = len(matrix)
    labels = list(labels or range(k))
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * k, 0.8 + 0.5 * k))
    ax.imshow(matrix, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(matrix[i][j])), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(k), [str(x) for x in labels], rotation=45, ha="right")
    ax.set_yticks(range(k), [str(x) for x in labels])
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot(run_dir: Path) -> None:
    plt = _pyplot()
    if plt is None:
        return
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    keys = [k for k in (val[0] if val else {}) if k not in ("step", "epoch", "split")
            and isinstance(val[0][k], (int, float))]
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4 * (1 + len(keys)), 3.2), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val and "loss" in val[0]:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], label="val")
    ax.set_title("loss"), ax.set_xlabel("step"), ax.legend()
    for ax, k in zip(axes[0][1:], keys):
        ax.plot([r["step"] for r in val], [r[k] for r in val], marker="o")
        ax.set_title(f"val {k}"), ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)
