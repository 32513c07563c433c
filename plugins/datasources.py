"""Built-in data sources: ``digits`` (scikit-learn's real 8x8 digit images), ``text`` and ``imagefolder``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import UNLABELLED, DataSource, GraftError, GraftWarning, hookimpl, option, read_text
from graft.errors import did_you_mean
from graft.files import ENCODING_HELP, check_encoding


def warn(message: str) -> None:
    import warnings

    warnings.warn(message, GraftWarning, stacklevel=2)


@dataclass
class SplitOptions:
    val_fraction: float = option(0.1, "Fraction of all examples held out for validation (stratified, seeded).")
    test_fraction: float = option(0.2, "Fraction of all examples held out for testing (stratified, seeded).")
    train_fraction: float = option(1.0, "Keep the labels of only this fraction of the training split "
                                        "(stratified, seeded, at least one example per class): few-label runs and "
                                        "learning curves. Validation and test stay whole.")
    unlabelled: Literal["drop", "keep"] = option(
        "drop", "With train_fraction < 1, the other training examples are dropped, or kept without their labels: "
                "losses skip them, distill teaches them with the teacher's soft targets (classification only).")

    def validate(self):
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1.")
        if not 0 < self.train_fraction <= 1:
            raise ValueError("train_fraction must be in (0, 1].")


def stratified_split(labels, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Seeded, stratified train/val/test index lists (per-class proportions kept in every split)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    out = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        n_val = int(round(len(idx) * val_fraction))
        out["test"] += idx[:n_test].tolist()
        out["val"] += idx[n_test:n_test + n_val].tolist()
        out["train"] += idx[n_test + n_val:].tolist()
    return {k: sorted(v) for k, v in out.items()}


def few_labels(train: list[int], labels, options, seed: int) -> tuple[list[int], set[int]]:
    """The training split under ``train_fraction`` / ``unlabelled``: (indices, the subset whose labels are
    withheld)."""
    kept = keep_fraction(train, labels, options.train_fraction, seed)
    if options.unlabelled == "drop":
        return kept, set()
    return train, set(train) - set(kept)


def keep_fraction(indices: list[int], labels, fraction: float, seed: int) -> list[int]:
    """A seeded, stratified subset of ``indices`` (``labels[i]`` is the class of index i), at least one per class.
    The same seed and fraction keep the same examples, so a teacher run and its student see one subset."""
    import numpy as np

    if fraction >= 1:
        return indices
    rng = np.random.default_rng([seed, 1])  # its own stream: the split itself must not change with the fraction
    labels = np.asarray(labels)[indices]
    indices = np.asarray(indices)
    kept = []
    for c in np.unique(labels):
        idx = indices[labels == c]
        kept += rng.permutation(idx)[: max(1, int(round(len(idx) * fraction)))].tolist()
    return sorted(kept)


def image_transform(backbone, image_size: int) -> "ImageTransform":
    """Tensor [C0, H, W] in [0, 1] -> the backbone's input: resized, channels matched, normalised."""
    import torch

    cfg = backbone.image_config()
    size = (image_size, image_size) if image_size else tuple(cfg["size"])
    return ImageTransform(size, torch.tensor(cfg["mean"]).view(-1, 1, 1), torch.tensor(cfg["std"]).view(-1, 1, 1),
                          cfg["channels"])


class ImageTransform:
    """A class, not a closure: data sources that hold it must pickle for loader workers started by spawn."""

    def __init__(self, size, mean, std, channels):
        self.size, self.mean, self.std, self.channels = size, mean, std, channels

    def __call__(self, x):
        import torch.nn.functional as F

        size, channels, mean, std = self.size, self.channels, self.mean, self.std
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x.unsqueeze(0), size=size, mode="bilinear", align_corners=False).squeeze(0)
        if x.shape[0] != channels:
            x = x.mean(0, keepdim=True).expand(channels, -1, -1) if channels != 1 else x.mean(0, keepdim=True)
        m, s = (mean, std) if mean.shape[0] == channels else (mean.mean().view(1, 1, 1), std.mean().view(1, 1, 1))
        return (x - m) / s


