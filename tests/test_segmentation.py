"""Issue 20, semantic segmentation: images/ + masks/ folders, the same augmentation for image and mask, an FPN-style
head over timm feature maps, mIoU and pixel accuracy, masks from `graft predict`; bad masks exit 2."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import graft, read_metrics, write_config
from graft import GraftError
from graft import load_config
from graft import train
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
    r = Run(load_config(conf(root, val_fraction=0.0, test_fraction=0.0, augment=True, class_names=["bg", "block"]),
                        where="c.toml"))
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
    """`graft predict` writes each mask at its image's own size (issue 25, item 6: the old code wrote the 48x40 image's
    mask at the model's 32x32)."""
    import json

    from PIL import Image

    summary = train(load_config(conf(canvases, augment=True), where="c.toml"), tmp_path / "run", echo=lambda m: None)
    test = summary["test"]
    assert summary["metric"] == "miou" and 0 < test["miou"] <= 1 and test["pixel_accuracy"] >= 0.6
    assert len(test["confusion_matrix"]) == len(CLASSES)
    Image.open(canvases / "images" / "00003.png").resize((48, 40), Image.BILINEAR).save(tmp_path / "wide.png")
    out = graft("predict", tmp_path / "run", canvases / "images" / "00003.png", tmp_path / "wide.png", "--mask-dir",
                tmp_path / "masks", check=True).stdout.splitlines()
    mask = np.asarray(Image.open(tmp_path / "masks" / "00003.mask.png"))
    assert out[0].split("\t")[0] == str(tmp_path / "masks" / "00003.mask.png")
    assert mask.shape == (32, 32) and mask.max() < len(CLASSES)
    wide = np.asarray(Image.open(tmp_path / "masks" / "wide.mask.png"))
    assert wide.shape == (40, 48) and wide.max() < len(CLASSES)
    pixels = json.loads(out[1].split("\t")[1])  # the counts are the written mask's
    assert sum(pixels.values()) == 40 * 48
    assert pixels == {CLASSES[c]: int((wide == c).sum()) for c in np.unique(wide)}


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
        r = Run(load_config(c, where="c.toml"))
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
        Run(load_config(c, registry=registry_with(Pooled, "backbone", "pooled"), where="c.toml"))


def test_per_pixel_distillation_from_a_teacher_at_another_size(canvases, tmp_path):
    """The student segments at 16 px what the teacher segmented at 32 px: the teacher's logits are resized onto the
    student's pixels (both saw the same crop and flip) and teach it."""
    train(load_config(conf(canvases), where="t.toml"), tmp_path / "teacher", echo=lambda m: None)
    c = conf(canvases, image_size=16)
    c["strategy"] = {"plugin": "distill", "teacher": str(tmp_path / "teacher")}
    c["loss"] = {"plugin": "kd", "temperature": 2.0, "alpha": 0.5}
    summary = train(load_config(c, where="s.toml"), tmp_path / "student", echo=lambda m: None)
    test = summary["test"]
    assert test["agreement"] >= 0.6 and 0 < test["miou"] <= 1 and test["teacher_accuracy"] >= 0.6
    losses = [r["loss"] for r in read_metrics(tmp_path / "student") if r["split"] == "train"]
    assert losses[-1] < 0.7 * losses[0]  # the soft targets are learnt


def pairs_folder(root, count=10, size=32):
    """A fresh copy of canvases to break (the module's set stays whole)."""
    return build(root, count=count, seed=1, size=size, digit_size=12)


def split_of(root, split, **data):
    """The mask files that setup puts in ``split`` (the split depends only on the count and the seed)."""
    return [m for _, m in Run(load_config(conf(root, **data), where="c.toml")).data.items[split]]


def test_a_test_mask_of_another_size_is_found_at_setup(tmp_path):
    """Issue 25, item 6a (Pytorch-UNet#311): one test mask 30x32 for its 32x32 image. The old code found it only
    when the final evaluation read it, after the whole training: `graft train` exited 2 ("masks/00002.png is 30x32
    pixels, its image ... 32x32: they must match") with checkpoints but no summary.json or exports. Now setup
    refuses it, naming both files."""
    from PIL import Image

    root = pairs_folder(tmp_path / "d")
    mask = split_of(root, "test")[0]
    Image.fromarray(np.zeros((32, 30), np.uint8), mode="L").save(mask)
    with pytest.raises(GraftError, match=rf"1 of the 10 image/mask pairs .* {mask} is 30x32 pixels, its image "
                                         rf".*{mask.stem}.png 32x32: they must match"):
        Run(load_config(conf(root), where="c.toml"))


