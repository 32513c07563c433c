"""Hyper-parameter search on Optuna: ``graft sweep CONFIG --space SPACE.toml --trials N``.

A space file holds one table per searched config key, nested as in a config (``[train.lr]`` searches ``train.lr``)
with a ``distribution`` -- ``log-uniform`` / ``uniform`` (``low``, ``high``), ``int`` (``low``, ``high``, optional
``step``, ``log``) or ``categorical`` (``choices``) -- and an optional ``[sweep]`` table: ``metric`` (default: the
config's), ``direction`` ("maximize" / "minimize", default from the strategy's ``metric_modes``), ``sampler`` (tpe,
random), ``pruner`` (median, none), ``startup_trials`` (3: trials that finish before any is pruned),
``warmup_steps`` (0: optimizer steps before a trial can be pruned), ``seed``.

Each trial is a normal run directory (``OUT/trial-NNN``) of the config with the trial's values set; its value is
the run's best validation metric. The median pruner (Optuna's ``MedianPruner``) sees every validation through a
logger and ends a trial as early stopping would. The metric (``[sweep] metric``, else the config's ``[train]
metric``, else the one the strategy picks for the task) is set as each trial's ``[train] metric``. The study lives in ``OUT/study.db`` (SQLite): a sweep run again
continues it -- finished trials count, a trial the interruption cut short runs again with the same values.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from . import config as cfg
from .errors import GraftError, did_you_mean, warn
from .interfaces import Logger
from .options import NoOptions

DISTRIBUTIONS = ("log-uniform", "uniform", "int", "categorical")
SETTINGS = ("metric", "direction", "sampler", "pruner", "seed", "startup_trials", "warmup_steps")


@dataclass
class Param:
    key: str  # "train.lr"
    distribution: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: list | None = None

    def suggest(self, trial):
        if self.distribution == "categorical":
            return trial.suggest_categorical(self.key, self.choices)
        if self.distribution == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.distribution == "log-uniform",
                                   step=self.step)


def _params(node: dict, where: str, prefix: str = "") -> list[Param]:
    out = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        if not isinstance(value, dict):
            raise GraftError(f"{where}: {name} = {value!r}: each searched key is a table with a distribution, e.g. "
                             f"[{name}] distribution = \"log-uniform\", low = 1e-4, high = 1e-2.")
        if "distribution" not in value:
            out += _params(value, where, name + ".")
            continue
        at = f"{where}: [{name}]"
        if "." not in name:
            raise GraftError(f"{at}: name a config key inside its table, e.g. [train.lr].")
        d = str(value["distribution"]).replace("_", "-").replace("loguniform", "log-uniform")
        if d not in DISTRIBUTIONS:
            raise GraftError(f"{at}: distribution {value['distribution']!r}: use one of {', '.join(DISTRIBUTIONS)}."
                             f"{did_you_mean(str(value['distribution']), DISTRIBUTIONS)}")
        allowed = {"distribution", "choices"} if d == "categorical" else {"distribution", "low", "high", "step", "log"}
        extra = set(value) - allowed
        if extra:
            raise GraftError(f"{at}: {d} takes {', '.join(sorted(allowed))}; not {', '.join(sorted(extra))}.")
        p = Param(name, d, value.get("low"), value.get("high"), value.get("step"), bool(value.get("log", False)),
                  value.get("choices"))
        if d == "categorical":
            if not isinstance(p.choices, list) or not p.choices:
                raise GraftError(f"{at}: categorical needs choices = [...], a non-empty list.")
        elif not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                     for x in (p.low, p.high)) or not p.low < p.high:
            raise GraftError(f"{at}: {d} needs numbers low < high, got low = {p.low!r}, high = {p.high!r}.")
        elif d == "log-uniform" and p.low <= 0:
            raise GraftError(f"{at}: log-uniform needs low > 0, got {p.low}.")
        out.append(p)
    return out


def load_space(path: str | Path) -> tuple[list[Param], dict]:
    """The searched keys of space file ``path`` and its ``[sweep]`` settings. Raises GraftError naming the file
    and table for bad input."""
    data = cfg.read_toml(path)
    settings = data.pop("sweep", {})
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        name = sorted(unknown)[0]
        raise GraftError(f"{path}: [sweep] {name}: not a setting.{did_you_mean(name, SETTINGS)} Settings: "
                         f"{', '.join(SETTINGS)}.")
    params = _params(data, str(path))
    if not params:
        raise GraftError(f"{path}: no searched keys; add tables such as [train.lr] distribution = \"log-uniform\", "
                         f"low = 1e-4, high = 1e-2.")
    return params, settings


def _literal(value) -> str:
    return cfg._toml_value(value)


class _Pruning(Logger):
    """Reports each validation's metric to the trial and asks to stop when Optuna's pruner says so (a subclass per
    trial binds ``trial`` and ``metric``; a trial it ended carries the user attribute ``pruned``)."""

    trial = None
    metric = ""

    def __init__(self, options=None):
        super().__init__(options)
        self.pruned = False

    def log(self, record):
        if record["split"] == "val" and self.metric in record:
            self.trial.report(record[self.metric], record["step"])
            self.pruned = self.trial.should_prune()

    def should_stop(self):
        if self.pruned:
            self.trial.set_user_attr("pruned", True)
        return self.pruned


def trial_config(config_path, overrides, params: list[Param], values: dict, where: str) -> cfg.Config:
    sets = [f"{k}={_literal(values[k])}" for k in (p.key for p in params)]
    try:
        return cfg.load_config(config_path, list(overrides) + sets)
    except GraftError as e:
        raise GraftError(f"{where}: {e}") from None


def _objective(base: cfg.Config, settings: dict, space_path) -> tuple[str, str]:
    """The metric the trials are scored by and its Optuna direction: ``[sweep]``'s, else the config's, else what
    the strategy picks for the data's task (a probe run built once on the CPU in eval mode, then let go)."""
    metric = settings.get("metric") or base.train.metric
    strategy = base.plugins["strategy"].cls(base.plugins["strategy"].options, backbone=None, loss=None, data=None)
    if not metric:  # per task: rmse, miou, entity_f1 ...
        import torch

        from .run import Run

        strategy = Run(base, device=torch.device("cpu"), mode="eval").strategy  # the sweep's RNGs left alone
        metric = strategy.primary_metric
    mode = base.train.metric_mode if base.train.metric_mode != "auto" else None
    if mode is None and settings.get("direction") is None:
        mode = strategy.metric_mode(metric)
    direction = settings.get("direction") or {"max": "maximize", "min": "minimize"}.get(mode or "")
    if direction not in ("maximize", "minimize"):
        raise GraftError(f"{space_path}: [sweep] direction: say \"maximize\" or \"minimize\" for metric {metric!r}.")
    return metric, direction


