"""Pipelines: several runs in order from one file, each stage a normal config that may use an earlier stage's run.

A pipeline file holds an optional ``[pipeline]`` table (``out``: the folder of the stages' run directories) and an
ordered list of ``[[stage]]`` tables. Each stage has a ``name``, optionally a ``config`` file (relative to the
pipeline file) and ``set`` (a list of ``TABLE.KEY=VALUE`` overrides, as ``graft train --set``), and any config
tables inline (``[stage.backbone]``, ``[stage.train]``, ...), which win key by key over the file's. A string value
``"@NAME"`` (or ``"@NAME/sub/path"``) anywhere in a stage stands for the run directory of the earlier stage NAME --
a run directory is what a backbone's ``weights``, a distill ``teacher`` or a clm ``teacher`` take.

A stage with ``compress = "@NAME"`` compresses that earlier stage's run instead of training (``graft compress``):
its other keys are ``quantize``, ``prune``, ``finetune_steps``, ``finetune_lr``, ``calibration_samples`` and
``calibration_method``. A stage with ``generate = "@NAME"`` answers the prompts of ``file`` with that run (``graft
generate --file``) into its folder's answers.jsonl -- or, with ``chosen = "FIELD"``, pairs.jsonl: preference pairs
whose chosen answer is the row's FIELD and rejected one the model's (SPIN), for a later stage's data
(``"@NAME/pairs.jsonl"``); its other keys are ``field``, ``batch_size``, ``max_new_tokens``, ``temperature``,
``top_p``, ``seed`` and ``raw``.

Every stage is resolved and checked before anything runs. A stage whose run finished with the same resolved config
and the same upstream stages is skipped; one that was interrupted resumes from its checkpoint; one whose config or
upstream changed runs again, and so does everything that uses it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import config as cfg
from . import rundir
from .errors import GraftError, did_you_mean

STATE_FILE = ".graft-stage.json"  # in each stage's run directory: the fingerprint it was started with


COMPRESS_KEYS = {"compress": str, "quantize": str, "prune": str, "finetune_steps": int, "finetune_lr": float,
                 "calibration_samples": int, "calibration_method": str}
GENERATE_KEYS = {"generate": str, "file": str, "field": str, "chosen": str, "batch_size": int, "max_new_tokens": int,
                 "temperature": float, "top_p": float, "seed": int, "raw": bool}


@dataclass(eq=False)
class Stage:
    name: str
    config: cfg.Config | None  # None for a compression stage
    run_dir: Path
    uses: list[str]  # names of the earlier stages it refers to
    fingerprint: str = ""
    status: str = ""  # done | resume | run
    summary: dict = field(default_factory=dict)
    compress: dict | None = None  # graft compress's options, "compress" the source run directory
    generate: dict | None = None  # graft generate --file's options, "generate" the run that answers
    group: str | None = None  # a method matrix's method (graft compare's row), kept in the state file


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _substitute(value, dirs: dict[str, Path], later: set[str], own: str, at: str, uses: list[str], key: str = ""):
    """``value`` with every "@NAME..." string replaced by stage NAME's run directory (``own``: this stage's name)."""
    if isinstance(value, dict):
        return {k: _substitute(v, dirs, later, own, at, uses, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, dirs, later, own, at, uses, key) for v in value]
    if isinstance(value, str) and value.startswith("@"):
        name, _, rest = value[1:].partition("/")
        if name == own:
            raise GraftError(f"{at}: {key} = {value!r} refers to the stage itself; name an earlier stage.")
        if name in later:
            raise GraftError(f"{at}: {key} = {value!r} refers to stage {name!r}, which comes later in the pipeline. "
                             f"A stage can use only the stages before it: move {name!r} up.")
        if name not in dirs:
            raise GraftError(f"{at}: {key} = {value!r}: there is no earlier stage named {name!r}."
                             f"{did_you_mean(name, list(dirs))} Stages so far: {', '.join(dirs) or 'none'}.")
        uses.append(name)
        return str(dirs[name] / rest) if rest else str(dirs[name])
    return value


def read_pipeline(path: str | Path, out: str | Path | None = None, registry=None,
                  overrides: list[str] = (), data: dict | None = None) -> list[Stage]:
    """The stages of pipeline file ``path`` (``overrides``: ``TABLE.KEY=VALUE`` for every stage, before each stage's
    own ``set``, which wins), resolved and validated (nothing runs). ``data``: the file's tables already read (a
    method matrix expands into them; relative paths stay relative to ``path``). Raises GraftError naming the
    file and stage for bad input: unknown keys, duplicate or missing names, unknown or later stage references,
    and every config error a ``graft train`` of the stage would give."""
    path = Path(path)
    data = cfg.read_toml(path) if data is None else data
    where = str(path)
    unknown = set(data) - {"pipeline", "stage"}
    if unknown:
        raise GraftError(f"{where}: unknown top-level key(s) {sorted(unknown)}; a pipeline file holds [pipeline] and "
                         f"[[stage]] tables.")
    settings = data.get("pipeline", {})
    if set(settings) - {"out"}:
        raise GraftError(f"{where}: [pipeline] takes only out (the folder of the stages' run directories).")
    stages_data = data.get("stage")
    if not isinstance(stages_data, list) or not stages_data:
        raise GraftError(f"{where}: no [[stage]] tables: list the runs in order, each with a name.")
    root = Path(out or settings.get("out") or Path("runs") / path.stem)
    names = [s.get("name") for s in stages_data]
    dirs: dict[str, Path] = {}
    stages: list[Stage] = []
    for i, table in enumerate(stages_data):
        name = table.get("name")
        at = f"{where}: [[stage]] {i + 1}" + (f" ({name!r})" if name else "")
        if not isinstance(name, str) or not name or "/" in name or name.startswith((".", "@")):
            raise GraftError(f"{at}: each stage needs name = \"...\" (a folder name: no '/', not starting with "
                             f"'.' or '@').")
        if name in dirs:
            raise GraftError(f"{at}: a stage named {name!r} comes earlier; names must differ.")
        if "compress" in table or "generate" in table:
            uses: list[str] = []
            kind = "compress" if "compress" in table else "generate"
            options = _compress_options(table, at) if kind == "compress" else _generate_options(table, at, path)
            options = _substitute(options, dirs, set(names[i + 1:]), name, at, uses)
            dirs[name] = (root / name).absolute()
            stages.append(Stage(name, None, dirs[name], sorted(set(uses)), **{kind: options}))
            continue
        base = {}
        if "config" in table:
            base = cfg.read_toml((path.parent / table["config"]) if not Path(table["config"]).is_absolute()
                                 else table["config"])
        inline = {k: v for k, v in table.items() if k not in ("name", "config", "set")}
        own = table.get("set", [])
        if not isinstance(own, list) or not all(isinstance(o, str) for o in own):
            raise GraftError(f"{at}: set must be a list of \"TABLE.KEY=VALUE\" strings.")
        merged = cfg.apply_overrides(_merge(base, inline), list(overrides) + list(own))  # the stage's own win
        uses: list[str] = []
        merged = _substitute(merged, dirs, set(names[i + 1:]), name, at, uses)
        config = cfg.resolve(merged, at, registry)
        dirs[name] = (root / name).absolute()
        stages.append(Stage(name, config, dirs[name], sorted(set(uses))))
    for s in stages:
        upstream = [next(t.fingerprint for t in stages if t.name == u) for u in s.uses]
        own = _tracked(s.config) if s.config is not None else s.compress or s.generate
        s.fingerprint = hashlib.sha256(json.dumps([own, upstream]).encode()).hexdigest()[:16]
        s.status = _status(s)
    return stages


def _tracked(config: cfg.Config) -> str:
    """The config as the fingerprint sees it: without its loggers (adding a tracker reruns nothing)."""
    data = config.to_dict()
    data.pop("loggers", None)
    data["train"] = {k: v for k, v in data["train"].items() if k != "loggers"}
    return cfg.dumps_toml(data)


def _compress_options(table: dict, at: str) -> dict:
    options = {k: v for k, v in table.items() if k != "name"}
    for key, value in options.items():
        if key not in COMPRESS_KEYS:
            raise GraftError(f"{at}: a compress stage takes {', '.join(COMPRESS_KEYS)}; not {key!r}."
                             f"{did_you_mean(key, list(COMPRESS_KEYS))}")
        kind = COMPRESS_KEYS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise GraftError(f"{at}: {key} = {value!r} should be a {kind.__name__}.")
    if not str(options["compress"]).startswith("@"):
        raise GraftError(f"{at}: compress = {options['compress']!r}: name an earlier stage, e.g. compress = "
                         f"\"@student\".")
    return options


def _generate_options(table: dict, at: str, pipeline_file: Path) -> dict:
    """A generate stage's options, its prompts file made absolute and fingerprinted (new prompts: run again)."""
    options = {k: v for k, v in table.items() if k != "name"}
    for key, value in options.items():
        if key not in GENERATE_KEYS:
            raise GraftError(f"{at}: a generate stage takes {', '.join(GENERATE_KEYS)}; not {key!r}."
                             f"{did_you_mean(key, list(GENERATE_KEYS))}")
        kind = GENERATE_KEYS[key]
        if kind is not bool and isinstance(value, bool) or not isinstance(value, (int, float) if kind is float
                                                                          else kind):
            raise GraftError(f"{at}: {key} = {value!r} should be a {kind.__name__}.")
    if not str(options["generate"]).startswith("@") or "file" not in options:
        raise GraftError(f"{at}: a generate stage answers the prompts of file = \"...\" with an earlier stage's run: "
                         f"generate = \"@sft\".")
    source = Path(options["file"]).expanduser()
    source = source if source.is_absolute() else (pipeline_file.parent / source)
    if not source.is_file():
        raise GraftError(f"{at}: file = {options['file']!r}: no such file ({source}).")
    options["file"] = str(source.absolute())
    options["file_sha256"] = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    return options


