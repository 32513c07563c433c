"""The ``pairs`` data source: source/target text pairs for sequence-to-sequence training (translation, rewriting).

Layouts, all giving the same examples: one CSV, TSV or JSONL file with a source and a target column (field), or two
line-aligned plain-text files (``path`` the sources, ``target_path`` the targets: the ``train.src`` / ``train.tgt``
layout of translation corpora; line N of one is the pair of line N of the other). Files are read with the encoding
and byte-order-mark rules of the other text sources; a row with an empty source or target stops the run naming its
file and line (or is dropped with ``empty_rows = "drop"``). Sources and targets are tokenized once at setup with the
backbone's tokenizer (targets in its target mode, ``text_target=``, for tokenizers with a separate target
vocabulary such as Marian's); a longer one is cut to ``max_source_length`` / ``max_target_length`` and counted
(``truncated_sources``, ``truncated_targets`` in data.json and summary.json). Splits not given as files are a
seeded random sample of the examples.

A batch: ``inputs`` = {input_ids, attention_mask} ``[batch, source tokens]`` padded on the right, ``targets`` =
target ids ``[batch, target tokens]`` padded with -100 (ignored by the loss), ``references`` = the target texts.
An example of a split is (source ids, target ids, target text, source text, hard negatives' ids, their texts, score
or None). For embedding training (``contrastive``) a batch also holds ``positives`` (the targets as encoder inputs),
``negatives`` + ``negative_rows`` (hard negatives ``[N, tokens]`` and the row each belongs to) and ``scores``
``[batch]`` when the options name such columns. A TSV file is read as translation
corpora write it: tab-separated, with quotes as ordinary characters (use CSV for quoted fields).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import UNLABELLED, DataSource, GraftError, did_you_mean, hookimpl, option, read_text, warn
from graft.data import ENCODING_HELP, check_encoding, check_limits, pad_tokens, text_lines


@dataclass
class PairsOptions:
    path: str = option("", "A CSV, TSV or JSONL file of pairs, or (with target_path) the file of sources, one per "
                           "line.", path=True)
    target_path: str = option("", "Two line-aligned files: the file of targets, line N translating line N of path.",
                              path=True)
    format: Literal["auto", "csv", "tsv", "jsonl", "lines"] = option(
        "auto", "How to read path: auto goes by target_path (lines) or the suffix (.csv, .tsv, .jsonl).")
    source_column: str = option("source", "Column (CSV/TSV) or field (JSONL) holding the source text.")
    target_column: str = option("target", "Column or field holding the target text.")
    negative_columns: list[str] = option(help="Embedding training (contrastive): columns holding hard negatives of the "
                                             "row (a JSONL field may hold a list of them).", default_factory=list)
    source_images: bool = option(False, "Embedding training with an image backbone: the source column holds image "
                                        "paths (relative to the file's folder), the targets are texts for the "
                                        "contrastive strategy's text tower.")
    target_images: bool = option(False, "Embedding training: the target (and negative) columns hold image paths "
                                        "(relative to the file's folder): embedded by an image [backbone], or by "
                                        "the contrastive strategy's image tower.")
    score_column: str = option("", "Embedding training (contrastive): a column holding each pair's similarity (e.g. "
                                   "in [0, 1] or [0, 5]; only its order matters to CoSENT and Spearman's rho).")
    val_path: str = option("", "Separate validation pairs (same layout); else a seeded sample of path.", path=True)
    val_target_path: str = option("", "Targets of val_path in the two-file layout.", path=True)
    test_path: str = option("", "Separate test pairs (same layout); else a seeded sample of path.", path=True)
    test_target_path: str = option("", "Targets of test_path in the two-file layout.", path=True)
    val_fraction: float = option(0.1, "Fraction of path's pairs held out for validation (seeded).")
    test_fraction: float = option(0.1, "Fraction of path's pairs held out for testing (seeded).")
    max_source_length: int = option(0, "Source tokens per example at most (longer ones are cut and counted); 0 = the "
                                       "model's limit, at most 512.")
    max_target_length: int = option(0, "Target tokens per example at most, special tokens included (longer ones are "
                                       "cut and counted); 0 = the model's limit, at most 128.")
    max_examples: int = option(0, "Use only a seeded sample of this many pairs of path; 0 = all.")
    empty_rows: Literal["error", "drop"] = option("error", "A pair whose source or target is empty: stop naming its "
                                                           "file and line, or drop it (with a warning).")
    encoding: str = option("utf-8", ENCODING_HELP)

    def validate(self):
        if not self.path:
            raise ValueError("path is required: a CSV/TSV/JSONL file of pairs, or the sources with target_path.")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction
                < 1):
            raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1.")
        if min(self.max_source_length, self.max_target_length, self.max_examples) < 0 \
                or 0 < self.max_source_length < 2 or 0 < self.max_target_length < 2:
            raise ValueError("max_source_length and max_target_length must be 0 (the model's limit) or at least 2; "
                             "max_examples must not be negative.")
        for a, b in (("val_path", "val_target_path"), ("test_path", "test_target_path")):
            if getattr(self, b) and not getattr(self, a):
                raise ValueError(f"{b} needs {a} (the file of its sources).")
        check_encoding(self.encoding)


@dataclass
class Pair:
    source: str
    target: str
    where: str  # "file, line N": for error messages
    negatives: tuple = ()
    score: float | None = None


def read_pairs(path: str, target_path: str, o: PairsOptions, where: str, key: str = "path") -> list[Pair]:
    """The pairs of one split's file(s) (option ``key``: path, val_path or test_path), each with its file and line;
    GraftError for unreadable files, missing columns, files of different lengths, missing source images and (unless
    dropped) empty rows."""
    pairs = _read_pairs(path, target_path, o, where, key)
    root = Path(path).expanduser().parent

    def image(value: str, r: Pair, side: str) -> str:
        found = Path(value.strip()).expanduser()
        found = found if found.is_absolute() else root / found
        if not found.is_file():
            raise GraftError(f"{where}: {r.where}: {side} image {value.strip()!r} is not a file (relative paths are "
                             f"read from {root}).")
        return str(found)

    for r in pairs:
        if o.source_images:
            r.source = image(r.source, r, "source")
        if o.target_images:
            r.target = image(r.target, r, "target")
            r.negatives = tuple(image(n, r, "negative") for n in r.negatives)
    return pairs


def _read_pairs(path: str, target_path: str, o: PairsOptions, where: str, key: str) -> list[Pair]:
    target_key = "target_path" if key == "path" else key.replace("_path", "_target_path")
    p = Path(path).expanduser()
    if not p.is_file():
        raise GraftError(f"{where}: {key} = {path!r} is not a file.")
    fmt = o.format
    if fmt == "auto":
        fmt = "lines" if target_path else {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}.get(
            p.suffix.lower(), "")
        if not fmt:
            raise GraftError(f"{where}: cannot tell the layout of {path!r}: set format = \"csv\", \"tsv\" or "
                             f"\"jsonl\", or give target_path (two line-aligned files).")
    if fmt == "lines" and (o.negative_columns or o.score_column):
        raise GraftError(f"{where}: negative_columns and score_column need a CSV, TSV or JSONL file; {path!r} is "
                         f"read as line-aligned files.")
    if fmt == "lines":
        if not target_path:
            raise GraftError(f"{where}: format = \"lines\" reads two line-aligned files: set the matching "
                             f"{target_key} of {key} = {path!r}.")
        t = Path(target_path).expanduser()
        if not t.is_file():
            raise GraftError(f"{where}: {target_key} = {target_path!r} is not a file.")
        src, tgt = text_lines(read_text(p, o.encoding, where)), text_lines(read_text(t, o.encoding, where))
        for side in (src, tgt):  # blank lines at the end of one file only (an editor's last newline) pair nothing
            while side and not side[-1].strip():
                side.pop()
        if len(src) != len(tgt):
            raise GraftError(f"{where}: {p} has {len(src)} lines and {t} has {len(tgt)}; line-aligned files pair line "
                             f"N with line N, so they must have as many lines.")
        pairs = [Pair(s, g, f"{p} / {t}, line {i}") for i, (s, g) in enumerate(zip(src, tgt), 1)]
    elif fmt in ("csv", "tsv"):
        pairs = _read_csv(p, fmt, o, where)
    else:
        pairs = _read_jsonl(p, o, where)
    empty = [r for r in pairs if not r.source.strip() or not r.target.strip()]
    if empty and o.empty_rows == "error":
        side = "source" if not empty[0].source.strip() else "target"
        raise GraftError(f"{where}: {empty[0].where} has an empty {side} ({len(empty)} such "
                         f"pair{'s' if len(empty) > 1 else ''} in {p.name}). Fill them in, or set empty_rows = "
                         f"\"drop\".")
    if empty:
        warn(f"{where}: {len(empty)} pair(s) with an empty source or target left out (first: {empty[0].where}).")
        pairs = [r for r in pairs if r.source.strip() and r.target.strip()]
    return pairs


def _read_csv(p: Path, fmt: str, o: PairsOptions, where: str) -> list[Pair]:
    import csv
    import io

    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(read_text(p, o.encoding, where), newline=""),
                        # TSV as translation corpora write it: a quote is a character, not a field's start
                        delimiter="\t" if fmt == "tsv" else ",", strict=True,
                        quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
    out = []
    try:
        header = [h.strip() for h in next(reader, [])]
        for col in (o.source_column, o.target_column):
            if col not in header:
                raise GraftError(f"{where}: {p} has no column {col!r}; its columns: {', '.join(header) or '(none)'}."
                                 f"{did_you_mean(col, header)} Set source_column / target_column.")
        for col in (*o.negative_columns, *([o.score_column] if o.score_column else [])):
            if col not in header:
                raise GraftError(f"{where}: {p} has no column {col!r} (negative_columns / score_column); its columns: "
                                 f"{', '.join(header)}.{did_you_mean(col, header)}")
        si, ti = header.index(o.source_column), header.index(o.target_column)
        line = reader.line_num + 1
        for row in reader:
            if any(cell.strip() for cell in row):
                cell = {h: row[k] if k < len(row) else "" for k, h in enumerate(header)}
                out.append(_pair(cell[header[si]], cell[header[ti]], cell, o, f"{p}, line {line}", where))
            line = reader.line_num + 1
    except csv.Error as e:
        raise GraftError(f"{where}: {p}, line {reader.line_num}: not valid CSV ({e}).") from None
    return out


def _read_jsonl(p: Path, o: PairsOptions, where: str) -> list[Pair]:
    import json

    out, fields = [], {}
    for i, line in enumerate(text_lines(read_text(p, o.encoding, where)), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise GraftError(f"{where}: {p}, line {i} is not valid JSON ({e.msg}).") from None
        if not isinstance(r, dict):
            raise GraftError(f"{where}: {p}, line {i} is not a JSON object ({{\"{o.source_column}\": ..., "
                             f"\"{o.target_column}\": ...}}).")
        fields.update(r)
        s, t = r.get(o.source_column), r.get(o.target_column)
        out.append(_pair("" if s is None else str(s), "" if t is None else str(t), r, o, f"{p}, line {i}", where))
    for col in (o.source_column, o.target_column, *o.negative_columns, *([o.score_column] if o.score_column else [])):
        if out and col not in fields:
            keys = "source_column / target_column" if col in (o.source_column, o.target_column) else \
                "negative_columns" if col in o.negative_columns else "score_column"
            raise GraftError(f"{where}: {p} has no field {col!r} in any record; its fields: {', '.join(fields)}."
                             f"{did_you_mean(col, list(fields))} Set {keys}.")
    return out


def _pair(source: str, target: str, row: dict, o: PairsOptions, at: str, where: str) -> Pair:
    """A Pair with the row's hard negatives (empty cells left out; a JSONL field may hold a list) and score."""
    negatives = []
    for col in o.negative_columns:
        v = row.get(col)
        for text in v if isinstance(v, list) else [v]:
            if text is not None and str(text).strip():
                negatives.append(str(text))
    score = None
    if o.score_column:
        v = row.get(o.score_column)
        try:
            score = float(v)
        except (TypeError, ValueError):
            score = float("nan")
        if score != score or score in (float("inf"), float("-inf")):
            raise GraftError(f"{where}: {at}: score_column {o.score_column!r} holds {v!r}, not a finite number.")
    return Pair(source, target, at, tuple(negatives), score)


