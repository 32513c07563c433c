"""The ``segfolder`` data source: semantic segmentation from a folder of images and a folder of masks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from graft import UNLABELLED, DataSource, GraftError, hookimpl, option
from graft.data import IMAGE_SUFFIXES, SplitOptions, check_image_size, keep_fraction, open_image, stratified_split

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
    and the first pixel (row, column) with a value that is no class."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise GraftError(f"{path}: a mask must be a single-channel PNG of class indices (mode L or P), not "
                                 f"mode {im.mode}.")
            values = np.asarray(im, dtype=np.int64)
    except GraftError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a damaged file
        raise GraftError(f"{path} cannot be read as a mask ({type(e).__name__}: {e}).") from None
    if classes is not None:
        bad = (values >= classes) & (values != IGNORE_VALUE)
        if bad.any():
            r, c = (int(x[0]) for x in np.nonzero(bad))
            raise GraftError(f"{path}: pixel (row {r}, column {c}) has class {values[r, c]}, but there are {classes} "
                             f"classes (0..{classes - 1}; {IGNORE_VALUE} = no class). Fix the mask or class_names.")
    mask = torch.from_numpy(values)
    mask[mask == IGNORE_VALUE] = UNLABELLED
    return mask


class SegFolder(DataSource):
    """Semantic segmentation from images/ and masks/ (PNG class indices), with the same augmentation for both."""

    Options = SegFolderOptions
    view_options = ("image_size",)
    training_options = ("train_fraction", "augment")
    task = "segmentation"

    def setup(self, backbone, seed):
        import numpy as np
        from PIL import Image

        o = self.options
        where = "[data] plugin = \"segfolder\""
        self.require(backbone, "image")
        root = Path(o.path)
        images, masks = root / "images", root / "masks"
        if not images.is_dir() or not masks.is_dir():
            raise GraftError(f"{where}: {o.path!r} needs the sub-folders images/ and masks/.")
        pairs = []
        for f in sorted(images.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                m = masks / (f.stem + ".png")
                if not m.is_file():
                    raise GraftError(f"{where}: image {f} has no mask {m}.")
                pairs.append((f, m))
        if not pairs:
            raise GraftError(f"{where}: no images in {images}.")
        if o.class_names:
            self.label_names = list(o.class_names)
        else:
            top = max(int(v) for _, m in pairs for v in np.unique(np.asarray(Image.open(m))) if v != IGNORE_VALUE)
            self.label_names = [str(i) for i in range(top + 1)]
        self._preprocessing(backbone)
        for _, m in pairs:  # every mask checked now, not mid-epoch
            read_mask(m, len(self.label_names))
        idx = stratified_split([0] * len(pairs), o.val_fraction, o.test_fraction, seed)
        self.items = {s: [pairs[i] for i in idx[s]] for s in ("train", "val", "test")}
        if o.train_fraction < 1:  # few labels: a seeded share of the training images
            keep = keep_fraction(list(range(len(self.items["train"]))), [0] * len(self.items["train"]),
                                 o.train_fraction, seed)
            self.items["train"] = [self.items["train"][i] for i in keep]

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
        import torch

        self._preprocessing(backbone)
        return torch.stack([self.prepare(open_image(p)) for p in items])


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
