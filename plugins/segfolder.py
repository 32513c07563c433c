"""The ``segfolder`` data source: semantic segmentation from a folder of images and a folder of masks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from graft import UNLABELLED, DataSource, GraftError, hookimpl, option, warn
from graft.data import (IMAGE_SUFFIXES, SplitOptions, check_image_size, image_problem, keep_fraction,
                        map_threads, open_image, shown_size, stratified_split)

IGNORE_VALUE = 255  # the mask value that marks pixels without a class (borders, "void"), as in Pascal VOC


@dataclass
class SegFolderOptions(SplitOptions):
    path: str = option("", "A folder with images/ and masks/: each mask a PNG of class indices (0, 1, ...; 255 = no "
                           "class) named like its image (a.jpg -> a.png).", path=True)
    class_names: list[str] = field(default_factory=list, metadata={
        "help": "Names of the classes, index 0 first (their number is the number of classes); empty: classes "
                "0..max found in the masks, named by number."})
    image_size: int = option(0, "Side of the square the image and its mask are resized to; 0 = the backbone's.")
    augment: bool = option(False, "Random horizontal flips and crops of 75-100% of the side (then resized), the "
                                  "same draw for an image and its mask, seeded per example and epoch.")

    def validate(self):
        super().validate()
        if not self.path:
            raise ValueError("path is required: a folder with images/ and masks/.")
        if self.unlabelled == "keep":
            raise ValueError("unlabelled = \"keep\" has no meaning for masks; with train_fraction < 1 the other "
                             "training images are dropped.")
        check_image_size(self.image_size)


def read_mask(path: Path, classes: int | None):
    """A mask PNG as a long tensor ``[H, W]`` of class indices, 255 -> UNLABELLED. Raises GraftError naming the file
    and the first pixel (row, column) with a value that is no class (negative, or ``classes`` or more when
    ``classes`` is given)."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise GraftError(f"{path}: a mask must be a single-channel PNG of class indices (mode L or P), not "
                                 f"mode {im.mode}.")
            values = np.asarray(im)  # its own type (uint8 for L and P): the checks below are passes over it
    except GraftError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a damaged file
        raise GraftError(f"{path} cannot be read as a mask ({type(e).__name__}: {e}).") from None
    ignored = values == IGNORE_VALUE
    # uint8 masks with no class count (a training example: setup checked every mask) can hold no bad value:
    # no passes over them here
    bad = None
    if classes is not None or values.dtype.kind == "i":
        bad = values < 0 if values.dtype.kind == "i" else np.zeros_like(ignored)
        if classes is not None:
            bad |= values >= classes
        bad &= ~ignored
    if bad is not None and bad.any():
        r, c = (int(x[0]) for x in np.nonzero(bad))
        known = f"there are {classes} classes (0..{classes - 1}" if classes is not None else "classes are (0, 1, ..."
        raise GraftError(f"{path}: pixel (row {r}, column {c}) has class {values[r, c]}, but {known}; "
                         f"{IGNORE_VALUE} = no class). Fix the mask or class_names.")
    mask = values.astype(np.int64)
    mask[ignored] = UNLABELLED
    return torch.from_numpy(mask)


def check_pair(image: Path, mask: Path, classes: int | None) -> tuple[str | None, int]:
    """(problem, top) of an image/mask pair: why it cannot be used (None when it can), and the largest class in the
    mask (-1: no labelled pixel). The image is checked as imagefolder checks files (header, checksums) without
    decoding it; the mask is decoded, once, for its values."""
    why = image_problem(image)
    if why:
        return f"{image} cannot be read as an image ({why})", -1
    try:
        mask_values = read_mask(mask, classes)
    except GraftError as e:
        return str(e).rstrip("."), -1
    h, w = shown_size(image)
    if tuple(mask_values.shape) != (h, w):
        return (f"{mask} is {mask_values.shape[1]}x{mask_values.shape[0]} pixels, its image {image} {w}x{h}: they "
                f"must match"), -1
    return None, max(int(mask_values.max()), -1)  # UNLABELLED (-100) is below every class


def check_pairs(pairs: list[tuple[Path, Path]], classes: int | None) -> list[tuple[str | None, int]]:
    """``check_pair`` of every pair, in threads (PIL and numpy release the GIL)."""
    return map_threads(lambda pair: check_pair(*pair, classes), pairs)


def _listing(paths, n=3) -> str:
    paths = [str(p) for p in paths]
    return ", ".join(paths[:n]) + (f" and {len(paths) - n} more" if len(paths) > n else "")