@dataclass
class DigitsOptions(SplitOptions):
    image_size: int = option(32, "Side length the 8x8 images are resized to; 0 means the backbone's own size.")
    augment: bool = option(False, "Random small affine warps of the training images (rotation up to 12 degrees, "
                                  "shifts up to 1 of 8 pixels, scale 0.9-1.1), drawn per example and epoch.")

    def validate(self):
        super().validate()
        check_image_size(self.image_size)


class Digits(DataSource):
    """scikit-learn's handwritten digits: 1,797 real 8x8 images, 10 classes, stratified seeded splits."""

    Options = DigitsOptions
    task = "classification"
    view_options = ("image_size",)
    training_options = ("train_fraction", "unlabelled", "augment")
    label_names = [str(i) for i in range(10)]

    def setup(self, backbone, seed):
        import torch

        self.require(backbone, "image")
        self.check_limits(backbone, image_size=(self.options.image_size,) * 2 if self.options.image_size else None,
                          image_key="image_size", where="[data] plugin = \"digits\"")
        from sklearn.datasets import load_digits

        d = load_digits()
        o = self.options
        self.transform = image_transform(backbone, o.image_size)
        self.raw = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        self.x = torch.stack([self.transform(img) for img in self.raw])
        self.y = torch.tensor(d.target, dtype=torch.long)
        self.splits = stratified_split(d.target, o.val_fraction, o.test_fraction, seed)
        self.splits["train"], self.hidden = few_labels(self.splits["train"], d.target, o, seed)

    def label(self, i):
        import torch

        return torch.tensor(UNLABELLED) if i in self.hidden else self.y[i]

    def dataset(self, split):
        idx = self.splits.get(split)
        return _DigitsSplit(self, idx, warp=split == "train" and self.options.augment) if idx else None

    def warp(self, i: int, seed: int):
        """Image i under a random affine warp drawn from ``seed``. The warp is sampled straight from the 8x8
        original at the output size, in coordinates relative to the image, so any two resolutions (a student's
        and a teacher's view) show the same warp."""
        import math

        import torch
        import torch.nn.functional as F

        g = torch.Generator().manual_seed(seed)
        angle, scale, dx, dy = (torch.rand(4, generator=g) * 2 - 1).tolist()
        angle, scale, dx, dy = angle * math.radians(12), 1 + 0.1 * scale, dx * 0.25, dy * 0.25  # 0.25 = 1 px of 8
        c, s_ = math.cos(angle) / scale, math.sin(angle) / scale
        theta = torch.tensor([[[c, -s_, dx], [s_, c, dy]]], dtype=torch.float32)
        size = self.x.shape[-2:]
        grid = F.affine_grid(theta, [1, 1, *size], align_corners=False)
        return self.transform(F.grid_sample(self.raw[i:i + 1], grid, align_corners=False).squeeze(0))

    def collate(self, examples):
        import torch

        return {"inputs": torch.stack([e[0] for e in examples]), "targets": torch.stack([e[1] for e in examples])}

    def encode(self, backbone, items):
        """Image files -> grey 8x8 like the training data (dark ink on light paper is inverted) -> model input."""
        import numpy as np
        import torch
        from PIL import Image

        transform = image_transform(backbone, self.options.image_size)
        out = []
        for path in items:
            im = open_image(path)
            x = np.asarray(im.convert("L").resize((8, 8), Image.BILINEAR), dtype=np.float32) / 255.0
            if x.mean() > 0.5:
                x = 1.0 - x
            out.append(transform(torch.from_numpy(x).unsqueeze(0)))
        return torch.stack(out)


class _DigitsSplit:
    """A split's examples, made on access (an online teacher asks for a few per step)."""

    def __init__(self, source, idx, warp):
        self.source, self.idx, self.warp = source, idx, warp

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, j):
        i, src = self.idx[j], self.source
        return (src.warp(i, src.example_seed(j)) if self.warp else src.x[i]), src.label(i)


# -- text ---------------------------------------------------------------------------------------------
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

        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
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
        for i, line in enumerate(text.splitlines(), 1):
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
        max_length = self.check_limits(backbone, tokens=o.max_length or None, tokens_key="max_length",
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
            warn(f"{where}: {count} row{'s' if count > 1 else ''} without a label (first: {first.where}) "
                 f"{'left out' if o.missing_labels == 'drop' else 'kept for training without a label'}.")
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

    def collate(self, examples):
        import torch

        n = max(len(ids) for ids, _ in examples)
        input_ids = torch.full((len(examples), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), n), dtype=torch.long)
        for i, (ids, _) in enumerate(examples):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
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


