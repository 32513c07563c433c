"""The path for third parties: every hook documented and exercised, the example package, graft.testing."""

import inspect
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, graft, tiny_config, write_config
from graft import hookspecs

HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]
EXAMPLE = ROOT / "examples" / "plugins" / "graft-ema-teacher"


def test_every_hook_is_documented():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert len(HOOKS) == 7
    for hook in HOOKS:
        assert re.search(rf"^### `{hook}\(register\)`", docs, re.M), f"{hook} has no section in docs/plugins.md"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_registers_through_pluggy(hook, tmp_path):
    """A module implementing just this hook, loaded as an entry point would be, provides a usable plugin."""
    kind = {"register_backbones": "backbone", "register_strategies": "strategy", "register_losses": "loss",
            "register_datasources": "data", "register_adapters": "adapter", "register_loggers": "logger",
            "register_tasks": "task"}[hook]
    base = {"backbone": "Backbone", "strategy": "Strategy", "loss": "Loss", "data": "DataSource",
            "adapter": "Adapter", "logger": "Logger", "task": "Task"}[kind]
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / f"hook_{kind}.py").write_text(
        f"from graft import {base}, hookimpl\n\n"
        f"class Thing({base}):\n    \"\"\"A {kind} made in a test.\"\"\"\n\n"
        f"@hookimpl\ndef {hook}(register):\n    register(Thing, name='thing_{kind}')\n")
    dist = pkg / "hook_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hook-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[graft]\nhook_{kind} = hook_{kind}\n")
    out = json.loads(graft("list", kind, "--json", env={"PYTHONPATH": str(pkg)}, check=True).stdout)
    assert {"name": f"thing_{kind}", "kind": kind, "plugin": f"hook_{kind}",
            "summary": f"A {kind} made in a test."} in out


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(EXAMPLE)], check=True, capture_output=True)
    return target


def test_example_plugin_shows_in_graft_plugins_and_trains(installed_example, tmp_path):
    env = {"PYTHONPATH": str(installed_example)}
    rows = {r["name"]: r for r in json.loads(graft("plugins", "--json", env=env, check=True).stdout)}
    assert rows["ema_teacher"]["version"] == "0.2.0" and rows["ema_teacher"]["status"] == "ok"
    assert set(rows["ema_teacher"]["provides"]) == {"strategy:ema_teacher", "loss:soft_ce"}
    assert "0.2.0" in graft("plugins", env=env, check=True).stdout
    conf = tiny_config(strategy={"plugin": "ema_teacher", "decay": 0.9}, train={"max_steps": 6, "eval_every": 3})
    del conf["loss"]
    proc = graft("train", write_config(tmp_path / "ema.toml", conf), "--out", tmp_path / "run", env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["strategy"] == "ema_teacher" and "ema_accuracy" in summary["test"]


def test_example_plugin_own_tests_pass(installed_example):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                          capture_output=True, text=True, env={**__import__("os").environ,
                                                               "PYTHONPATH": str(installed_example)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout


def test_check_strategy_reports_a_strategy_that_loses_its_state(installed_example, tmp_path):
    sys.path.insert(0, str(installed_example))
    try:
        from graft_ema_teacher import EMATeacher
    finally:
        sys.path.remove(str(installed_example))
    from graft.testing import check_strategy

    class Forgetful(EMATeacher):
        """EMA teacher that forgets to checkpoint its EMA."""

        def state_dict(self):
            return {}

    with pytest.raises(AssertionError, match="resume does not reproduce"):
        check_strategy(Forgetful, tmp_path, options={"decay": 0.5})


def test_check_strategy_reports_options_without_help(tmp_path):
    from graft import option
    from graft.plugins.finetune import Finetune, FinetuneOptions
    from graft.testing import check_strategy

    @dataclass
    class Bare(FinetuneOptions):
        extra: int = 3

    class Undocumented(Finetune):
        """Finetune with an undocumented option."""

        Options = Bare

    with pytest.raises(AssertionError, match="options without help text.*extra"):
        check_strategy(Undocumented, tmp_path)
    assert option  # the helper authors should use instead
