"""A plugin that fails on import (test fixture)."""

raise ImportError("graft_broken needs a library that is not installed")