# -- image folders ------------------------------------------------------------------------------------
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_IMAGE_SIZE = 4096


def check_image_size(image_size: int) -> None:
    if not 0 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be 0 (the backbone's own) or 1 to {MAX_IMAGE_SIZE}, got {image_size}.")


@dataclass
class ImageFolderOptions(SplitOptions):
    path: str = option("", "A folder with one sub-folder per class, or with train/ (val/, test/) folders of those.",
                       path=True)
    image_size: int = option(0, "Side length of the model input; 0 means the backbone's own size.")
    augment: bool = option(False, "Random resized crops and horizontal flips on the training split, drawn per "
                                  "example and epoch.")
    bad_files: Literal["error", "skip"] = option(
        "error", "Files with an image suffix that do not decode (corrupt, truncated, empty, not an image), found by "
                 "a check of every file at setup: stop with a list of them, or skip them with a warning (the list "
                 "goes to data.json in the run directory).")

    def validate(self):
        super().validate()
        if not self.path:
            raise ValueError("path is required.")
        check_image_size(self.image_size)


def list_images(root: Path) -> list[tuple[Path, str]]:
    """(file, class folder name) for every image-suffixed file under ``root``'s class folders. Hidden files and
    folders (``.DS_Store``, ``.ipynb_checkpoints``, ``._photo.jpg``) are never examples or classes."""
    def visible(f: Path) -> bool:
        return not any(part.startswith(".") for part in f.relative_to(root).parts)

    return [(f, d.name) for d in sorted(x for x in root.iterdir() if x.is_dir() and not x.name.startswith("."))
            for f in sorted(d.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and visible(f)]


def image_problem(path) -> str | None:
    """Why ``path`` cannot be used as an image (None when it can). Fast: the header, then a JPEG decoded at 1/8
    scale (its whole entropy-coded stream is still read, so truncation shows) or a PNG's chunk checksums; other
    formats are decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
            elif im.format == "PNG":
                im.verify()
            else:
                im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files; each is the file's fault
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return None


def check_images(paths: list[Path]) -> dict[str, str]:
    """{path: problem} for the files among ``paths`` that do not decode (threads: PIL releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        problems = list(pool.map(image_problem, paths))
    return {str(p): why for p, why in zip(paths, problems) if why}


def open_image(path):
    """An image file as the RGB picture a person sees: EXIF orientation applied (phone photos stored sideways),
    transparency composited on white, palette/CMYK/grey converted, 16- and 32-bit pixels scaled to 8 bits.

    Raises GraftError naming the file when it cannot be read."""
    import numpy as np
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                x = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") or x.max() > 255 else 255.0
                if im.mode == "F" and x.max() <= 1.0:
                    top = 1.0
                im = Image.fromarray(np.clip(x / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
            if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            return im.convert("RGB")
    except FileNotFoundError:
        raise GraftError(f"{path}: no such file.") from None
    except IsADirectoryError:
        raise GraftError(f"{path} is a folder; pass image files (e.g. {Path(path) / '*.png'}).") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files; each is the file's fault
        raise GraftError(f"{path} cannot be read as an image ({type(e).__name__}: {e}). Pass a JPEG, PNG, BMP, "
                         f"GIF, WebP or TIFF file.") from None


class ImageFolder(DataSource):
    """Images in one folder per class (or train/val/test folders of those), with the backbone's preprocessing."""

    Options = ImageFolderOptions
    task = "classification"
    view_options = ("image_size",)
    training_options = ("train_fraction", "unlabelled", "augment")

    def setup(self, backbone, seed):
        o = self.options
        where = "[data] plugin = \"imagefolder\""
        root = Path(o.path).expanduser()
        if not root.is_dir():
            raise GraftError(f"{where}: path {o.path!r} is not a folder.")
        self.require(backbone, "image")
        self.check_limits(backbone, image_size=(o.image_size,) * 2 if o.image_size else None, image_key="image_size",
                          where=where)
        if (root / "train").is_dir():
            parts = {s: list_images(root / s) for s in ("train", "val", "test") if (root / s).is_dir()}
        else:
            parts = {"": list_images(root)}
        bad = check_images([f for items in parts.values() for f, _ in items])
        self.skipped = sorted(bad)
        if bad:
            listing = "; ".join(f"{p} ({why})" for p, why in list(bad.items())[:5])
            if o.bad_files == "error":
                raise GraftError(f"{where}: {len(bad)} file{'s' if len(bad) > 1 else ''} under {o.path!r} cannot be "
                                 f"read as images: {listing}{' ...' if len(bad) > 5 else ''}. Remove or replace "
                                 f"them, or set bad_files = \"skip\" to train without them.")
            warn(f"{where}: skipping {len(bad)} unreadable image file{'s' if len(bad) > 1 else ''} (listed in the run "
                 f"directory's data.json), e.g. {listing.split('; ')[0]}.")
            parts = {s: [(f, lab) for f, lab in items if str(f) not in bad] for s, items in parts.items()}
        if "" in parts:
            items = parts.pop("")
            idx = stratified_split([lab for _, lab in items], o.val_fraction, o.test_fraction, seed)
            parts = {s: [items[i] for i in idx[s]] for s in ("train", "val", "test")}
        hidden = set()
        if parts.get("train") and o.train_fraction < 1:
            keep, hidden = few_labels(list(range(len(parts["train"]))), [lab for _, lab in parts["train"]], o, seed)
            parts["train"] = [parts["train"][i] for i in keep]
        if not parts.get("train"):
            raise GraftError(f"{where}: no images under {o.path!r} (expected class folders of "
                             f"{', '.join(sorted(IMAGE_SUFFIXES))} files).")
        self.label_names = sorted({lab for items in parts.values() for _, lab in items})
        index = {n: i for i, n in enumerate(self.label_names)}
        self.parts = {s: [(p, index[lab]) for p, lab in items] for s, items in parts.items()}
        self.parts["train"] = [(p, UNLABELLED if i in hidden else y) for i, (p, y) in enumerate(self.parts["train"])]
        self.train_tf, self.eval_tf = self.transforms(backbone)

    def report(self):
        return {"skipped_files": self.skipped} if getattr(self, "skipped", None) else {}

    def transforms(self, backbone):
        """(train, eval) transforms from the backbone's preprocessing: resize + centre crop, or random crops."""
        import torch
        from torchvision.transforms import v2 as T

        cfg = backbone.image_config()
        size = (self.options.image_size,) * 2 if self.options.image_size else tuple(cfg["size"])
        norm = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(cfg["mean"], cfg["std"])]
        gray = [T.Grayscale(1)] if cfg["channels"] == 1 else []
        eval_tf = T.Compose(gray + [T.Resize(int(round(size[0] / 0.875))), T.CenterCrop(size)] + norm)
        train_tf = T.Compose(gray + [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] + norm) \
            if self.options.augment else eval_tf
        return train_tf, eval_tf

    def dataset(self, split):
        items = self.parts.get(split)
        if not items:
            return None
        if split == "train" and self.options.augment:
            return _Images(items, self.train_tf, seeded_by=self)
        return _Images(items, self.eval_tf)

    def collate(self, examples):
        import torch

        return {"inputs": torch.stack([x for x, _ in examples]), "targets": torch.tensor([y for _, y in examples])}

    def encode(self, backbone, items):
        import torch

        images = _Images([(path, -1) for path in items], self.transforms(backbone)[1])
        return torch.stack([images[i][0] for i in range(len(images))])


class _Images:
    """Images read and transformed on access. ``seeded_by`` (a source) draws each random transform from the
    source's ``example_seed``: the same crop and flip in any worker, after a resume, and in a teacher's view at
    another size (crops are drawn relative to the original image)."""

    def __init__(self, items, transform, seeded_by=None):
        self.items, self.transform, self.seeded_by = items, transform, seeded_by

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import torch

        path, label = self.items[i]
        image = open_image(path)
        if self.seeded_by is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: GPU dropout keeps its own stream
            torch.default_generator.manual_seed(self.seeded_by.example_seed(i))
            return self.transform(image), label


@hookimpl
def register_datasources(register):
    register(Digits, name="digits")
    register(Text, name="text")
    register(ImageFolder, name="imagefolder")
