"""A plugin whose loss name clashes with a built-in (test fixture)."""

from graft import Loss, hookimpl


class OtherCrossEntropy(Loss):
    """Another loss calling itself cross_entropy."""

    def __call__(self, outputs, targets):
        raise NotImplementedError


@hookimpl
def register_losses(register):
    register(OtherCrossEntropy, name="cross_entropy")
