"""The ``text`` data source: classification, multi-label or regression from CSV, JSONL or label folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import UNLABELLED, DataSource, GraftError, did_you_mean, hookimpl, option, read_text, warn
from graft.data import (ENCODING_HELP, IMAGE_SUFFIXES, SplitOptions, check_encoding, check_limits, few_labels,
                        pad_tokens, stratified_split, text_lines)


@dataclass
class TextOptions(SplitOptions):
    path: str = option("", "A CSV or JSONL file, or a folder with one sub-folder of .txt files per label.", path=True)
    format: Literal["auto", "csv", "jsonl", "folders"] = option("auto", "How to read path; auto goes by its suffix.")
    encoding: str = option("utf-8", ENCODING_HELP)
    text_column: str = option("text", "Column (CSV) or field (JSONL) holding the text.")
    label_column: str = option("label", "Column or field holding the label.")
    val_path: str = option("", "Separate validation file (same format); else split off path.", path=True)
    test_path: str = option("", "Separate test file (same format); else split off path.", path=True)
    task: Literal["classification", "multilabel", "regression"] = option(
        "classification", "multilabel labels are lists (JSONL) or strings separated by label_separator.")
    label_separator: str = option(",", "Separator of multi-label strings in CSV.")
    missing_labels: Literal["error", "drop", "unlabelled"] = option(
        "error", "A row whose label is empty or absent: stop with its file and line; drop it (with a warning); or "
                 "keep it in the training split without a label (classification; see unlabelled). Never a class "
                 "named ''.")
    max_length: int = option(0, "Tokens per example (longer texts are truncated); 0 = the backbone's usable "
                                "positions, at most 256.")
    max_examples: int = option(0, "Use only this many examples of path (seeded sample, stratified); 0 = all.")

    def validate(self):
        super().validate()
        if not self.path:
            raise ValueError("path is required: a CSV/JSONL file or a folder of label folders.")
        if self.max_length == 1 or self.max_length < 0:
            raise ValueError("max_length must be 0 (the model's limit) or at least 2.")
        check_encoding(self.encoding)
        if self.max_examples < 0:
            raise ValueError("max_examples must not be negative.")


@dataclass
class Record:
    text: str
    label: object  # None when missing
    where: str  # "file, line N": for error messages


def _label_value(value):
    """A cell or field as a label: strings lose stray spaces; empty strings and nulls are missing (None)."""
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


def read_records(path: str, o: TextOptions, where: str) -> list[Record]:
    """Records of a CSV/TSV, JSONL or label-folder ``path``, each with its file and line for later errors."""
    p = Path(path).expanduser()
    if not p.exists():
        raise GraftError(f"{where}: {path!r} does not exist.")
    fmt = o.format
    if fmt == "auto":
        fmt = "folders" if p.is_dir() else {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(
            p.suffix.lower(), "")
        if not fmt:
            raise GraftError(f"{where}: cannot tell the format of {path!r}; set format = \"csv\" or \"jsonl\".")
    if fmt == "folders":
        if not p.is_dir():
            raise GraftError(f"{where}: format = \"folders\" needs a folder; {path!r} is a file.")
        out = [Record(read_text(f, o.encoding, where).strip(), d.name, str(f))
               for d in sorted(x for x in p.iterdir() if x.is_dir() and not x.name.startswith("."))
               for f in sorted(d.iterdir()) if f.is_file() and not f.name.startswith(".")]
        if not out:
            raise GraftError(f"{where}: {path!r} has no label folders with text files.")
        return out
    if p.is_dir():
        raise GraftError(f"{where}: {path!r} is a folder; format = {fmt!r} needs a file.")
    text = read_text(p, o.encoding, where)
    text_col, label_col = o.text_column, o.label_column
    records = []
    if fmt == "csv":
        import csv
        import io

        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long articles are one field
        # strict: an unclosed quote is an error at its line, not the rest of the file swallowed into one field
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if p.suffix.lower() == ".tsv" else ",",
                            strict=True)
        try:
            header = [h.strip() for h in next(reader, [])]
            for col in (text_col, label_col):
                if col not in header:
                    raise GraftError(f"{where}: {p} has no column {col!r}; columns: {', '.join(header) or '(none)'}."
                                     f"{did_you_mean(col, header)} Set text_column / label_column.")
            ti, li = header.index(text_col), header.index(label_col)
            line = reader.line_num + 1
            for row in reader:
                if any(cell.strip() for cell in row):  # blank lines are no records
                    label = row[li] if li < len(row) else None
                    # multilabel: an empty cell is the empty set of labels; elsewhere an empty cell is no label
                    label = label.strip() if o.task == "multilabel" and label is not None else _label_value(label)
                    records.append(Record(row[ti] if ti < len(row) else None, label, f"{p}, line {line}"))
                line = reader.line_num + 1
        except csv.Error as e:
            raise GraftError(f"{where}: {p}, line {reader.line_num}: not valid CSV ({e}).") from None
    else:
        import json

        fields: dict = {}  # every field name seen, in order
        for i, line in enumerate(text_lines(text), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise GraftError(f"{where}: {p}, line {i} is not valid JSON ({e.msg}).") from None
            if not isinstance(r, dict):
                raise GraftError(f"{where}: {p}, line {i} is not a JSON object ({{\"{text_col}\": ..., "
                                 f"\"{label_col}\": ...}}).")
            fields.update(r)
            records.append(Record(r.get(text_col), _label_value(r.get(label_col)), f"{p}, line {i}"))
        for col in (text_col, label_col):
            if records and col not in fields:
                raise GraftError(f"{where}: {p} has no field {col!r} in any record; fields: {', '.join(fields)}."
                                 f"{did_you_mean(col, fields)} Set text_column / label_column.")
    for rec in records:
        if rec.text is None:
            raise GraftError(f"{where}: {rec.where} has no {text_col!r} value. Fill it in or remove the row.")
        rec.text = str(rec.text)
    return records


class Text(DataSource):
    """Text classification, multi-label or regression from CSV, JSONL or label folders; dynamic padding."""

    Options = TextOptions
    view_options = ("max_length",)
    training_options = ("train_fraction", "unlabelled", "missing_labels")

    def setup(self, backbone, seed):
        import numpy as np

        o = self.options
        where = "[data] plugin = \"text\""
        self.task = o.task
        self.require(backbone, "text")
        tok = backbone.tokenizer()
        if tok is None:
            raise GraftError(f"{where}: backbone {backbone.name!r} has no tokenizer; set [backbone] tokenizer = "
                             f"\"DIR\".")
        if o.missing_labels == "unlabelled" and o.task != "classification":
            raise GraftError(f"{where}: missing_labels = \"unlabelled\" needs task = \"classification\"; use "
                             f"\"drop\" or fill in the labels.")
        max_length = check_limits(backbone, tokens=o.max_length or None, tokens_key="max_length",
                                  tokenizer=tok, where=where)
        max_length = o.max_length or min(256, max_length or 256)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        parts = {"": read_records(o.path, o, where)}
        for split, p in (("val", o.val_path), ("test", o.test_path)):
            if p:
                parts[split] = read_records(p, o, where)
        missing = {s: [r for r in recs if r.label is None] for s, recs in parts.items()}
        if any(missing.values()):
            first = next(r for recs in missing.values() for r in recs)
            count = sum(map(len, missing.values()))
            if o.missing_labels == "error":
                raise GraftError(f"{where}: {first.where} has no label ({o.label_column!r} is empty or absent; "
                                 f"{count} such row{'s' if count > 1 else ''} in all). Fill them in, or set "
                                 f"missing_labels = \"drop\" (leave them out) or \"unlabelled\" (train on them "
                                 f"without a label).")
            kept = len(missing[""]) if o.missing_labels == "unlabelled" else 0
            warn(f"{where}: {count} row{'s' if count > 1 else ''} without a label (first: {first.where}): "
                 + (f"{kept} kept for training without a label, {count - kept} left out (validation and test need "
                    f"labels)." if kept else "left out."))
        unlabelled = missing[""] if o.missing_labels == "unlabelled" else []
        parts = {s: [r for r in recs if r.label is not None] for s, recs in parts.items()}
        main = parts[""]
        if o.task == "classification":
            self.label_names = sorted({str(r.label) for recs in parts.values() for r in recs})
        elif o.task == "multilabel":
            def split_labels(x):
                return [str(v).strip() for v in x] if isinstance(x, list) else [
                    v.strip() for v in str(x).split(o.label_separator) if v.strip()]
            self.label_names = sorted({v for recs in parts.values() for r in recs for v in split_labels(r.label)})
        else:
            self.label_names = [o.label_column]
        index = {n: i for i, n in enumerate(self.label_names)}

        def target(rec):
            x = rec.label
            if o.task == "classification":
                return index[str(x)]
            if o.task == "multilabel":
                vec = [0.0] * len(index)
                for v in split_labels(x):
                    vec[index[v]] = 1.0
                return vec
            try:
                value = float(x)
            except (TypeError, ValueError):
                value = float("nan")
            if not np.isfinite(value):
                raise GraftError(f"{where}: {rec.where}: regression target {x!r} is not a finite number.")
            return value

        def encode(records, targets=None):
            if not records:
                return []
            ids = tok([r.text for r in records], truncation=True, max_length=max_length,
                      add_special_tokens=True)["input_ids"]
            return [(i, target(r) if targets is None else targets) for i, r in zip(ids, records)]

        strat = [str(r.label) if o.task == "classification" else 0 for r in main]
        if o.max_examples and o.max_examples < len(main):
            keep = np.random.default_rng(seed).permutation(len(main))[: o.max_examples]
            main = [main[i] for i in sorted(keep)]
            strat = [strat[i] for i in sorted(keep)]
        if not main:
            raise GraftError(f"{where}: {o.path!r} holds no labelled rows.")
        val_f = 0.0 if o.val_path else o.val_fraction
        test_f = 0.0 if o.test_path else o.test_fraction
        idx = stratified_split(strat, val_f, test_f, seed)
        if o.unlabelled == "keep" and o.train_fraction < 1 and o.task != "classification":
            raise GraftError(f"{where}: unlabelled = \"keep\" needs task = \"classification\".")
        idx["train"], hidden = few_labels(idx["train"], strat, o, seed)
        self.splits = {s: encode([main[i] for i in idx[s]]) for s in ("train", "val", "test")}
        self.ids = {s: [parts[s][j].where if s in parts else main[j].where
                        for j in (range(len(parts[s])) if s in parts else idx[s])] for s in ("val", "test")}
        self.splits["train"] = [(ids, UNLABELLED if i in hidden else y)
                                for i, (ids, y) in zip(idx["train"], self.splits["train"])]
        self.splits["train"] += encode(unlabelled, targets=UNLABELLED)
        for split in ("val", "test"):
            if split in parts:
                self.splits[split] = encode(parts[split])
        if o.task == "classification":
            trained = {y for _, y in self.splits["train"]}
            for split in ("val", "test"):
                unseen = sorted({self.label_names[y] for _, y in self.splits[split] if y not in trained})
                if unseen:
                    warn(f"{where}: the {split} split has label{'s' if len(unseen) > 1 else ''} "
                         f"{', '.join(map(repr, unseen))} that the training split never has; the model cannot learn "
                         f"{'them' if len(unseen) > 1 else 'it'}, so those examples count as errors.")

    def dataset(self, split):
        return self.splits.get(split) or None

    def example_ids(self, split):
        """"FILE, line N" (or row) of each example of ``split`` ("val", "test"): the same in every run on this file
        and split (graft compare pairs runs by them)."""
        return self.ids.get(split)

    def collate(self, examples):
        import torch

        input_ids, mask = pad_tokens([ids for ids, _ in examples], self.pad_id)
        ys = [y for _, y in examples]
        targets = torch.tensor(ys, dtype=torch.long if self.task == "classification" else torch.float32)
        return {"inputs": {"input_ids": input_ids, "attention_mask": mask}, "targets": targets}

    def encode(self, backbone, items):
        tok = backbone.tokenizer()
        for item in items:
            if Path(item).suffix.lower() in IMAGE_SUFFIXES and Path(item).is_file():
                raise GraftError(f"{item!r} is an image file, but this run takes text. Pass the text itself, or "
                                 f"--file FILE with one text per line.")
        limit = backbone.limits().get("max_tokens")
        max_length = self.options.max_length or min(256, limit or 256)
        enc = tok(list(items), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@hookimpl
def register_datasources(register):
    register(Text, name="text")
