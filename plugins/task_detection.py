"""The ``detection`` task and the ``fcos`` loss: boxes from any backbone's feature maps.

The detector is FCOS (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019) assembled
from torchvision's own parts: ``torchvision.ops.FeaturePyramidNetwork`` with P6/P7 (``LastLevelP6P7``) on the
backbone's maps of stride 8, 16 and 32, ``torchvision.models.detection.fcos.FCOSHead`` (classification, box and
centerness towers), torchvision's ``AnchorGenerator``, and torchvision's FCOS target matching, losses (sigmoid focal
loss, GIoU, centerness BCE) and post-processing (score threshold, top-k, batched NMS). mAP is pycocotools'.

The network's output is one tensor ``[B, A, K + 9]`` over the A locations of all pyramid levels: K class logits,
the box regression (l, t, r, b, in units of the level's stride), the centerness logit, and the location's anchor box
(x0, y0, x1, y1, input pixels) -- everything decoding needs, so an export holds it too. Boxes come out before NMS;
``detections`` (below) decodes them and runs NMS, in PyTorch for ``graft predict`` whichever runtime ran the
network.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from graft import GraftError, Loss, Task, hookimpl, option
from graft.supervised import check_class_ids, map_layout

#: detections kept per image for mAP (COCO's maxDets) and the score they need
EVAL_SCORE, EVAL_DETECTIONS = 0.05, 100
#: the score a box needs to be shown by ``graft predict``
PREDICT_SCORE = 0.3


def detection_head(channels: list[int], strides: list[int], classes: int, width: int = 128, num_convs: int = 4):
    """FPN + FCOS head on maps of ``channels`` at ``strides`` (``map_layout``): the last map of
    each distinct stride of 8 or more, the coarsest three of those (P3-P5 on a ResNet), plus P6 and P7.
    ``head(maps, (H, W))``: maps ``[B, C_i, H_i, W_i]`` -> ``[B, A, classes + 9]`` (see the module's docstring).
    ``width``: the FPN's and towers' channels, a multiple of 32 (the towers' GroupNorm has 32 groups), 64 or more."""
    from collections import OrderedDict

    import torch
    from torch import nn
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    last = {s: i for i, s in enumerate(strides) if s >= 8} or {strides[-1]: len(strides) - 1}
    kept = sorted(last)[-3:]
    top = kept[-1]
    sizes = tuple((s,) for s in kept + [top * 2, top * 4])

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.maps = [last[s] for s in kept]
            self.fpn = FeaturePyramidNetwork([channels[i] for i in self.maps], width,
                                             extra_blocks=LastLevelP6P7(width, width))
            self.fcos = FCOSHead(width, 1, classes, num_convs=num_convs)
            self.anchor_generator = AnchorGenerator(sizes, ((1.0,),) * len(sizes))
            self._anchors = {}  # (input size, level sizes, device) -> [A, 4]: the same for every batch

        def anchors(self, size, features):
            key = (tuple(size), tuple(tuple(f.shape[-2:]) for f in features), features[0].device)
            if key not in self._anchors:
                blank = ImageList(torch.empty(1, 1, *key[0], device=key[2]), [key[0]])
                self._anchors[key] = self.anchor_generator(blank, [f[:1].float() for f in features])[0]
            return self._anchors[key]

        def forward(self, maps, size):
            features = list(self.fpn(OrderedDict((str(i), maps[i]) for i in self.maps)).values())
            self.features = features  # the FPN levels, for distillation (Task.feature_maps)
            out = self.fcos(features)
            anchors = self.anchors(size, features)
            return torch.cat([out["cls_logits"].float(), out["bbox_regression"].float(), out["bbox_ctrness"].float(),
                              anchors.expand(out["cls_logits"].shape[0], -1, -1)], -1)

    return Head()


@functools.lru_cache(maxsize=8)
def torchvision_fcos(center_sampling_radius: float = 1.5, score_thresh: float = EVAL_SCORE,
                     detections_per_img: int = EVAL_DETECTIONS):
    """A ``torchvision.models.detection.FCOS`` without a network (a 1-channel stub head), for its target matching, loss
    and post-processing
    (NMS at IoU 0.6, the 1,000 best locations per level before it), on outputs of ``detection_head``."""
    import torch
    from torch import nn
    from torchvision.models.detection.fcos import FCOS, FCOSHead

    class NoBackbone(nn.Module):
        out_channels = 1

    class Losses(FCOSHead):
        """torchvision's losses, divided by the matched locations of all processes rather than this one's (as
        mmdetection's FCOS does): N processes with batch B then train like one process with batch N x B."""

        def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
            losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
            import torch.distributed as td

            # training only: evaluation runs no collectives (its processes may hold different batch counts)
            if torch.is_grad_enabled() and td.is_available() and td.is_initialized() and td.get_world_size() > 1:
                local = float(sum(int((m >= 0).sum()) for m in matched_idxs))
                total = torch.tensor(local, device=anchors[0].device)
                td.all_reduce(total)
                scale = max(1.0, local) / max(1.0, float(total) / td.get_world_size())
                losses = {k: v * scale for k, v in losses.items()}
            return losses

    return FCOS(NoBackbone(), num_classes=1, head=Losses(1, 1, 1, num_convs=0),
                center_sampling_radius=center_sampling_radius, score_thresh=score_thresh,
                detections_per_img=detections_per_img)


def _parts(outputs):
    """``[B, A, K + 9]`` -> class logits, box regression, centerness, anchors ``[A, 4]``, locations per level."""
    import torch

    k = outputs.shape[-1] - 9
    cls, reg, ctr, anchors = outputs.float().split([k, 4, 1, 4], -1)
    anchors = anchors[0].detach()
    counts = torch.unique_consecutive(anchors[:, 2] - anchors[:, 0], return_counts=True)[1].tolist()
    return cls, reg, ctr, anchors, counts


def detection_loss(outputs, targets, center_sampling_radius: float = 1.5):
    """torchvision's FCOS loss of ``outputs`` ``[B, A, K + 9]`` against ``targets`` (``boxes [B, M, 4]`` xyxy input
    pixels, ``labels [B, M]`` with UNLABELLED padding, ``crowd [B, M]``, left out): sigmoid focal loss over all
    locations + GIoU loss + centerness BCE over the matched ones, each divided by the number of matched locations."""
    cls, reg, ctr, anchors, counts = _parts(outputs)
    keep = (targets["labels"] >= 0) & ~targets["crowd"]
    boxes = [{"boxes": targets["boxes"][b][keep[b]].float(), "labels": targets["labels"][b][keep[b]]}
             for b in range(outputs.shape[0])]
    losses = torchvision_fcos(center_sampling_radius).compute_loss(
        boxes, {"cls_logits": cls, "bbox_regression": reg, "bbox_ctrness": ctr}, [anchors] * len(boxes), counts)
    return losses["classification"] + losses["bbox_regression"] + losses["bbox_ctrness"]


def detections(outputs, score_thresh: float = EVAL_SCORE, max_detections: int = EVAL_DETECTIONS) -> list[dict]:
    """``outputs`` ``[B, A, K + 9]`` -> per image ``{"boxes" [N, 4] xyxy input pixels, "scores" [N], "labels" [N]}``:
    torchvision FCOS's post-processing (score sqrt(class x centerness) above ``score_thresh``, top-k per level,
    boxes decoded and clipped to the input, class-wise NMS at IoU 0.6, the ``max_detections`` best)."""
    cls, reg, ctr, anchors, counts = _parts(outputs)
    first = anchors[: counts[0]]
    stride = float(first[0, 2] - first[0, 0])
    centres = (first[:, :2] + first[:, 2:]) / 2
    side = (int(centres[:, 1].max() + stride), int(centres[:, 0].max() + stride))  # (height, width) of the input
    head = {"cls_logits": list(cls.split(counts, 1)), "bbox_regression": list(reg.split(counts, 1)),
            "bbox_ctrness": list(ctr.split(counts, 1))}
    per_level = list(anchors.split(counts))
    fcos = torchvision_fcos(score_thresh=score_thresh, detections_per_img=max_detections)
    return fcos.postprocess_detections(head, [per_level] * len(cls), [side] * len(cls))


def coco_metrics(images: list[dict], names: list[str]) -> dict:
    """pycocotools' bbox evaluation of ``images``: per image ``{"gt": [[x0, y0, x1, y1, label, crowd]], "dt":
    [[x0, y0, x1, y1, score, label]]}`` in input pixels (COCO's small / medium / large areas are of those pixels).
    Returns map (AP@[.5:.95]), map_50, map_75, map_small/medium/large, mar_100 and per_class {name: {ap, ap_50,
    boxes}}; 0.0 for a summary AP with no box to score, None for a class with none. Raises GraftError without
    pycocotools."""
    import contextlib
    import io

    import numpy as np
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise GraftError("Detection's mAP needs pycocotools: pip install 'graftkit[detection]'.") from None

    cats = [{"id": k + 1, "name": str(n)} for k, n in enumerate(names)]
    gts, dts = [], []
    for i, im in enumerate(images, 1):
        for x0, y0, x1, y1, label, crowd in im["gt"]:
            gts.append({"id": len(gts) + 1, "image_id": i, "category_id": int(label) + 1, "iscrowd": int(crowd),
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
        for x0, y0, x1, y1, score, label in im["dt"]:
            dts.append({"id": len(dts) + 1, "image_id": i, "category_id": int(label) + 1, "score": score,
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    index = [{"id": i} for i in range(1, len(images) + 1)]
    truth, found = COCO(), COCO()
    truth.dataset = {"images": index, "annotations": gts, "categories": cats}
    found.dataset = {"images": index, "annotations": dts, "categories": cats}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        truth.createIndex()
        found.createIndex()
        ev = COCOeval(truth, found, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(0.0, float(s)) for s in ev.stats]  # -1: nothing to score
    precision = ev.eval["precision"]  # [IoU thresholds, recall points, classes, areas, max detections]
    per_class = {}
    for k, name in enumerate(names):
        p = precision[:, :, k, 0, -1]
        p50 = precision[0, :, k, 0, -1]
        per_class[str(name)] = {"ap": float(np.mean(p[p > -1])) if (p > -1).any() else None,
                                "ap_50": float(np.mean(p50[p50 > -1])) if (p50 > -1).any() else None,
                                "boxes": sum(1 for g in gts if g["category_id"] == k + 1 and not g["iscrowd"])}
    return {"map": stats[0], "map_50": stats[1], "map_75": stats[2], "map_small": stats[3], "map_medium": stats[4],
            "map_large": stats[5], "mar_100": stats[8], "per_class": per_class}


class Detection(Task):
    """Boxes and classes: an FPN and FCOS head (torchvision's) on any backbone's feature maps; COCO mAP."""

    features = "maps"
    losses = ("fcos",)
    primary_metric = "map"
    metric_modes = {k: "max" for k in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
                                       "mar_100")}
    output_names = ("detections",)
    output_shape = "[batch, locations, classes + 9]"
    distill_maps = True
    per_example = False  # mAP matches boxes across the whole split: no per-example sums

    def head(self, backbone, options):
        width = options.head_hidden or 128
        if width % 32 or width < 64:
            raise GraftError(f"[strategy] head_hidden = {width}: the detection head's width must be a multiple of "
                             f"32 of at least 64 (its towers' GroupNorm has 32 groups, which need two channels each "
                             f"to normalise a 1 x 1 map of one image); try {max(64, width // 32 * 32)}.")
        channels, strides = zip(*map_layout(backbone))  # one probe of the trunk for both
        coarsest = max(strides)
        side = getattr(self.data, "side", None)  # set up (training) data only; a served model keeps its size
        if side and side % coarsest:
            fits = sorted({side // coarsest * coarsest or coarsest, (side // coarsest + 1) * coarsest})
            model = getattr(backbone.options, "model", "") or backbone.name
            raise GraftError(f"[data] image_size = {side}: detection needs a multiple of {coarsest}, the stride of the "
                             f"coarsest feature map of {model} (the anchors of every level must fall on its grid); "
                             f"use {' or '.join(map(str, fits))}.")
        return detection_head(list(channels), list(strides), self.outputs(), width)

    def feature_maps(self, model):
        """The FPN levels P3-P7 of ``model``'s last forward."""
        return model.head.features

    def check_targets(self, targets):
        check_class_ids(targets["labels"], self.data, self.name)

    def eval_sums(self, outputs, targets):
        """``count`` (images) and ``images``: each image's true boxes and its detections, a list that evaluation
        concatenates over batches and processes for ``coco_metrics``."""
        import torch

        records = []
        for b, found in enumerate(detections(outputs)):
            real = targets["labels"][b] >= 0
            truth = torch.cat([targets["boxes"][b][real].float(), targets["labels"][b][real, None].float(),
                               targets["crowd"][b][real, None].float()], 1)
            dt = torch.cat([found["boxes"], found["scores"][:, None], found["labels"][:, None].float()], 1)
            records.append({"gt": truth.tolist(), "dt": dt.tolist()})
        return {"count": torch.tensor(float(len(records)), device=outputs.device), "images": records}

    def compute_metrics(self, sums):
        return coco_metrics(sums["images"], self.label_names)

    def predict(self, model, inputs):
        """Boxes with a score of at least ``PREDICT_SCORE``, in each image's own pixels (``inputs["sizes"]``)."""
        from graft.data import letterbox_size

        images, sizes = inputs["images"], inputs["sizes"]
        out, side = [], images.shape[-1]
        names = self.label_names
        for found, (h, w) in zip(detections(model(images), PREDICT_SCORE), sizes.tolist()):
            rh, rw = letterbox_size(h, w, side)  # the image was scaled to rh x rw, then padded at the right and bottom
            boxes = found["boxes"] * found["boxes"].new_tensor([w / rw, h / rh, w / rw, h / rh])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            out.append({"boxes": [{"label": str(names[int(c)]), "score": round(float(s), 4),
                                   "box": [round(float(v), 1) for v in box]}
                                  for box, s, c in zip(boxes, found["scores"], found["labels"])]})
        return out

    def show(self, result, item, out_dir):
        """The image with its boxes drawn (``out_dir``/INPUT_NAME.boxes.png), and a line per box: label, score,
        x0 y0 x1 y1 in the image's pixels."""
        from pathlib import Path

        import numpy as np
        import torch
        from PIL import Image
        from torchvision.utils import draw_bounding_boxes

        from graft.data import open_image

        boxes = result["boxes"]
        image = torch.from_numpy(np.asarray(open_image(item)).copy()).permute(2, 0, 1)
        if boxes:
            image = draw_bounding_boxes(image, torch.tensor([b["box"] for b in boxes]),
                                        labels=[f"{b['label']} {b['score']:.2f}" for b in boxes], width=2)
        path = Path(out_dir) / f"{Path(item).stem}.boxes.png"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        except OSError as e:
            raise GraftError(f"Cannot write {path}: {e.strerror or e}. Choose another --out-dir.") from None
        lines = [f"{item}\t{len(boxes)} box{'es' if len(boxes) != 1 else ''}\t{path}"]
        lines += [f"  {b['label']}\t{b['score']:.4f}\t{' '.join(f'{v:.1f}' for v in b['box'])}" for b in boxes]
        return {"boxes_png": str(path), **result}, "\n".join(lines)


@dataclass
class FCOSOptions:
    center_sampling_radius: float = option(1.5, "A location matches a box only within this many strides of the "
                                                "box's centre (FCOS's centre sampling; torchvision's default).")

    def validate(self):
        if self.center_sampling_radius <= 0:
            raise ValueError(f"center_sampling_radius must be positive, got {self.center_sampling_radius}.")


class FCOSLoss(Loss):
    """FCOS's loss as torchvision computes it: focal classification + GIoU boxes + centerness (detection)."""

    Options = FCOSOptions

    def __call__(self, outputs, targets):
        return detection_loss(outputs, targets, self.options.center_sampling_radius)


@hookimpl
def register_tasks(register):
    register(Detection, name="detection")


@hookimpl
def register_losses(register):
    register(FCOSLoss, name="fcos")
