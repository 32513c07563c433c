"""Several tasks' data sources as one (``TaskMixture``): the data of a multi-task run, whose config gives each task
as a ``[tasks.NAME]`` table. Public as ``graft.data.TaskMixture``.

Training batches hold one task each: every epoch, each task's examples are shuffled on their own (the seeded order a
one-task run's sampler draws), cut into groups of one optimizer step's examples (batch size x accumulation x
processes), and the groups of all
tasks laid out by the sampling scheme; the training sampler (``graft.batches.EpochSampler``) takes this order as it
is. Evaluation batches may hold several tasks: each batch is ``{"tasks": {NAME: that task's own batch}}``.
"""

from __future__ import annotations

import math

from .errors import GraftError
from .interfaces import DataSource

SAMPLING = ("proportional", "temperature", "round_robin")


class TaskMixture(DataSource):
    """The data sources of several tasks (name -> an un-set-up source) as one source. ``sampling``: "proportional"
    (each task's examples once per epoch, the groups in a seeded random order), "temperature" (task t's share of an
    epoch's examples proportional to n_t ** (1 / ``temperature``): 1 = proportional, large = equal; small tasks are
    repeated, large ones cut -- Arivazhagan et al. 2019 / mT5), "round_robin" (each task's examples once per epoch,
    the tasks taking turns group by group). An epoch holds as many examples as the tasks' training splits together."""

    task = "multitask"

    def __init__(self, sources: dict[str, DataSource], sampling: str = "proportional", temperature: float = 1.0):
        super().__init__(None)
        if sampling not in SAMPLING:
            raise GraftError(f"Task sampling {sampling!r}: one of {', '.join(SAMPLING)}.")
        self.sources, self.sampling, self.temperature = dict(sources), sampling, temperature
        self.names = list(self.sources)
        self.label_names = []
        self.name = "tasks"

    def setup(self, backbone, seed):
        for name, source in self.sources.items():
            source.seed = seed
            try:
                source.setup(backbone, seed)
            except GraftError as e:
                raise GraftError(f"[tasks.{name}]: {e}") from None

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        for source in self.sources.values():
            source.set_epoch(epoch)

    def report(self):
        return {name: r for name, r in ((n, s.report()) for n, s in self.sources.items()) if r}

    # -- what a run saves to predict without data (labels.json's "tasks") -------------------------------
    def tasks_info(self) -> dict:
        return {name: {"task": s.task, "label_names": list(s.label_names or [])} for name, s in self.sources.items()}

    def restore(self, info: dict) -> None:
        for name, source in self.sources.items():
            if name not in info:
                raise GraftError(f"The run's labels.json has no task {name!r} (it has {', '.join(info)}): was the "
                                 f"run's config.toml edited?")
            source.task, source.label_names = info[name]["task"], info[name]["label_names"]

    # -- examples ---------------------------------------------------------------------------------------
    def parts(self, split: str) -> list[tuple[str, object]]:
        return [(name, ds) for name, ds in ((n, s.dataset(split)) for n, s in self.sources.items()) if ds]

    def dataset(self, split):
        parts = self.parts(split)
        return _Joined(parts) if parts else None

    def collate(self, examples):
        """``(task, index in its split, example)`` items -> ``{"tasks": {NAME: batch}}``, each task's batch made by its
        own source's ``collate``, with ``index`` (positions in that task's split)."""
        import torch

        grouped: dict[str, list] = {}
        for name, index, example in examples:
            grouped.setdefault(name, []).append((index, example))
        out = {}
        for name, items in grouped.items():
            batch = self.sources[name].collate([e for _, e in items])
            batch["index"] = torch.tensor([i for i, _ in items], dtype=torch.long)
            out[name] = batch
        return {"tasks": out}

    def encode(self, backbone, items):
        """Raw inputs for every task at once: the first task's source prepares them (the tasks share the backbone)."""
        return self.sources[self.names[0]].encode(backbone, items)

    # -- the training order -----------------------------------------------------------------------------
    def shares(self, sizes: list[int]) -> list[int]:
        """Examples of each task in one epoch (the tasks' sizes ``sizes`` together)."""
        if self.sampling != "temperature":
            return list(sizes)
        weights = [n ** (1.0 / self.temperature) for n in sizes]
        total = sum(sizes)
        shares = [math.floor(total * w / sum(weights)) for w in weights]
        for i in sorted(range(len(sizes)), key=lambda i: -weights[i])[:total - sum(shares)]:
            shares[i] += 1  # the remainder to the largest weights, so the epoch keeps its length
        return shares

    def epoch_order(self, epoch: int, seed: int, group: int) -> list[int]:
        """The training split's order in ``epoch``: positions in ``dataset("train")``, in groups of ``group`` (one
        optimizer step's examples: every micro-batch on every process) that each hold one task. Each task's examples follow their own seeded
        shuffle (a one-task mixture gives exactly the order a plain run's sampler draws); a task's last group is
        filled up from the start of its order, except when it is the only task."""
        import torch

        parts = self.parts("train")
        sizes = [len(ds) for _, ds in parts]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        chunks = []  # (task number, positions)
        for t, (size, share) in enumerate(zip(sizes, self.shares(sizes))):
            g = torch.Generator().manual_seed(seed + epoch)
            seq: list[int] = []
            while len(seq) < share:  # a task sampled above its size goes round again, in a new order
                seq += torch.randperm(size, generator=g).tolist()
            seq = seq[:share]
            for i in range(0, len(seq), group):
                chunk = seq[i:i + group]
                if len(chunk) < group and len(parts) > 1:
                    chunk += (seq * (group // max(1, len(seq)) + 1))[:group - len(chunk)]
                chunks.append((t, [offsets[t] + j for j in chunk]))
        if len(parts) > 1:
            chunks = self._arrange(chunks, len(parts), seed + epoch)
        return [i for _, chunk in chunks for i in chunk]

    def _arrange(self, chunks, tasks: int, seed: int):
        import torch

        if self.sampling == "round_robin":
            queues = [[c for c in chunks if c[0] == t] for t in range(tasks)]
            out = []
            while any(queues):
                out += [q.pop(0) for q in queues if q]
            return out
        g = torch.Generator().manual_seed(seed)
        return [chunks[i] for i in torch.randperm(len(chunks), generator=g).tolist()]


class _Joined:
    """The tasks' splits end to end; item i is (task, index in its split, example)."""

    def __init__(self, parts):
        self.parts = parts
        self.starts = [0]
        for _, ds in parts:
            self.starts.append(self.starts[-1] + len(ds))

    def __len__(self):
        return self.starts[-1]

    def __getitem__(self, i):
        import bisect

        t = bisect.bisect_right(self.starts, i) - 1
        name, ds = self.parts[t]
        return name, i - self.starts[t], ds[i - self.starts[t]]
