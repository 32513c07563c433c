"""Checkpoints: safetensors for every tensor, JSON for everything else, written atomically.

A checkpoint is a directory ``checkpoints/step-00000120/`` holding ``model.safetensors``, ``state.safetensors``
(optimizer, scaler, RNG and strategy tensors) and ``state.json`` (the rest, with references to those tensors).
Nothing is unpickled -- except in a sharded (FSDP) run's checkpoint, whose model and optimizer shards are in
``dcp/``, torch.distributed.checkpoint's format, which keeps its index as a pickle; graft reads those only when
resuming a run directory. The directory is written under a temporary name, fsynced and renamed, and only then
does ``checkpoints/latest`` (itself replaced atomically) point at it: a kill at any moment leaves the previous
checkpoint whole and pointed to.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import GraftError
from .files import fsync_dir, fsync_file, atomic_write_text

def clean_key(key: str) -> str:
    """Drop the wrappers' prefixes: torch.compile's ``_orig_mod.`` (wherever a compiled submodule sits) and
    DDP's leading ``module.``."""
    key = key.replace("_orig_mod.", "")
    return key[len("module."):] if key.startswith("module.") else key


def clean_state_dict(state: dict) -> dict:
    """A state dict safe for safetensors: no wrapper prefixes, contiguous, no shared storage."""
    out = {}
    seen = {}
    for k, v in state.items():
        v = v.detach()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if ptr is not None and ptr in seen:
            v = v.clone()  # tied weights: safetensors refuses shared storage
        elif ptr is not None:
            seen[ptr] = k
        out[clean_key(k)] = v.contiguous().cpu()
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile and DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def pack(obj, tensors: dict, prefix: str = "t"):
    """Replace every tensor in a nested structure with a reference; collect tensors into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError("checkpoint state dict keys must be str or int")
        return {"__dict__": [[k, pack(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__": [pack(v, tensors, prefix) for v in obj]}
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy arrays and scalars
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}; use tensors and plain values")


def unpack(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: unpack(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [unpack(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(unpack(v, tensors) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            import numpy as np

            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    return obj


def atomic_save_file(tensors: dict, path: Path, metadata: dict | None = None):
    """safetensors ``save_file`` through a temporary name, fsync and rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_checkpoint(directory: Path, step: int, model_state: dict, state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step-<step>`` under ``directory`` and point ``latest`` at it."""
    tmp = _fresh_tmp(directory, step)
    save_file(clean_state_dict(model_state), str(tmp / "model.safetensors"))
    return _publish(directory, tmp, step, state, keep)


def _fresh_tmp(directory: Path, step: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(directory: Path, tmp: Path, step: int, state: dict, keep: int) -> Path:
    """Add ``state`` to the checkpoint being written in ``tmp``, make it durable, rename it ``step-<step>``, point
    ``latest`` at it and remove the oldest beyond ``keep``."""
    final = directory / f"step-{step:08d}"
    tensors: dict = {}
    skeleton = pack(state, tensors)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(skeleton))
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_file(f)
    for d in [tmp, *(d for d in tmp.rglob("*") if d.is_dir())]:
        fsync_dir(d)
    if final.exists():
        # Re-saving a step (the end of a run right after a periodic save): at every moment `latest` must name a
        # whole checkpoint, so the new one goes live under another name before the old one is removed.
        fresh = directory / f"{final.name}.new"
        shutil.rmtree(fresh, ignore_errors=True)
        os.replace(tmp, fresh)
        fsync_dir(directory)
        atomic_write_text(directory / "latest", fresh.name + "\n")
        shutil.rmtree(final)
        tmp = fresh
    os.replace(tmp, final)
    fsync_dir(directory)
    atomic_write_text(directory / "latest", final.name + "\n")
    old = sorted(p for p in directory.glob("step-*") if p.is_dir() and p != final and not p.name.endswith(".new"))
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest(directory: Path) -> Path | None:
    pointer = directory / "latest"
    if pointer.is_file():
        p = directory / pointer.read_text().strip()
        if (p / "state.json").is_file():
            return p
    # The pointer may be missing if a kill came between rename and pointer update: take the newest whole one.
    done = sorted(p for p in directory.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_latest(directory: Path, echo=print, set_aside: bool = False) -> tuple[Path, dict, dict] | None:
    """(path, model state, state) of the newest checkpoint that loads. A damaged one (a disk that filled up, a file
    cut short by hand) is passed over for the one before it, saying so; None when there is none. ``set_aside`` (the
    main process of a resume): damaged checkpoints newer than the one loaded are renamed ``damaged-step-N``, kept
    for a look but no longer counted against ``keep_checkpoints`` nor taken for the newest."""
    first = latest(directory)
    candidates = ([first] if first else []) + sorted(
        (p for p in directory.glob("step-*") if (p / "state.json").is_file() and p != first), reverse=True)
    errors = []
    for path in candidates:
        try:
            model_state, state = load_checkpoint(path)
        except GraftError as e:
            errors.append(str(e))
            continue
        if errors:
            echo(f"Warning: checkpoint {candidates[0].name} is damaged; resuming from {path.name} instead.")
            if set_aside:
                for bad in candidates[:candidates.index(path)]:
                    if bad.name > path.name:
                        aside = directory / f"damaged-{bad.name}"
                        shutil.rmtree(aside, ignore_errors=True)
                        os.replace(bad, aside)
                        echo(f"Warning: the damaged checkpoint is kept as {aside}; delete it when done with it.")
                atomic_write_text(directory / "latest", path.name + "\n")
        return path, model_state, state
    if errors:
        raise GraftError(errors[0] if len(errors) == 1 else f"No checkpoint in {directory} loads; the newest: "
                         f"{errors[0]}")
    return None


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(model state dict, state) of a checkpoint directory; the model state is None for a sharded checkpoint (its
    model and optimizer are in ``dcp/``, torch.distributed.checkpoint's format)."""
    try:
        sharded = (path / "dcp" / ".metadata").is_file()
        model_state = None if sharded else load_file(str(path / "model.safetensors"))
        tensors = load_file(str(path / "state.safetensors"))
        skeleton = json.loads((path / "state.json").read_text())
    except Exception as e:  # noqa: BLE001 - safetensors' own error is no OSError/ValueError
        raise GraftError(f"Checkpoint {path} is unreadable ({e}). Point {path.parent / 'latest'} at an earlier "
                         f"step directory, or start again.") from None
    return model_state, unpack(skeleton, tensors)


def load_weights(path: Path) -> dict:
    """A safetensors weights file as a state dict, with a clear error when it is missing or damaged."""
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors' own error is no OSError/ValueError
        raise GraftError(f"Cannot read weights {path}: {e}.") from None


# -- the training state a checkpoint holds --------------------------------------------------------------------
@dataclasses.dataclass
class TrainState:
    """Where a run is and what it has seen; every field goes into each checkpoint (``state.json`` "position")."""

    epoch: int = 0
    micro: int = 0  # micro-batches done in the current epoch
    step: int = 0  # optimizer steps done
    best: float | None = None  # best validation metric so far
    bad_evals: int = 0  # evaluations since the best one (early stopping)
    skipped_steps: int = 0  # non-finite losses skipped (on_nan = "skip")
    samples: int = 0
    train_time: float = 0.0
    stopped_early: bool = False
    last_eval_step: int = -1
    # What fixes the data order: a resumed run must keep these, or it would skip to the wrong examples.
    world_size: int = 1
    batch_size: int = 1
    grad_accum: int = 1

    LAYOUT = ("world_size", "batch_size", "grad_accum")


def save_training(directory: Path, state: TrainState, model, optimizer, scheduler, scaler, strategy, dist,
                  keep: int, sharded: bool = False) -> None:
    """Checkpoint everything a resumed run needs: weights, optimizer, schedule, scaler, the strategy's own state,
    every process's RNG state and ``state``. Collective: every process calls it. Non-finite weights are refused, so
    the previous checkpoint stays the last good one. ``sharded`` (FSDP): each process writes its own shards of the
    model and optimizer with ``torch.distributed.checkpoint`` into the same temporary directory, which process 0
    publishes only after all of them finished."""
    from . import distributed
    from .device import rng_state

    rngs = [rng_state()]
    if dist.enabled:
        import torch.distributed as td

        rngs = [None] * dist.world_size
        td.all_gather_object(rngs, rng_state())
    # Every process checks its (shard of the) weights and all of them learn the verdict, so they stop together.
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731 - a DTensor's own shard
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(local(p)).all()]
    flag = distributed.all_reduce_sum(torch.tensor([float(len(bad))]), dist)
    if flag.item():
        raise GraftError(f"Refusing to checkpoint non-finite weights ({bad[0] if bad else 'in another process'}...); "
                         f"the last good checkpoint in {directory} is kept.")
    extra = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "strategy": strategy.state_dict(),
             "rng": rngs, "position": dataclasses.asdict(state)}
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        tmp = directory / f".tmp-step-{state.step:08d}"
        if dist.is_main:
            _fresh_tmp(directory, state.step)
        distributed.barrier(dist)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / "dcp"))
        distributed.barrier(dist)  # every shard is on disk before the checkpoint goes live
        if dist.is_main:
            _publish(directory, tmp, state.step, extra, keep)
    elif dist.is_main:
        save_checkpoint(directory, state.step, model.state_dict(), {"optimizer": optimizer.state_dict(), **extra},
                        keep=keep)
    distributed.barrier(dist)