class Pairs(DataSource):
    """Source/target text pairs (CSV, TSV, JSONL, or two line-aligned files) for seq2seq: translation, rewriting."""

    Options = PairsOptions
    task = "seq2seq"
    view_options = ("max_source_length", "max_target_length")
    training_options = ()

    def setup(self, backbone, seed):
        import numpy as np

        o = self.options
        where = f"[data] plugin = \"{self.name or 'pairs'}\""
        if backbone.modality == "image" or o.source_images:
            self._image_setup(backbone, where)
        else:
            self.require(backbone, "text")
        tok = backbone.tokenizer() if backbone.modality == "text" else None
        if tok is None and backbone.modality == "text":
            raise GraftError(f"{where}: backbone {backbone.name!r} has no tokenizer: set [backbone] tokenizer = "
                             f"\"DIR\" (a folder with tokenizer.json or vocab.txt).")
        limit = None
        if tok is not None:
            limit = check_limits(backbone, where=where, tokens=o.max_source_length or None,
                                 tokens_key="max_source_length", tokenizer=tok)
            check_limits(backbone, where=where, tokens=o.max_target_length or None, tokens_key="max_target_length")
        self.max_source = o.max_source_length or min(512, limit or 512)
        self.max_target = o.max_target_length or min(128, limit or 128)
        self.tokenizer = tok
        self.pad_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        main = read_pairs(o.path, o.target_path, o, where)
        if o.max_examples and o.max_examples < len(main):
            keep = np.random.default_rng([seed, 2]).permutation(len(main))[: o.max_examples]
            main = [main[i] for i in sorted(keep)]
        if len(main) < 2:
            raise GraftError(f"{where}: {o.path!r} holds fewer than two pairs.")
        order = np.random.default_rng(seed).permutation(len(main))
        n_val = 0 if o.val_path else int(round(len(main) * o.val_fraction))
        n_test = 0 if o.test_path else int(round(len(main) * o.test_fraction))
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        splits = {s: [main[i] for i in sorted(idx)] for s, idx in parts.items()}
        for split, a, b in (("val", o.val_path, o.val_target_path), ("test", o.test_path, o.test_target_path)):
            if a:
                splits[split] = read_pairs(a, b, o, where, key=f"{split}_path")
                if not splits[split]:
                    raise GraftError(f"{where}: {split}_path = {a!r} holds no pairs.")
        if not splits["train"]:
            raise GraftError(f"{where}: no training pairs left after the validation and test splits.")
        self.truncated = {"sources": 0, "targets": 0}
        self.splits = {s: self._encode(pairs) for s, pairs in splits.items()}
        if any(self.truncated.values()):
            warn(f"{where}: {self.truncated['sources']} source(s) longer than max_source_length = {self.max_source} "
                 f"and {self.truncated['targets']} target(s) longer than max_target_length = {self.max_target} "
                 f"tokens were cut; raise those limits to keep them whole.")

    def _image_setup(self, backbone, where):
        """An image backbone: the sources are image paths, read when an example is (eval-style resize + centre
        crop to the backbone's size); the targets stay texts (for a text tower), untokenized."""
        if backbone.modality != "image":
            raise GraftError(f"{where}: source_images = true needs an image backbone; [backbone] plugin = "
                             f"\"{backbone.name}\" takes {backbone.modality}.")
        if not self.options.source_images:
            raise GraftError(f"{where} with an image backbone ({backbone.name!r}): the source column must hold image "
                             f"paths. Set source_images = true (embedding training with a text tower).")
        import torch
        from torchvision.transforms import v2 as T

        cfg = backbone.image_config()
        size = tuple(cfg["size"])
        gray = [T.Grayscale(1)] if cfg["channels"] == 1 else []
        self.image_tf = T.Compose(gray + [T.Resize(int(round(size[0] / 0.875))), T.CenterCrop(size), T.ToImage(),
                                          T.ToDtype(torch.float32, scale=True), T.Normalize(cfg["mean"], cfg["std"])])

    def _encode(self, pairs: list[Pair]) -> list[tuple]:
        if not pairs:
            return []
        if self.tokenizer is None:  # image sources: paths; texts for the strategy's tower
            return [(p.source, [], p.target, p.source, (), p.negatives, p.score) for p in pairs]
        tok = self.tokenizer
        src = tok([p.source for p in pairs], add_special_tokens=True)["input_ids"]
        if self.options.target_images:  # image paths: for the strategy's image tower
            return [(self._cut(s, self.max_source, "sources"), [], p.target, p.source, (), p.negatives, p.score)
                    for p, s in zip(pairs, src)]
        tgt = tok(text_target=[p.target for p in pairs], add_special_tokens=True)["input_ids"]
        flat = [n for p in pairs for n in p.negatives]
        neg = iter(tok(text_target=flat, add_special_tokens=True)["input_ids"] if flat else [])
        out = []
        for p, s, t in zip(pairs, src, tgt):
            s, t = self._cut(s, self.max_source, "sources"), self._cut(t, self.max_target, "targets")
            negatives = tuple(self._cut(next(neg), self.max_target, "targets") for _ in p.negatives)
            out.append((s, t, p.target, p.source, negatives, p.negatives, p.score))
        return out

    def _cut(self, ids: list[int], n: int, kind: str) -> list[int]:
        """``ids`` cut to ``n`` tokens, keeping the special tokens that end it (</s>, [SEP]; mBART's </s> and
        language code) as the tokenizer's truncation does."""
        if len(ids) <= n:
            return ids
        self.truncated[kind] += 1
        special, k = set(self.tokenizer.all_special_ids), 0
        while k < len(ids) and k < n - 1 and ids[len(ids) - 1 - k] in special:
            k += 1
        return ids[: n - k] + ids[len(ids) - k:]

    def report(self):
        return {"truncated_sources": self.truncated["sources"], "truncated_targets": self.truncated["targets"]}

    def texts(self, split) -> list[tuple]:
        """(source, target, hard negatives) as strings for each example of ``split`` (image sources: their paths),
        without reading images."""
        return [(e[3], e[2], e[5]) for e in self.splits.get(split) or []]

    def dataset(self, split):
        rows = self.splits.get(split) or None
        return _SourceImages(rows, self.image_tf, self.options.target_images) if rows and self.tokenizer is None \
            else rows

    def collate(self, examples):
        import torch

        if self.tokenizer is None:  # images and target texts (a text tower tokenizes them)
            batch = {"inputs": torch.stack([e[0] for e in examples]), "references": [e[2] for e in examples],
                     "sources": [e[3] for e in examples], "targets": torch.zeros(len(examples), dtype=torch.long)}
            negatives = [(row, n) for row, e in enumerate(examples) for n in e[5]]
            if negatives:
                batch["negative_rows"] = torch.tensor([row for row, _ in negatives], dtype=torch.long)
                batch["negative_texts"] = [n for _, n in negatives]
            if examples[0][6] is not None:
                batch["scores"] = torch.tensor([e[6] for e in examples], dtype=torch.float32)
            if self.options.target_images:  # images on both sides, prepared alike
                batch["positives"] = torch.stack([e[1] for e in examples])
                if negatives:
                    batch["negatives"] = torch.stack([n for e in examples for n in e[4]])
            return batch
        input_ids, mask = pad_tokens([e[0] for e in examples], self.pad_id)
        targets, _ = pad_tokens([e[1] for e in examples], UNLABELLED)
        batch = {"inputs": {"input_ids": input_ids, "attention_mask": mask}, "targets": targets,
                 "references": [e[2] for e in examples], "sources": [e[3] for e in examples]}
        # the target side as encoder inputs, for embedding training (contrastive): positives, hard negatives, scores
        ids, mask = pad_tokens([e[1] for e in examples], self.pad_id)
        batch["positives"] = {"input_ids": ids, "attention_mask": mask}
        negatives = [(row, n) for row, e in enumerate(examples) for n in e[4]]
        if negatives:
            ids, mask = pad_tokens([n for _, n in negatives], self.pad_id)
            batch["negatives"] = {"input_ids": ids, "attention_mask": mask}
            batch["negative_rows"] = torch.tensor([row for row, _ in negatives], dtype=torch.long)
            batch["negative_texts"] = [t for e in examples for t in e[5]]
        if examples[0][6] is not None:
            batch["scores"] = torch.tensor([e[6] for e in examples], dtype=torch.float32)
        return batch

    def encode(self, backbone, items):
        if backbone.modality == "image":
            import torch

            from graft.data import open_image

            if not hasattr(self, "image_tf"):
                self._image_setup(backbone, "graft predict")
            return torch.stack([self.image_tf(open_image(path)) for path in items])
        tok = backbone.tokenizer()
        limit = backbone.limits().get("max_tokens")
        n = self.options.max_source_length or min(512, limit or 512)
        enc = tok(list(items), truncation=True, max_length=n, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class _SourceImages:
    """A split whose sources (and with ``targets``, targets and negatives) are image paths: each example's images read
    and prepared when it is taken (in the loader's workers)."""

    def __init__(self, rows, transform, targets: bool = False):
        self.rows, self.transform, self.targets = rows, transform, targets

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        from graft.data import open_image

        row = self.rows[i]
        if not self.targets:
            return (self.transform(open_image(row[0])), *row[1:])
        target = self.transform(open_image(row[2]))
        negatives = tuple(self.transform(open_image(n)) for n in row[5])
        return (self.transform(open_image(row[0])), target, row[2], row[3], negatives, *row[5:])


@hookimpl
def register_datasources(register):
    register(Pairs, name="pairs")
