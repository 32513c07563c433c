import json
import os
import subprocess
import sys
from pathlib import Path

import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent

# A second busy process makes torch's spinning OpenMP threads crawl on two cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2: two workers share the two cores, one thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the tests' subprocesses
    torch.set_num_threads(1)

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
        if values is None or "plugin" in values and (
                table == "backbone" or values["plugin"] != conf.get(table, {}).get("plugin")):
            conf[table] = values  # another plugin (or backbone): its own options only
        else:
            conf[table] = {**conf.get(table, {}), **values}
    return {k: v for k, v in conf.items() if v is not None}


def write_config(path: Path, conf: dict) -> Path:
    from graft.config import dumps_toml

    path.write_text(dumps_toml(conf))
    return path


def graft(*args, env=None, check=False, cwd=None, subprocess_=False) -> subprocess.CompletedProcess:
    """Run the real `graft` command: in this process through click's runner (each start-up of a new Python costs
    seconds of imports), or in a subprocess when ``env`` or ``cwd`` is given (installed plugins, working folders) or
    ``subprocess_`` asks for one (signals, exit paths of the process itself), and for ``--nproc`` (the launched
    processes print to the real standard streams)."""
    if env is None and cwd is None and not subprocess_ and "--nproc" not in map(str, args):
        return _graft_in_process(args, check)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "graft.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"graft {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def _graft_in_process(args, check) -> subprocess.CompletedProcess:
    import traceback
    import warnings

    from click.testing import CliRunner

    from graft.cli import cli

    saved_env, saved_show = dict(os.environ), warnings.showwarning
    try:
        result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="graft")
    finally:
        os.environ.clear()
        os.environ.update(saved_env)  # --debug sets GRAFT_DEBUG
        warnings.showwarning = saved_show
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))  # what a subprocess would have printed
    proc = subprocess.CompletedProcess(["graft", *map(str, args)], result.exit_code, result.stdout, stderr)
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


def weights(run_dir, name="last.safetensors"):
    return load_file(str(run_dir / name))


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


def start_train(cfg, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "graft.cli", "train", str(cfg), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_lines(out, n, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = out / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("run made no progress")


def assert_same_records(a, b, rel=1e-6):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        x, y = ({k: v for k, v in r.items() if k != "samples_per_s"} for r in (x, y))
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == (pytest.approx(y[k], rel=rel, abs=1e-9) if isinstance(y[k], float) else y[k]), (k, x, y)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A random-init 2-layer BERT saved with save_pretrained, and a WordPiece tokenizer of a toy vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("bert")
    words = "good great fine nice bad awful poor sad the a film movie is was very".split()
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tok = BertTokenizerFast(vocab=vocab)  # vocab_file= is ignored by transformers 5
    tok.save_pretrained(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    return d


def reviews(path, n=120, seed=0):
    import random

    rng = random.Random(seed)
    pos, neg = "good great fine nice".split(), "bad awful poor sad".split()
    with open(path, "w") as f:
        for i in range(n):
            label = i % 2
            words = [rng.choice(pos if label else neg), rng.choice(["film", "movie"]), "was", "very"]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": "pos" if label else "neg"}) + "\n")
    return path




def interrupted_and_resumed(cfg, tmp_path, lines=40):
    """Train ``cfg`` whole into tmp_path/full, and again into tmp_path/cut with SIGTERM after ``lines`` metric lines
    and a --resume; returns what the interrupted process printed on stderr."""
    import signal

    graft("train", cfg, "--out", tmp_path / "full", check=True)
    proc = start_train(cfg, tmp_path / "cut")
    wait_for_lines(tmp_path / "cut", lines, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Interrupted at step" in err, err
    graft("train", cfg, "--resume", tmp_path / "cut", check=True)
    return err


def assert_resume_from_step_reproduces(config, tmp_path, step=2):
    """Train ``config`` (checkpoint_every = 1, keep_checkpoints >= its steps) into tmp_path/full; copy it to
    tmp_path/cut with every checkpoint after ``step`` removed, resume there in this process, and compare the final
    weights (in-process: resuming from a mid-epoch checkpoint is the point, not the interrupting signal)."""
    import shutil

    from graft import train

    train(config, tmp_path / "full", echo=lambda m: None)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for folder in (tmp_path / "cut" / "checkpoints").glob("step-*"):
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    (tmp_path / "cut" / "checkpoints" / "latest").write_text(f"step-{step:08d}")
    (tmp_path / "cut" / "last.safetensors").unlink()
    train(config, tmp_path / "cut", resume=True, echo=lambda m: None)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))


def one_step_weights(conf, tmp_path, *layouts):
    """Final weights of ``conf(batch, accum)`` for each (batch, accum) in ``layouts``, each trained into its own
    folder (an in-process run)."""
    from graft import load_config
    from graft import train

    out = []
    for batch, accum in layouts:
        train(load_config(conf(batch, accum), where="c.toml"), tmp_path / f"b{batch}x{accum}", echo=lambda m: None)
        out.append(weights(tmp_path / f"b{batch}x{accum}"))
    return out


def assert_signal_resume(cfg, tmp_path, sig: str, steps: int, lines: int = 8):
    """Train ``cfg`` (a config file of ``steps`` steps, log_every = 1, frequent checkpoints) whole into
    tmp_path/full, and into tmp_path/cut cut by ``sig`` (SIGINT: checkpoint and exit 0; SIGKILL: nothing after the
    last checkpoint) after ``lines`` metric lines, then --resume: the same weights and the same records."""
    import signal

    start_train(cfg, tmp_path / "full").communicate(timeout=300)
    proc = start_train(cfg, tmp_path / "cut")
    wait_for_lines(tmp_path / "cut", lines, proc)
    proc.send_signal(getattr(signal, sig))
    proc.communicate(timeout=60)
    assert proc.returncode == (0 if sig == "SIGINT" else -signal.SIGKILL)
    assert len([r for r in read_metrics(tmp_path / "cut") if r["split"] == "train"]) < steps  # cut before the end
    resumed = start_train(cfg, tmp_path / "cut", "--resume", tmp_path / "cut")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [(r["step"], r["split"]) for r in cut] == [(r["step"], r["split"]) for r in full]
    assert [r["loss"] for r in cut] == pytest.approx([r["loss"] for r in full], rel=1e-5)
