"""Built-in losses: cross-entropy, binary cross-entropy (multi-label) and mean squared error."""

from dataclasses import dataclass

from graft import Loss, hookimpl, option


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
        import torch.nn.functional as F

        return F.cross_entropy(outputs.float(), targets, label_smoothing=self.options.label_smoothing)


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


@hookimpl
def register_losses(register):
    register(CrossEntropy, name="cross_entropy")
    register(BCE, name="bce")
    register(MSE, name="mse")