def test_every_pair_is_checked_at_setup_in_every_split(tmp_path):
    """The kind of 6a: a size mismatch in the train, val and test splits, an image cut short, a mask that is no
    PNG -- all listed by one setup check, each by name. Old code: a macOS ._ copy stopped setup as an image without
    a mask; without it, the mismatches and the cut image stopped the run only when an epoch or the final evaluation
    read them. A JPEG stored sideways (EXIF orientation 6) is compared at the size it is shown."""
    from PIL import Image

    root = pairs_folder(tmp_path / "d", count=12)
    data = {"val_fraction": 0.25, "test_fraction": 0.25}
    splits = {s: split_of(root, s, **data) for s in ("train", "val", "test")}
    broken = [splits["train"][0], splits["val"][0], splits["test"][0]]
    for m in broken:
        Image.fromarray(np.zeros((32, 31), np.uint8), mode="L").save(m)
    cut = root / "images" / f"{splits['train'][1].stem}.png"
    cut.write_bytes(cut.read_bytes()[:200])
    splits["val"][1].write_text("not a png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by a quarter: 40x32 stored, 32x40 shown
    jpeg = root / "images" / f"{splits['test'][1].stem}.png"
    Image.new("RGB", (40, 32), "white").save(jpeg.with_suffix(".jpg"), exif=exif)
    jpeg.unlink()
    Image.fromarray(np.zeros((40, 32), np.uint8), mode="L").save(splits["test"][1])
    (root / "images" / "._00000.png").write_bytes(b"\0\5\x16\7")
    with pytest.raises(GraftError) as e:
        Run(load_config(conf(root, **data), where="c.toml"))
    message = str(e.value)
    assert "5 of the 12 image/mask pairs" in message
    assert all(f"{m} is 31x32 pixels" in message for m in broken)
    assert f"{cut} cannot be read as an image" in message and f"{splits['val'][1]} cannot be read as a mask" in message
    assert "._00000" not in message and str(splits["test"][1]) not in message


def test_masks_without_a_labelled_pixel_are_found_at_setup(tmp_path):
    """Issue 25, item 6b (deeplab#20): every mask all 255 and no class_names. Old code: `ValueError: max() arg is
    an empty sequence` (exit 1). The kind: with class_names the old run trained on nothing and ended in
    `ZeroDivisionError` (exit 1); a split whose masks are all 255 has nothing to score; a single such mask is
    allowed, with a warning and its name in data.json."""
    from PIL import Image

    from graft import GraftWarning

    root = pairs_folder(tmp_path / "d")
    masks = sorted((root / "masks").iterdir())
    val = split_of(root, "val", val_fraction=0.2)
    blank = np.full((32, 32), 255, np.uint8)
    Image.fromarray(blank, mode="L").save(masks[0])
    with pytest.warns(GraftWarning, match=f"1 mask without a labelled pixel .*{masks[0]}"):
        r = Run(load_config(conf(root, val_fraction=0.2), where="c.toml"))
    assert r.data.report() == {"masks_without_labels": [str(masks[0])]}
    for m in val:
        Image.fromarray(blank, mode="L").save(m)
    with pytest.raises(GraftError, match=f"no mask of the val split has a labelled pixel .*{val[0]}"):
        Run(load_config(conf(root, val_fraction=0.2), where="c.toml"))
    for m in masks:
        Image.fromarray(blank, mode="L").save(m)
    c = conf(root)
    del c["data"]["class_names"]
    with pytest.raises(GraftError, match=f"no mask under .* has a labelled pixel: every pixel of {masks[0]}"):
        Run(load_config(c, where="c.toml"))
    with pytest.raises(GraftError, match="no mask of the train split has a labelled pixel"):
        Run(load_config(conf(root), where="c.toml"))
