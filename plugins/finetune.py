"""The ``finetune`` strategy: a head on a backbone, with freezing schedules and layer-wise learning rates.

The method lives in ``graft.supervised`` (public, so that ``distill`` and third-party strategies build on the same
heads, schedules and metrics); this module names it and registers it.
"""

from graft import hookimpl
from graft.supervised import Supervised, SupervisedOptions

FinetuneOptions = SupervisedOptions


class Finetune(Supervised):
    """Fine-tune a backbone with a new head: classification, multi-label or regression."""


@hookimpl
def register_strategies(register):
    register(Finetune, name="finetune")
