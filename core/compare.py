"""``graft compare``: finished runs side by side on the same test examples, with statistics a reader can trust.

Each run's per-example records (``graft.predictions``) give its test metric a 95% percentile bootstrap interval
over the test examples (Efron & Tibshirani 1993): the examples are resampled with replacement and the run's own
``compute_metrics`` is applied to each resample's summed statistics, so any metric that is a function of sums over
examples works (accuracy, macro F1, entity F1, mIoU, RMSE, loss). Against a baseline, both runs are resampled with
the same draws (a paired bootstrap, Koehn 2004): the difference's interval, and its p-value -- McNemar's exact
test (``scipy.stats.binomtest`` on the discordant pairs) when the metric is accuracy over one-label examples, else
the paired bootstrap's (the share of resampled differences at least as far from the observed one as the observed
one is from 0; Berg-Kirkpatrick et al. 2012).

Runs that differ only in ``train.seed`` form one row (a matrix's method is one row whatever its config): the mean
and spread of the seeds' metrics, and the pooled test over all their test examples, each seed's run paired with the
baseline's run on the same test examples. Runs on different examples (another split, another file) are refused.
Cost columns come from the run directories' summary.json. Importing this module never imports torch.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import predictions, rundir
from .errors import GraftError
from .files import atomic_write_text

RESAMPLES = 2000
LEVEL = 0.95
ALPHA = 0.05


@dataclass
class Member:
    """One finished run: its directory, summary, seed, test records and the key runs of one row share."""
    run_dir: Path
    summary: dict
    seed: int
    records: list
    key: str
    label: str

    @functools.cached_property
    def fingerprint(self) -> str:
        return predictions.fingerprint(self.records)

    @functools.cached_property
    def stacked(self) -> dict:
        """The records' sums as arrays (``stack``), decoded once."""
        return stack(self.records, str(self.run_dir))


@dataclass
class Group:
    """One row: the runs of one config (or one matrix method) across seeds."""
    label: str
    members: list = field(default_factory=list)


def _config_key(run_dir: Path, summary: dict) -> tuple[str, int]:
    """(the config without its seed and output folder, as text; the seed). A compression's request (not its
    source path) is part of the key: an int8 model is not its fp32 source."""
    from .config import read_toml

    data = read_toml(run_dir / rundir.CONFIG)
    train = dict(data.get("train", {}))
    seed = int(train.pop("seed", 0))
    data["train"] = train
    extra = {k: v for k, v in (summary.get("compression") or {}).items() if k != "source"}
    return json.dumps([data, extra], sort_keys=True, default=str), seed


def load_member(run_dir, split: str) -> Member:
    """A finished run with per-example predictions of ``split``. Raises GraftError naming the run and the fix."""
    run_dir = Path(run_dir)
    summary = rundir.read_summary(run_dir)
    if summary is None or not (run_dir / rundir.CONFIG).is_file():
        raise GraftError(f"{run_dir} is not a finished graft run (no {rundir.SUMMARY} or {rundir.CONFIG}): give run "
                         f"directories of finished `graft train` or `graft compress` runs.")
    records = predictions.read(run_dir, split)
    if not records:
        strategy = summary.get("strategy", "?")
        raise GraftError(f"{run_dir} has no per-example predictions of its {split} split "
                         f"({predictions.FOLDER}/{split}.jsonl): it was trained before graftkit kept them, its "
                         f"strategy ({strategy}) does not score examples one by one, or it has no {split} split. "
                         f"Write them with `graft eval {run_dir} --predictions` (runs of finetune, distill, adapt, "
                         f"clm and seq2seq keep them).")
    key, seed = _config_key(run_dir, summary)
    state = run_dir / ".graft-stage.json"  # a matrix's stage: its method is its row, whatever the config
    group = json.loads(state.read_text()).get("group") if state.is_file() else None
    if group:
        key = f"matrix:{group}"
    return Member(run_dir, summary, seed, records, key, group or run_dir.name)


