"""Devices, precision and seeds: where a run computes and how it repeats itself."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from .errors import GraftError


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


def peak_memory(device: torch.device) -> int:
    """Peak memory in bytes: ``torch.cuda.max_memory_allocated`` on CUDA, else the process's peak resident set
    size (``getrusage``; 0 where the platform has none)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux kilobytes
    except (ImportError, OSError):
        return 0


def training_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process holds for training state: its parameters, a gradient for each trainable one, and the
    optimizer's state -- only the local shard of each under FSDP. Unlike peak memory it leaves out activations and
    everything the process allocated once (a whole model built before sharding, the gathered export)."""
    def size(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = sum(size(p) * (2 if p.requires_grad else 1) for p in model.parameters())
    return params + sum(size(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
