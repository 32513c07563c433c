import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A second busy process makes torch's spinning OpenMP threads crawl on two cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TINY_VIT = {"plugin": "timm", "model": "vit_tiny_patch16_224",
            "model_kwargs": {"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}}


def tiny_config(**tables) -> dict:
    """A config that trains in a second or two: a 2-block ViT on 8x8 digits."""
    conf = {
        "backbone": dict(TINY_VIT),
        "strategy": {"plugin": "finetune"},
        "loss": {"plugin": "cross_entropy"},
        "data": {"plugin": "digits", "image_size": 8},
        "train": {"seed": 0, "epochs": 1, "batch_size": 32, "lr": 3e-3, "progress": False, "plot": False,
                  "log_every": 1},
    }
    for table, values in tables.items():
        if values is None or "plugin" in values and (table == "backbone" or values["plugin"] != conf[table]["plugin"]):
            conf[table] = values  # another plugin (or backbone): its own options only
        else:
            conf[table] = {**conf.get(table, {}), **values}
    return {k: v for k, v in conf.items() if v is not None}


def write_config(path: Path, conf: dict) -> Path:
    from graft.config import dumps_toml

    path.write_text(dumps_toml(conf))
    return path


def graft(*args, env=None, check=False, cwd=None) -> subprocess.CompletedProcess:
    """Run the real `graft` command in a subprocess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "graft.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"graft {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture
def tiny(tmp_path):
    """Write a tiny config (with table overrides) and return its path."""
    def make(name="tiny.toml", **tables):
        return write_config(tmp_path / name, tiny_config(**tables))
    return make