def group_members(members: list[Member]) -> list[Group]:
    """Rows in the order their first run was given; a row's runs ordered by seed. A second run of a config with a
    seed its row already has (a rerun, a copy) gets a row of its own."""
    groups: dict[str, Group] = {}
    for m in members:
        key, n = m.key, 1
        while key in groups and any(o.seed == m.seed for o in groups[key].members):
            key, n = f"{m.key}#{n}", n + 1
        groups.setdefault(key, Group(m.label)).members.append(m)
    for g in groups.values():
        g.members.sort(key=lambda m: m.seed)
        if len(groups) > 1 and sum(o.label == g.label for o in groups.values()) > 1:
            g.label = f"{g.label} ({g.members[0].run_dir.parent.name})"
    return list(groups.values())


# -- statistics ----------------------------------------------------------------------------------------------------

def stack(records: list[dict], where: str) -> dict:
    """The records' sums as arrays ``[N, ...]`` (float64); a sum that is a list of items per example (seq2seq's
    [hypothesis, reference] pairs for BLEU) as ``Items``, concatenated per resample. Raises GraftError when the
    records disagree on a sum's form."""
    import numpy as np

    out = {}
    keys = sorted({k for r in records for k in r["sums"]})
    for k in keys:
        values = [r["sums"].get(k) for r in records]
        if any(_items(v) for v in values):
            out[k] = Items([v or [] for v in values])
            continue
        if any(v is None for v in values):
            raise GraftError(f"{where}: some records lack the sum {k!r}; were they written by one run?")
        out[k] = np.stack([predictions.decode(v) for v in values])
    return out


def _items(value) -> bool:
    """Whether a record's sum is a list of items (strings, pairs of strings, dicts) rather than numbers (a number, a
    nested list of numbers, a sparse tensor)."""
    if not isinstance(value, list):
        return False
    while isinstance(value, list) and value:
        value = value[0]
    return isinstance(value, (str, dict))


def concat(members: list[Member]) -> dict:
    """The stacked sums of several runs' records one after the other (a row's seeds pooled)."""
    import numpy as np

    out = {}
    for k in {k for m in members for k in m.stacked}:
        parts = [m.stacked.get(k) for m in members]
        if any(isinstance(p, Items) for p in parts):
            out[k] = Items(x for p, m in zip(parts, members) for x in (p if p is not None else [[]] * len(m.records)))
        elif any(p is None for p in parts):
            raise GraftError(f"the runs of one row disagree on the sum {k!r}; were they written by one graftkit?")
        else:
            out[k] = np.concatenate(parts)
    return out


class Items(list):
    """Per example, a list of items (not numbers): a resample holds each example's items as often as it is drawn."""

    def take(self, counts) -> list:
        return [item for i in counts.nonzero()[0] for _ in range(int(counts[i])) for item in self[i]]


