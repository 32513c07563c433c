"""Method matrices for ``graft compare --matrix FILE``: one data and backbone, several methods, several seeds.

A matrix file is a graft config (the tables every method shares: ``[backbone]``, ``[data]``, ``[train]`` ...)
plus ``[matrix]`` and a list of ``[[method]]`` tables::

    [matrix]
    seeds = [0, 1, 2]            # each method runs once per seed (train.seed)
    baseline = "finetune"        # the row the others are compared with (default: the first method)
    out = "runs/bbc-matrix"      # default runs/<file name>
    # config = "base.toml"       # optional: a config file under the tables here (relative to this file)

    [[method]]
    name = "finetune"            # a folder name: NAME-sSEED is each run's directory
    [[method]]
    name = "lora-r8"
    [method.adapter]
    plugin = "lora"
    r = 8
    [[method]]
    name = "student"
    [method.strategy]
    plugin = "distill"
    teacher = "@finetune"        # the finetune run of the same seed
    [[method]]
    name = "int8"
    compress = "finetune"        # graft compress of the same seed's finetune run
    quantize = "dynamic-int8"

A method's tables win key by key over the shared ones; a table naming another ``plugin`` replaces the shared one
(its options are that plugin's). ``set`` lists ``TABLE.KEY=VALUE`` overrides. ``"@METHOD"`` anywhere in a method
stands for that method's run of the same seed. The matrix expands into a pipeline (``graft.pipeline``): seed by
seed, the methods in order, so finished runs are skipped, an interrupted one resumes from its checkpoint, and a
changed method runs again with what uses it.
"""

from __future__ import annotations

from pathlib import Path

from . import config as cfg
from .errors import GraftError, did_you_mean

MATRIX_KEYS = {"seeds", "baseline", "out", "config"}


def _with_seed(value, names: set[str], seed: int):
    """``value`` with "@METHOD..." strings pointed at METHOD's run of ``seed``."""
    if isinstance(value, dict):
        return {k: _with_seed(v, names, seed) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_seed(v, names, seed) for v in value]
    if isinstance(value, str) and value.startswith("@"):
        name, sep, rest = value[1:].partition("/")
        if name in names:
            return f"@{name}-s{seed}{sep}{rest}"
    return value


def _method_tables(shared: dict, method: dict) -> dict:
    """The shared tables with a method's over them (overrides never change shared tables: ``apply_overrides``)."""
    out = dict(shared)
    for key, value in method.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and value.get("plugin", out[key].get("plugin")) \
                == out[key].get("plugin"):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def expand(path: Path) -> tuple[dict, dict]:
    """The matrix file ``path`` as pipeline tables, and ``{"baseline": NAME, "methods": [...], "seeds": [...]}``.
    Raises GraftError naming the file, method and key for bad input."""
    data = cfg.read_toml(path)
    where = str(path)
    settings = data.pop("matrix", None)
    methods = data.pop("method", None)
    if not isinstance(settings, dict) or not isinstance(methods, list) or not methods:
        raise GraftError(f"{where}: a matrix file needs a [matrix] table (seeds, baseline) and [[method]] tables, "
                         f"each with a name; the other tables are the config every method shares.")
    unknown = set(settings) - MATRIX_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise GraftError(f"{where}: [matrix] {key}: unknown key{did_you_mean(key, sorted(MATRIX_KEYS))} It takes "
                         f"{', '.join(sorted(MATRIX_KEYS))}.")
    seeds = settings.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool)
                                                           for x in seeds) or len(set(seeds)) != len(seeds):
        raise GraftError(f"{where}: [matrix] seeds = {seeds!r}: give a list of different integers, e.g. [0, 1, 2].")
    names = []
    for i, m in enumerate(methods):
        name = m.get("name") if isinstance(m, dict) else None
        if not isinstance(name, str) or not name or "/" in name or name.startswith((".", "@")) or name in names:
            raise GraftError(f"{where}: [[method]] {i + 1}: each method needs its own name = \"...\" (a folder name: "
                             f"no '/', not starting with '.' or '@').")
        names.append(name)
    baseline = settings.get("baseline", names[0])
    if baseline not in names:
        raise GraftError(f"{where}: [matrix] baseline = {baseline!r} is no method.{did_you_mean(baseline, names)} "
                         f"Methods: {', '.join(names)}.")
    stages = []
    for seed in seeds:
        for m in methods:
            own = _with_seed({k: v for k, v in m.items() if k not in ("name", "set")}, set(names), seed)
            stage = {"name": f"{m['name']}-s{seed}"}
            if "compress" in own:
                ref = str(own["compress"]).lstrip("@")
                if ref not in names:
                    raise GraftError(f"{where}: [[method]] {m['name']!r}: compress = {own['compress']!r} names no "
                                     f"method.{did_you_mean(ref, names)}")
                stages.append({**stage, **own, "compress": f"@{ref}-s{seed}"})
                continue
            if "config" in settings:
                stage["config"] = settings["config"]
            stage.update(_method_tables(data, own))
            stage["set"] = [f"train.seed={seed}"] + _with_seed(list(m.get("set", [])), set(names), seed)
            stages.append(stage)
    out = settings.get("out") or str(Path("runs") / path.stem)
    return {"pipeline": {"out": out}, "stage": stages}, {"baseline": baseline, "methods": names, "seeds": seeds}


def run_matrix(path, registry=None, overrides: list[str] = (), echo=print):
    """Expand the matrix file ``path``, run what is not done (the pipeline machinery: skip, resume, rerun what
    changed). Returns (the run directories, the baseline method's, the matrix's folder), or (None, None, None)
    when a signal interrupted a run (rerunning the same command resumes it)."""
    from . import pipeline as pl

    path = Path(path)
    tables, info = expand(path)
    stages = pl.read_pipeline(path, None, registry, overrides, data=tables)
    for s in stages:
        s.group = s.name.rsplit("-s", 1)[0]
    if pl.run_stages(stages, echo=echo) is None:
        return None, None, None
    base = [s.run_dir for s in stages if s.group == info["baseline"]]
    return [s.run_dir for s in stages], base, stages[0].run_dir.parent
