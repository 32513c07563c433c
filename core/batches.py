"""Batches: the seeded, shardable, resumable sampler, a second source's stream, example indices in every batch,
moving to a device."""

from __future__ import annotations

import functools

import torch


class EpochSampler(torch.utils.data.Sampler):
    """Seeded order per epoch, split across processes, able to start mid-epoch (for exact resume).

    Process r of w takes positions r, r+w, r+2w... of the epoch's order, so w processes with batch B see the
    same examples per step as one process with batch w*B. Training pads the order (wrapping around) to a
    multiple of w so every process runs the same number of steps; evaluation does not pad, so nothing is
    counted twice.

    With ``keys`` (one set of hashable keys per example, e.g. its texts) and ``group`` (the examples of one step
    across processes), each group of the order holds no two examples sharing a key (``distinct_order``). With
    ``plan`` (``plan(epoch, seed, group) -> positions``: a data source's ``epoch_order``, e.g. a task mixture's
    groups of one task each), training takes that order instead of a shuffle.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, dist, pad: bool, keys=None, group: int = 0, plan=None):
        self.n, self.shuffle, self.seed, self.dist, self.pad = n, shuffle, seed, dist, pad
        self.keys, self.group, self.plan = keys, group, plan
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = epoch, skip

    def _order(self) -> list[int]:
        if self.shuffle and self.plan is not None:  # the data's own order (a task mixture's), once per epoch
            if getattr(self, "_planned", (None,))[0] != self.epoch:
                self._planned = (self.epoch, self.plan(self.epoch, self.seed, self.group))
            order = list(self._planned[1])
        elif self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.keys is not None and self.group > 1:  # once per epoch: len() and iter() both ask
            if getattr(self, "_distinct", (None,))[0] != self.epoch:
                self._distinct = (self.epoch, distinct_order(order, self.keys, self.group))
            order = list(self._distinct[1])
        w, n = self.dist.world_size, len(order)
        if self.pad and n % w:
            order += order[: w - n % w]
        return order[self.dist.rank::w]

    def __iter__(self):
        return iter(self._order()[self.skip:])

    def __len__(self):
        return len(self._order()) - self.skip


def distinct_order(order: list[int], keys, size: int) -> list[int]:
    """``order`` rearranged so that each run of ``size`` positions holds no two examples whose ``keys`` (sets)
    meet: a duplicate text in a batch of in-batch negatives is a false negative. Greedy and deterministic, after
    sentence-transformers' ``NoDuplicatesBatchSampler``: an example that clashes waits for the next batch that takes
    it. Only at the end of the order, where no such batch is left, does a batch take a clashing example (so the
    order keeps every example and its length)."""
    from collections import deque

    out, pending, rest = [], deque(), deque(order)
    while rest or pending:
        batch, seen = [], set()
        for source in (pending, rest):
            for _ in range(len(source)):
                if len(batch) == size:
                    break
                i = source.popleft()
                if keys[i] & seen:
                    pending.append(i)
                else:
                    batch.append(i)
                    seen |= keys[i]
        while len(batch) < size and pending and not rest:  # nothing else left: the clash is unavoidable
            batch.append(pending.popleft())
        out += batch
    return out


class Stream:
    """Batches of one split of a second data source (a [target] domain's), drawn one by one beside the training
    loader's: ``next()`` gives the batch at ``position`` (on ``device``, with "index" and "split" like the loader's)
    and moves on. Epoch after epoch of the split, each in its own seeded order split across processes as
    ``EpochSampler`` splits it, so w processes drawing ``batch_size`` each see what one process drawing
    w x ``batch_size`` sees. The batch at a position depends on nothing else: a checkpoint keeps ``position``, and a
    resumed run draws the same batches. Raises GraftError (naming ``where``) for an empty split."""

    def __init__(self, data, split: str, batch_size: int, seed: int, dist, device, where: str = ""):
        self.data, self.split, self.device = data, split, device
        self.ds = data.dataset(split)
        if not self.ds:
            from .errors import GraftError

            raise GraftError(f"{where or 'The data source'} plugin = {getattr(data, 'name', '')!r} has an empty "
                             f"{split} split: there is nothing to draw batches from.")
        self.sampler = EpochSampler(len(self.ds), shuffle=True, seed=seed, dist=dist, pad=True)
        self.batch_size = min(batch_size, len(self.sampler))
        # whole global batches only, counted on the unpadded split: w processes then draw what one process drawing w x
        # batch_size draws (a smaller last batch would also weigh its examples more)
        self.per_epoch = max(1, len(self.ds) // (self.batch_size * dist.world_size))
        self.position, self._epoch, self._order = 0, None, []

    def next(self) -> dict:
        epoch, b = divmod(self.position, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, self.sampler._order()
            self.data.set_epoch(epoch)  # augmentation seeds (example_seed) follow the stream's epoch
        idx = self._order[b * self.batch_size:(b + 1) * self.batch_size]
        batch = _IndexedCollate(self.data.collate, self.split)([(i, self.ds[i]) for i in idx])
        self.position += 1
        return move(batch, self.device)


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


def _step_groups(plan, grad_accum: int, epoch: int, seed: int, group: int) -> list[int]:
    return plan(epoch, seed, group * grad_accum)


def make_loader(data, split: str, train: bool, t, dist, device, batch_size: int | None = None, keys=None):
    """A DataLoader over ``data.dataset(split)`` whose batches carry ``index`` and ``split``; None when empty.
    ``keys``: per example, a set the other examples of its step must not share (``EpochSampler``)."""
    ds = data.dataset(split)
    if ds is None or len(ds) == 0:
        return None
    size = batch_size or (t.batch_size if train else (t.eval_batch_size or t.batch_size))
    plan = getattr(data, "epoch_order", None) if train else None
    if plan is not None:  # the data plans its order in groups of one optimizer step (all micro-batches, processes)
        plan = functools.partial(_step_groups, plan, t.grad_accum)
    sampler = EpochSampler(len(ds), shuffle=train, seed=t.seed, dist=dist, pad=train, keys=keys,
                           group=size * dist.world_size, plan=plan)
    # A private generator keeps the DataLoader from drawing on the global RNG, which resume restores.
    return torch.utils.data.DataLoader(
        _Indexed(ds), batch_size=size,
        sampler=sampler, collate_fn=_IndexedCollate(data.collate, split), num_workers=t.num_workers,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(t.seed),
        persistent_workers=False)