def resample_weights(n: int, resamples: int, seed: int):
    """``[resamples, n]`` counts: how often each example is drawn in each bootstrap resample (seeded)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    offsets = (np.arange(resamples) * n)[:, None]
    return np.bincount((draws + offsets).reshape(-1), minlength=resamples * n).reshape(resamples, n).astype(float)


def metric_values(stacked: dict, weights, fn) -> list[float]:
    """``fn`` (summed sums -> the metric) of each row of ``weights`` ``[R, N]`` applied to ``stacked``."""
    import numpy as np
    import torch

    out = []
    for start in range(0, len(weights), 256):
        w = weights[start:start + 256]
        summed = {k: np.tensordot(w, a, axes=(1, 0)) for k, a in stacked.items() if not isinstance(a, Items)}
        for i in range(len(w)):
            sums = {k: torch.from_numpy(np.asarray(v[i])) for k, v in summed.items()}
            sums.update({k: a.take(w[i]) for k, a in stacked.items() if isinstance(a, Items)})
            out.append(fn(sums))
    return out


def interval(values, level: float = LEVEL) -> tuple[float, float]:
    import numpy as np

    v = np.asarray([x for x in values if math.isfinite(x)])
    if not len(v):
        return float("nan"), float("nan")
    return float(np.quantile(v, (1 - level) / 2)), float(np.quantile(v, 1 - (1 - level) / 2))


def seed_interval(values: list[float], level: float = LEVEL) -> list[float] | None:
    """Student's t interval of the mean of per-seed values (training randomness, which the test-example bootstrap
    does not see); None for one seed."""
    import numpy as np
    from scipy.stats import t

    if len(values) < 2:
        return None
    half = t.ppf(1 - (1 - level) / 2, len(values) - 1) * np.std(values, ddof=1) / len(values) ** 0.5
    return [float(np.mean(values) - half), float(np.mean(values) + half)]


def mcnemar(a_correct: list[bool], b_correct: list[bool]) -> dict:
    """McNemar's exact test on paired correctness: ``scipy.stats.binomtest`` of the discordant pairs (a right and b
    wrong, of all pairs where they disagree) against 1/2; p = 1 when they never disagree."""
    from scipy.stats import binomtest

    only_a = sum(x and not y for x, y in zip(a_correct, b_correct))
    only_b = sum(y and not x for x, y in zip(a_correct, b_correct))
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"test": "McNemar exact", "p_value": float(p), "only_this_right": only_a, "only_baseline_right": only_b}


def paired_p(observed: float, diffs) -> float:
    """The paired bootstrap's two-sided p-value: the share of resampled differences at least as far from the
    observed difference as it is from 0 (the resamples recentred on the null), with the +1 of a Monte-Carlo test."""
    finite = [d for d in diffs if math.isfinite(d)]
    extreme = sum(abs(d - observed) >= abs(observed) - 1e-12 for d in finite)
    return (extreme + 1) / (len(finite) + 1)


class Scorer:
    """The metric of summed statistics, by the run's own strategy (loaded once per row, without its data)."""

    def __init__(self, member: Member, metric: str | None):
        from .export import load_run

        run = load_run(member.run_dir, for_prediction=True, device="cpu")
        self.strategy = run.strategy
        self.metric = metric or member.summary.get("metric")
        if not self.metric:
            raise GraftError(f"{member.run_dir}: its summary names no metric; pass --metric NAME.")
        try:
            self.mode = self.strategy.metric_mode(self.metric)
        except GraftError:
            self.mode = "max"

    def __call__(self, sums: dict) -> float:
        metrics = self.strategy.compute_metrics(sums)
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)):
            names = [k for k, v in metrics.items() if isinstance(v, (int, float))]
            raise GraftError(f"metric {self.metric!r} is not one of the runs' metrics; pass --metric with one of "
                             f"{', '.join(names)}.")
        return float(value)


# -- the comparison ------------------------------------------------------------------------------------------------

def _partner(m: Member, base: Group) -> Member:
    """The baseline's run on the same test examples as ``m`` (the same seed first). Raises GraftError saying why
    none fits."""
    same = [b for b in base.members if b.fingerprint == m.fingerprint]
    if same:
        return next((b for b in same if b.seed == m.seed), same[0])
    b = next((b for b in base.members if b.seed == m.seed), base.members[0])
    ids_a, ids_b = [r["id"] for r in m.records], [r["id"] for r in b.records]
    if ids_a != ids_b:
        why = (f"their test splits hold different examples ({len(set(ids_a) ^ set(ids_b))} of {len(ids_a)} + "
               f"{len(ids_b)} ids are in only one; another seed, split fraction or data file splits differently)")
    else:
        diff = next(r["id"] for r, q in zip(m.records, b.records) if r.get("target") != q.get("target"))
        why = f"the same example ids have different targets (first: {diff!r}): the data differ"
    raise GraftError(f"{m.run_dir} cannot be compared with the baseline {b.run_dir}: {why}. Compare runs tested on the "
                     f"same examples: the same data and split settings, and the same train.seed unless the test "
                     f"split is a file of its own.")