def _generate_stage(stage: Stage, echo) -> None:
    from .export import load_run
    from .generate import answer_file

    o = stage.generate
    out = stage.run_dir / ("pairs.jsonl" if o.get("chosen") else "answers.jsonl")
    echo(f"[{stage.name}] answering {o['file']} with {o['generate']} -> {out}")
    run = load_run(o["generate"], for_prediction=True)
    n = answer_file(run, o["file"], out, o.get("field", "prompt"), o.get("chosen", ""), o.get("batch_size", 8),
                    o.get("max_new_tokens", 64), o.get("temperature", 0.0), o.get("top_p", 1.0), o.get("seed", 0),
                    o.get("raw", False))
    rundir.write_summary(stage.run_dir, {"stage": "generate", **n, "file": out.name, "run": o["generate"]})
    if o.get("chosen"):
        echo(f"[{stage.name}] {n['rows']} pairs ({n['left_out']} left out: empty answers or the chosen one itself)")


def _status(stage: Stage) -> str:
    state = stage.run_dir / STATE_FILE
    same = state.is_file() and json.loads(state.read_text()).get("fingerprint") == stage.fingerprint
    if same and (stage.run_dir / rundir.SUMMARY).is_file():
        return "done"
    checkpoints = stage.run_dir / ("finetune" if stage.compress else "") / rundir.CHECKPOINTS / "latest"
    if same and checkpoints.is_file():
        return "resume"
    return "run"


