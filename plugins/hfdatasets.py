"""The ``hfdatasets`` data source: anything the Hugging Face ``datasets`` library loads offline."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import UNLABELLED, DataSource, GraftError, did_you_mean, hookimpl, option, warn
from graft.data import (IMAGE_SUFFIXES, SplitOptions, check_image_size, check_limits, few_labels, image_transform,
                        open_image, pad_tokens, stratified_split)

#: split names taken for each role when the split options leave it open; a dataset without a training split of
#: these names stops rather than train on whatever split it has (test data is never trained on unasked)
SPLIT_NAMES = {"train": ("train", "training"), "val": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing")}
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
    train_split: str = option("", "The dataset's split to train on; empty = the one named train or training (a "
                                  "dataset with neither stops and lists its splits).")
    val_split: str = option("", "The dataset's validation split; empty = validation, valid, val or dev when it has "
                                "one, else val_fraction of the training split.")
    test_split: str = option("", "The dataset's test split; empty = test or testing when it has one, else "
                                 "test_fraction of the training split.")

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


def choose_splits(raw: dict, o: HFDatasetsOptions, where: str) -> dict:
    """{role: split name} for "train" and, where the dataset has them, "val" and "test": the split options, else
    the names of ``SPLIT_NAMES``. A split is never in two roles; splits left over are named in a warning.
    GraftError for a split option naming no split, and for a dataset without exactly one training split of those
    names (training on validation or test data must be asked for with train_split)."""
    listed = ", ".join(map(repr, raw))
    chosen = {}
    for role in ("train", "val", "test"):
        key, name = f"{role}_split", getattr(o, f"{role}_split")
        if name and name not in raw:
            raise GraftError(f"{where}: {key} = {name!r}, but {o.path} has the splits {listed}."
                             f"{did_you_mean(name, list(raw))}")
        if name in chosen.values():
            other = next(r for r, n in chosen.items() if n == name)
            raise GraftError(f"{where}: {name!r} is both {other}_split and {key}; a split plays one role (the "
                             f"missing ones are split off the training split).")
        if name:
            chosen[role] = name
            continue
        found = [n for n in SPLIT_NAMES[role] if n in raw and n not in chosen.values()]
        if role == "train" and len(found) != 1:
            raise GraftError(f"{where}: {o.path} has the splits {listed}, and "
                             f"{'none is' if not found else 'more than one is'} a training split "
                             f"({' or '.join(SPLIT_NAMES['train'])}); graftkit does not guess which data to train "
                             f"on. Set train_split = \"NAME\" (val_split and test_split choose the others; those "
                             f"not set are taken by name or split off the training split).")
        if found:
            chosen[role] = found[0]
    unused = [n for n in raw if n not in chosen.values()]
    if unused:
        warn(f"{where}: split{'s' if len(unused) > 1 else ''} {', '.join(map(repr, unused))} of {o.path} "
             f"{'are' if len(unused) > 1 else 'is'} not used; train_split, val_split and test_split choose splits.")
    return chosen


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
        chosen = choose_splits(raw, o, where)
        parts = {role: raw[name] for role, name in chosen.items()}
        for role, ds in parts.items():
            for key, col in (("text_column" if self.modality == "text" else "image_column", column),
                             ("label_column", o.label_column)):
                if col not in ds.column_names:
                    raise GraftError(f"{where}: {o.path} (split {chosen[role]!r}) has no column {col!r}; its columns "
                                     f"are {', '.join(ds.column_names)}.{did_you_mean(col, ds.column_names)} Set "
                                     f"{key}.")
        self.label_names, targets = self._labels(parts, chosen, where)
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
        if o.task == "classification":
            trained = {y for _, _, y in self.items["train"]}
            for split in ("val", "test"):
                unseen = sorted({self.label_names[y] for _, _, y in self.items[split] if y >= 0 and y not in trained})
                if unseen:
                    warn(f"{where}: the {split} split has label{'s' if len(unseen) > 1 else ''} "
                         f"{', '.join(map(repr, unseen))} that the training split never has; the model cannot "
                         f"learn {'them' if len(unseen) > 1 else 'it'}, so those examples count as errors.")
        self.splits = {s: self._prepare(backbone, items, column, where) for s, items in self.items.items()}
        self.sources = {s: (f"the dataset's own {chosen[s]!r} split" if s in chosen
                            else f"split off its training split {chosen['train']!r} (seeded, stratified)")
                        for s in ("train", "val", "test")}

    def report(self):
        return {"splits": {s: len(self.items[s]) for s in self.items}, "split_sources": self.sources}

    def _labels(self, parts, chosen, where):
        """(label names, {role: one target per row}). Classes are matched by name across splits, whatever each
        split's encoding: a ClassLabel id is read with that split's own names (splits class-encoded one by one
        number their classes differently), -1 and None are "unlabelled". The classes are the training split's
        ClassLabel names in their order (else its sorted distinct values), then any only other splits have.
        GraftError for an id the split's ClassLabel has no name for, or a regression label that is no number."""
        o = self.options
        if o.task == "regression":
            def number(v):
                try:
                    return float(v)
                except (TypeError, ValueError):
                    raise GraftError(f"{where}: regression label {v!r} in {o.label_column!r} is not a "
                                     f"number.") from None
            return [o.label_column], {r: [number(v) for v in ds[o.label_column]] for r, ds in parts.items()}
        text = {role: self._label_texts(ds, chosen[role], where) for role, ds in parts.items()}
        own = getattr(parts["train"].features[o.label_column], "names", None)
        names = list(own) if own else sorted({v for v in text["train"] if v is not None})
        names += sorted({v for vs in text.values() for v in vs if v is not None} - set(names))
        index = {n: i for i, n in enumerate(names)}
        return names, {r: [UNLABELLED if v is None else index[v] for v in vs] for r, vs in text.items()}

    def _label_texts(self, ds, split, where):
        """The label of each row of ``ds`` as text (None: unlabelled), ClassLabel ids read with its own names."""
        o = self.options
        values = list(ds[o.label_column])
        names = getattr(ds.features[o.label_column], "names", None)
        if not names:
            return [None if v is None else str(v) for v in values]
        bad = [(i, v) for i, v in enumerate(values) if v is not None and not -1 <= int(v) < len(names)]
        if bad:
            i, v = bad[0]
            raise GraftError(f"{where}: split {split!r} of {o.path} has label {v} in {o.label_column!r} (example "
                             f"{i}; {len(bad)} such), outside its ClassLabel's {len(names)} classes (0 to "
                             f"{len(names) - 1}; -1 means unlabelled). Fix those labels, or cast the column to a "
                             f"ClassLabel that names every class (ClassLabel.names is what each id means).")
        return [None if v is None or v == -1 else names[int(v)] for v in values]

    def _prepare(self, backbone, items, column, where):
        if self.modality == "text":
            tok = backbone.tokenizer()
            if tok is None:
                raise GraftError(f"{where}: backbone {backbone.name!r} has no tokenizer; set [backbone] tokenizer.")
            limit = check_limits(backbone, tokens=self.options.max_length or None, tokens_key="max_length",
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