def _costs(m: Member) -> dict:
    s = m.summary
    params = s.get("parameters") or {}
    weights = m.run_dir / rundir.WEIGHTS
    size = s.get("size_bytes") or (weights.stat().st_size if weights.is_file() else None)
    latency = ((s.get("compressed") or {}).get("latency") or {}).get("p50_ms")
    out = {"parameters": params.get("total"), "trainable_parameters": params.get("trainable"),
           "train_time_s": s.get("train_time_s"), "train_samples_per_s": s.get("train_samples_per_s"),
           "peak_memory_mib": s["peak_memory_bytes"] / 2**20 if s.get("peak_memory_bytes") else None,
           "size_mib": size / 2**20 if size else None,
           "adapter_mib": (s.get("adapter") or {}).get("size_bytes", 0) / 2**20 or None,
           "latency_p50_ms": latency}
    return out


def _mean_costs(members: list[Member]) -> dict:
    costs = [_costs(m) for m in members]
    out = {}
    for k in costs[0]:
        values = [c[k] for c in costs if c[k] is not None]
        out[k] = sum(values) / len(values) if values else None
    return out


def _row(g: Group, scorer: Scorer, partners: list[Member] | None, base_scorer: Scorer, weights_of, seed: int) -> dict:
    import numpy as np

    runs = []
    for m in g.members:
        values = metric_values(m.stacked, weights_of(len(m.records), seed), scorer)
        point = metric_values(m.stacked, np.ones((1, len(m.records))), scorer)[0]
        runs.append({"run_dir": str(m.run_dir), "seed": m.seed, "value": point, "ci": interval(values),
                     "examples": len(m.records)})
    pooled_records = [r for m in g.members for r in m.records]
    pooled = concat(g.members)
    n = len(pooled_records)
    w = weights_of(n, seed)
    values = metric_values(pooled, w, scorer)
    point = metric_values(pooled, np.ones((1, n)), scorer)[0]
    seeds = [r["value"] for r in runs]
    row = {"label": g.label, "runs": runs, "seeds": [m.seed for m in g.members],
           "mean": float(np.mean(seeds)), "std": float(np.std(seeds, ddof=1)) if len(seeds) > 1 else None,
           "seed_ci": seed_interval(seeds),
           "pooled": {"value": point, "ci": interval(values), "examples": n}, "cost": _mean_costs(g.members)}
    if partners is None:
        row["baseline"] = True
        return row
    theirs_records = [r for b in partners for r in b.records]
    theirs = concat(partners)
    other = metric_values(theirs, w, base_scorer)
    diffs = [a - b for a, b in zip(values, other)]
    observed = point - metric_values(theirs, np.ones((1, n)), base_scorer)[0]
    per_seed = [r["value"] - metric_values(b.stacked, np.ones((1, len(b.records))), base_scorer)[0]
                for r, b in zip(runs, partners)]
    vs = {"difference": observed, "ci": interval(diffs), "baseline_runs": [str(b.run_dir) for b in partners],
          "seed_differences": per_seed, "seed_ci": seed_interval(per_seed),
          "same_sign_every_seed": all(d > 0 for d in per_seed) or all(d < 0 for d in per_seed)}
    # McNemar's test needs the metric to be the share of records right: one label each, one source
    both = pooled_records + theirs_records
    if scorer.metric == "accuracy" and all("correct" in r and "source" not in r for r in both):
        vs.update(mcnemar([r["correct"] for r in pooled_records], [r["correct"] for r in theirs_records]))
    else:
        vs.update(test="paired bootstrap", p_value=paired_p(observed, diffs))
    vs["significant"] = vs["p_value"] < ALPHA
    row["vs_baseline"] = vs
    return row


