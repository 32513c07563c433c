"""Data sources: few-label subsets, and random augmentation drawn per example and epoch (workers, teacher views)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_records, assert_same_weights, read_metrics, tiny_config, weights
from graft import load_config
from graft import train
from graft.run import Run

RESNET = {"plugin": "timm", "model": "test_resnet"}


def digits(size=8, backbone=RESNET, seed=0, **options):
    conf = tiny_config(backbone=backbone, data={"image_size": size, **options}, train={"seed": seed})
    return Run(load_config(conf, where="d.toml")).data


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


def test_sources_pickle_for_spawned_workers_and_take_any_seed():
    import pickle

    for d in (digits(augment=True), digits(seed=2**31 - 1, augment=True)):
        d.set_epoch(1)
        ds = pickle.loads(pickle.dumps(d.dataset("train")))  # spawn / forkserver workers get the split this way
        assert torch.equal(ds[3][0], d.dataset("train")[3][0])
    seeds = {digits(seed=s).example_seed(i) for s in (0, 20240101, 2**63 - 1) for i in range(3)}
    assert len(seeds) == 9 and all(0 <= x < 2**63 for x in seeds)


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
        train(load_config(conf, where="w.toml"), tmp_path / f"w{workers}", echo=lambda m: None)
        runs[workers] = tmp_path / f"w{workers}"
    assert_same_records(read_metrics(runs[0]), read_metrics(runs[2]))
    assert_same_weights(weights(runs[0]), weights(runs[2]), atol=0)


def test_distill_teacher_sees_the_same_augmentation_at_its_own_size(tmp_path):
    teacher_conf = tiny_config(backbone=RESNET, data={"image_size": 16, "augment": True}, train={"max_steps": 2})
    train(load_config(teacher_conf, where="t.toml"), tmp_path / "teacher", echo=lambda m: None)
    conf = tiny_config(strategy={"plugin": "distill", "teacher": str(tmp_path / "teacher")},
                       loss={"plugin": "kd"}, data={"image_size": 8, "augment": True})
    r = Run(load_config(conf, where="s.toml"))
    s = r.strategy
    assert not s.use_cache and not s.same_view  # 8 vs 16 pixels: the teacher needs its own, online view
    for epoch in (2, 5):
        r.data.set_epoch(epoch)
        student = r.data.dataset("train")[7][0]
        teacher = s._teacher_inputs("train", [7])[0]
        assert teacher.shape[-1] == 16
        assert corr(student.mean(0), F.avg_pool2d(teacher[None], 2)[0].mean(0)) > 0.97


def test_unlabelled_examples_are_kept_without_labels_and_skipped_by_losses():
    from graft import UNLABELLED
    from graft.plugins.losses import CrossEntropy, kd_loss

    full, part = digits(), digits(train_fraction=0.1, unlabelled="keep")
    assert part.splits["train"] == full.splits["train"]
    labels = torch.stack([y for _, y in part.dataset("train")])
    labelled = labels != UNLABELLED
    assert int(labelled.sum()) == len(digits(train_fraction=0.1).splits["train"])
    assert torch.equal(labels[labelled], full.y[torch.tensor(full.splits["train"])][labelled])

    ce = CrossEntropy()
    logits = torch.randn(6, 10, requires_grad=True)
    y = torch.tensor([3, UNLABELLED, 1, UNLABELLED, 0, 9])
    assert torch.allclose(ce(logits, y), F.cross_entropy(logits[y >= 0], y[y >= 0]))
    none = ce(logits, torch.full((6,), UNLABELLED))
    none.backward()
    assert none.item() == 0 and torch.isfinite(logits.grad).all()  # torch's own mean would be NaN here
    probs = torch.softmax(torch.randn(6, 10), 1)  # class-probability targets: a plain mean over all examples
    assert torch.allclose(ce(logits, probs), F.cross_entropy(logits, probs))
    teacher = torch.randn(6, 10)
    soft_only = kd_loss(logits, teacher, None, 0.5, 2.0)
    assert torch.allclose(kd_loss(logits, teacher, torch.full((6,), UNLABELLED), 0.5, 2.0), soft_only)


def test_teacher_trained_on_few_labels_teaches_every_training_example(tmp_path):
    """The teacher run used 16x16 inputs and only the labelled fifth; the student keeps the rest unlabelled:
    the teacher's view takes its image size from its run and which examples from the student's config."""
    few = {"train_fraction": 0.2}
    teacher_conf = tiny_config(backbone=RESNET, data={"image_size": 16, **few}, train={"max_steps": 2})
    train(load_config(teacher_conf, where="t.toml"), tmp_path / "teacher", echo=lambda m: None)
    conf = tiny_config(strategy={"plugin": "distill", "teacher": str(tmp_path / "teacher"),
                                 "cache_dir": str(tmp_path / "cache")},
                       loss={"plugin": "kd", "alpha": 0.5}, data={"unlabelled": "keep", **few},
                       train={"epochs": 1, "batch_size": 8})  # small batches: some hold no labelled example
    r = Run(load_config(conf, where="s.toml"))
    n_train = len(digits().splits["train"])
    assert len(r.strategy.teacher_data.dataset("train")) == len(r.data.dataset("train")) == n_train
    assert r.strategy.teacher_data.options.image_size == 16 and r.data.options.image_size == 8
    summary = train(load_config(conf, where="s.toml"), tmp_path / "student", echo=lambda m: None)
    assert summary["skipped_steps"] == 0 and np.isfinite(summary["test"]["loss"])
    r = Run(load_config(conf, where="s.toml"))
    on_train = r.evaluate(r.model, "train")  # `graft eval --split train` scores the labelled examples only
    assert 0 <= on_train["agreement"] <= 1 and 0 <= on_train["accuracy"] <= 1
    assert sum(sum(row) for row in on_train["confusion_matrix"]) == len(digits(train_fraction=0.2).splits["train"])
    alone = train(load_config(tiny_config(data={"unlabelled": "keep", **few}, train={"epochs": 1, "batch_size": 8}),
                              where="a.toml"), tmp_path / "alone", echo=lambda m: None)
    assert np.isfinite(alone["test"]["loss"])  # finetune trains on the labelled ones, no NaN from empty batches