def run_stages(stages: list[Stage], start: str | None = None, only: str | None = None, echo=print) -> dict | None:
    """Run the stages that are not done (``start``: rerun that stage and all after it; ``only``: just that one),
    in order. Returns the pipeline report, or None when a signal interrupted a stage (its checkpoint is kept)."""
    from .loop import train

    names = [s.name for s in stages]
    for flag, name in (("--from", start), ("--only", only)):
        if name is not None and name not in names:
            raise GraftError(f"{flag} {name}: no such stage.{did_you_mean(name, names)} Stages: {', '.join(names)}.")
    first = names.index(start or only) if (start or only) else 0
    chosen = [s for i, s in enumerate(stages) if i >= first and (not only or s.name == only)]
    missing = [s.name for s in stages if s not in chosen and s.status != "done"
               and any(s.name in c.uses for c in chosen)]
    if missing:
        raise GraftError(f"Stage(s) {', '.join(map(repr, missing))} not finished, and a stage to run uses them. Run "
                         f"the pipeline without --from / --only first.")
    foreign = [s.run_dir for s in chosen if s.run_dir.exists() and any(s.run_dir.iterdir())
               and not (s.run_dir / STATE_FILE).is_file()]
    if foreign:
        raise GraftError(f"{foreign[0]} exists and was not written by a pipeline; a stage would replace it. Choose "
                         f"another out (--out or [pipeline] out), or move that folder away.")
    forced = (start or only) is not None
    for stage in chosen:
        if stage.status == "done" and not forced:
            echo(f"[{stage.name}] up to date: {stage.run_dir}")
            continue
        resume = stage.status == "resume" and not forced
        if not resume and stage.run_dir.exists():
            shutil.rmtree(stage.run_dir)  # another config (or upstream) than the run there: start it afresh
        stage.run_dir.mkdir(parents=True, exist_ok=True)
        (stage.run_dir / STATE_FILE).write_text(json.dumps({"fingerprint": stage.fingerprint, "uses": stage.uses,
                                                            "group": stage.group}))
        if stage.compress is not None or stage.generate is not None:
            (_compress_stage if stage.compress is not None else _generate_stage)(stage, echo)
            stage.status = "done"
            continue
        echo(f"[{stage.name}] {'resuming' if resume else 'training'} {stage.config.plugins['strategy'].name} -> "
             f"{stage.run_dir}")
        summary = train(stage.config, stage.run_dir, resume=resume, echo=echo)
        if summary.get("interrupted"):
            echo(f"[{stage.name}] interrupted; run the pipeline again to continue from its checkpoint.")
            return None
        stage.status = "done"
    return report(stages)


