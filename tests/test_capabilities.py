"""Narrow interfaces (issue 26): the base classes hold what every plugin of a kind provides; what only some plugins
provide is a capability in graft.capabilities, checked where it is used with an error naming the plugin."""

from pathlib import Path

import graft
import graft.supervised
import pytest
from graft import capabilities as cap

ROOT = Path(__file__).resolve().parent.parent

#: members that served one plugin family (or only distill) and were base-class defaults before issue 26
MOVED = {graft.Backbone: ["task_model", "set_tokenizer", "load_tokenizer", "hf_model", "source_dir"],
         graft.Strategy: ["generate"],
         graft.DataSource: ["view", "split_differences", "view_options", "training_options"]}


def test_interfaces_are_short_and_hold_no_single_family_member():
    """The old core/interfaces.py was 629 lines, and graft.Backbone had task_model, set_tokenizer, ... (AssertionError
    here: 'Backbone.task_model'), defaults that only the hf backbone implemented."""
    assert len((ROOT / "core" / "interfaces.py").read_text().splitlines()) < 300
    left = [f"{base.__name__}.{name}" for base, names in MOVED.items() for name in names if hasattr(base, name)]
    assert not left, left


def test_built_in_plugins_have_the_capabilities_they_are_used_for():
    """Old code: no module graft.capabilities (ModuleNotFoundError)."""
    from graft.plugins.clm import CLM
    from graft.plugins.hf_backbone import HFBackbone
    from graft.plugins.timm_backbone import TimmBackbone

    hf, timm = HFBackbone(), TimmBackbone()
    for capability in (cap.TaskModel, cap.SettableTokenizer, cap.PretrainedFolder):
        assert isinstance(hf, capability) and not isinstance(timm, capability), capability
    assert isinstance(HFBackbone, cap.SavedTokenizer) and not isinstance(TimmBackbone, cap.SavedTokenizer)
    assert isinstance(CLM, cap.TextGeneration) and not isinstance(graft.supervised.Supervised, cap.TextGeneration)
    from graft.registry import get_registry

    sources = {name: entry.cls for name, entry in get_registry().entries["data"].items()}
    viewable = {name for name, cls in sources.items() if isinstance(cls, cap.Views)}  # class attributes
    assert {"digits", "imagefolder", "text", "conll", "hfdatasets", "segfolder"} <= viewable
    assert "corpus" not in viewable


def test_require_names_the_plugin_and_what_the_config_asked_for():
    """Old code: no graft.capabilities.require (ModuleNotFoundError); a timm backbone asked for a pretraining head
    raised from the base class, without saying which config key asked."""
    from graft.plugins.timm_backbone import TimmBackbone

    backbone = graft.create("backbone", {"plugin": "timm", "model": "resnet18"})
    with pytest.raises(graft.GraftError) as e:
        cap.require(backbone, cap.TaskModel, '[strategy] plugin = "mlm"', "Use an hf text backbone.")
    assert str(e.value) == ('[strategy] plugin = "mlm": backbone \'timm\' does not give its network with a '
                            'pretraining head (task_model). Use an hf text backbone.')
    with pytest.raises(graft.GraftError, match="backbone 'TimmBackbone' does not load its tokenizer from saved files"):
        cap.require(TimmBackbone, cap.SavedTokenizer, "serving the export in runs/x")
    from graft.plugins.hf_backbone import HFBackbone

    assert cap.require(HFBackbone, cap.SavedTokenizer, "serving") is HFBackbone
