"""Issue 20, semantic segmentation: images/ + masks/ folders, the same augmentation for image and mask, an FPN-style
head over timm feature maps, mIoU and pixel accuracy, masks from `graft predict`; bad masks exit 2."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import graft, read_metrics, write_config
from graft import GraftError
from graft.config import resolve
from graft.loop import train
from graft.run import Run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from digits_canvas import build  # noqa: E402

CLASSES = ["background"] + [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def canvases(tmp_path_factory):
    return build(tmp_path_factory.mktemp("seg") / "canvas", count=60, seed=0, size=32, digit_size=12)


def conf(path, **data):
    return {"backbone": {"plugin": "timm", "model": "test_resnet"}, "strategy": {"plugin": "finetune"},
            "data": {"plugin": "segfolder", "path": str(path), "image_size": 32, "class_names": CLASSES, **data},
            "train": {"epochs": 3, "batch_size": 8, "lr": 3e-3, "progress": False, "plot": False}}


def test_augmentation_moves_image_and_mask_together(tmp_path):
    """A known pattern: a white block on black whose mask is 1 exactly there. After each drawn crop and flip the
    block and the mask's 1s still coincide (bilinear resizing blurs only the block's edge)."""
    from PIL import Image

    root = tmp_path / "pattern"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    img = np.zeros((40, 40), dtype=np.uint8)
    img[4:20, 22:36] = 255  # off-centre, so a flip that left the mask behind would show
    Image.fromarray(img).convert("RGB").save(root / "images" / "a.png")
    Image.fromarray((img > 0).astype(np.uint8), mode="L").save(root / "masks" / "a.png")
    r = Run(resolve(conf(root, val_fraction=0.0, test_fraction=0.0, augment=True, class_names=["bg", "block"]),
                    "c.toml"))
    data = r.data
    mean, std = data.mean, data.std
    for draw in [(0.0, 0.0, 1.0, False), (0.0, 0.0, 1.0, True), (0.3, 0.9, 0.75, True), (1.0, 0.2, 0.8, False)]:
        x, mask = data.prepare(Image.open(root / "images" / "a.png").convert("RGB"),
                               torch.from_numpy((img > 0).astype(np.int64)), draw)
        brightness = (x * std + mean).mean(0)
        assert mask.shape == brightness.shape == (32, 32)
        block, ones = brightness > 0.5, mask == 1
        iou = (block & ones).sum() / (block | ones).sum()
        wrong = (block & ones.flip(-1)).sum() / (block | ones.flip(-1)).sum()  # what a mask left unflipped would give
        assert iou >= 0.7 and wrong <= 0.3, (draw, iou, wrong)
    flipped = data.prepare(Image.open(root / "images" / "a.png").convert("RGB"),
                           torch.from_numpy((img > 0).astype(np.int64)), (0.0, 0.0, 1.0, True))[1]
    assert flipped[:, :16].sum() > 0 and flipped[:, 16:].sum() == 0  # the block went to the other side
    a, b = data.dataset("train")[0], data.dataset("train")[0]
    assert torch.equal(a[1], b[1])  # draws are seeded per example: the same pair twice


def test_tiny_segmentation_trains_and_predicts_a_mask(canvases, tmp_path):
    summary = train(resolve(conf(canvases, augment=True), "c.toml"), tmp_path / "run", echo=lambda m: None)
    test = summary["test"]
    assert summary["metric"] == "miou" and 0 < test["miou"] <= 1 and test["pixel_accuracy"] >= 0.6
    assert len(test["confusion_matrix"]) == len(CLASSES)
    out = graft("predict", tmp_path / "run", canvases / "images" / "00003.png", "--mask-dir", tmp_path / "masks",
                check=True).stdout
    from PIL import Image

    mask = np.asarray(Image.open(tmp_path / "masks" / "00003.mask.png"))
    assert out.split("\t")[0] == str(tmp_path / "masks" / "00003.mask.png")
    assert mask.shape == (32, 32) and mask.max() < len(CLASSES)


def test_a_mask_with_an_unknown_class_exits_2_naming_it(canvases, tmp_path):
    proc = graft("train", write_config(tmp_path / "c.toml", conf(canvases, class_names=["background", "0", "1"])))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "masks/" in proc.stderr and "pixel (row" in proc.stderr and "there are 3 classes" in proc.stderr


def test_hf_vision_models_give_maps_and_others_are_refused(canvases):
    """hf ViT (tokens laid back on the patch grid) and ConvNeXt (stage outputs) feed the same head; a backbone with
    no feature maps is refused with the reason."""
    c = conf(canvases)
    for config in ({"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 4,
                    "num_attention_heads": 2, "intermediate_size": 32},
                   {"model_type": "convnext", "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}):
        c["backbone"] = {"plugin": "hf", "config": config}
        r = Run(resolve(c, "c.toml"))
        batch = r.data.collate([r.data.dataset("train")[i] for i in range(2)])
        assert r.model(batch["inputs"]).shape == (2, len(CLASSES), 32, 32)
        assert len(r.backbone.module(batch["inputs"], dense=True)) == 4

    from graft.plugins.timm_backbone import TimmBackbone
    from graft.testing import registry_with

    class Pooled(TimmBackbone):
        def build(self):
            module = super().build()
            self.dense_features = None  # a network that only gives pooled vectors
            return module

    c = conf(canvases)
    c["backbone"]["plugin"] = "pooled"
    with pytest.raises(GraftError, match="multi-scale feature maps.*'pooled' gives none"):
        Run(resolve(c, "c.toml", registry_with(Pooled, "backbone", "pooled")))


def test_per_pixel_distillation_from_a_teacher_at_another_size(canvases, tmp_path):
    """The student segments at 16 px what the teacher segmented at 32 px: the teacher's logits are resized onto the
    student's pixels (both saw the same crop and flip) and teach it."""
    train(resolve(conf(canvases), "t.toml"), tmp_path / "teacher", echo=lambda m: None)
    c = conf(canvases, image_size=16)
    c["strategy"] = {"plugin": "distill", "teacher": str(tmp_path / "teacher")}
    c["loss"] = {"plugin": "kd", "temperature": 2.0, "alpha": 0.5}
    summary = train(resolve(c, "s.toml"), tmp_path / "student", echo=lambda m: None)
    test = summary["test"]
    assert test["agreement"] >= 0.6 and 0 < test["miou"] <= 1 and test["teacher_accuracy"] >= 0.6
    losses = [r["loss"] for r in read_metrics(tmp_path / "student") if r["split"] == "train"]
    assert losses[-1] < 0.7 * losses[0]  # the soft targets are learnt
