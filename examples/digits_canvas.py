"""Build a real-image segmentation and detection set from scikit-learn's digits: 2-4 digits placed on a 64x64 canvas
per image, the mask from the digit pixels (class = digit + 1, background 0) and a box per digit (the bounding box of
its ink; a later digit may cover part of an earlier one), seeded. Writes OUT/images/*.png, OUT/masks/*.png and
OUT/instances.json (COCO boxes, categories "0" to "9").

Usage: python examples/digits_canvas.py [--out ~/.cache/graftkit/digits-canvas] [--count 1000] [--seed 0]
"""

import argparse
import json
from pathlib import Path

import numpy as np


def build(out: Path, count: int = 1000, seed: int = 0, size: int = 64, digit_size: int = 20) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": d + 1, "name": str(d)} for d in range(10)]}
    for n in range(count):
        canvas = np.zeros((size, size), dtype=np.float32)
        mask = np.zeros((size, size), dtype=np.uint8)
        for _ in range(rng.integers(2, 5)):
            i = rng.integers(len(digits.images))
            d = np.asarray(Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8)).resize(
                (digit_size, digit_size), Image.BILINEAR), dtype=np.float32) / 255.0
            top, left = rng.integers(0, size - digit_size, size=2)
            region = canvas[top:top + digit_size, left:left + digit_size]
            ink = d > 0.35  # the digit's pixels; a later digit covers an earlier one
            region[ink] = d[ink]
            mask[top:top + digit_size, left:left + digit_size][ink] = digits.target[i] + 1
            rows, cols = np.nonzero(ink)
            if len(rows):
                x, y = int(left + cols.min()), int(top + rows.min())
                w, h = int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": n + 1,
                                            "category_id": int(digits.target[i]) + 1, "bbox": [x, y, w, h],
                                            "area": w * h, "iscrowd": 0})
        image = (255 * (1 - canvas)).astype(np.uint8)  # dark ink on light paper, as the digits are drawn
        Image.fromarray(image).convert("RGB").save(out / "images" / f"{n:05d}.png")
        Image.fromarray(mask, mode="L").save(out / "masks" / f"{n:05d}.png")
        coco["images"].append({"id": n + 1, "file_name": f"images/{n:05d}.png", "width": size, "height": size})
    (out / "instances.json").write_text(json.dumps(coco))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path.home() / ".cache" / "graftkit" / "digits-canvas"))
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(build(Path(a.out).expanduser(), a.count, a.seed))
