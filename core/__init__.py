"""graftkit: plugin-based transfer learning for PyTorch.

The public API for plugin authors and scripts lives here; ``docs/plugins.md`` lists it. Importing ``graft`` never
imports torch: the names that need it (``train``, ``load_run``, ``predict``, ``Run``, ``move``,
``clean_state_dict``) are loaded on first use. Public modules beside these names: ``graft.data`` (splits, few-label
subsets, images), ``graft.supervised`` (heads, freezing schedules, metrics), ``graft.testing`` (conformance checks).
"""

import os as _os

# OpenMP reads its wait policy once, when torch loads it. Its default spin-waiting made CPU training steps several
# times slower whenever another program shared the cores (benchmarks/cpu_threads.py); sleeping idle threads cost
# little on a quiet machine. A policy the user set wins; setting it after torch is loaded changes nothing.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import create, load_config
from .errors import GraftError, GraftWarning, did_you_mean, warn
from .files import read_text
from .hookspecs import hookimpl
from .interfaces import UNLABELLED, Adapter, Backbone, DataSource, Logger, Loss, Plugin, SoftTargetLoss, Strategy
from .options import option
from .rundir import exported_backbone, read_metrics
from .task import Task

__version__ = "0.1.0"

#: names that import torch, loaded on first use: name -> module
_LAZY = {"train": "loop", "load_run": "export", "predict": "run", "Run": "run", "move": "batches",
         "clean_state_dict": "checkpoint"}

__all__ = ["Adapter", "Backbone", "DataSource", "GraftError", "GraftWarning", "Logger", "Loss", "Plugin",
           "SoftTargetLoss", "Strategy", "Task", "UNLABELLED", "create", "did_you_mean", "hookimpl", "load_config", "option",
           "exported_backbone", "read_metrics", "read_text", "warn", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'graft' has no attribute {name!r}")
