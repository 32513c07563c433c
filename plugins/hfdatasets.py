"""The ``hfdatasets`` data source: anything the Hugging Face ``datasets`` library loads offline."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import UNLABELLED, DataSource, GraftError, did_you_mean, hookimpl, option
from graft.data import (IMAGE_SUFFIXES, SplitOptions, check_image_size, few_labels, image_transform, open_image,
                        pad_tokens, stratified_split)

VAL_NAMES = ("validation", "valid", "val", "dev")
FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class HFDatasetsOptions(SplitOptions):
    path: str = option("", "A folder written by Dataset / DatasetDict.save_to_disk, or a local .csv, .json(l) or "
                           ".parquet file (read with datasets.load_dataset). Hub names are never downloaded.",
                       path=True)
    format: Literal["auto", "disk", "csv", "json", "parquet"] = option("auto", "How to read path; auto: a folder is "
                                                                              "save_to_disk's, a file goes by suffix.")
    text_column: str = option("text", "Column of the texts (text backbones).")
    image_column: str = option("image", "Column of the images (image backbones): a datasets.Image feature, or "
                                        "image file paths.")
    label_column: str = option("label", "Column of the labels: a ClassLabel (its names are the classes), strings or "
                                        "integers; numbers for task = \"regression\".")
    task: Literal["classification", "regression"] = option("classification", "What the labels are.")
    max_length: int = option(0, "Tokens per text (longer ones are truncated); 0 = the backbone's usable positions, "
                                "at most 256.")
    image_size: int = option(0, "Image side; 0 = the backbone's own input size.")
    max_examples: int = option(0, "Use only this many examples of the training split (seeded sample); 0 = all.")

    def validate(self):
        super().validate()
        if not self.path:
            raise ValueError("path is required: a save_to_disk folder or a local CSV / JSON / Parquet file.")
        if self.max_length == 1 or self.max_length < 0 or self.max_examples < 0:
            raise ValueError("max_length must be 0 or at least 2; max_examples must not be negative.")
        check_image_size(self.image_size)


def load(o: HFDatasetsOptions, where: str) -> dict:
    """{split name: datasets.Dataset} of ``o.path``, read offline."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    p = Path(o.path).expanduser()
    if not p.exists():
        raise GraftError(f"{where}: path {o.path!r} does not exist. graftkit never downloads from the hub: save the "
                         f"dataset with save_to_disk, or pass a local CSV / JSON / Parquet file.")
    fmt = o.format if o.format != "auto" else ("disk" if p.is_dir() else FORMATS.get(p.suffix.lower(), ""))
    if not fmt:
        raise GraftError(f"{where}: cannot tell how to read {o.path!r}; set format = \"csv\", \"json\" or "
                         f"\"parquet\".")
    try:
        if fmt == "disk":
            data = datasets.load_from_disk(str(p))
        else:
            data = datasets.load_dataset(fmt, data_files=str(p), **({"delimiter": "\t"} if p.suffix == ".tsv"
                                                                    else {}))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise GraftError(f"{where}: datasets cannot read {o.path!r} as {fmt}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - pyarrow and datasets raise many types for a damaged file
        raise GraftError(f"{where}: datasets cannot read {o.path!r} as {fmt}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return dict(data) if isinstance(data, datasets.DatasetDict) else {"train": data}


class HFDatasets(DataSource):
    """Any dataset the Hugging Face datasets library reads offline (save_to_disk folders, CSV, JSON, Parquet)."""

    Options = HFDatasetsOptions
    view_options = ("max_length", "image_size")
    training_options = ("train_fraction", "unlabelled", "max_examples")

    def setup(self, backbone, seed):
        import numpy as np

        o = self.options
        where = "[data] plugin = \"hfdatasets\""
        self.task = o.task
        self.modality = backbone.modality
        column = o.text_column if self.modality == "text" else o.image_column
        raw = load(o, where)
        for name, ds in raw.items():
            for key, col in (("text_column" if self.modality == "text" else "image_column", column),
                             ("label_column", o.label_column)):
                if col not in ds.column_names:
                    raise GraftError(f"{where}: {o.path} (split {name!r}) has no column {col!r}; its columns are "
                                     f"{', '.join(ds.column_names)}.{did_you_mean(col, ds.column_names)} Set {key}.")
        parts = {"train": raw.get("train") or next(iter(raw.values()))}
        own_val = next((raw[k] for k in VAL_NAMES if k in raw), None)
        for split, ds in (("val", own_val), ("test", raw.get("test"))):
            if ds is not None:
                parts[split] = ds
        self.label_names, to_target = self._labels(parts)
        targets = {s: [to_target(v) for v in ds[o.label_column]] for s, ds in parts.items()}
        train = list(range(len(parts["train"])))
        strat = [t if o.task == "classification" else 0 for t in targets["train"]]
        if o.max_examples and o.max_examples < len(train):
            train = sorted(np.random.default_rng(seed).permutation(len(train))[: o.max_examples].tolist())
        # the dataset's own splits where it has them; the missing ones are split off its training split
        idx = stratified_split([strat[i] for i in train], 0.0 if "val" in parts else o.val_fraction,
                               0.0 if "test" in parts else o.test_fraction, seed)
        split_of = {s: [train[i] for i in idx[s]] for s in ("train", "val", "test")}
        keep, hidden = few_labels(split_of["train"], strat, o, seed)
        self.items = {"train": [(parts["train"], i, UNLABELLED if i in hidden else targets["train"][i]) for i in keep]}
        for s in ("val", "test"):
            self.items[s] = ([(parts[s], i, targets[s][i]) for i in range(len(parts[s]))] if s in parts
                             else [(parts["train"], i, targets["train"][i]) for i in split_of[s]])
        self.splits = {s: self._prepare(backbone, items, column, where) for s, items in self.items.items()}
        self.sources = {s: (f"the dataset's own {next(k for k, v in raw.items() if v is parts[s])!r} split"
                            if s in parts else "split off its training split (seeded, stratified)")
                        for s in ("train", "val", "test")}

    def report(self):
        return {"splits": {s: len(self.items[s]) for s in self.items}, "split_sources": self.sources}

    def _labels(self, parts):
        """Label names and a value -> target function: ClassLabel names, else the sorted distinct values."""
        o = self.options
        if o.task == "regression":
            def number(v):
                try:
                    return float(v)
                except (TypeError, ValueError):
                    raise GraftError(f"[data] plugin = \"hfdatasets\": regression label {v!r} in {o.label_column!r} "
                                     f"is not a number.") from None
            return [o.label_column], number
        feature = parts["train"].features[o.label_column]
        names = getattr(feature, "names", None)
        if names:  # a ClassLabel; -1 is its "no label" (test splits without labels): kept out of the scores
            return list(names), lambda v: UNLABELLED if v is None or int(v) < 0 else int(v)
        values = sorted({str(v) for ds in parts.values() for v in ds[o.label_column] if v is not None})
        index = {n: i for i, n in enumerate(values)}
        return values, lambda v: UNLABELLED if v is None else index[str(v)]

    def _prepare(self, backbone, items, column, where):
        if self.modality == "text":
            tok = backbone.tokenizer()
            if tok is None:
                raise GraftError(f"{where}: backbone {backbone.name!r} has no tokenizer; set [backbone] tokenizer.")
            limit = self.check_limits(backbone, tokens=self.options.max_length or None, tokens_key="max_length",
                                      tokenizer=tok, where=where)
            self.max_length = self.options.max_length or min(256, limit or 256)
            self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
            columns = {id(ds): ds[column] for ds, _, _ in items}  # one read per split, not one per row
            texts = [str(columns[id(ds)][i]) for ds, i, _ in items]
            ids = tok(texts, truncation=True, max_length=self.max_length)["input_ids"] if texts else []
            return [(x, y) for x, (_, _, y) in zip(ids, items)]
        self.transform = image_transform(backbone, self.options.image_size)
        return _Images([(ds, i, y) for ds, i, y in items], column, self.transform)

    def dataset(self, split):
        return self.splits.get(split) or None

    def collate(self, examples):
        import torch

        ys = torch.tensor([y for _, y in examples], dtype=torch.long if self.task == "classification"
                          else torch.float32)
        if self.modality != "text":
            return {"inputs": torch.stack([x for x, _ in examples]), "targets": ys}
        input_ids, mask = pad_tokens([ids for ids, _ in examples], self.pad_id)
        return {"inputs": {"input_ids": input_ids, "attention_mask": mask}, "targets": ys}

    def encode(self, backbone, items):
        import torch

        if backbone.modality == "text":
            limit = backbone.limits().get("max_tokens")
            enc = backbone.tokenizer()(list(items), truncation=True, padding=True, return_tensors="pt",
                                       max_length=self.options.max_length or min(256, limit or 256))
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        transform = image_transform(backbone, self.options.image_size)
        return torch.stack([transform(_tensor(open_image(p))) for p in items])


def _tensor(image):
    """A PIL image -> float tensor [3, H, W] in [0, 1]."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


class _Images:
    """Examples of an image column decoded on access: datasets.Image values (PIL) or file paths."""

    def __init__(self, items, column, transform):
        self.items, self.column, self.transform = items, column, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        ds, i, y = self.items[k]
        value = ds[i][self.column]
        if isinstance(value, str):
            if Path(value).suffix.lower() not in IMAGE_SUFFIXES:
                raise GraftError(f"[data] plugin = \"hfdatasets\": {self.column!r} of example {i} is {value!r}, not "
                                 f"an image or an image file.")
            value = open_image(value)
        elif isinstance(value, dict) and value.get("path"):
            value = open_image(value["path"])
        return self.transform(_tensor(value)), y


@hookimpl
def register_datasources(register):
    register(HFDatasets, name="hfdatasets")
