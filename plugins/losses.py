"""Built-in losses: cross-entropy, BCE, MSE; knowledge distillation (soft targets) and feature distillation."""

from dataclasses import dataclass
from typing import Literal

from graft import Loss, SoftTargetLoss, hookimpl, option


@dataclass
class CrossEntropyOptions:
    label_smoothing: float = option(0.0, "Label smoothing in [0, 1).")

    def validate(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")


class CrossEntropy(Loss):
    """Cross-entropy over class logits, with optional label smoothing (single-label classification)."""

    Options = CrossEntropyOptions

    def __call__(self, outputs, targets):
        return cross_entropy(outputs, targets, self.options.label_smoothing)


def cross_entropy(outputs, labels, label_smoothing: float = 0.0):
    """Mean cross-entropy over the batch's labelled examples (each batch averages its own, so a batch with few
    labels weighs as much as a full one). Summing and dividing by the count (at least 1) gives 0 for a batch with
    no labels at all, where torch's mean would be NaN, and needs no host sync to find out. Class-probability
    targets ([N, C] floats) are all labelled: a plain mean."""
    import torch.nn.functional as F

    from graft import UNLABELLED

    if labels.is_floating_point():
        return F.cross_entropy(outputs.float(), labels, label_smoothing=label_smoothing)
    total = F.cross_entropy(outputs.float(), labels, ignore_index=UNLABELLED, label_smoothing=label_smoothing,
                            reduction="sum")
    return total / (labels != UNLABELLED).sum().clamp(min=1)


class BCE(Loss):
    """Binary cross-entropy on logits, one sigmoid per label (multi-label classification)."""

    def __call__(self, outputs, targets):
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(outputs.float(), targets.float())


class MSE(Loss):
    """Mean squared error (regression)."""

    def __call__(self, outputs, targets):
        import torch.nn.functional as F

        return F.mse_loss(outputs.float().reshape(targets.shape), targets.float())


@dataclass
class KDOptions:
    temperature: float = option(4.0, "Softening temperature T of both distributions.")
    alpha: float = option(0.9, "Weight of the soft-target term; the hard-label cross-entropy gets 1 - alpha.")
    schedule: Literal["constant", "linear"] = option("constant", "linear moves alpha and temperature from their "
                                                     "start values to alpha_end / temperature_end over the run.")
    alpha_end: float = option(-1.0, "Final alpha of a linear schedule; negative means alpha (no change).")
    temperature_end: float = option(-1.0, "Final temperature of a linear schedule; negative means temperature.")

    def validate(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")
        if not 0.0 <= self.alpha <= 1.0 or self.alpha_end > 1.0:
            raise ValueError("alpha and alpha_end must be in [0, 1].")


class KD(SoftTargetLoss):
    """Soft-target distillation: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy."""

    Options = KDOptions

    def at(self, progress: float) -> tuple[float, float]:
        """(alpha, temperature) at ``progress`` in [0, 1] of the run."""
        o = self.options
        if o.schedule == "constant":
            return o.alpha, o.temperature
        a_end = o.alpha if o.alpha_end < 0 else o.alpha_end
        t_end = o.temperature if o.temperature_end <= 0 else o.temperature_end
        return o.alpha + (a_end - o.alpha) * progress, o.temperature + (t_end - o.temperature) * progress

    def __call__(self, outputs, targets):
        """``targets``: {"teacher": teacher logits, "labels": class ids or None, "progress": 0..1}."""
        alpha, T = self.at(float(targets.get("progress", 0.0)))
        return kd_loss(outputs, targets["teacher"], targets.get("labels"), alpha, T)


def kd_loss(student, teacher, labels, alpha: float, temperature: float):
    """Hinton et al. (2015): the KL term is scaled by T^2 so its gradients keep their size as T changes."""
    import torch.nn.functional as F

    s, t = student.float() / temperature, teacher.float() / temperature
    soft = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    loss = alpha * temperature ** 2 * soft
    if labels is not None and alpha < 1.0:
        loss = loss + (1.0 - alpha) * cross_entropy(student, labels)  # unlabelled examples learn from soft targets only
    return loss


class FeatureMSE(Loss):
    """Feature distillation: mean squared error between (projected) student and teacher hidden features."""

    def __call__(self, outputs, targets):
        import torch.nn.functional as F

        return F.mse_loss(outputs.float(), targets.float())


class FeatureCosine(Loss):
    """Feature distillation: 1 - cosine similarity between (projected) student and teacher hidden features."""

    def __call__(self, outputs, targets):
        import torch.nn.functional as F

        return (1.0 - F.cosine_similarity(outputs.float(), targets.float(), dim=-1)).mean()


@hookimpl
def register_losses(register):
    register(CrossEntropy, name="cross_entropy")
    register(BCE, name="bce")
    register(MSE, name="mse")
    register(KD, name="kd")
    register(FeatureMSE, name="feature_mse")
    register(FeatureCosine, name="feature_cosine")
