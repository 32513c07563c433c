"""Tile the NEON tree-crown annotations shipped in PyPI `deepforest==2.1.0` into a detection set (COCO JSON).

deepforest's `data/` folder holds four aerial RGB images (10 cm pixels) with 951 tree crowns as Pascal VOC XML:
two large Yellowstone crops (2299 x 2472 and 1249 x 1035 pixels) and two 400 x 400 plots (OSBS, SOAP). This cuts
each image into whole `--tile` x `--tile` crops (a strip narrower than a tile at the right and bottom is left out);
a crown belongs to the crop holding its centre and is clipped to it, dropped when less than half of it is inside.
Held-out tiles are whole bands, not scattered neighbours: in each image the bottom `--test` share of the rows is the
test split and the band above it the validation split, so no held-out crown is half of a training one.

    pip install --no-deps deepforest==2.1.0     # the data only; the package is never imported
    python examples/tree_tiles.py [--out ~/.cache/graftkit/neon-trees] [--tile 200]

Writes OUT/images/*.png and OUT/train.json, OUT/val.json, OUT/test.json (category "Tree").
"""

import argparse
import importlib.util
import json
import xml.etree.ElementTree as ET
from pathlib import Path


def deepforest_data() -> Path:
    spec = importlib.util.find_spec("deepforest")
    if spec is None or spec.origin is None:
        raise SystemExit("deepforest is not installed: pip install --no-deps deepforest==2.1.0 (its data only).")
    return Path(spec.origin).parent / "data"


def crowns(xml: Path) -> tuple[str, list[list[float]]]:
    root = ET.parse(xml).getroot()
    boxes = []
    for obj in root.iter("object"):
        b = obj.find("bndbox")
        x0, y0, x1, y1 = (float(b.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x0 - 1, y0 - 1, x1, y1])  # VOC's 1-based pixel indices
    return root.find("filename").text, boxes


def starts(length: int, tile: int) -> list[int]:
    return list(range(0, length - tile + 1, tile))  # whole tiles only: no crown in two of them


def build(out: Path, tile: int = 200, val: float = 0.15, test: float = 0.25) -> Path:
    from PIL import Image

    data = deepforest_data()
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits = {s: {"images": [], "annotations": [], "categories": [{"id": 1, "name": "Tree"}]}
              for s in ("train", "val", "test")}
    for xml in sorted(data.glob("*.xml")):
        name, boxes = crowns(xml)
        image = Image.open(data / name).convert("RGB")
        w, h = image.size
        rows, cols = starts(h, tile), starts(w, tile)
        for r, top in enumerate(rows):
            share = (r + 1) / len(rows)
            split = "test" if share > 1 - test else "val" if share > 1 - test - val else "train"
            if len(rows) < 3:  # the 400 x 400 plots: 2 x 2 tiles, kept whole in one split each
                split = "test" if "SOAP" in name else "train"
            for left in cols:
                coco = splits[split]
                file_name = f"images/{xml.stem}_{top}_{left}.png"
                image.crop((left, top, left + tile, top + tile)).save(out / file_name)
                image_id = sum(len(s["images"]) for s in splits.values()) + 1
                coco["images"].append({"id": image_id, "file_name": file_name, "width": tile, "height": tile})
                for x0, y0, x1, y1 in boxes:
                    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                    if not (left <= cx < left + tile and top <= cy < top + tile):
                        continue
                    a = [max(x0, left) - left, max(y0, top) - top, min(x1, left + tile) - left,
                         min(y1, top + tile) - top]
                    if (a[2] - a[0]) * (a[3] - a[1]) < 0.5 * (x1 - x0) * (y1 - y0):
                        continue
                    coco["annotations"].append({
                        "id": sum(len(s["annotations"]) for s in splits.values()) + 1, "image_id": image_id,
                        "category_id": 1, "bbox": [a[0], a[1], a[2] - a[0], a[3] - a[1]], "iscrowd": 0})
    for split, coco in splits.items():
        (out / f"{split}.json").write_text(json.dumps(coco))
        print(f"{split}: {len(coco['images'])} tiles, {len(coco['annotations'])} crowns")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path.home() / ".cache" / "graftkit" / "neon-trees"))
    ap.add_argument("--tile", type=int, default=200)
    a = ap.parse_args()
    print(build(Path(a.out).expanduser(), a.tile))
