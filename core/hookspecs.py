"""The hooks a graftkit plugin implements. Each receives a ``register`` callable.

A plugin module implements any of these with the ``graft.hookimpl`` marker and is found through the
``graft`` entry-point group (third parties) or ``registry.toml`` (the built-ins) -- both the same way.
Registering must stay cheap: import torch and model libraries inside the registered classes' methods,
never at module level, so ``graft list`` stays fast.
"""

import pluggy

hookspec = pluggy.HookspecMarker("graft")
hookimpl = pluggy.HookimplMarker("graft")


@hookspec
def register_backbones(register):
    """Register Backbone subclasses: ``register(MyBackbone, name="mybackbone")``."""


@hookspec
def register_strategies(register):
    """Register Strategy subclasses (transfer-learning methods): ``register(MyStrategy, name="mystrategy")``."""


@hookspec
def register_losses(register):
    """Register Loss subclasses: ``register(MyLoss, name="myloss")``."""


@hookspec
def register_datasources(register):
    """Register DataSource subclasses (the ``[data]`` table): ``register(MyData, name="mydata")``."""


@hookspec
def register_adapters(register):
    """Register Adapter subclasses (the ``[adapter]`` table): ``register(MyAdapter, name="myadapter")``."""


@hookspec
def register_loggers(register):
    """Register Logger subclasses (experiment trackers, ``[train] loggers``): ``register(MyLogger, name="mylog")``."""


@hookspec
def register_tasks(register):
    """Register Task subclasses (what a supervised task is; a data source's ``task`` names one):
    ``register(MyTask, name="mytask")``."""
