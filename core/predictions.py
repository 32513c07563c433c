"""Per-example predictions of a finished run: what ``graft compare`` pairs example by example.

At the end of training (and in ``graft compress``) the test and val splits are scored once more with one record per
example, written to ``RUN_DIR/predictions/SPLIT.jsonl``: ``id`` (stable across runs on the same data and split:
``DataSource.example_ids`` when the source has them, else ``SPLIT:POSITION``), ``target``, ``prediction`` and
``score`` where the task has them (a classifier's label names and the predicted class's probability), ``correct``
for one-label examples, and ``sums``: the example's own summable evaluation statistics (``Strategy.eval_step``'s for
that example alone). The sums of all records are the split's sums, so ``compute_metrics`` of them is the test
metric of summary.json, and ``compute_metrics`` of a resample's sums is the metric on that resample: the bootstrap
needs nothing else. Large tensors (a confusion matrix) are kept sparse.

Strategies opt in with ``per_example = True`` (their metrics must be sums over examples: not retrieval's Recall@1,
whose candidates are the whole split). Importing this module never imports torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .files import atomic_write_text

FOLDER = "predictions"
DENSE = 16  # tensors with more elements than this are stored as their non-zero entries


def slice_batch(batch: dict, i: int, n: int):
    """Example ``i`` of a batch of ``n`` as a batch of one: tensors and lists whose first axis is the batch are
    cut, dicts recursively, anything else (the split's name) kept."""
    import torch

    if isinstance(batch, dict):
        return {k: slice_batch(v, i, n) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor) and batch.ndim and batch.shape[0] == n:
        return batch[i:i + 1]
    if isinstance(batch, (list, tuple)) and len(batch) == n:
        return type(batch)(batch[i:i + 1])
    return batch


def encode_sums(sums: dict) -> dict:
    """One example's sums as JSON: numbers, small tensors as nested lists, large ones as ``{"shape", "index",
    "value"}`` of their non-zero entries. List-valued sums (records such as detection's boxes) are kept as they
    are."""
    import torch

    out = {}
    for k, v in sums.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().double().cpu()
            if v.numel() <= DENSE:
                out[k] = v.tolist()
            else:
                flat = v.reshape(-1)
                nz = flat.nonzero().reshape(-1)
                out[k] = {"shape": list(v.shape), "index": nz.tolist(), "value": flat[nz].tolist()}
        elif isinstance(v, (int, float, list)):
            out[k] = v
    return out


def per_example(strategy, model, batch: dict) -> list[dict]:
    """Each example's sums of one evaluation batch: ``strategy.eval_step`` on each example alone, or the
    strategy's faster ``example_sums(model, batch)`` (one forward, the sums cut per example) when it gives them."""
    n = len(batch["index"])
    fast = strategy.example_sums(model, batch) if hasattr(strategy, "example_sums") else None
    if fast is not None:
        return fast
    return [strategy.eval_step(model, slice_batch(batch, i, n)) for i in range(n)]


def total(each: list[dict]) -> dict:
    """The batch's sums from its examples' (list-valued sums concatenated)."""
    out: dict = {}
    for e in each:
        for k, v in e.items():
            if not k.startswith("_"):
                out[k] = out[k] + v if k in out else (list(v) if isinstance(v, list) else v)
    return out


def records(strategy, batch: dict, sums: list[dict], ids: list[str] | None, source: str = "") -> list[dict]:
    """The JSON records of one batch's ``per_example`` sums: id, the task's fields (``Task.describe``), the score
    (a sum named ``_score``), the sums. ``source``: a data source beside [data] (the [target]), which prefixes
    its examples' ids and is kept in the record."""
    describe = getattr(getattr(strategy, "task", None), "describe", None)
    out = []
    for position, s in zip(batch["index"].tolist(), sums):
        own = {k: v for k, v in s.items() if not k.startswith("_")}
        fields = describe({k.split("/", 1)[-1]: v for k, v in own.items()}) if describe else {}
        if "_score" in s:
            fields["score"] = float(s["_score"])
        name = ids[position] if ids else f"{batch['split']}:{position}"
        out.append({"id": f"{source}/{name}" if source else name, **({"source": source} if source else {}),
                    "position": position, **fields, "sums": encode_sums(own)})
    return out


def order(record: dict) -> tuple:
    """Records in evaluation order: [data]'s examples, then a [target]'s, each by position in its split."""
    return record.get("source", ""), record["position"]


def fingerprint(records: list[dict]) -> str:
    """What two runs must share to be compared example by example: the ids and targets in order."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r["id"], r.get("target")]).encode())
    return h.hexdigest()[:16]


def write(run_dir: Path, split: str, records: list[dict], id_kind: str) -> dict:
    """``run_dir/predictions/SPLIT.jsonl`` (atomically); returns what summary.json says of it."""
    folder = Path(run_dir) / FOLDER
    folder.mkdir(exist_ok=True)
    records = sorted(records, key=order)
    atomic_write_text(folder / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return {"file": f"{FOLDER}/{split}.jsonl", "examples": len(records), "ids": id_kind,
            "fingerprint": fingerprint(records)}


def write_all(run_dir: Path, examples: dict[str, list[dict]], data) -> dict:
    """Each split's records that were kept (``{"val": [...], "test": [...]}``); returns summary.json's
    ``predictions``: split -> what ``write`` says."""
    kind = "source" if hasattr(data, "example_ids") else "positions"
    return {split: write(run_dir, split, recs, kind) for split, recs in examples.items() if recs}


def read(run_dir: Path, split: str) -> list[dict] | None:
    """The records of ``run_dir/predictions/SPLIT.jsonl`` in order, or None when the run has none."""
    path = Path(run_dir) / FOLDER / f"{split}.jsonl"
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def decode(value):
    """An encoded sum back as a float64 numpy array (a list-valued record sum: the list)."""
    import numpy as np

    if isinstance(value, dict) and "shape" in value:
        out = np.zeros(int(np.prod(value["shape"])), dtype=np.float64)
        out[value["index"]] = value["value"]
        return out.reshape(value["shape"])
    return np.asarray(value, dtype=np.float64)
