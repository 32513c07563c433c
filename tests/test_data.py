"""Data sources: few-label subsets, and random augmentation drawn per example and epoch (workers, teacher views)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_records, assert_same_weights, read_metrics, tiny_config, weights
from graft.config import resolve
from graft.loop import Run, train

RESNET = {"plugin": "timm", "model": "test_resnet"}


def digits(size=8, backbone=RESNET, seed=0, **options):
    conf = tiny_config(backbone=backbone, data={"image_size": size, **options}, train={"seed": seed})
    return Run(resolve(conf, "d.toml")).data


def corr(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def test_train_fraction_keeps_a_stratified_seeded_subset():
    full, part = digits(), digits(train_fraction=0.1)
    assert part.splits["val"] == full.splits["val"] and part.splits["test"] == full.splits["test"]
    assert set(part.splits["train"]) < set(full.splits["train"])
    counts = np.bincount(part.y[part.splits["train"]].numpy(), minlength=10)
    full_counts = np.bincount(full.y[full.splits["train"]].numpy(), minlength=10)
    assert np.all(np.abs(counts - np.round(full_counts * 0.1)) <= 0) and counts.min() >= 1
    assert digits(train_fraction=0.1).splits["train"] == part.splits["train"]  # seeded
    assert digits(seed=1, train_fraction=0.1).splits["train"] != part.splits["train"]
    with pytest.raises(Exception, match="train_fraction"):
        digits(train_fraction=0.0)


def test_digits_augmentation_is_drawn_per_example_and_epoch():
    small, again, big = digits(8, augment=True), digits(8, augment=True), digits(16, augment=True)
    for d in (small, again, big):
        d.set_epoch(3)
    x8, x16 = small.dataset("train")[5][0], big.dataset("train")[5][0]
    assert torch.equal(x8, again.dataset("train")[5][0])  # another instance (a teacher's view): the same draw
    plain = small.x[small.splits["train"][5]]
    assert not torch.equal(x8, plain)
    # the same warp at twice the resolution: far closer to the 8x8 view than the unwarped image is
    assert corr(x8, F.avg_pool2d(x16[None], 2)[0]) > 0.97 > corr(plain, F.avg_pool2d(x16[None], 2)[0]) + 0.05
    small.set_epoch(4)
    assert not torch.equal(small.dataset("train")[5][0], x8)  # a new draw each epoch
    assert torch.equal(small.dataset("val")[0][0], small.x[small.splits["val"][0]])  # evaluation is not augmented


def _imagefolder(root):
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in range(80):
        folder = root / f"c{d.target[i] % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).convert("RGB").resize((12, 12)).save(
            folder / f"{i}.png")
    return {"plugin": "imagefolder", "path": str(root), "image_size": 8, "augment": True}


@pytest.mark.parametrize("source", ["digits", "imagefolder"])
def test_augmented_runs_are_the_same_with_loader_workers(tmp_path, source):
    """Augmentation comes from (seed, epoch, example), not from the worker processes' RNGs."""
    data = _imagefolder(tmp_path / "img") if source == "imagefolder" else {"image_size": 8, "augment": True}
    runs = {}
    for workers in (0, 2):
        conf = tiny_config(data=data, train={"epochs": 2, "batch_size": 16, "num_workers": workers})
        train(resolve(conf, "w.toml"), tmp_path / f"w{workers}", echo=lambda m: None)
        runs[workers] = tmp_path / f"w{workers}"
    assert_same_records(read_metrics(runs[0]), read_metrics(runs[2]))
    assert_same_weights(weights(runs[0]), weights(runs[2]), atol=0)


def test_distill_teacher_sees_the_same_augmentation_at_its_own_size(tmp_path):
    teacher_conf = tiny_config(backbone=RESNET, data={"image_size": 16, "augment": True}, train={"max_steps": 2})
    train(resolve(teacher_conf, "t.toml"), tmp_path / "teacher", echo=lambda m: None)
    conf = tiny_config(strategy={"plugin": "distill", "teacher": str(tmp_path / "teacher")},
                       loss={"plugin": "kd"}, data={"image_size": 8, "augment": True})
    r = Run(resolve(conf, "s.toml"))
    s = r.strategy
    assert not s.use_cache and not s.same_view  # 8 vs 16 pixels: the teacher needs its own, online view
    for epoch in (2, 5):
        r.data.set_epoch(epoch)
        student = r.data.dataset("train")[7][0]
        teacher = s._teacher_inputs("train", [7])[0]
        assert teacher.shape[-1] == 16
        assert corr(student.mean(0), F.avg_pool2d(teacher[None], 2)[0].mean(0)) > 0.97
