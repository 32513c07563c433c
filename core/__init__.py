"""graftkit: plugin-based transfer learning for PyTorch.

The public API for plugin authors lives here. Importing ``graft`` never imports torch.
"""

from .errors import GraftError, GraftWarning
from .files import read_text
from .hookspecs import hookimpl
from .interfaces import UNLABELLED, Backbone, DataSource, Loss, Plugin, Strategy
from .options import option

__version__ = "0.1.0"
__all__ = ["Backbone", "DataSource", "GraftError", "GraftWarning", "Loss", "Plugin", "Strategy", "UNLABELLED", "hookimpl",
           "option", "read_text", "__version__"]