def sweep(config_path, space_path, trials: int, out=None, overrides=(), echo=print) -> dict:
    """Run the study to ``trials`` finished trials (complete or pruned); returns the results (also sweep.json)."""
    try:
        import optuna
    except ImportError:
        raise GraftError("graft sweep needs Optuna: pip install 'graftkit[optuna]'.") from None
    from .loop import train

    params, settings = load_space(space_path)
    out = Path(out or Path("runs") / f"sweep-{Path(config_path).stem}")
    # every searched key must exist: a config with the lowest values is resolved before anything runs
    probe = {p.key: p.choices[0] if p.choices else (int(p.low) if p.distribution == "int" else p.low) for p in params}
    base = trial_config(config_path, overrides, params, probe, f"{space_path}")
    metric, direction = _objective(base, settings, space_path)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}.get(
        settings.get("sampler", "tpe"))
    if sampler is None:
        raise GraftError(f"{space_path}: [sweep] sampler: use tpe or random.")
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=int(settings.get("startup_trials", 3)),
                                                            n_warmup_steps=int(settings.get("warmup_steps", 0))),
              "none": optuna.pruners.NopPruner}.get(settings.get("pruner", "median"))
    if pruner is None:
        raise GraftError(f"{space_path}: [sweep] pruner: use median or none.")
    storage = f"sqlite:///{out.resolve() / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="graft", load_if_exists=True, direction=direction,
                                pruner=pruner())
    # A sampler seeded as on the first attempt would repeat that attempt's start-up draws (optuna#6283): offset the
    # seed by the trials the study holds, which keeps a sweep that is never cut reproducible.
    study.sampler = sampler(seed=int(settings.get("seed", 0)) + len(study.trials))
    _requeue_interrupted(study, echo)
    done = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
    echo(f"Study {out / 'study.db'}: {len(done)} of {trials} trials finished; metric {metric} ({direction}).")

    def objective(trial):
        trial.set_user_attr(OUTCOME, "running")  # a trial that fails still "running" was cut short (a signal)
        values = {p.key: p.suggest(trial) for p in params}
        conf = trial_config(config_path, overrides, params, values, f"trial {trial.number}")
        pruning = type("Pruning", (_Pruning,), {"trial": trial, "metric": metric})
        # the run's best weights, the pruner and the objective: one metric
        conf = conf.replace(train={"metric": metric}, loggers=[
            *conf.loggers, cfg.PluginSpec("logger", "optuna-pruning", pruning, NoOptions())])
        run_dir = out / f"trial-{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))
        echo(f"[trial {trial.number}] " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                                                    for k, v in values.items()))
        try:
            summary = train(conf, run_dir, echo=lambda m: None)
        except Exception:  # a signal (KeyboardInterrupt) is no Exception: that trial stays "running", to be re-run
            trial.set_user_attr(OUTCOME, "error")  # bad input, a diverged run, a crash: running it again won't help
            raise
        if summary.get("interrupted"):
            raise KeyboardInterrupt
        trial.set_user_attr(OUTCOME, "finished")
        if summary.get("best") is None:
            raise GraftError(f"trial {trial.number}: the run has no validation metric {metric!r} (no val split?).")
        if trial.user_attrs.get("pruned"):
            echo(f"[trial {trial.number}] pruned at step {summary['steps']}")
            raise optuna.TrialPruned()
        echo(f"[trial {trial.number}] {metric} {summary['best']:.4g} in {summary['steps']} steps")
        return summary["best"]

    remaining = trials - len(done)
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=(GraftError,))  # e.g. a non-finite loss: that trial fails
    return report(study, out, metric, direction)


