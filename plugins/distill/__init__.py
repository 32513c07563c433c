"""The ``distill`` strategy: a finished run (the teacher) taught into any student backbone.

The teacher and the student may be of different families and sizes: each gets its own preprocessing, because
the teacher's inputs come from its own view of the same data (``teacher.view``: the same source set up with the
teacher's backbone and the same seed, so example i is the same example for both; a source's
``graft.capabilities.Views`` say which options prepare examples). Teacher outputs are computed once per dataset and
kept as safetensors (the teacher cache), unless the data is randomly augmented: then it runs online, on the
student's own augmented batch when both preprocess alike, else on its own view of the same random draw (data
sources draw augmentation from ``example_seed``, so the teacher's 64x64 view shows the student's 32x32 warp).

Soft targets: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015); feature distillation:
Romero et al., FitNets (ICLR 2015). ``teacher.py`` loads the teacher and its view of the data, ``cache.py`` keeps its
outputs, ``strategy.py`` is the method.
"""

from graft import hookimpl

from .strategy import Distill, DistillOptions

__all__ = ["Distill", "DistillOptions"]


@hookimpl
def register_strategies(register):
    register(Distill, name="distill")
