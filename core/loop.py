"""The one training loop every strategy runs on.

``train()`` locks the run directory, builds the ``Run`` (``graft.run``), and drives ``Loop``: epochs of optimizer
steps, each of ``grad_accum`` micro-batches under autocast and DDP's ``no_sync``, then unscale, clip, step and the
schedule; logging, evaluation with best weights and early stopping, checkpoints, SIGINT/SIGTERM. It never asks which
strategy it runs: it only calls the Strategy interface (``graft.interfaces``). Checkpoint contents live in
``graft.checkpoint``, run-directory files in ``graft.rundir``, the sampler in ``graft.batches``.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
import warnings
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed, predictions, rundir
from .batches import batch_size_of, move
from .checkpoint import TrainState
from .config import Config
from .device import peak_memory, select_device, training_state_bytes
from .errors import GraftError
from .optim import build_optimizer, lr_lambda
from .run import Run, rebuilt_alone, scalars
from .rundir import RunDir, RunLock


def train(config: Config, run_dir: str | Path, resume: bool = False, echo=print, prepare=None) -> dict:
    """Train ``config`` into ``run_dir`` (``resume``: from its last checkpoint; ``prepare(run)`` alters the built model
    first). Returns the summary, {"interrupted": True, "step": N} if a signal stopped it; GraftError for bad input."""
    dist = distributed.from_env()
    device = select_device(config.train.device, dist.local_rank)
    distributed.init(dist, device)
    try:
        run_dir = Path(run_dir)
        with contextlib.ExitStack() as stack:
            if dist.is_main:  # before anything slow: a second run on this directory, or an unwritable one, fails now
                try:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    stack.enter_context(RunLock(run_dir))
                except OSError as e:
                    raise GraftError(f"Cannot write the run directory {run_dir}: {e.strerror or e}. Choose another "
                                     f"--out (a folder you can write to).") from None
            run = Run(config, dist, device)
            if prepare is not None:
                prepare(run)
            loop = Loop(run, run_dir, resume, echo)
            stack.callback(loop.out.close)  # the trackers end with the run, however it ends
            return loop.fit()
    finally:
        distributed.shutdown(dist)


class _Signals:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop at the next step boundary."""

    def __init__(self):
        self.requested, self._old = 0, {}

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
            signal.signal(signal.SIGINT, self._old[signal.SIGINT])  # a second Ctrl-C stops at once

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Loop:
    """One training run over a built ``Run``: optimizer, schedule, scaler and the ``TrainState`` checkpoints hold."""

    def __init__(self, run: Run, run_dir: Path, resume: bool, echo):
        self.run, self.t, self.dist, self.echo = run, run.config.train, run.dist, echo
        t, strategy = self.t, run.strategy
        self.strategy, self.base = strategy, run.model
        self.run_dir, self.out = run_dir, RunDir(run_dir, enabled=self.dist.is_main, config=run.config)
        self.loader = run.loader("train", train=True)
        if self.loader is None:
            raise GraftError(f"[data] plugin {run.data.name!r} has an empty training split.")
        self.micro_per_epoch = len(self.loader)
        self.total_steps = t.max_steps or t.epochs * math.ceil(self.micro_per_epoch / t.grad_accum)
        self.sharded = distributed.fsdp(t, self.dist)
        if self.sharded:  # before the optimizer: sharding replaces the parameters with DTensors
            units = distributed.shard(self.base, run.backbone, t.precision)
            self.echo_main(f"FSDP: {self.dist.world_size} processes; {len(units)} backbone units + the model.")
        self.optimizer = build_optimizer(t, strategy.param_groups(self.base))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t, self.total_steps))
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=t.precision == "fp16")
        self.metric = t.metric or strategy.primary_metric
        self.mode = t.metric_mode if t.metric_mode != "auto" else strategy.metric_mode(self.metric)
        self.state = TrainState(world_size=self.dist.world_size, batch_size=t.batch_size, grad_accum=t.grad_accum)
        if resume:
            name = ckpt.restore_training(run_dir, self.state, *self._checkpointed(), self.dist, echo, self.sharded)
            self.echo_main(f"Resuming {run_dir} from {name} (epoch {self.state.epoch}, step {self.state.step}).")
        if run.device.type == "cpu":  # the figure that decides CPU speed, and the settings that change it
            self.echo_main(f"CPU: {torch.get_num_threads()} threads per process (OMP_NUM_THREADS), OMP_WAIT_POLICY="
                           f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}.")
        self.out.start(self.state.step if resume else None)
        if run.data.report():
            self.out.write_data_report(run.data.report())
        self.out.write_config(run.config)

    def _checkpointed(self):
        return self.base, self.optimizer, self.scheduler, self.scaler, self.strategy

    def echo_main(self, message: str) -> None:
        if self.dist.is_main:
            self.echo(message)

    def trainable(self) -> tuple:
        return tuple(p.requires_grad for p in self.base.parameters())

    def wrap(self) -> None:
        """DDP (and torch.compile) around the model. DDP registers gradient hooks only for parameters that need
        grad when it is built, so this runs again when the trainable set changes."""
        model, self.ddp = self.base, None
        if self.dist.enabled and not self.sharded:
            device = self.run.device
            model = self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=self.t.find_unused_parameters)
        self.model = torch.compile(model) if self.t.compile else model
        self.grads_of = self.trainable()

    def save_checkpoint(self) -> None:
        ckpt.save_training(self.run_dir / rundir.CHECKPOINTS, self.state, *self._checkpointed(), self.dist,
                           self.t.keep_checkpoints, self.sharded)

    def save_weights(self, name: str) -> None:
        """Collective. A sharded model is gathered whole into process 0 first."""
        state = distributed.full_state_dict(self.base) if self.sharded else self.base.state_dict()
        if self.dist.is_main:
            ckpt.atomic_save_file(ckpt.clean_state_dict(state), self.run_dir / name)

    def evaluate_and_track(self) -> bool:
        """Validation; keeps the best weights; True when early stopping says stop."""
        s = self.state
        metrics = self.run.evaluate(self.base, "val")
        if metrics is None:
            return False
        s.last_eval_step = s.step
        self.out.log({"step": s.step, "epoch": s.epoch, "split": "val", **scalars(metrics)})
        if self.metric not in scalars(metrics):
            raise GraftError(f"[train] metric = {self.metric!r} is not among the strategy's metrics: "
                             f"{', '.join(metrics)}.")
        value = metrics[self.metric]
        if s.best is None or (value > s.best if self.mode == "max" else value < s.best):
            s.best, s.bad_evals = value, 0
            self.save_weights(rundir.WEIGHTS)
        else:
            s.bad_evals += 1
        return bool(self.t.patience) and s.bad_evals >= self.t.patience or self.out.should_stop(self.dist, self.base)

    def step(self, batches, stop_requested: bool) -> tuple[float, bool, int, dict]:
        """One optimizer step over the next ``grad_accum`` micro-batches of ``batches``: (mean loss over processes,
        whether any process was asked to stop, examples in this process, other scalars the strategy logged)."""
        t, s, device = self.t, self.state, self.run.device
        group = min(t.grad_accum, self.micro_per_epoch - s.micro)
        losses, n_samples, extra = [], 0, {}
        micro = [move(next(batches), device) for _ in range(group)]
        # Token-level losses: each micro-batch's summed loss is divided by the targets of the whole step (all its
        # micro-batches, all processes), so batch 3 x accumulation 2 updates like batch 6 (transformers >= 4.46).
        counts = [self.strategy.step_targets(b) for b in micro]
        per_target = counts[0] is not None
        if per_target:
            total = distributed.all_reduce_sum(torch.tensor(float(sum(counts)), device=device), self.dist)
            for b in micro:
                b["step_targets"] = total.clamp(min=1.0)
        # DDP averages gradients over processes; a per-target loss is already a share of the global sum
        scale = self.dist.world_size if per_target else 1.0 / group
        for i, batch in enumerate(micro):
            n_samples += batch_size_of(batch)
            if self.sharded:  # FSDP reduce-scatters the accumulated gradients once, after the last micro-batch
                self.base.set_requires_gradient_sync(i == group - 1)
            # no_sync must cover the forward pass too: DDP prepares the reduction there.
            with self.ddp.no_sync() if self.ddp is not None and i < group - 1 else contextlib.nullcontext():
                with self.run.autocast():
                    out = self.strategy.training_step(self.model, batch)
                    loss = out["loss"]
                self.scaler.scale(loss.float() * scale if scale != 1.0 else loss.float()).backward()
            losses.append(loss.detach().float())
            extra.update({k: extra.get(k, 0.0) + float(v) / group for k, v in out.items() if k != "loss"})
        s.micro += group
        local = losses[0] if group == 1 else torch.stack(losses).sum() / (1 if per_target else group)
        if self.dist.enabled:  # the mean over processes of each's loss (a per-target share times world_size)
            local = local * self.dist.world_size if per_target else local
            flags = torch.stack([local, torch.tensor(float(stop_requested), device=device)])
            step_loss, stop_asked = (distributed.all_reduce_sum(flags, self.dist) / self.dist.world_size).tolist()
        else:  # no stacking and reducing: on a CPU step every tensor operation costs its dispatch (issue 27)
            step_loss, stop_asked = local.item(), float(stop_requested)
        stepped = math.isfinite(step_loss)
        if stepped:
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)
            if t.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.base.parameters(), t.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif t.on_nan == "stop":
            self.optimizer.zero_grad(set_to_none=True)
            raise GraftError(f"Non-finite loss ({step_loss}) at step {s.step + 1}, epoch {s.epoch}. The last good "
                             f"checkpoint in {self.run_dir / 'checkpoints'} is untouched. Lower [train] lr, set "
                             f"clip_grad_norm, use precision = \"bf16\" instead of fp16, or set on_nan = \"skip\".")
        else:
            s.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        if stepped and not self.scaler.is_enabled():
            self.scheduler.step()
        else:
            with warnings.catch_warnings():  # a skipped step (fp16 overflow, on_nan = "skip") is expected
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                self.scheduler.step()
        s.step += 1
        return step_loss, stop_asked > 0, n_samples, extra

    def log_window(self, window: dict) -> dict:
        """Write the train record of the steps since the last one (every log_every steps, and the last step);
        returns the window to add the next steps to."""
        if self.state.step % self.t.log_every == 0 or self.state.step == self.total_steps:
            g = self.optimizer.param_groups[0]
            rec = {"step": self.state.step, "epoch": self.state.epoch, "split": "train",
                   "loss": window["loss"] / window["n"], "lr": g["lr"] / g.get("lr_scale", 1.0),
                   "samples_per_s": window["samples"] / max(window["time"], 1e-9)}
            rec.update({k: v / window["n"] for k, v in window["extra"].items()})
            self.out.log(rec)
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", sps=f"{rec['samples_per_s']:.0f}",
                                 refresh=False)
            return {"loss": 0.0, "n": 0, "samples": 0, "time": 0.0, "extra": {}}
        return window

    def epoch(self, signals) -> bool:
        """Steps until the epoch ends, the run ends, or a stop; True when interrupted by a signal."""
        t, s = self.t, self.state
        self.loader.sampler.set_epoch(s.epoch, skip=s.micro * t.batch_size)
        self.run.data.set_epoch(s.epoch)  # before iter(): worker processes copy the source as it is then
        batches = iter(self.loader)
        window = self.window
        while s.micro < self.micro_per_epoch and s.step < self.total_steps:
            t0 = time.perf_counter()
            self.strategy.on_step_start(s.step, self.total_steps)
            loss, interrupted, n, extra = self.step(batches, signals.requested > 0)
            dt = time.perf_counter() - t0
            s.samples += n * self.dist.world_size
            s.train_time += dt
            window["loss"] += loss if math.isfinite(loss) else 0.0
            window["n"] += 1
            window["samples"] += n * self.dist.world_size
            window["time"] += dt
            window["extra"].update({k: window["extra"].get(k, 0.0) + v for k, v in extra.items()})
            self.bar.update(1)
            window = self.window = self.log_window(window)
            if t.eval_every and s.step % t.eval_every == 0:
                s.stopped_early = self.evaluate_and_track()
            if t.checkpoint_every and s.step % t.checkpoint_every == 0 or interrupted:
                self.save_checkpoint()
            if s.stopped_early or interrupted:
                break
        if s.micro >= self.micro_per_epoch:  # a whole epoch done
            if not t.eval_every:
                s.stopped_early = self.evaluate_and_track()
            s.epoch, s.micro = s.epoch + 1, 0
            if s.step < self.total_steps and not s.stopped_early:
                self.strategy.on_epoch_start(s.epoch, self.base)
                if self.trainable() != self.grads_of:
                    self.wrap()
                self.save_checkpoint()
        return interrupted

    def fit(self) -> dict:
        from tqdm.auto import tqdm

        s = self.state
        self.bar = tqdm(total=self.total_steps, initial=s.step, disable=not (self.t.progress and self.dist.is_main),
                        dynamic_ncols=True, mininterval=0.5, desc="train")
        self.base.train()
        self.strategy.on_epoch_start(s.epoch, self.base)
        self.wrap()
        if self.t.eval_at_start and s.step == 0:
            metrics = self.run.evaluate(self.base, "val")
            if metrics is not None:
                self.out.log({"step": 0, "epoch": 0, "split": "val", **scalars(metrics)})
        self.t_start = time.perf_counter()
        self.window = {"loss": 0.0, "n": 0, "samples": 0, "time": 0.0, "extra": {}}  # steps not yet logged
        interrupted = False
        with _Signals() as signals:
            while s.step < self.total_steps and not (s.stopped_early or interrupted):
                interrupted = self.epoch(signals)
        self.bar.close()
        if interrupted:
            self.echo_main(f"Interrupted at step {s.step}: checkpoint saved. Continue with "
                           f"`graft train {self.run.config.path} --resume {self.run_dir}`.")
            return {"interrupted": True, "step": s.step}
        return self.finish()

    def finish(self) -> dict:
        """Last evaluation and checkpoint, best weights back, test metrics, summary, exports and plots."""
        s, run = self.state, self.run
        if not s.stopped_early and s.last_eval_step not in (-1, s.step):
            self.evaluate_and_track()  # the steps since the last evaluation count too
        self.save_checkpoint()
        self.save_weights(rundir.LAST_WEIGHTS)
        best = self.run_dir / rundir.WEIGHTS
        if s.best is None:
            self.save_weights(rundir.WEIGHTS)
        elif self.sharded:
            distributed.load_full_state_dict(self.base, ckpt.load_weights(best))
        else:
            self.base.load_state_dict(ckpt.load_weights(best))
        examples = {"val": [], "test": []}  # per-example records (graft.predictions) for graft compare, and metrics:
        results = {split: run.evaluate(self.base, split, records=examples[split]) for split in examples}
        measured = {"strategy": self.strategy.report(self.base), "wall_time_s": time.perf_counter() - self.t_start,
                    "peak_memory_bytes": peak_memory(run.device),  # process RSS on CPU, allocated on CUDA
                    "training_state_bytes": training_state_bytes(self.base, self.optimizer)}
        if self.dist.is_main:
            if self.sharded:  # exports need a whole model: a one-process rebuild holding the best weights
                run = rebuilt_alone(run, best)
            if results["test"] is not None:
                self.out.log({"step": s.step, "epoch": s.epoch, "split": "test", **scalars(results["test"])})
            self.out.write_labels(run.data)
            measured["predictions"] = predictions.write_all(self.run_dir, examples, run.data)
            if run.adapter is not None:
                size = run.adapter.save(str(self.run_dir / rundir.ADAPTER), run.backbone)
                measured["adapter"] = {"plugin": run.adapter.name, "size_bytes": size, "dir": rundir.ADAPTER}
            # backbone/ is written merged: a plain model in its family's format, the hand-off to a later run
            with run.adapter.merged(run.backbone) if run.adapter is not None else contextlib.nullcontext():
                run.strategy.export(run.model, str(self.run_dir))
        summary = rundir.training_summary(self.run, self.state, self.run_dir, self.metric, results, measured)
        if self.dist.is_main:
            self.out.write_summary(summary)
            if self.t.plot:
                self.out.plots(run.data.label_names, results)
            self.out.finish(summary)
        distributed.barrier(self.dist)
        return summary
