"""The multi-process side: launching N processes through torch's launcher, the collectives the loop uses, and
FSDP2 sharding (``[train] parallel = "fsdp"``).

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


def fsdp(config_train, dist: Dist) -> bool:
    """Whether this run shards its model: parallel = "fsdp" with more than one process."""
    return config_train.parallel == "fsdp" and dist.enabled


def _module_prefix(names: list[str]) -> str:
    """The deepest module holding every parameter in ``names`` (dotted path; "" = the root)."""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def shard(model, backbone, precision: str) -> list[str]:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``; Zhao et al. 2023, "PyTorch FSDP") on the module of each of the
    backbone's layer groups, then on the whole model (the head, and what no group's module holds alone). A group's
    module is left to the root when it contains another group's module or a parameter tied to one outside it (GPT-2's
    embeddings and output layer), since FSDP2 cannot split a tied parameter across units. bf16 runs gather
    parameters in bf16 and reduce gradients in fp32. Returns the sharded modules' paths (in the backbone)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
    root = backbone.module
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    candidates = {}
    for group in backbone.layer_groups():
        prefix = _module_prefix(group)
        module = root.get_submodule(prefix) if prefix else root
        if module is root or module is model:
            continue
        if any(counts.get(id(p), 0) > 1 for p in module.parameters()):
            continue  # tied to a parameter elsewhere
        candidates[prefix] = module
    chosen = [p for p in candidates if not any(q.startswith(p + ".") for q in candidates)]
    # Sharding replaces every parameter with a new (DTensor) one: the adapter's set of frozen parameters, kept by
    # identity, must name the new ones, or freezing schedules would thaw the pretrained weights.
    names = {id(p): n for n, p in model.named_parameters()}
    frozen = {names[i] for i in backbone.adapter_frozen if i in names}
    for prefix in chosen:
        fully_shard(candidates[prefix], mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    backbone.adapter_frozen = frozenset(id(p) for n, p in model.named_parameters() if n in frozen)
    return chosen


def full_state_dict(model) -> dict:
    """Collective: the whole (unsharded) state dict of a sharded model on the CPU, in process 0; {} elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model, state: dict) -> None:
    """Collective: load a whole state dict (every process holds it) into a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``graft <argv>`` in ``nproc`` processes on this machine with torch's own launcher."""
    env = dict(os.environ)
    # Each process gets an even share of the cores; torch's default would oversubscribe them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "graft.cli", *argv]
    return subprocess.call(cmd, env=env)
