"""Built-in data sources: ``digits`` (scikit-learn's real 8x8 digit images), ``text`` and ``imagefolder``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import UNLABELLED, DataSource, GraftError, hookimpl, option


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
            with Image.open(path) as im:
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
    text_column: str = option("text", "Column (CSV) or field (JSONL) holding the text.")
    label_column: str = option("label", "Column or field holding the label.")
    val_path: str = option("", "Separate validation file (same format); else split off path.", path=True)
    test_path: str = option("", "Separate test file (same format); else split off path.", path=True)
    task: Literal["classification", "multilabel", "regression"] = option(
        "classification", "multilabel labels are lists (JSONL) or strings separated by label_separator.")
    label_separator: str = option(",", "Separator of multi-label strings in CSV.")
    max_length: int = option(256, "Tokens per example (longer texts are truncated).")
    max_examples: int = option(0, "Use only this many examples of path (seeded sample, stratified); 0 = all.")

    def validate(self):
        super().validate()
        if not self.path:
            raise ValueError("path is required: a CSV/JSONL file or a folder of label folders.")
        if self.max_length < 2:
            raise ValueError("max_length must be at least 2.")


def read_records(path: str, fmt: str, text_col: str, label_col: str, where: str) -> list[tuple[str, object]]:
    p = Path(path).expanduser()
    if not p.exists():
        raise GraftError(f"{where}: {path!r} does not exist.")
    if fmt == "auto":
        fmt = "folders" if p.is_dir() else {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(
            p.suffix.lower(), "")
        if not fmt:
            raise GraftError(f"{where}: cannot tell the format of {path!r}; set format = \"csv\" or \"jsonl\".")
    if fmt == "folders":
        out = []
        for d in sorted(x for x in p.iterdir() if x.is_dir()):
            out += [(f.read_text(encoding="utf-8", errors="replace").strip(), d.name)
                    for f in sorted(d.iterdir()) if f.is_file() and not f.name.startswith(".")]
        if not out:
            raise GraftError(f"{where}: {path!r} has no label folders with text files.")
        return out
    rows = []
    if fmt == "csv":
        import csv

        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ","))
    else:
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise GraftError(f"{where}: {path}:{i} is not valid JSON ({e.msg}).") from None
    if rows and (text_col not in rows[0] or label_col not in rows[0]):
        raise GraftError(f"{where}: {path!r} has no column {text_col if text_col not in rows[0] else label_col!r}; "
                         f"columns: {', '.join(rows[0])}. Set text_column / label_column.")
    return [(str(r[text_col]), r[label_col]) for r in rows]


class Text(DataSource):
    """Text classification, multi-label or regression from CSV, JSONL or label folders; dynamic padding."""

    Options = TextOptions
    view_options = ("max_length",)
    training_options = ("train_fraction", "unlabelled")

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
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        main = read_records(o.path, o.format, o.text_column, o.label_column, where)
        parts = {"": main}
        for split, p in (("val", o.val_path), ("test", o.test_path)):
            if p:
                parts[split] = read_records(p, o.format, o.text_column, o.label_column, where)
        labels_all = [lab for recs in parts.values() for _, lab in recs]
        if o.task == "classification":
            self.label_names = sorted({str(x) for x in labels_all})
        elif o.task == "multilabel":
            split_labels = lambda x: [str(v) for v in x] if isinstance(x, list) else [  # noqa: E731
                v.strip() for v in str(x).split(o.label_separator) if v.strip()]
            self.label_names = sorted({v for x in labels_all for v in split_labels(x)})
        else:
            self.label_names = [o.label_column]
        index = {n: i for i, n in enumerate(self.label_names)}

        def target(x):
            if o.task == "classification":
                return index[str(x)]
            if o.task == "multilabel":
                vec = [0.0] * len(index)
                for v in split_labels(x):
                    vec[index[v]] = 1.0
                return vec
            try:
                return float(x)
            except ValueError:
                raise GraftError(f"{where}: regression label {x!r} is not a number.") from None

        def encode(records):
            if not records:
                return []
            texts = [t for t, _ in records]
            ids = tok(texts, truncation=True, max_length=o.max_length, add_special_tokens=True)["input_ids"]
            return [(i, target(lab)) for i, (_, lab) in zip(ids, records)]

        strat = [str(lab) if o.task == "classification" else 0 for _, lab in main]
        if o.max_examples and o.max_examples < len(main):
            keep = np.random.default_rng(seed).permutation(len(main))[: o.max_examples]
            main = [main[i] for i in sorted(keep)]
            strat = [strat[i] for i in sorted(keep)]
        val_f = 0.0 if o.val_path else o.val_fraction
        test_f = 0.0 if o.test_path else o.test_fraction
        idx = stratified_split(strat, val_f, test_f, seed)
        if o.unlabelled == "keep" and o.train_fraction < 1 and o.task != "classification":
            raise GraftError(f"{where}: unlabelled = \"keep\" needs task = \"classification\".")
        idx["train"], hidden = few_labels(idx["train"], strat, o, seed)
        self.splits = {s: encode([main[i] for i in idx[s]]) for s in ("train", "val", "test")}
        self.splits["train"] = [(ids, UNLABELLED if i in hidden else y)
                                for i, (ids, y) in zip(idx["train"], self.splits["train"])]
        for split in ("val", "test"):
            if split in parts:
                self.splits[split] = encode(parts[split])

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
        enc = tok(list(items), truncation=True, max_length=self.options.max_length, padding=True,
                  return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# -- image folders ------------------------------------------------------------------------------------
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageFolderOptions(SplitOptions):
    path: str = option("", "A folder with one sub-folder per class, or with train/ (val/, test/) folders of those.",
                       path=True)
    image_size: int = option(0, "Side length of the model input; 0 means the backbone's own size.")
    augment: bool = option(False, "Random resized crops and horizontal flips on the training split, drawn per "
                                  "example and epoch.")

    def validate(self):
        super().validate()
        if not self.path:
            raise ValueError("path is required.")


def list_images(root: Path) -> list[tuple[Path, str]]:
    return [(f, d.name) for d in sorted(x for x in root.iterdir() if x.is_dir())
            for f in sorted(d.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]


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
        if (root / "train").is_dir():
            parts = {s: list_images(root / s) for s in ("train", "val", "test") if (root / s).is_dir()}
        else:
            items = list_images(root)
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
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as im:
            if self.seeded_by is None:
                return self.transform(im.convert("RGB")), label
            with torch.random.fork_rng(devices=[]):  # the CPU generator only: GPU dropout keeps its own stream
                torch.default_generator.manual_seed(self.seeded_by.example_seed(i))
                return self.transform(im.convert("RGB")), label


@hookimpl
def register_datasources(register):
    register(Digits, name="digits")
    register(Text, name="text")
    register(ImageFolder, name="imagefolder")
