"""The multi-process side: launching N processes through torch's launcher, and the collectives the loop uses.

``graft train --nproc N`` re-runs the same command under ``torch.distributed.run``; running under ``torchrun``
directly works the same, since both only set RANK / WORLD_SIZE / LOCAL_RANK for the loop to read.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


def init(dist: Dist, device) -> None:
    if not dist.enabled:
        return
    import torch.distributed as td

    if not td.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        td.init_process_group(backend=backend, rank=dist.rank, world_size=dist.world_size,
                              device_id=device if device.type == "cuda" else None)


def shutdown(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


def all_reduce_sum(tensor, dist: Dist):
    """Sum ``tensor`` over processes in place (a no-op in one process) and return it."""
    if dist.enabled:
        import torch.distributed as td

        td.all_reduce(tensor, op=td.ReduceOp.SUM)
    return tensor


def barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        td.barrier()


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``graft <argv>`` in ``nproc`` processes on this machine with torch's own launcher."""
    env = dict(os.environ)
    # Each process gets an even share of the cores; torch's default would oversubscribe them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "graft.cli", *argv]
    return subprocess.call(cmd, env=env)