def compare(run_dirs: list, baseline: list | None = None, split: str = "test", metric: str | None = None,
            resamples: int = RESAMPLES, seed: int = 0, echo=None) -> dict:
    """The comparison of finished runs ``run_dirs`` (``baseline``: the runs of the baseline row, by default the
    first run's row) on ``split``: per row the seeds' metrics, the pooled metric with its bootstrap interval, the
    paired difference to the baseline with its interval and p-value, and costs. Raises GraftError for runs that
    cannot be compared (not finished, no predictions, other test examples, another metric)."""
    if not run_dirs:
        raise GraftError("graft compare: give at least one run directory (or --matrix FILE).")
    try:
        import scipy.stats  # noqa: F401 - McNemar's test
    except ImportError:
        raise GraftError("graft compare uses scipy: pip install 'graftkit[compare]'.") from None
    if resamples < 100:
        raise GraftError(f"--resamples {resamples}: use 100 or more (2000 is the default; intervals from fewer "
                         f"resamples move from one seed to the next).")
    given = [Path(d).resolve() for d in run_dirs]
    extra = [Path(d).resolve() for d in baseline or () if Path(d).resolve() not in given]
    members = [load_member(d, split) for d in extra + given]
    groups = group_members(members)
    base = groups[0]
    if baseline:
        first = Path(baseline[0]).resolve()
        base = next(g for g in groups if any(m.run_dir == first for m in g.members))
    scorers = {id(g): Scorer(g.members[0], metric) for g in groups}
    name = metric or scorers[id(base)].metric
    for g in groups:
        scorers[id(g)].metric = name
    cache: dict = {}

    def weights_of(n, s):
        if (n, s) not in cache:
            cache[(n, s)] = resample_weights(n, resamples, s)
        return cache[(n, s)]

    rows = []
    for g in [base] + [g for g in groups if g is not base]:
        if echo:
            echo(f"Resampling {g.label} ({len(g.members)} run{'s' if len(g.members) > 1 else ''})...")
        partners = None if g is base else [_partner(m, base) for m in g.members]
        rows.append(_row(g, scorers[id(g)], partners, scorers[id(base)], weights_of, seed))
    return {"metric": name, "mode": scorers[id(base)].mode, "split": split, "baseline": base.label,
            "resamples": resamples, "level": LEVEL, "alpha": ALPHA, "seed": seed, "rows": rows,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S")}


# -- the report: table, plots, page -------------------------------------------------------------------------------

def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}g}"


def _ci(ci) -> str:
    return "[-]" if not all(map(math.isfinite, ci)) else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _p(p: float) -> str:
    return "< 0.001" if p < 1e-3 else f"{p:.3f}"


HEADERS = ["METHOD", "SEEDS", "MEAN ± SD", "POOLED [95% CI]", "Δ VS BASELINE [95% CI]", "P", "TEST",
           "TRAINABLE", "TRAIN S", "SIZE MiB"]


def table(report: dict) -> list[list[str]]:
    """The report as rows of text: the terminal's table and the page's."""
    out = []
    for r in report["rows"]:
        vs = r.get("vs_baseline")
        mean = f"{r['mean']:.4f}" + (f" ± {r['std']:.4f}" if r["std"] is not None else "")
        diff = "baseline" if vs is None else f"{vs['difference']:+.4f} {_ci(vs['ci'])}"
        p = "" if vs is None else _p(vs["p_value"]) + (" *" if vs["significant"] else "")
        c = r["cost"]
        trainable = _cost("trainable_parameters", c["trainable_parameters"])
        out.append([r["label"], str(len(r["runs"])), mean, f"{r['pooled']['value']:.4f} {_ci(r['pooled']['ci'])}",
                    diff, p, "" if vs is None else vs["test"], trainable, _fmt(c["train_time_s"], 3),
                    _fmt(c["size_mib"], 3)])
    return out


COSTS = {"train_time_s": "training time (s)", "trainable_parameters": "trainable parameters",
         "size_mib": "size on disk (MiB)", "latency_p50_ms": "latency p50, batch 1 (ms)"}