class SegFolder(DataSource):
    """Semantic segmentation from images/ and masks/ (PNG class indices), with the same augmentation for both."""

    Options = SegFolderOptions
    view_options = ("image_size",)
    training_options = ("train_fraction", "augment")
    task = "segmentation"

    def setup(self, backbone, seed):
        o = self.options
        where = "[data] plugin = \"segfolder\""
        self.require(backbone, "image")
        root = Path(o.path)
        images, masks = root / "images", root / "masks"
        if not images.is_dir() or not masks.is_dir():
            raise GraftError(f"{where}: {o.path!r} needs the sub-folders images/ and masks/.")
        pairs = []
        for f in sorted(images.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):  # not ._a.png, .DS_Store
                m = masks / (f.stem + ".png")
                if not m.is_file():
                    raise GraftError(f"{where}: image {f} has no mask {m}.")
                pairs.append((f, m))
        if not pairs:
            raise GraftError(f"{where}: no images in {images}.")
        # every pair checked now, not mid-epoch or after training: one read of each mask gives its problems and
        # its largest class (the class count without class_names)
        facts = check_pairs(pairs, len(o.class_names) or None)
        bad = [why for why, _ in facts if why]
        if bad:
            raise GraftError(f"{where}: {len(bad)} of the {len(pairs)} image/mask pairs under {o.path!r} cannot be "
                             f"used: {'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. Fix or remove them (an "
                             f"image and its mask go together).")
        top = {m: t for (_, m), (_, t) in zip(pairs, facts)}
        if o.class_names:
            self.label_names = list(o.class_names)
        elif max(top.values()) < 0:
            raise GraftError(f"{where}: no mask under {masks} has a labelled pixel: every pixel of "
                             f"{_listing(top)} is {IGNORE_VALUE} (no class). A mask holds class indices 0, 1, ... "
                             f"({IGNORE_VALUE} only where no class applies).")
        else:
            self.label_names = [str(i) for i in range(max(top.values()) + 1)]
        self._preprocessing(backbone)
        idx = stratified_split([0] * len(pairs), o.val_fraction, o.test_fraction, seed)
        self.items = {s: [pairs[i] for i in idx[s]] for s in ("train", "val", "test")}
        if o.train_fraction < 1:  # few labels: a seeded share of the training images
            keep = keep_fraction(list(range(len(self.items["train"]))), [0] * len(self.items["train"]),
                                 o.train_fraction, seed)
            self.items["train"] = [self.items["train"][i] for i in keep]
        for split, items in self.items.items():  # a split without one labelled pixel: nothing to learn or score
            if items and all(top[m] < 0 for _, m in items):
                raise GraftError(f"{where}: no mask of the {split} split has a labelled pixel (every pixel of "
                                 f"{_listing(m for _, m in items)} is {IGNORE_VALUE}, no class): there is nothing "
                                 f"to {'learn' if split == 'train' else 'score'}. Label those masks, or remove them.")
        self.unlabelled_masks = [str(m) for m, t in top.items() if t < 0]
        if self.unlabelled_masks:
            warn(f"{where}: {len(self.unlabelled_masks)} mask{'s' if len(self.unlabelled_masks) > 1 else ''} "
                 f"without a labelled pixel (all {IGNORE_VALUE}, no class) add nothing to the loss or the metrics: "
                 f"{_listing(self.unlabelled_masks)} (listed in data.json).")

    def report(self):
        return {"masks_without_labels": self.unlabelled_masks} if getattr(self, "unlabelled_masks", None) else {}

    def dataset(self, split):
        items = self.items.get(split)
        return _Pairs(self, items, augment=split == "train" and self.options.augment) if items else None

    def collate(self, examples):
        import torch

        return {"inputs": torch.stack([x for x, _ in examples]), "targets": torch.stack([y for _, y in examples])}

    def prepare(self, image, mask=None, draw=None):
        """Image (PIL) and mask (``[H, W]``) -> the backbone's input ``[C, H, W]`` and the mask at the same size:
        the same crop and flip for both (``draw``: (top, left, side fraction, flip) as fractions of the image), the
        image resized bilinearly and normalised, the mask by nearest neighbour (class indices stay classes)."""
        import numpy as np
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if draw is not None:
            top, left, side, flip = draw
            h, w = x.shape[-2:]
            ch, cw = max(1, round(h * side)), max(1, round(w * side))
            t, l0 = round(top * (h - ch)), round(left * (w - cw))
            x = x[:, t:t + ch, l0:l0 + cw]
            mask = mask[t:t + ch, l0:l0 + cw] if mask is not None else None
            if flip:
                x = x.flip(-1)
                mask = mask.flip(-1) if mask is not None else None
        x = F.interpolate(x.unsqueeze(0), size=self.size, mode="bilinear", align_corners=False).squeeze(0)
        if self.channels == 1:
            x = x.mean(0, keepdim=True)
        x = (x - self.mean) / self.std
        if mask is None:
            return x
        mask = F.interpolate(mask[None, None].float(), size=self.size, mode="nearest")[0, 0].long()
        return x, mask

    def _preprocessing(self, backbone):
        """Input size, channels and normalisation of ``backbone``, as tensors ready for ``prepare``."""
        import torch

        cfg = backbone.image_config()
        self.size = (self.options.image_size,) * 2 if self.options.image_size else tuple(cfg["size"])
        self.channels = cfg["channels"]
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32).view(-1, 1, 1)
        if self.mean.shape[0] != self.channels:  # a grey model's one channel: the mean statistics
            self.mean, self.std = self.mean.mean().view(1, 1, 1), self.std.mean().view(1, 1, 1)

    def encode(self, backbone, items):
        """Image paths -> ``{"images": [B, C, H, W], "sizes": [B, 2]}``: the model's inputs and each image's own
        (height, width), at which ``graft predict`` gives its mask."""
        import torch

        self._preprocessing(backbone)
        images = [open_image(p) for p in items]
        return {"images": torch.stack([self.prepare(im) for im in images]),
                "sizes": torch.tensor([(im.height, im.width) for im in images], dtype=torch.long)}


class _Pairs:
    """Image/mask pairs read on access; with ``augment``, crop and flip drawn from the source's ``example_seed``
    (the same in any worker and after a resume)."""

    def __init__(self, source, items, augment):
        self.source, self.items, self.augment = source, items, augment

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import numpy as np

        image_path, mask_path = self.items[i]
        image = open_image(image_path)
        mask = read_mask(mask_path, None)
        if tuple(mask.shape) != (image.height, image.width):
            raise GraftError(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} pixels, its image {image_path} "
                             f"{image.width}x{image.height}: they must match.")
        draw = None
        if self.augment:
            rng = np.random.default_rng(self.source.example_seed(i))
            draw = (rng.random(), rng.random(), rng.uniform(0.75, 1.0), bool(rng.random() < 0.5))
        return self.source.prepare(image, mask, draw)


@hookimpl
def register_datasources(register):
    register(SegFolder, name="segfolder")