def _load_sharded(path: Path, model, optimizer) -> None:
    """Model and optimizer from a torch.distributed.checkpoint directory, resharded to this run's processes (any
    number, one included). DCP keeps its metadata as a pickle: graft reads only checkpoints of a run directory given
    to --resume, which its own runs wrote."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    both = {"model": model_state, "optimizer": optim_state}
    with warnings.catch_warnings():  # one process: DCP says it assumes so, which is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(both, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])


def _load_optimizer(optimizer, saved: dict) -> bool:
    """``optimizer.load_state_dict``; a checkpoint from before optimizer groups with equal settings were merged
    (issue 27) is read into the unmerged layout first and handed over parameter by parameter (then True)."""
    unmerged = getattr(optimizer, "graft_unmerged", None)
    if unmerged is None or len(saved["param_groups"]) == len(optimizer.param_groups):
        optimizer.load_state_dict(saved)
        return False
    older = unmerged()
    older.load_state_dict(saved)
    lr_of = {id(p): g["lr"] for g in older.param_groups for p in g["params"]}
    for p, s in older.state.items():
        optimizer.state[p] = s
    for g in optimizer.param_groups:  # merged groups hold equal settings: any member's saved lr is the group's
        g["lr"] = lr_of[id(g["params"][0])]
    return True


def restore_training(run_dir: Path, state: TrainState, model, optimizer, scheduler, scaler, strategy, dist,
                     echo, sharded: bool = False) -> str:
    """Load the newest loadable checkpoint of ``run_dir`` into the given objects and ``state``; returns its name.
    Raises GraftError when there is none, or when it was made with another batch layout, model or optimizer."""
    from .device import set_rng_state

    found = load_latest(run_dir / "checkpoints", echo if dist.is_main else lambda m: None, set_aside=dist.is_main)
    if found is None:
        raise GraftError(f"--resume {run_dir}: no checkpoint in {run_dir / 'checkpoints'}. Start a new run instead.")
    path, model_state, saved = found
    position = saved["position"]
    changed = {k: (position.get(k, getattr(state, k)), getattr(state, k)) for k in TrainState.LAYOUT
               if position.get(k, getattr(state, k)) != getattr(state, k)}
    # w processes with batch B see, step by step, the examples 1 process with batch w * B does: another process
    # count with the same global batch continues the same data order.
    glob = lambda ws, bs: ws * bs  # noqa: E731
    if changed and glob(*[position.get(k, getattr(state, k)) for k in ("world_size", "batch_size")]) == glob(
            state.world_size, state.batch_size) and "grad_accum" not in changed:
        changed = {}
    if changed:
        raise GraftError(f"--resume {run_dir}: the run was made with " + ", ".join(
            f"{k} = {a}" for k, (a, _) in changed.items()) + ", this config says " + ", ".join(
            f"{k} = {b}" for k, (_, b) in changed.items()) + ". Resume with the same grad_accum and the same global batch "
            "(processes x batch_size: e.g. --nproc 1 with twice the batch_size of 2 processes).")
    from_unmerged = False
    try:
        if model_state is None:
            _load_sharded(path, model, optimizer)
        elif sharded:
            raise GraftError(f"--resume {run_dir}: checkpoint {path.name} was written by a run with parallel = "
                             f"\"ddp\" (or one process); resume it with the same parallel setting.")
        else:
            model.load_state_dict(model_state)
            from_unmerged = _load_optimizer(optimizer, saved["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise GraftError(f"--resume {run_dir}: checkpoint {path.name} does not fit this config's model or optimizer "
                         f"({str(e).splitlines()[0]}). Resume with the config the run was made with "
                         f"({run_dir / 'config.toml'}).") from None
    scheduler.load_state_dict(saved["scheduler"])
    if from_unmerged:  # the saved schedule listed the unmerged groups
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    scaler.load_state_dict(saved["scaler"])
    strategy.load_state_dict(saved["strategy"])
    for k, v in position.items():
        if hasattr(state, k):
            setattr(state, k, v)
    set_rng_state(saved["rng"][dist.rank % len(saved["rng"])])
    return path.name