OUTCOME = "graft_outcome"  # trial user attribute: running / finished / error


def _requeue_interrupted(study, echo) -> None:
    """Trials a signal or a kill cut short run again with the same values, once each: those left RUNNING by a kill
    (marked FAIL now), and FAILed ones whose run never reached an outcome (Optuna records a trial that a
    KeyboardInterrupt ended as FAIL, optuna#3255). A FAIL from bad input or a diverged run is not retried."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    requeued = {t.user_attrs.get("requeued_from") for t in trials}  # WAITING ones included
    for t in trials:
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
        elif not (t.state == TrialState.FAIL and t.user_attrs.get(OUTCOME) == "running"):
            continue
        if t.number in requeued:
            continue  # queued by an earlier attempt that was itself cut before running it
        study.enqueue_trial(t.params, user_attrs={"requeued_from": t.number})
        echo(f"Trial {t.number} was cut short; it runs again with the same values.")


def report(study, out: Path, metric: str, direction: str) -> dict:
    """sweep.json (every trial: state, values, metric, run directory; the best trial and its config) and Optuna's
    plots as PNG."""
    trials = [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
               "last_step": max(t.intermediate_values) if t.intermediate_values else None,
               "run_dir": t.user_attrs.get("run_dir")} for t in study.trials]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    best = None
    if complete:
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params, "run_dir": b.user_attrs.get("run_dir"),
                "config": str(Path(b.user_attrs.get("run_dir", "")) / "config.toml")}
    result = {"metric": metric, "direction": direction, "trials": trials, "best": best,
              "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    result["plots"] = _plots(study, out) if complete else []
    return result


def _plots(study, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
    except ImportError:
        return []
    written = []
    import warnings

    for name in ("optimization_history", "intermediate_values", "param_importances", "parallel_coordinate"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = getattr(ovm, f"plot_{name}")(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(f"{name}.png")
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importances need two completed trials
            warn(f"sweep plot {name}: not drawn ({e}).")
    return written


def table(result: dict) -> list[list[str]]:
    rows = []
    for t in result["trials"]:
        value = f"{t['value']:.4g}" if t["value"] is not None else "-"
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
        rows.append([str(t["number"]), t["state"].lower(), value, params])
    return rows