COST_COLUMNS = {"parameters": "parameters", "trainable_parameters": "trainable", "train_time_s": "training s",
                "train_samples_per_s": "samples/s", "peak_memory_mib": "peak memory MiB", "size_mib": "size MiB",
                "adapter_mib": "adapter MiB", "latency_p50_ms": "latency p50 ms"}


def pareto(points: list[tuple[float, float]], mode: str) -> list[bool]:
    """Which (cost, metric) points no other point beats: as cheap or cheaper and as good or better, one of them
    strictly (``mode``: "max" when a larger metric is better)."""
    sign = 1 if mode == "max" else -1
    front = []
    for i, (c, m) in enumerate(points):
        beaten = any(c2 <= c and sign * m2 >= sign * m and (c2 < c or sign * m2 > sign * m)
                     for j, (c2, m2) in enumerate(points) if j != i)
        front.append(not beaten)
    return front


def plots(report: dict, folder: Path) -> list[str]:
    """metric.png (each row's pooled metric with its interval, the seeds' values as dots) and pareto.png (the
    metric against each cost that at least two rows have, the Pareto front joined); returns the files written
    (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows, metric = report["rows"], report["metric"]
    written = []
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.4))
    for i, r in enumerate(rows):
        lo, hi = r["pooled"]["ci"]
        ax.errorbar([r["pooled"]["value"]], [i], xerr=[[r["pooled"]["value"] - lo], [hi - r["pooled"]["value"]]],
                    fmt="o", color="tab:red" if r.get("baseline") else "tab:blue", capsize=4)
        ax.scatter([x["value"] for x in r["runs"]], [i + 0.18] * len(r["runs"]), s=12, color="gray", zorder=3)
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"test {metric}: pooled over seeds, {int(report['level'] * 100)}% bootstrap interval; grey: seeds")
    fig.tight_layout()
    fig.savefig(folder / "metric.png", dpi=100)
    plt.close(fig)
    written.append("metric.png")
    axes = [k for k in COSTS if sum(r["cost"].get(k) is not None for r in rows) >= 2]
    if axes:
        fig, axs = plt.subplots(1, len(axes), figsize=(4.2 * len(axes), 3.6), squeeze=False)
        for ax, k in zip(axs[0], axes):
            pts = [(r["cost"][k], r["pooled"]["value"], r["label"]) for r in rows if r["cost"].get(k) is not None]
            front = pareto([(c, m) for c, m, _ in pts], report["mode"])
            for (c, m, label), on in zip(pts, front):
                ax.scatter([c], [m], color="tab:green" if on else "tab:gray", zorder=3)
                ax.annotate(label, (c, m), fontsize=7, xytext=(3, 3), textcoords="offset points")
            best = sorted((c, m) for (c, m, _), on in zip(pts, front) if on)
            ax.plot([c for c, _ in best], [m for _, m in best], color="tab:green", lw=1, ls="--")
            ax.set_xlabel(COSTS[k])
            if k in ("trainable_parameters", "train_time_s"):
                ax.set_xscale("log")
            ax.set_ylabel(metric)
        axs[0][0].set_title("green: the Pareto front", fontsize=9, loc="left")
        fig.tight_layout()
        fig.savefig(folder / "pareto.png", dpi=100)
        plt.close(fig)
        written.append("pareto.png")
    return written


def _cost(key: str, value) -> str:
    if value is not None and key.endswith("parameters"):
        return f"{value / 1e6:.3g}M" if value >= 1e5 else f"{value:,.0f}"
    return _fmt(value, 4)


def _cell(text: str) -> str:
    return html.escape(text)


def page(report: dict, images: dict[str, bytes]) -> str:
    """The report as one self-contained HTML page: the table, what is significant, the plots inlined as PNG data;
    no script, no request for anything."""
    rows = table(report)
    head = "".join(f"<th>{_cell(h)}</th>" for h in HEADERS)
    body = "".join("<tr" + (' class="baseline"' if r.get("baseline") else "") + ">" +
                   "".join(f"<td>{_cell(c)}</td>" for c in cells) + "</tr>\n"
                   for r, cells in zip(report["rows"], rows))
    verdicts = []
    for r in report["rows"][1:]:
        vs = r["vs_baseline"]
        word = "significantly " + ("higher" if vs["difference"] > 0 else "lower") if vs["significant"] else \
            "not significantly different"
        seeds = ""
        if len(vs["seed_differences"]) > 1:
            each = ", ".join(f"{d:+.4f}" for d in vs["seed_differences"])
            seeds = (f" Seed by seed: {each}; t interval of their mean {_ci(vs['seed_ci'])}"
                     + ("." if vs["same_sign_every_seed"] else " -- <b>not in the same direction on every seed</b>: "
                        "another seed may reverse it."))
        verdicts.append(f"<li><b>{_cell(r['label'])}</b>: {word} than {_cell(report['baseline'])} on the pooled "
                        f"test ({vs['difference']:+.4f}, {_cell(vs['test'])} p {'' if vs['p_value'] < 1e-3 else '= '}{_p(vs['p_value'])}).{seeds}</li>")
    runs = "".join(f"<li>{_cell(r['label'])}: " + ", ".join(
        f"seed {x['seed']} {_fmt(x['value'])} {_ci(x['ci'])} <code>{_cell(x['run_dir'])}</code>" for x in r["runs"])
        + "</li>" for r in report["rows"])
    cost_head = "".join(f"<th>{_cell(h)}</th>" for h in ["method", *COST_COLUMNS.values()])
    cost_rows = "".join(f"<tr><td>{_cell(r['label'])}</td>" + "".join(
        f"<td>{_cell(_cost(k, r['cost'].get(k)))}</td>" for k in COST_COLUMNS) + "</tr>\n" for r in report["rows"])
    figures = "".join(f'<figure><img alt="{_cell(name)}" src="data:image/png;base64,'
                      f'{base64.b64encode(data).decode()}"></figure>' for name, data in images.items())
    level = int(report["level"] * 100)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>graft compare: {_cell(report['metric'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:100em;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left;white-space:nowrap}}
th{{background:#f3f3f3}}tr.baseline{{background:#fff4e5}}img{{max-width:100%}}code{{font-size:.85em}}</style>
</head><body>
<h1>Which method? Test {_cell(report['metric'])}, {len(report['rows'])} rows</h1>
<p>Each row is one method; several seeds are pooled. The interval is a {level}% percentile bootstrap over the test
examples ({report['resamples']} resamples); the difference to the baseline (<b>{_cell(report['baseline'])}</b>) is
paired example by example (the same resamples for both), tested with McNemar's exact test for accuracy and the paired
bootstrap otherwise. * marks p &lt; {report['alpha']}. With several rows, some differences reach p &lt; 0.05 by
chance. The pooled interval measures how the test examples were drawn, not how training varies with the seed: the
seeds' spread (SD) and the t interval over seeds below say that.</p>
<table id="comparison"><thead><tr>{head}</tr></thead><tbody>
{body}</tbody></table>
<h2>What differs from the baseline</h2><ul id="verdicts">{''.join(verdicts) or '<li>(one row only)</li>'}</ul>
<h2>Costs (means over a row's runs)</h2>
<table id="costs"><thead><tr>{cost_head}</tr></thead><tbody>
{cost_rows}</tbody></table>
<h2>Plots</h2>{figures}
<h2>Runs</h2><ul>{runs}</ul>
<p><small>graft compare, {_cell(report['written'])}; split {_cell(report['split'])}; resampling seed
{report['seed']}.</small></p>
</body></html>
"""


def write_report(report: dict, folder: Path) -> Path:
    """compare.json, the PNGs and index.html (the page, written last and atomically) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "compare.json", json.dumps(report, indent=2) + "\n")
    images = {name: (folder / name).read_bytes() for name in plots(report, folder)}
    atomic_write_text(folder / "index.html", page(report, images))
    return folder / "index.html"
