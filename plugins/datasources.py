"""Built-in data sources: ``digits`` (scikit-learn's 1,797 real 8x8 digit images)."""

from __future__ import annotations

from dataclasses import dataclass

from graft import DataSource, GraftError, hookimpl, option


@dataclass
class SplitOptions:
    val_fraction: float = option(0.1, "Fraction of all examples held out for validation (stratified, seeded).")
    test_fraction: float = option(0.2, "Fraction of all examples held out for testing (stratified, seeded).")

    def validate(self):
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1.")


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


def image_transform(backbone, image_size: int):
    """Tensor [C0, H, W] in [0, 1] -> the backbone's input: resized, channels matched, normalised."""
    import torch
    import torch.nn.functional as F

    cfg = backbone.image_config()
    size = (image_size, image_size) if image_size else tuple(cfg["size"])
    mean = torch.tensor(cfg["mean"]).view(-1, 1, 1)
    std = torch.tensor(cfg["std"]).view(-1, 1, 1)
    channels = cfg["channels"]

    def transform(x):
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x.unsqueeze(0), size=size, mode="bilinear", align_corners=False).squeeze(0)
        if x.shape[0] != channels:
            x = x.mean(0, keepdim=True).expand(channels, -1, -1) if channels != 1 else x.mean(0, keepdim=True)
        m, s = (mean, std) if mean.shape[0] == channels else (mean.mean().view(1, 1, 1), std.mean().view(1, 1, 1))
        return (x - m) / s

    return transform


@dataclass
class DigitsOptions(SplitOptions):
    image_size: int = option(32, "Side length the 8x8 images are resized to; 0 means the backbone's own size.")


class Digits(DataSource):
    """scikit-learn's handwritten digits: 1,797 real 8x8 images, 10 classes, stratified seeded splits."""

    Options = DigitsOptions
    task = "classification"
    label_names = [str(i) for i in range(10)]

    def setup(self, backbone, seed):
        import torch

        if backbone.modality != "image":
            raise GraftError(f"[data] plugin = \"digits\" holds images, but backbone {backbone.name!r} takes "
                             f"{backbone.modality}.")
        from sklearn.datasets import load_digits

        d = load_digits()
        transform = image_transform(backbone, self.options.image_size)
        images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        self.x = torch.stack([transform(img) for img in images])
        self.y = torch.tensor(d.target, dtype=torch.long)
        self.splits = stratified_split(d.target, self.options.val_fraction, self.options.test_fraction, seed)

    def dataset(self, split):
        idx = self.splits.get(split)
        return None if not idx else [(self.x[i], self.y[i]) for i in idx]

    def collate(self, examples):
        import torch

        return {"inputs": torch.stack([e[0] for e in examples]), "targets": torch.stack([e[1] for e in examples])}


@hookimpl
def register_datasources(register):
    register(Digits, name="digits")
