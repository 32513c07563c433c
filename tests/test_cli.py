"""The graft command: listing, describing, plugin status, and clean errors for bad input."""

import json
import subprocess
import sys

import pytest

from conftest import graft, tiny_config, write_config


def test_list_shows_every_kind_with_builtins():
    out = graft("list", "--json", check=True).stdout
    entries = {(e["kind"], e["name"]) for e in json.loads(out)}
    for item in [("backbone", "timm"), ("strategy", "finetune"), ("loss", "cross_entropy"), ("data", "digits")]:
        assert item in entries
    assert {k for k, _ in entries} == {"backbone", "strategy", "loss", "data", "adapter", "logger", "task"}
    text = graft("list", "loss", check=True).stdout
    assert "cross_entropy" in text and "timm" not in text
    assert graft("list", "loss", "b*", check=True).stdout.count("\n") == 2  # header + bce


def test_describe_finetune_shows_options():
    out = graft("describe", "strategy", "finetune", check=True).stdout
    for key in ("head", "freeze", "layer_decay", "lp_epochs"):
        assert key in out
    data = json.loads(graft("describe", "strategy", "finetune", "--json", check=True).stdout)
    head = next(o for o in data["options"] if o["name"] == "head")
    assert head["default"] == "linear" and "mlp" in head["type"] and head["help"]


def test_describe_unknown_name_suggests():
    proc = graft("describe", "strategy", "finetun")
    assert proc.returncode == 2
    assert 'Did you mean "finetune"' in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["list"], ["list", "--json"], ["describe", "backbone", "timm"],
                                  ["plugins"]])
def test_light_commands_never_import_torch(args):
    code = ("import sys; from graft.cli import cli\n"
            "try:\n    cli(args=%r, prog_name='graft')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = [m for m in ('torch', 'timm', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n" % (args,))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_plugins_lists_builtins_ok():
    rows = json.loads(graft("plugins", "--json", check=True).stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["finetune"]["source"] == "built-in"
    assert all(r["status"] == "ok" for r in rows if r["source"] == "built-in")


def test_disable_plugins_env():
    proc = graft("plugins", "--json", env={"GRAFT_DISABLE_PLUGINS": "losses"}, check=True)
    assert {r["name"]: r["status"] for r in json.loads(proc.stdout)}["losses"] == "disabled"
    assert "cross_entropy" not in graft("list", env={"GRAFT_DISABLE_PLUGINS": "losses"}, check=True).stdout


def _bad(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    proc = graft("train", path, "--out", tmp_path / "run")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("Error: ")
    assert not (tmp_path / "run").exists()
    return proc.stderr


def test_error_malformed_toml(tmp_path):
    err = _bad(tmp_path, "[backbone\nplugin = 'timm'\n")
    assert "bad.toml" in err and "TOML" in err and "line 1" in err


def test_error_unknown_plugin(tmp_path):
    conf = tiny_config(strategy={"plugin": "finetuen"})
    err = _bad(tmp_path, write_config(tmp_path / "x.toml", conf).read_text())
    assert "[strategy]" in err and "finetuen" in err and 'Did you mean "finetune"' in err and "bad.toml" in err


def test_error_unknown_key(tmp_path):
    conf = tiny_config(train={"learning_rate": 0.1})
    err = _bad(tmp_path, write_config(tmp_path / "x.toml", conf).read_text())
    assert "[train]" in err and "learning_rate" in err and "bad.toml" in err


def test_error_wrong_type(tmp_path):
    conf = tiny_config(train={"epochs": "three"})
    err = _bad(tmp_path, write_config(tmp_path / "x.toml", conf).read_text())
    assert "[train].epochs" in err and "integer" in err


def test_error_unknown_table_and_choice(tmp_path):
    conf = tiny_config(strategy={"head": "mpl"})
    err = _bad(tmp_path, write_config(tmp_path / "x.toml", conf).read_text())
    assert "[strategy].head" in err and 'Did you mean "mlp"' in err
    conf = tiny_config()
    conf["trian"] = {"epochs": 1}
    assert "[trian]" in _bad(tmp_path, write_config(tmp_path / "x.toml", conf).read_text())


def test_error_missing_file(tmp_path):
    proc = graft("train", tmp_path / "nope.toml")
    assert proc.returncode == 2 and "nope.toml" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_error_bad_override(tiny, tmp_path):
    proc = graft("train", tiny(), "--set", "train.lr=-1", "--out", tmp_path / "r")
    assert proc.returncode == 2 and "lr" in proc.stderr


def test_debug_shows_traceback(tmp_path):
    proc = graft("--debug", "train", tmp_path / "nope.toml")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_missing_library_is_a_clear_error(tmp_path):
    """A plugin needing a library that is not installed fails with an install hint, not a traceback."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "needs_lib.py").write_text(
        "from graft import Backbone, hookimpl\n\n"
        "class NeedsLib(Backbone):\n    \"\"\"Needs a missing library.\"\"\"\n\n"
        "    def build(self):\n        import graft_missing_lib  # noqa: F401\n\n"
        "@hookimpl\ndef register_backbones(register):\n    register(NeedsLib, name='needs_lib')\n")
    dist = site / "needs_lib-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: needs-lib\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[graft]\nneeds_lib = needs_lib\n")
    conf = tiny_config(backbone={"plugin": "needs_lib"})
    proc = graft("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "r",
                 env={"PYTHONPATH": str(site)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'graft_missing_lib', which is not installed" in proc.stderr
