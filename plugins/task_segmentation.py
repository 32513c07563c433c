"""The ``segmentation`` task: a class per pixel, an FPN-style decoder on the backbone's feature maps."""

from graft import Task, hookimpl
from graft.supervised import (check_class_ids, confusion_metrics, confusion_sums, flatten_dense, map_channels,
                              segment_masks, segmentation_head, write_mask)


class Segmentation(Task):
    """A class per pixel: a light FPN decoder on multi-scale feature maps; mIoU, pixel accuracy; masks as PNGs."""

    features = "maps"
    losses = ("cross_entropy",)
    primary_metric = "miou"
    metric_modes = {"miou": "max", "pixel_accuracy": "max", "accuracy": "max", "macro_f1": "max"}
    per_target = True
    distillable = True
    output_shape = "[batch, classes, height, width]"

    def head(self, backbone, options):
        return segmentation_head(map_channels(backbone), self.outputs(), options.head_hidden or 64, options.dropout)

    def check_targets(self, targets):
        check_class_ids(targets, self.data, self.name)

    def loss_inputs(self, outputs, targets):
        return flatten_dense(outputs, targets)

    def eval_sums(self, outputs, targets):
        return confusion_sums(outputs.argmax(1), targets, outputs.shape[1])  # [B, K, H, W]: classes on axis 1

    def compute_metrics(self, sums):
        m = confusion_metrics(sums, self.label_names)
        cm = sums["confusion"].double()  # per class IoU = tp / (tp + fp + fn), over the classes that occur
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        m["pixel_accuracy"] = m["accuracy"]
        m["miou"] = float((tp[union > 0] / union[union > 0]).mean())
        return m

    def distill_logits(self, student, teacher, targets):
        """A teacher segmenting another image size is resized to the student's: both saw the same crop and flip."""
        import torch.nn.functional as F

        if teacher.shape[-2:] != student.shape[-2:]:
            teacher = F.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False)
        s, y = flatten_dense(student, targets)
        return s, flatten_dense(teacher, targets)[0], y

    def predict(self, model, inputs):
        return segment_masks(model, inputs, self.label_names)  # at each image's own size

    def show(self, result, item, out_dir):
        """The class of every pixel as a PNG of class indices (``out_dir``/INPUT_NAME.mask.png)."""
        import json

        result = {"mask_png": write_mask(result["mask"], item, out_dir),
                  **{k: v for k, v in result.items() if k != "mask"}}
        return result, f"{result['mask_png']}\t{json.dumps(result['pixels'])}\t{item}"


@hookimpl
def register_tasks(register):
    register(Segmentation, name="segmentation")
