"""Issue 28, object detection: COCO, VOC and YOLO files read to the same boxes; boxes move with the augmentation; mAP
from pycocotools; an FCOS head from torchvision's parts on a timm trunk overfits a few images, predicts boxes in the
image's pixels and resumes exactly; a bad box exits 2 naming its file and line."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_same_weights, graft, weights, write_config
from graft import load_config, train
from graft.run import Run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from digits_canvas import build  # noqa: E402

NAMES = ["cat", "dog", "bird"]
#: (file, width, height, [(x0, y0, x1, y1, class, crowd)]): one image without boxes, one crowd box
IMAGES = [("a.png", 40, 30, [(2, 3, 20, 25, 0, False), (22, 1, 39, 12, 2, False)]),
          ("b.png", 50, 50, [(10, 10, 30, 45, 1, True)]),
          ("c.png", 32, 48, []),
          ("d.png", 36, 36, [(0, 0, 36, 36, 2, False), (5, 6, 9, 30, 0, False)])]


def write_all_formats(root: Path) -> dict[str, Path]:
    """The same images and boxes as COCO JSON, a VOC folder and a YOLO folder with data.yaml."""
    from PIL import Image

    rng = np.random.default_rng(0)
    coco = {"images": [], "annotations": [], "categories": [{"id": 7 + k, "name": n} for k, n in enumerate(NAMES)]}
    for folder in ("coco", "voc/JPEGImages", "voc/Annotations", "yolo/images/train", "yolo/labels/train"):
        (root / folder).mkdir(parents=True)
    for i, (name, w, h, boxes) in enumerate(IMAGES):
        pixels = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for folder in ("coco", "voc/JPEGImages", "yolo/images/train"):
            pixels.save(root / folder / name)
        coco["images"].append({"id": 100 + i, "file_name": name, "width": w, "height": h})
        objects, lines = [], []
        for x0, y0, x1, y1, c, crowd in boxes:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": 100 + i, "category_id": 7 + c,
                                        "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": int(crowd)})
            objects.append(f"<object><name>{NAMES[c]}</name><difficult>{int(crowd)}</difficult><part><name>hand"
                           f"</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></part>"
                           f"<bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
                           f"</bndbox></object>")
            if not crowd:  # YOLO has no crowd flag: the crowd box is left out of its files
                lines.append(f"{c} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} "
                             f"{(y1 - y0) / h:.6f}")
        (root / "voc/Annotations" / f"{Path(name).stem}.xml").write_text(
            f"<annotation><filename>{name}</filename><size><width>{w}</width><height>{h}</height><depth>3</depth>"
            f"</size>\n" + "\n".join(objects) + "\n</annotation>\n")
        if lines:
            (root / "yolo/labels/train" / f"{Path(name).stem}.txt").write_text("\n".join(lines) + "\n")
    (root / "coco" / "instances.json").write_text(json.dumps(coco, indent=1))
    (root / "yolo" / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  0: cat\n  1: dog\n  2: bird\n")
    return {"coco": root / "coco" / "instances.json", "voc": root / "voc", "yolo": root / "yolo" / "data.yaml"}


def conf(train_path, backbone=None, **data):
    return {"backbone": backbone or {"plugin": "timm", "model": "test_resnet"},
            "strategy": {"plugin": "finetune", "head_hidden": 64},
            "data": {"plugin": "detection", "train": str(train_path), "image_size": 64, **data},
            "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "progress": False, "plot": False}}


def test_coco_voc_and_yolo_read_to_the_same_boxes(tmp_path):
    paths = write_all_formats(tmp_path)
    read = {}
    for fmt, path in paths.items():
        data = Run(load_config(conf(path, val_fraction=0.0, test_fraction=0.0, class_names=NAMES
                                    if fmt == "voc" else []), where="c.toml")).data
        assert data.label_names == NAMES
        read[fmt] = {Path(x["path"]).name: x for x in data.items["train"]}
    for name, w, h, boxes in IMAGES:
        for fmt in ("coco", "voc", "yolo"):
            x = read[fmt][name]
            expect = [b for b in boxes if fmt != "yolo" or not b[5]]
            assert x["size"] == (h, w)
            assert np.allclose(x["boxes"], [b[:4] for b in expect], atol=1e-3) if expect else not x["boxes"]
            assert x["labels"] == [b[4] for b in expect]
            assert x["crowd"] == [b[5] for b in expect]
    # VOC without class_names: the names found, sorted
    assert Run(load_config(conf(paths["voc"]), where="c.toml")).data.label_names == sorted(NAMES)


def test_boxes_follow_flips_scaling_and_shifts(tmp_path):
    """A white block on black whose box is known: after each seeded augmentation the box still bounds the block."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    img = np.zeros((40, 60, 3), dtype=np.uint8)
    img[5:25, 34:50] = 255  # off-centre, so a flip that left the box behind would show
    Image.fromarray(img).save(tmp_path / "images" / "a.png")
    (tmp_path / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "images/a.png", "width": 60, "height": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [34, 5, 16, 20]}],
        "categories": [{"id": 1, "name": "block"}]}))
    data = Run(load_config(conf(tmp_path / "instances.json", val_fraction=0.0, test_fraction=0.0, augment=True),
                           where="c.toml")).data
    flips = scaled = 0
    plain = data.prepare(Image.fromarray(img), [[34, 5, 50, 25]], [0], [False])[1]["boxes"]
    # the letterbox: 60 x 40 -> 64 x 43
    assert torch.allclose(plain, torch.tensor([[34, 5, 50, 25]]) * torch.tensor([64 / 60, 43 / 40] * 2), atol=1e-4)
    for seed in range(24):
        x, target = data.prepare(Image.fromarray(img), [[34, 5, 50, 25]], [0], [False], seed=seed)
        bright = (x * data.transform.std + data.transform.mean).amax(0)
        block = bright > (bright.max() + bright.min()) / 2
        rows, cols = block.any(1).nonzero(), block.any(0).nonzero()
        if len(target["boxes"]) == 0:
            assert block.sum() < 4  # the block was moved out of the picture, and its box with it
            continue
        box = target["boxes"][0]
        seen = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)
        assert (box - seen).abs().max() <= 2.0, (seed, box, seen)
        flips += bool(box[0] < 24)  # unflipped, scale and shift keep x0 above 28
        scaled += bool(abs((box[2] - box[0]) - (plain[0, 2] - plain[0, 0])) > 1.5)
    assert flips and scaled  # the draws did flip and did rescale
    data.options.flip = False  # digits, text: their mirror image is something else
    assert all(data.prepare(Image.fromarray(img), [[34, 5, 50, 25]], [0], [False], seed=seed)[1]["boxes"][0, 0] > 24
               for seed in range(24))


