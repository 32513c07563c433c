"""Building blocks for data sources (``graft.data``, public): seeded stratified splits, few-label subsets, images
read as a person sees them and prepared as a backbone expects, and several tasks' sources as one (``TaskMixture``).
The built-in sources use these; third-party sources may too. Importing this module never imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import GraftError
from .files import ENCODING_HELP, check_encoding, text_lines  # noqa: F401 - public here for text sources
from .chat import IGNORE, ROLES, ChatRenderer, replies  # noqa: F401 - public here for chat sources
from .mixture import TaskMixture  # noqa: F401 - public here: a multi-task strategy's data
from .options import option

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_IMAGE_SIZE = 4096


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


def check_image_size(image_size: int) -> None:
    if not 0 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be 0 (the backbone's own) or 1 to {MAX_IMAGE_SIZE}, got {image_size}.")


def check_limits(backbone, *, where: str, tokens: int | None = None, tokens_key: str = "", tokenizer=None,
                 image_size: tuple[int, int] | None = None, image_key: str = "") -> int | None:
    """Check what a data source will feed ``backbone`` against ``backbone.limits()``: ``tokens`` per example
    (option ``tokens_key``), the ``tokenizer``'s vocabulary, and ``image_size`` (option ``image_key``).

    Returns the backbone's usable token count (None: no limit). Raises GraftError naming ``where``, both numbers
    and the key to change when something does not fit -- an index error in the first step otherwise.
    """
    limits = backbone.limits()
    max_tokens = limits.get("max_tokens")
    if tokens is not None and max_tokens is not None and tokens > max_tokens:
        raise GraftError(f"{where}: {tokens_key} = {tokens}, but backbone {backbone.name!r} takes at most "
                         f"{max_tokens} tokens per example{limits.get('max_tokens_why', '')}. Set {tokens_key} "
                         f"to {max_tokens} or less.")
    vocab = limits.get("vocab_size")
    if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
        raise GraftError(f"{where}: the tokenizer has {len(tokenizer)} tokens, but backbone {backbone.name!r}'s "
                         f"embedding table has {vocab} rows, so some token ids would not exist. Use the model's "
                         f"own tokenizer ([backbone] tokenizer = \"DIR\") or a model with vocab_size >= "
                         f"{len(tokenizer)}.")
    fixed = limits.get("image_size")
    if image_size is not None and fixed is not None and tuple(image_size) != tuple(fixed):
        raise GraftError(f"{where}: {image_key} = {image_size[0]} gives {image_size[0]}x{image_size[1]} images, "
                         f"but backbone {backbone.name!r} takes only {fixed[0]}x{fixed[1]}. Set {image_key} = "
                         f"{fixed[0]} (or 0 for the backbone's own size).")
    return max_tokens


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


def letterbox_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(height, width) of an image scaled until its longer side is ``side`` (aspect kept, at least 1 pixel): the
    letterbox of the detection source, which pads it to ``side`` x ``side`` at the right and bottom."""
    scale = side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def shown_size(path) -> tuple[int, int]:
    """(height, width) of an image as ``open_image`` shows it (EXIF orientation applied), from its header: nothing
    is decoded. A PNG's EXIF is read only when it comes before the pixels (PIL would decode the image to find a
    later one)."""
    from PIL import Image

    with Image.open(path) as im:
        exif = im.getexif() if im.format != "PNG" or "exif" in im.info else {}
        w, h = im.size
    return (w, h) if exif.get(0x0112, 1) in (5, 6, 7, 8) else (h, w)  # 5-8: turned by a quarter


def pad_tokens(sequences, pad_id: int, fill=None):
    """Token id lists -> ``(input_ids, attention_mask)`` long tensors ``[batch, longest]``, padded on the right with
    ``pad_id`` (mask 0 there). ``fill`` (optional): per-token lists padded alike with -100 (``UNLABELLED``) into a
    third tensor -- token classification's targets."""
    import torch

    n = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), n), dtype=torch.long)
    for i, ids in enumerate(sequences):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
    if fill is None:
        return input_ids, mask
    targets = torch.full((len(sequences), n), -100, dtype=torch.long)
    for i, labels in enumerate(fill):
        targets[i, : len(labels)] = torch.tensor(labels, dtype=torch.long)
    return input_ids, mask, targets


def map_threads(fn, items) -> list:
    """``[fn(x) for x in items]`` in a few threads: file checks whose decoding (PIL, numpy) releases the GIL."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        return list(pool.map(fn, items))
