"""The ``digits`` data source: scikit-learn's real 8x8 digit images."""

from __future__ import annotations

from dataclasses import dataclass

from graft import UNLABELLED, DataSource, hookimpl, option
from graft.data import (SplitOptions, check_image_size, check_limits, few_labels, image_transform,
                        open_image, stratified_split)


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
        check_limits(backbone, image_size=(self.options.image_size,) * 2 if self.options.image_size else None,
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


@hookimpl
def register_datasources(register):
    register(Digits, name="digits")