def test_map_of_perfect_predictions_is_one_and_of_shuffled_ones_low():
    from graft.plugins.task_detection import coco_metrics

    rng = np.random.default_rng(0)
    images = []
    for _ in range(20):
        gt = []
        for _ in range(rng.integers(1, 4)):
            x, y = rng.uniform(0, 40, 2)
            w, h = rng.uniform(8, 24, 2)
            gt.append([x, y, x + w, y + h, int(rng.integers(3)), 0])
        images.append({"gt": gt, "dt": [[*g[:4], 0.9, g[4]] for g in gt]})
    perfect = coco_metrics(images, NAMES)
    assert perfect["map"] == pytest.approx(1.0) and perfect["map_50"] == pytest.approx(1.0)
    assert all(c["ap"] == pytest.approx(1.0) for c in perfect["per_class"].values())
    shuffled = [{"gt": im["gt"], "dt": images[(i + 7) % len(images)]["dt"]} for i, im in enumerate(images)]
    assert coco_metrics(shuffled, NAMES)["map"] < 0.2
    wrong_class = [{"gt": im["gt"], "dt": [[*d[:5], (d[5] + 1) % 3] for d in im["dt"]]} for im in images]
    assert coco_metrics(wrong_class, NAMES)["map"] < 0.2
    # a detection on a crowd box neither counts nor costs
    crowd = [{"gt": [g[:5] + [1] for g in im["gt"][:1]] + im["gt"][1:], "dt": im["dt"]} for im in images]
    assert coco_metrics(crowd, NAMES)["map"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def canvases(tmp_path_factory):
    return build(tmp_path_factory.mktemp("det") / "canvas", count=8, seed=0, size=64, digit_size=24)


def test_a_tiny_detector_overfits_eight_images_and_predicts_boxes(canvases, tmp_path):
    c = conf(canvases / "instances.json", val=str(canvases / "instances.json"), test_fraction=0.0)
    c["train"].update(epochs=1000, max_steps=120, batch_size=8, lr=3e-3, warmup_steps=10, eval_every=120)
    summary = train(load_config(c, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    val = summary["val"]
    assert summary["metric"] == "map" and val["map_50"] >= 0.8 and val["map"] >= 0.5, val
    assert set(val["per_class"]) == {str(d) for d in range(10)}
    out = graft("predict", tmp_path / "run", canvases / "images" / "00001.png", "--json", "--out-dir",
                tmp_path / "shown", check=True).stdout.splitlines()
    record = json.loads(out[0])
    truth = json.loads((canvases / "instances.json").read_text())["annotations"]
    truth = [a for a in truth if a["image_id"] == 2]
    assert record["boxes"] and Path(record["boxes_png"]).is_file()
    best = record["boxes"][0]
    ious = [_iou(best["box"], [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]])
            for a in truth]
    assert max(ious) >= 0.5, (best, truth)  # in the image's own pixels


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _edit_coco(path, box=None):
    data = json.loads(path.read_text())
    data["annotations"][2]["bbox"][0] = -10  # b.png's box, now 10 pixels left of the image
    if box:  # within a pixel of the edge, but wholly past it: clipping would turn it inside out
        data["annotations"][2]["bbox"] = box
    text = json.dumps(data, indent=1)
    path.write_text(text)
    lines = [n for n, line in enumerate(text.splitlines(), 1) if '"bbox"' in line]
    return f"instances.json, line {lines[2]} (annotation id 3)"


@pytest.mark.parametrize("fmt, fix, where", [
    ("yolo", lambda root: (root / "yolo/labels/train/a.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0 0.3\n"),
     "labels/train/a.txt, line 2"),
    ("yolo", lambda root: (root / "yolo/labels/train/a.txt").write_text("7 0.5 0.5 0.2 0.2\n"),
     "labels/train/a.txt, line 1"),
    ("voc", lambda root: (root / "voc/Annotations/b.xml").write_text(
        "<annotation><filename>b.png</filename>\n<object><name>dog</name>\n<bndbox><xmin>10</xmin><ymin>10</ymin>"
        "<xmax>90</xmax><ymax>20</ymax></bndbox></object></annotation>"), "Annotations/b.xml, line 2"),
    ("coco", lambda root: _edit_coco(root / "coco/instances.json"), None),
    ("coco", lambda root: _edit_coco(root / "coco/instances.json", [50.2, 5, 0.7, 5]), "lies outside the 50x50"),
])
def test_a_bad_box_exits_2_naming_its_file_and_line(tmp_path, fmt, fix, where):
    paths = write_all_formats(tmp_path)
    where = fix(tmp_path) if where is None else (fix(tmp_path), where)[1]
    proc = graft("train", write_config(tmp_path / "c.toml", conf(paths[fmt], class_names=NAMES)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert where in proc.stderr, proc.stderr


def test_resume_mid_epoch_reproduces_an_uninterrupted_run(canvases, tmp_path):
    """Augmented training stopped after step 2 of an epoch's 3 and resumed ends where the uninterrupted run does."""
    import shutil

    c = conf(canvases / "instances.json", augment=True, val_fraction=0.25, test_fraction=0.0)
    c["train"].update(epochs=2, batch_size=2, checkpoint_every=1, keep_checkpoints=10)
    config = load_config(c, where="c.toml")
    train(config, tmp_path / "full", echo=lambda m: None)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for step in (tmp_path / "cut" / "checkpoints").glob("step-*"):
        if int(step.name.split("-")[1]) > 2:
            shutil.rmtree(step)
    (tmp_path / "cut" / "checkpoints" / "latest").write_text("step-00000002")
    (tmp_path / "cut" / "last.safetensors").unlink()
    train(config, tmp_path / "cut", resume=True, echo=lambda m: None)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))


def test_two_processes_train_like_one_with_twice_the_batch(canvases, tmp_path):
    """DDP: the loss is divided by the matched locations of both processes, so 2 x batch 4 = 1 x batch 8 (a ViT
    trunk: no BatchNorm statistics that differ between the halves)."""
    vit = {"plugin": "timm", "model": "vit_tiny_patch16_224",
           "model_kwargs": {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}
    c = conf(canvases / "instances.json", backbone=vit, val_fraction=0.25, test_fraction=0.0)
    # SGD, not Adam: Adam's update of a weight whose gradient is near zero is about lr * sign(g), so float noise in
    # such gradients (the reduction order of 2 x 2 vs 4 examples) moved weights by lr (1e-3) on an Intel Xeon VM
    c["train"].update(epochs=2, batch_size=4, optimizer="sgd", lr=0.05)
    cfg = write_config(tmp_path / "c.toml", c)
    two = graft("train", cfg, "--nproc", "2", "--out", tmp_path / "two", "--set", "train.batch_size=2")
    assert two.returncode == 0, two.stderr
    graft("train", cfg, "--out", tmp_path / "one", "--set", "train.batch_size=4", check=True)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-5)


def test_onnx_export_gives_the_same_boxes_as_pytorch(canvases, tmp_path):
    """The exported network outputs the raw per-location tensor; `graft predict` decodes and runs NMS after either
    runtime, so the boxes of the ONNX export and of the run agree."""
    c = conf(canvases / "instances.json", val_fraction=0.25, test_fraction=0.0)
    c["train"].update(max_steps=6, batch_size=2)
    train(load_config(c, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    shown = graft("eval", tmp_path / "run", "--split", "val", check=True).stdout  # per class: detection's columns
    assert "AP_50" in shown and "BOXES" in shown
    graft("export", tmp_path / "run", "--format", "onnx", "--out", tmp_path / "onnx", check=True)
    info = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert info["outputs"] == ["detections"] and info["max_abs_difference"] < 1e-3
    images = [canvases / "images" / f"0000{i}.png" for i in range(3)]
    runs = [[json.loads(line) for line in graft("predict", tmp_path / where, *images, "--json", "--out-dir",
                                                tmp_path / "shown", check=True).stdout.splitlines()]
            for where in ("run", "onnx")]
    for a, b in zip(*runs):
        assert len(a["boxes"]) == len(b["boxes"])
        for x, y in zip(a["boxes"], b["boxes"]):
            assert x["label"] == y["label"] and abs(x["score"] - y["score"]) < 1e-3
            assert np.allclose(x["box"], y["box"], atol=0.2)


def test_feature_distillation_from_a_detection_teacher(canvases, tmp_path):
    """distill teaches the teacher run's FPN levels (standardised per channel: PKD) to a student with another head
    width (1x1 projections) at another input size (the teacher's maps resized), beside the student's own fcos loss."""
    from conftest import read_metrics

    teacher = conf(canvases / "instances.json", val_fraction=0.25, test_fraction=0.0)
    teacher["train"].update(max_steps=4, batch_size=2)
    train(load_config(teacher, where="t.toml"), tmp_path / "teacher", echo=lambda m: None)
    student = conf(canvases / "instances.json", val_fraction=0.25, test_fraction=0.0, image_size=32, augment=True)
    student["strategy"] = {"plugin": "distill", "teacher": str(tmp_path / "teacher"), "head_hidden": 96,
                           "feature_weight": 2.0}
    student["train"].update(max_steps=12, batch_size=2, log_every=1)
    summary = train(load_config(student, where="s.toml"), tmp_path / "student", echo=lambda m: None)
    assert summary["metric"] == "map" and "map_50" in summary["val"]
    records = [r for r in read_metrics(tmp_path / "student") if r["split"] == "train"]
    assert all("feature_loss" in r and "task_loss" in r for r in records)
    first, last = np.mean([r["feature_loss"] for r in records[:3]]), np.mean([r["feature_loss"] for r in records[-3:]])
    assert last < 0.9 * first, (first, last)


def test_trunk_options_hf_maps_lora_and_gradual_unfreezing(canvases, tmp_path):
    """The usual trunk options apply to a detector: an hf ConvNeXt's stage maps feed the FPN; LoRA on a timm trunk
    trains only the adapter, the FPN and the head; gradual unfreezing opens the trunk group by group."""
    hf = conf(canvases / "instances.json", backbone={"plugin": "hf", "config": {
        "model_type": "convnext", "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}})
    run = Run(load_config(hf, where="c.toml"))
    batch = run.data.collate([run.data.dataset("train")[i] for i in range(2)])
    assert run.model(batch["inputs"]).shape[-1] == 10 + 9  # ten digit classes, then the box parts

    lora = conf(canvases / "instances.json", val_fraction=0.25, test_fraction=0.0)
    lora["adapter"] = {"plugin": "lora"}
    lora["train"].update(max_steps=3, batch_size=2)
    summary = train(load_config(lora, where="c.toml"), tmp_path / "lora", echo=lambda m: None)
    assert 0 < summary["parameters"]["trainable"] < summary["parameters"]["total"]
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").is_file()
    run = Run(load_config(lora, where="c.toml"))
    trunk = [n for n, p in run.model.named_parameters() if p.requires_grad and n.startswith("backbone.")]
    assert trunk and all("lora_" in n for n in trunk), trunk

    gradual = conf(canvases / "instances.json", val_fraction=0.25, test_fraction=0.0)
    gradual["strategy"]["unfreeze_every"] = 1
    run = Run(load_config(gradual, where="c.toml"))
    opened = []
    for epoch in range(3):
        run.strategy.on_epoch_start(epoch, run.model)
        opened.append(sum(p.requires_grad for n, p in run.model.named_parameters() if n.startswith("backbone.")))
    assert opened[0] == 0 < opened[1] < opened[2]


def test_default_losses_and_an_image_size_off_the_grid(tmp_path):
    """Without [loss]: finetune and distill on detection data train with fcos; distill on classes keeps kd. An input
    side that is no multiple of the coarsest map's stride exits 2 naming the sizes that fit."""
    from graft import GraftError

    paths = write_all_formats(tmp_path)
    assert load_config(conf(paths["coco"]), where="c.toml").plugins["loss"].name == "fcos"
    distill = conf(paths["coco"])
    distill["strategy"] = {"plugin": "distill", "teacher": str(tmp_path)}
    assert load_config(distill, where="c.toml").plugins["loss"].name == "fcos"
    digits = {"backbone": {"plugin": "timm", "model": "test_resnet"}, "data": {"plugin": "digits"},
              "strategy": {"plugin": "distill", "teacher": str(tmp_path)}}
    assert load_config(digits, where="c.toml").plugins["loss"].name == "kd"
    with pytest.raises(GraftError, match=r"image_size = 80: detection needs a multiple of 32.*use 64 or 96"):
        Run(load_config(conf(paths["coco"], image_size=80), where="c.toml"))


@pytest.mark.parametrize("sig", ["SIGKILL", pytest.param("SIGINT", marks=pytest.mark.slow)])
def test_a_run_cut_by_a_signal_and_resumed_ends_like_an_uninterrupted_one(canvases, tmp_path, sig):
    """The detection source and task through the loop's stop paths: SIGINT (checkpoint at the next step, exit 0)
    and SIGKILL (nothing saved after the last checkpoint), each then --resume: the weights and the records of the
    uninterrupted run."""
    import signal

    from conftest import read_metrics, start_train, wait_for_lines

    c = conf(canvases / "instances.json", augment=True, val_fraction=0.25, test_fraction=0.0)
    c["train"].update(epochs=12, batch_size=2, log_every=1, checkpoint_every=2)
    cfg = write_config(tmp_path / "c.toml", c)
    # every run in a one-thread process: the thread count changes float sums, which a detector's training amplifies
    start_train(cfg, tmp_path / "full").communicate(timeout=300)
    proc = start_train(cfg, tmp_path / "cut")
    wait_for_lines(tmp_path / "cut", 7, proc)
    proc.send_signal(getattr(signal, sig))
    proc.communicate(timeout=60)
    assert proc.returncode == (0 if sig == "SIGINT" else -signal.SIGKILL)
    assert len([r for r in read_metrics(tmp_path / "cut") if r["split"] == "train"]) < 36  # cut before the end
    resumed = start_train(cfg, tmp_path / "cut", "--resume", tmp_path / "cut")
    assert resumed.communicate(timeout=300) and resumed.returncode == 0
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [(r["step"], r["split"]) for r in cut] == [(r["step"], r["split"]) for r in full]
    assert [r["loss"] for r in cut] == pytest.approx([r["loss"] for r in full], rel=1e-5)
