"""The ``detection`` data source: boxes from COCO JSON, Pascal VOC XML or YOLO txt files (task ``detection``).

Every box is checked at setup (a number where one belongs, positive size, inside its image, a known class); a bad
one fails the run naming its file and line. Images without boxes are legal negatives. COCO's ``iscrowd`` and VOC's
``difficult`` boxes are kept as *crowd* boxes: evaluation ignores detections on them (pycocotools' crowd rule) and
training takes them as no targets (their locations count as background). Boxes are ``[x0, y0, x1, y1]`` in pixels
with (0, 0) the image's top-left corner: COCO's ``[x, y, w, h]`` converted, VOC's 1-based pixel indices shifted by
one at the top-left (as Detectron2 reads them), YOLO's normalised ``cx cy w h`` scaled by the image's size.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from graft import UNLABELLED, DataSource, GraftError, hookimpl, option
from graft.data import (IMAGE_SUFFIXES, SplitOptions, check_image_size, image_problem, image_transform,
                        keep_fraction, letterbox_size, map_threads, open_image, shown_size, stratified_split)

#: pixels a box may pass its image's edge by (annotation tools round outwards); such boxes are clipped
EDGE_TOLERANCE = 1.0
WHERE = "[data] plugin = \"detection\""


@dataclass
class DetectionOptions(SplitOptions):
    train: str = option("", "The training boxes: a COCO JSON file (instances_train.json); a Pascal VOC folder "
                            "(Annotations/ and JPEGImages/, or XML files beside their images) or an ImageSets/Main "
                            "id list in one; YOLO: a data.yaml, or an images/ folder with labels/ beside it.",
                        path=True)
    val: str = option("", "Validation boxes, in the same format; empty: val_fraction of train (a data.yaml's own "
                          "val split when train is one).", path=True)
    test: str = option("", "Test boxes, in the same format; empty: test_fraction of train (a data.yaml's test).",
                       path=True)
    format: Literal["auto", "coco", "voc", "yolo"] = option(
        "auto", "auto: a .json file is COCO, a .yaml file or a folder with labels/ YOLO, a folder of .xml files VOC.")
    images: str = option("", "COCO: the folder the JSON's file_name entries are relative to; empty: the JSON's own "
                             "folder, else its images/ sub-folder.", path=True)
    class_names: list[str] = field(default_factory=list, metadata={
        "help": "Class names in label order. COCO: the categories' names (by id) unless given; YOLO: data.yaml's "
                "names, needed here without one; VOC: the names in the XML files, sorted, unless given."})
    image_size: int = option(0, "Side of the square input: an image is scaled until its longer side fits and padded "
                                "at the right and bottom, its boxes scaled with it; 0 = the backbone's size.")
    augment: bool = option(False, "Training images get photometric distortion, scale jitter (0.75-1.25x) with "
                                  "shifts of up to 10%, and horizontal flips, the boxes moved with them "
                                  "(torchvision transforms.v2), seeded per example and epoch.")
    flip: bool = option(True, "With augment: horizontal flips too (turn off for digits, text, or anything whose "
                              "mirror image is something else).")

    def validate(self):
        super().validate()
        if not self.train:
            raise ValueError("train is required: a COCO JSON file, a VOC folder, or a YOLO data.yaml or images "
                             "folder.")
        if self.unlabelled == "keep":
            raise ValueError("unlabelled = \"keep\" has no meaning for boxes; with train_fraction < 1 the other "
                             "training images are dropped.")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names has a name twice: {self.class_names}.")
        check_image_size(self.image_size)


class _Raw:
    """One image as read from its annotation file, before its boxes are checked: ``boxes`` hold (x0, y0, x1, y1,
    class, crowd, where); YOLO's are normalised until the image's size is known."""

    def __init__(self, path: Path, size=None, normalised=False, source=None):
        self.path, self.size, self.normalised, self.boxes, self.source = path, size, normalised, [], source


def _bad(where: str, message: str) -> GraftError:
    return GraftError(f"{WHERE}: {where}: {message}")


def _number(value, where: str, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise _bad(where, f"{what} is {value!r}, not a number.") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise _bad(where, f"{what} is {value!r}, not a finite number.")
    return x


# -- COCO ---------------------------------------------------------------------------------------------------------
def read_coco(path: Path, images: str, class_names: list[str]) -> tuple[list[_Raw], list[str]]:
    """A COCO ``instances_*.json``: its images (negatives included) and their boxes; class names from the categories
    sorted by id (or ``class_names``, which must hold every category's name)."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except OSError as e:
        raise GraftError(f"{WHERE}: cannot read {path}: {e.strerror or e}.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        line = f" (line {e.lineno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise GraftError(f"{WHERE}: {path} is not a UTF-8 JSON file{line}. A COCO file has images, annotations "
                         f"and categories.") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or \
            not isinstance(data.get("categories"), list):
        raise GraftError(f"{WHERE}: {path} is not a COCO detection file: it needs the lists images, annotations "
                         f"and categories.")
    cats = sorted(data["categories"], key=lambda c: c.get("id", 0))
    names = [str(c.get("name", c.get("id"))) for c in cats]
    order = class_names or names
    missing = [n for n in names if n not in order]
    if missing:
        raise GraftError(f"{WHERE}: {path} has the categories {missing}, which class_names {class_names} lacks.")
    label = {c.get("id"): order.index(n) for c, n in zip(cats, names)}
    root = Path(images) if images else path.parent
    if not images and data["images"] and not (root / str(data["images"][0].get("file_name", ""))).exists() and \
            (path.parent / "images").is_dir():
        root = path.parent / "images"
    raws, by_id = [], {}
    for im in data["images"]:
        raw = _Raw(root / str(im.get("file_name", "")),
                   (im["height"], im["width"]) if "height" in im and "width" in im else None, source=path)
        by_id[im.get("id")] = raw
        raws.append(raw)
    lines = [text.count("\n", 0, m.start()) + 1 for m in re.finditer(r'"bbox"\s*:', text)]
    anns = data.get("annotations") or []
    for k, ann in enumerate(anns):
        where = f"{path}, line {lines[k]}" if len(lines) == len(anns) else f"{path}, annotation {k}"
        where += f" (annotation id {ann.get('id')})"
        raw = by_id.get(ann.get("image_id"))
        if raw is None:
            raise _bad(where, f"image_id {ann.get('image_id')!r} is no image of the file.")
        if ann.get("category_id") not in label:
            raise _bad(where, f"category_id {ann.get('category_id')!r} is no category of the file (ids "
                              f"{sorted(label)[:10]}).")
        box = ann.get("bbox")
        if not isinstance(box, list) or len(box) != 4:
            raise _bad(where, f"bbox is {box!r}; a COCO box is [x, y, width, height] in pixels.")
        x, y, w, h = (_number(v, where, "a bbox value") for v in box)
        raw.boxes.append((x, y, x + w, y + h, label[ann["category_id"]], bool(ann.get("iscrowd", 0)), where))
    return raws, order


# -- Pascal VOC ---------------------------------------------------------------------------------------------------
def _voc_xml(path: Path) -> dict:
    """filename, size and objects (with the line of each) of one VOC annotation; a part's box is not an object's."""
    import xml.parsers.expat

    parser = xml.parsers.expat.ParserCreate()
    stack, texts, info, objects = [], [], {}, []

    def start(name, _attrs):
        stack.append(name)
        texts.append([])
        if stack[-2:] == ["annotation", "object"]:
            objects.append({"line": parser.CurrentLineNumber})

    def end(name):
        value = "".join(texts.pop()).strip()
        if stack[-2:] == ["annotation", "filename"]:
            info["filename"] = value
        elif stack[-3:-1] == ["annotation", "size"]:
            info[name] = value
        elif stack[-3:-1] == ["annotation", "object"] and name in ("name", "difficult"):
            objects[-1][name] = value
        elif stack[-4:-1] == ["annotation", "object", "bndbox"]:
            objects[-1][name] = value
        stack.pop()

    parser.StartElementHandler, parser.EndElementHandler = start, end
    parser.CharacterDataHandler = lambda data: texts[-1].append(data) if texts else None
    try:
        parser.Parse(path.read_bytes(), True)
    except OSError as e:
        raise GraftError(f"{WHERE}: cannot read {path}: {e.strerror or e}.") from None
    except xml.parsers.expat.ExpatError as e:
        why = xml.parsers.expat.errors.messages[e.code]
        raise GraftError(f"{WHERE}: {path}, line {e.lineno}: not well-formed XML ({why}).") from None
    info["objects"] = objects
    return info


def read_voc(path: Path) -> list[_Raw]:
    """A VOC folder (Annotations/ + JPEGImages/, or XML files beside their images), or an ImageSets/Main list of ids
    inside one. Class names are read as written; the caller maps them to labels."""
    if path.is_file():
        root = path.parents[2]
        ids = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        xmls = [root / "Annotations" / f"{i}.xml" for i in ids]
    else:
        root = path
        folder = path / "Annotations" if (path / "Annotations").is_dir() else path
        xmls = sorted(f for f in folder.glob("*.xml") if not f.name.startswith("."))
    if not xmls:
        raise GraftError(f"{WHERE}: no VOC .xml files in {path}.")
    image_dir = root / "JPEGImages"
    raws = []
    for xml in xmls:
        if not xml.is_file():
            raise GraftError(f"{WHERE}: {path} lists {xml.stem}, but {xml} does not exist.")
        info = _voc_xml(xml)
        name = info.get("filename") or xml.stem + ".jpg"
        image = next((d / name for d in (image_dir, xml.parent) if (d / name).is_file()), None)
        if image is None:  # a filename without its suffix, or with another one
            image = next((f for d in (image_dir, xml.parent) if d.is_dir() for f in sorted(d.glob(xml.stem + ".*"))
                          if f.suffix.lower() in IMAGE_SUFFIXES), image_dir / name)
        size = None
        if info.get("width") and info.get("height"):
            size = (int(_number(info["height"], str(xml), "size/height")),
                    int(_number(info["width"], str(xml), "size/width")))
            size = size if min(size) > 0 else None  # some tools write 0 when they did not know
        raw = _Raw(image, size, source=xml)
        for obj in info["objects"]:
            where = f"{xml}, line {obj['line']}"
            if not all(k in obj for k in ("xmin", "ymin", "xmax", "ymax")):
                raise _bad(where, "the object has no complete bndbox (xmin, ymin, xmax, ymax).")
            where += f" (xmin {obj['xmin']}, ymin {obj['ymin']}, xmax {obj['xmax']}, ymax {obj['ymax']})"
            x0, y0, x1, y1 = (_number(obj[k], where, k) for k in ("xmin", "ymin", "xmax", "ymax"))
            crowd = obj.get("difficult", "0") not in ("", "0")
            raw.boxes.append((x0 - 1.0, y0 - 1.0, x1, y1, obj.get("name", ""), crowd, where))
        raws.append(raw)
    return raws


# -- YOLO ---------------------------------------------------------------------------------------------------------
def read_yolo_yaml(path: Path) -> tuple[dict[str, Path | None], list[str]]:
    """A YOLO data.yaml: the image folders (or .txt lists) of train, val and test, and the class names."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise GraftError(f"{WHERE}: cannot read {path} as YAML ({e}).") from None
    if not isinstance(data, dict) or "names" not in data or "train" not in data:
        raise GraftError(f"{WHERE}: {path} is not a YOLO data.yaml: it needs train and names.")
    base = path.parent / str(data.get("path") or ".")
    names = data["names"]
    names = [str(names[k]) for k in sorted(names)] if isinstance(names, dict) else [str(n) for n in names]
    return {s: (base / str(data[s]) if data.get(s) else None) for s in ("train", "val", "test")}, names


def _label_file(image: Path) -> Path:
    """YOLO's convention: .../images/a.jpg -> .../labels/a.txt (the last images/ component), else a.txt beside it."""
    parts = list(image.parts)
    if "images" in parts:
        i = len(parts) - 1 - parts[::-1].index("images")
        return Path(*parts[:i], "labels", *parts[i + 1:]).with_suffix(".txt")
    return image.with_suffix(".txt")


def read_yolo(path: Path, classes: int) -> list[_Raw]:
    """YOLO images (a folder, or a .txt list of image paths) with one ``class cx cy w h`` line per box; an image
    without a label file is a negative."""
    if path.is_file():
        images = [(path.parent / line.strip()) for line in path.read_text(encoding="utf-8").splitlines()
                  if line.strip()]
    elif path.is_dir():
        images = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and
                        not f.name.startswith("."))
    else:
        raise GraftError(f"{WHERE}: {path} does not exist.")
    if not images:
        raise GraftError(f"{WHERE}: no images in {path}.")
    raws = []
    for image in images:
        txt = _label_file(image)
        raw = _Raw(image, normalised=True, source=path)
        if txt.is_file():
            for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                fields = line.split()
                if not fields:
                    continue
                where = f"{txt}, line {n}"
                if len(fields) != 5:
                    raise _bad(where, f"{len(fields)} values; a YOLO box is 5: class cx cy w h (normalised to 0-1; "
                                      f"polygons are for segmentation).")
                if not re.fullmatch(r"\d+", fields[0]) or int(fields[0]) >= classes:
                    raise _bad(where, f"class {fields[0]!r} is not one of 0..{classes - 1} ({classes} names).")
                cx, cy, w, h = (_number(v, where, "a box value") for v in fields[1:])
                raw.boxes.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, int(fields[0]), False, where))
        raws.append(raw)
    return raws


def _format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix.lower() == ".json":
        return "coco"
    if path.suffix.lower() in (".yaml", ".yml") or (path.is_dir() and (path.parent / "labels").is_dir()) or \
            (path.is_dir() and (path / "labels").is_dir()):
        return "yolo"
    if path.suffix.lower() == ".txt":  # YOLO's list of image paths, or VOC's ImageSets/Main list of ids
        first = next((line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                      if line.strip()), "")
        return "yolo" if Path(first).suffix.lower() in IMAGE_SUFFIXES else "voc"
    if path.is_dir() and ((path / "Annotations").is_dir() or any(path.glob("*.xml"))):
        return "voc"
    raise GraftError(f"{WHERE}: cannot tell the format of {path}; set format = \"coco\", \"voc\" or \"yolo\".")


def _image_facts(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """(problem, (height, width) as shown) of an image file, from its header and a fast integrity check."""
    if not path.is_file():
        return "no such file", None
    why = image_problem(path)
    return (why, None) if why else (None, shown_size(path))


def checked(raws: list[_Raw], label_of) -> list[dict]:
    """Every image readable and every box usable: ``label_of(class)`` -> label index, or a message. Returns one
    ``{"path", "size", "boxes" [[x0, y0, x1, y1]], "labels", "crowd"}`` per image. Raises GraftError listing the first
    problems, each naming its file (and line)."""
    facts = map_threads(lambda r: _image_facts(r.path), raws)
    problems, items = [], []
    for raw, (why, size) in zip(raws, facts):
        if why:
            problems.append(f"image {raw.path} (named in {raw.source}): {why}" if raw.source else
                            f"image {raw.path}: {why}")
            continue
        if raw.size is not None and tuple(raw.size) != tuple(size):
            problems.append(f"image {raw.path} is {size[1]}x{size[0]} pixels (as shown, EXIF orientation applied), "
                            f"its annotation says {raw.size[1]}x{raw.size[0]}")
            continue
        h, w = size
        item = {"path": str(raw.path), "size": (h, w), "boxes": [], "labels": [], "crowd": []}
        for x0, y0, x1, y1, cls, crowd, where in raw.boxes:
            if raw.normalised:
                x0, y0, x1, y1 = x0 * w, y0 * h, x1 * w, y1 * h
            label = label_of(cls)
            why = (label if isinstance(label, str) else
                   "the box has no area (x1 <= x0 or y1 <= y0)" if x1 <= x0 or y1 <= y0 else
                   f"the box passes the {w}x{h} image's edge" if min(x0, y0) < -EDGE_TOLERANCE or
                   x1 > w + EDGE_TOLERANCE or y1 > h + EDGE_TOLERANCE else None)
            clipped = [max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)]
            if not why and (clipped[2] <= clipped[0] or clipped[3] <= clipped[1]):
                why = f"the box lies outside the {w}x{h} image"
            if why:
                problems.append(f"{where}: {why} (box x0 y0 x1 y1 = {x0:g} {y0:g} {x1:g} {y1:g} in pixels)")
                continue
            item["boxes"].append(clipped)
            item["labels"].append(label)
            item["crowd"].append(crowd)
        items.append(item)
    if problems:
        raise GraftError(f"{WHERE}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the images and "
                         f"boxes: {'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}. Fix the files or "
                         f"paths, or remove those entries (an image with no boxes is a legal negative).")
    return items


class Detection(DataSource):
    """Object detection: images with labelled boxes from COCO JSON, Pascal VOC XML or YOLO txt files."""

    Options = DetectionOptions
    view_options = ("image_size",)
    training_options = ("train_fraction", "augment", "flip")
    task = "detection"

    def setup(self, backbone, seed):
        o = self.options
        self.require(backbone, "image")
        train = Path(o.train)
        if not train.exists():
            raise GraftError(f"{WHERE}: train = {o.train!r} does not exist.")
        fmt = _format(train, o.format)
        paths = {"train": train, "val": Path(o.val) if o.val else None, "test": Path(o.test) if o.test else None}
        for split, p in paths.items():
            if p is not None and not p.exists():
                raise GraftError(f"{WHERE}: {split} = {str(p)!r} does not exist.")
        names = list(o.class_names)
        if fmt == "yolo" and train.suffix.lower() in (".yaml", ".yml"):
            from_yaml, yaml_names = read_yolo_yaml(train)
            paths = {s: paths[s] if s != "train" and paths[s] else from_yaml[s] for s in paths}
            names = names or yaml_names
        raws: dict[str, list[_Raw]] = {}
        for split, p in paths.items():
            if p is None:
                continue
            if fmt == "coco":
                raws[split], names = read_coco(p, o.images, names)
            elif fmt == "voc":
                raws[split] = read_voc(p)
            else:
                if not names:
                    raise GraftError(f"{WHERE}: YOLO labels are class numbers; give their names with class_names = "
                                     f"[...] or pass a data.yaml as train.")
                raws[split] = read_yolo(p, len(names))
        if fmt == "voc" and not names:
            names = sorted({b[4] for rs in raws.values() for r in rs for b in r.boxes})
        self.label_names = names
        if not names:
            raise GraftError(f"{WHERE}: {o.train} has no classes: no category, box or class name.")
        index = {n: i for i, n in enumerate(names)}

        def label_of(cls):
            if isinstance(cls, int):
                return cls
            return index[cls] if cls in index else f"class {cls!r} is not one of class_names {names}"

        items = {s: checked(r, label_of) for s, r in raws.items()}
        self._split(items, seed)
        self._preprocessing(backbone)

    def _split(self, items: dict[str, list[dict]], seed: int) -> None:
        """Splits not given as files: fractions of the training images (seeded)."""
        o = self.options
        train = items["train"]
        idx = stratified_split([0] * len(train), 0.0 if "val" in items else o.val_fraction,
                               0.0 if "test" in items else o.test_fraction, seed)
        self.items = {s: items[s] if s in items else [train[i] for i in idx[s]] for s in ("val", "test")}
        self.items["train"] = [train[i] for i in idx["train"]]
        if o.train_fraction < 1:
            kept = keep_fraction(list(range(len(self.items["train"]))), [0] * len(self.items["train"]),
                                 o.train_fraction, seed)
            self.items["train"] = [self.items["train"][i] for i in kept]
        if not self.items["train"]:
            raise GraftError(f"{WHERE}: no training images are left in {o.train} after the splits.")

    def report(self):
        items = getattr(self, "items", {})
        return {"images": {s: len(v) for s, v in items.items()},
                "boxes": {s: sum(len(x["labels"]) for x in v) for s, v in items.items()},
                "negatives": {s: sum(not x["labels"] for x in v) for s, v in items.items()}} if items else {}

    def _preprocessing(self, backbone):
        self.side = self.options.image_size or max(backbone.image_config()["size"])
        self.transform = image_transform(backbone, self.side)  # the letterbox is already side x side: no resize

    def dataset(self, split):
        items = getattr(self, "items", {}).get(split)
        return _Images(self, items, augment=split == "train" and self.options.augment) if items else None

    def prepare(self, image, boxes=None, labels=None, crowd=None, seed: int | None = None):
        """A PIL image and its boxes (``[N, 4]`` xyxy pixels) -> the input ``[C, S, S]`` (scaled until its longer side
        is S, padded at the right and bottom, normalised) and the target ``{"boxes" [N', 4], "labels" [N'],
        "crowd" [N']}`` at the input's pixels. ``seed``: the training augmentation, drawn from it (boxes that leave
        the image or shrink below a pixel are dropped)."""
        import numpy as np
        import torch
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        h, w = pixels.shape[-2:]
        n = 0 if boxes is None else len(boxes)
        sample = {"image": tv_tensors.Image(pixels),
                  "boxes": tv_tensors.BoundingBoxes(torch.as_tensor(boxes if n else [], dtype=torch.float32)
                                                    .reshape(n, 4), format="XYXY", canvas_size=(h, w)),
                  "labels": torch.as_tensor(labels if n else [], dtype=torch.long).reshape(n),
                  "crowd": torch.as_tensor(crowd if n else [], dtype=torch.bool).reshape(n)}
        s = self.side
        rh, rw = letterbox_size(h, w, s)
        sample = v2.Resize((rh, rw), antialias=True)(sample)
        sample = v2.Pad([0, 0, s - rw, s - rh])(sample)
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)  # the CPU's only: a GPU's generator (dropout) is not ours
                sample = _augmentation(self.options.flip)(sample)
        x = self.transform(sample["image"].as_subclass(torch.Tensor).float() / 255.0)
        return x, {"boxes": sample["boxes"].as_subclass(torch.Tensor).float(), "labels": sample["labels"],
                   "crowd": sample["crowd"]}

    def collate(self, examples):
        """Inputs ``[B, C, S, S]``; targets padded to the batch's most boxes M: ``boxes [B, M, 4]``, ``labels [B, M]``
        (UNLABELLED past an image's boxes), ``crowd [B, M]``."""
        import torch

        m = max(len(t["labels"]) for _, t in examples)
        b = len(examples)
        boxes, labels = torch.zeros(b, m, 4), torch.full((b, m), UNLABELLED, dtype=torch.long)
        crowd = torch.zeros(b, m, dtype=torch.bool)
        for i, (_, t) in enumerate(examples):
            k = len(t["labels"])
            boxes[i, :k], labels[i, :k], crowd[i, :k] = t["boxes"], t["labels"], t["crowd"]
        return {"inputs": torch.stack([x for x, _ in examples]),
                "targets": {"boxes": boxes, "labels": labels, "crowd": crowd}}

    def encode(self, backbone, items):
        """Image paths -> ``{"images": [B, C, S, S], "sizes": [B, 2]}``: the inputs and each image's own (height,
        width), where ``graft predict`` gives its boxes."""
        import torch

        self._preprocessing(backbone)
        images = [open_image(p) for p in items]
        return {"images": torch.stack([self.prepare(im)[0] for im in images]),
                "sizes": torch.tensor([(im.height, im.width) for im in images], dtype=torch.long)}


def _labels_and_crowd(sample):
    return sample["labels"], sample["crowd"]


def _augmentation(flip: bool):
    """The training augmentation (torchvision transforms.v2; the boxes move with the image)."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomPhotometricDistort(p=0.5),
        v2.RandomAffine(degrees=0.0, translate=(0.1, 0.1), scale=(0.75, 1.25)),
        v2.RandomHorizontalFlip(0.5 if flip else 0.0),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_labels_and_crowd),
    ])


class _Images:
    """The images of a split, read on access; with ``augment``, drawn from the source's ``example_seed`` (the same
    in any worker and after a resume)."""

    def __init__(self, source, items, augment):
        self.source, self.items, self.augment = source, items, augment

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        seed = self.source.example_seed(i) if self.augment else None
        return self.source.prepare(open_image(item["path"]), item["boxes"], item["labels"], item["crowd"], seed)


@hookimpl
def register_datasources(register):
    register(Detection, name="detection")
