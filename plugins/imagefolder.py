"""The ``imagefolder`` data source: images in one folder per class (or train/val/test folders of those)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import UNLABELLED, DataSource, GraftError, hookimpl, option, warn
from graft.data import (IMAGE_SUFFIXES, SplitOptions, check_image_size, check_limits, few_labels, image_problem,
                        map_threads, open_image, stratified_split)


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


def check_images(paths: list[Path]) -> dict[str, str]:
    """{path: problem} for the files among ``paths`` that do not decode (threads: PIL releases the GIL)."""
    problems = map_threads(image_problem, paths)
    return {str(p): why for p, why in zip(paths, problems) if why}



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
        check_limits(backbone, image_size=(o.image_size,) * 2 if o.image_size else None, image_key="image_size",
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

    def example_ids(self, split):
        """Each example's file, relative to ``path``: graft compare's ids."""
        root = Path(self.options.path).expanduser()
        return [Path(p).relative_to(root).as_posix() if Path(p).is_relative_to(root) else str(p)
                for p, _ in self.parts.get(split, [])]

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
    register(ImageFolder, name="imagefolder")