def _compress_stage(stage: Stage, echo) -> None:
    from .compress import compress_run

    o = stage.compress
    echo(f"[{stage.name}] compressing {o['compress']} -> {stage.run_dir}")
    compress_run(o["compress"], stage.run_dir, o.get("quantize"), o.get("prune"), o.get("finetune_steps", 0),
             o.get("finetune_lr"), o.get("calibration_samples", 256), o.get("calibration_method", "percentile"),
             echo=echo)


def report(stages: list[Stage]) -> dict:
    """Per stage: strategy, backbone, the metric and its best value, val/test metrics, parameters, throughput and
    the size of its weights -- from each finished stage's summary.json."""
    rows = []
    for s in stages:
        summary = rundir.read_summary(s.run_dir)
        if summary is None:
            rows.append({"stage": s.name, "status": "not run"})
            continue
        weights = s.run_dir / rundir.WEIGHTS
        rows.append({
            "stage": s.name, "status": "done", "run_dir": str(s.run_dir), "strategy": summary.get("strategy"),
            "backbone": summary.get("backbone"), "metric": summary.get("metric"), "best": summary.get("best"),
            "val": _scalars(summary.get("val")), "test": _scalars(summary.get("test")),
            "parameters": summary.get("parameters", {}), "train_samples_per_s": summary.get("train_samples_per_s"),
            "weights_bytes": summary.get("size_bytes") or (weights.stat().st_size if weights.is_file() else None)})
    return {"stages": rows, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _scalars(metrics):
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))} or None


def table(rep: dict) -> list[list[str]]:
    """The report as table rows: stage, strategy, metric, val, test, parameters, size, samples/s."""
    rows = []
    for r in rep["stages"]:
        if r["status"] != "done":
            rows.append([r["stage"], "-", "-", "-", "-", "-", "-", "-"])
            continue
        m = r["metric"]
        fmt = lambda d: f"{d[m]:.4g}" if d and m in d else "-"  # noqa: E731
        rows.append([r["stage"], r["strategy"], m, fmt(r["val"]), fmt(r["test"]),
                     f"{r['parameters'].get('total', 0) / 1e6:.2f}M",
                     f"{(r['weights_bytes'] or 0) / 2**20:.1f} MiB", f"{r['train_samples_per_s'] or 0:.0f}"])
    return rows


def plot(rep: dict, path: Path) -> bool:
    """A PNG of each finished stage's metric (test, else val) and parameter count; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    done = [r for r in rep["stages"] if r["status"] == "done"]
    if not done:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    labels = [f"{r['stage']}\n({r['metric']})" for r in done]
    a.bar(labels, [((r["test"] or r["val"] or {}).get(r["metric"], 0)) for r in done], color="tab:blue")
    a.set_title("metric (test, else val)")
    b.bar([r["stage"] for r in done], [r["parameters"].get("total", 0) / 1e6 for r in done], color="tab:gray")
    b.set_title("parameters (millions)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
