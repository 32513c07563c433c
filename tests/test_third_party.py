"""Third-party plugins arrive through the `graft` entry-point group, installed with pip like any package."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import graft, read_metrics, tiny_config, write_config

HERE = Path(__file__).parent / "plugins"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The fixture plugin packages pip-installed into a private directory, put on PYTHONPATH by each call."""
    target = tmp_path_factory.mktemp("site")
    for pkg in ("graft-demo", "graft-broken", "graft-clash"):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(HERE / pkg)], check=True, capture_output=True)
    return target


def test_installed_strategy_is_listed_and_trains(site, tmp_path):
    env = {"PYTHONPATH": str(site)}
    listing = json.loads(graft("list", "strategy", "--json", env=env, check=True).stdout)
    assert {"name": "demo_probe", "kind": "strategy", "plugin": "demo",
            "summary": "Linear probe: the backbone stays frozen, a linear head trains."} in listing
    plugins = {r["name"]: r for r in json.loads(graft("plugins", "--json", env=env, check=True).stdout)}
    assert plugins["demo"]["source"] == "entry point" and plugins["demo"]["version"] == "0.3.1"
    assert plugins["demo"]["status"] == "ok"

    conf = tiny_config(strategy={"plugin": "demo_probe", "head_lr_scale": 2.0})
    del conf["loss"]  # the strategy's default loss applies
    cfg = write_config(tmp_path / "demo.toml", conf)
    proc = graft("train", cfg, "--out", tmp_path / "run", env={**env, "GRAFT_DISABLE_PLUGINS": "clash"})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["strategy"] == "demo_probe" and 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert 'plugin = "cross_entropy"' in (tmp_path / "run" / "config.toml").read_text()
    assert read_metrics(tmp_path / "run")
    # issue 25: a run whose strategy exported no backbone/ is no weights source; the old code read the run's whole
    # model.safetensors as backbone weights: "weights file lacks 30 tensors of the model, e.g. cls_token"
    from conftest import TINY_VIT

    later = write_config(tmp_path / "later.toml", tiny_config(backbone={**TINY_VIT, "weights": str(tmp_path / "run")}))
    proc = graft("train", later, "--out", tmp_path / "later")
    assert proc.returncode == 2 and "without backbone/" in proc.stderr and "'demo_probe'" in proc.stderr, proc.stderr
    assert "Handing the backbone on" in proc.stderr and "Traceback" not in proc.stderr


def test_broken_plugin_is_reported_and_the_rest_works(site):
    env = {"PYTHONPATH": str(site)}
    plugins = {r["name"]: r for r in json.loads(graft("plugins", "--json", env=env, check=True).stdout)}
    assert plugins["broken"]["status"] == "broken"
    assert "needs a library that is not installed" in plugins["broken"]["error"]
    text = graft("plugins", env=env, check=True).stdout
    assert "broken" in text and "ImportError" in text
    proc = graft("list", env=env)
    assert proc.returncode == 0 and "finetune" in proc.stdout and "demo_probe" in proc.stdout
    assert "broken" in proc.stderr


def test_duplicate_name_names_both_sources(site, tmp_path):
    env = {"PYTHONPATH": str(site)}
    proc = graft("list", env=env)
    assert proc.returncode == 0 and "cross_entropy" in proc.stderr and "clash" in proc.stderr
    cfg = write_config(tmp_path / "c.toml", tiny_config())
    proc = graft("train", cfg, "--out", tmp_path / "run", env=env)
    assert proc.returncode == 2
    assert "registered twice" in proc.stderr and "losses" in proc.stderr and "clash" in proc.stderr
    assert "graft_clash" in proc.stderr and "GRAFT_DISABLE_PLUGINS" in proc.stderr


def test_a_pipeline_with_a_third_party_strategy_stage(site, tmp_path):
    """Stage 1 fine-tunes; stage 2 trains a linear probe with the pip-installed demo_probe strategy on its backbone."""
    vit = ('model = "vit_tiny_patch16_224"\nmodel_kwargs = { img_size = 8, patch_size = 4, embed_dim = 32, depth = 2, '
           'num_heads = 2 }')
    common = ('[stage.data]\nplugin = "digits"\nimage_size = 8\n[stage.train]\nmax_steps = 3\nbatch_size = 16\n'
              'progress = false\nplot = false\n')
    path = tmp_path / "p.toml"
    path.write_text(f"""[pipeline]
out = "{tmp_path / 'runs'}"

[[stage]]
name = "tune"
[stage.backbone]
plugin = "timm"
{vit}
[stage.strategy]
plugin = "finetune"
{common}
[[stage]]
name = "probe"
[stage.backbone]
plugin = "timm"
{vit}
weights = "@tune"
[stage.strategy]
plugin = "demo_probe"
{common}""")
    proc = graft("pipeline", path, env={"PYTHONPATH": str(site), "GRAFT_DISABLE_PLUGINS": "clash"})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    rep = json.loads((tmp_path / "runs" / "pipeline.json").read_text())
    assert [(r["stage"], r["strategy"]) for r in rep["stages"]] == [("tune", "finetune"), ("probe", "demo_probe")]
    assert str(tmp_path / "runs" / "tune") in (tmp_path / "runs" / "probe" / "config.toml").read_text()
