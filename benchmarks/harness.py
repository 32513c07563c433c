"""The one way every benchmark here measures: paired, interleaved runs and a bootstrap interval of the median ratio.

A CPU's speed drifts over minutes (other processes, frequency, the page cache), far more than the 1-2% these
benchmarks need to see: timing contender A for five minutes and then B for five compares two machines. Here each
*pair* runs every contender once, back to back, in an order that alternates from pair to pair, and the figure is the
ratio of their costs *within* the pair; drift that moves both halves of a pair cancels. The claim is the median of the
pair ratios with a 95% percentile-bootstrap interval (Efron & Tibshirani, 1993), and pairs are added until every
interval is within +-``target`` of its median or the time budget runs out.

Two shapes: ``compare`` pairs calls of functions that return their cost (seconds per pass over the same batches);
``compare_steps`` pairs training loops *step by step*: ``interleave`` runs them in turn, one step each, and reads the
clock at the start of every step, so a step's cost holds all of it -- the next batch's loading and collation,
forward, backward, optimizer, and whatever the loop does between steps -- and the machine's state is shared by the
two halves of a pair, a quarter of a second apart. (On this project's 2-core VM the same batch's step time varies
+-15% from one step to the next, and a run's mean by 5-10% from one run to the next.)
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import threading
import time
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # graft's own default; set before torch loads, as graft does


def machine() -> dict:
    """What a figure depends on: CPU model, cores, load, torch version, threads, the OpenMP wait policy and glibc's
    malloc arena limit (``run_all.py`` sets ``MALLOC_ARENA_MAX=1``: see ``compare_steps``)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "unset"), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def interleave(contenders: dict[str, Callable], first: str, warmup: int = 3) -> dict[str, list[float]]:
    """Run the training loops ``contenders`` step by step in turn (A's step k, B's step k, A's step k + 1, ...): each
    runs in its own thread, but only the one holding the baton runs. A contender is ``fn(tick)`` and calls ``tick()``
    at the start of every training step (a hand loop at its top, graft's through ``Strategy.on_step_start``,
    Trainer's from ``on_step_begin``); ``tick`` hands the baton on, so the set-up and the loops never overlap.

    Returns each contender's step costs in seconds: step k's cost is the time from when it got the baton back at
    the start of step k to its next ``tick`` -- the whole step, the next batch's loading and everything the loop does
    between steps, but never another contender's work. The first ``warmup`` steps are dropped. ``first`` starts."""
    names = [first] + [n for n in contenders if n != first]
    baton = {n: threading.Semaphore(0) for n in names}
    live, costs, errors = set(names), {n: [] for n in names}, {}
    lock = threading.Lock()

    def hand_on(name):
        with lock:
            i = names.index(name)
            for k in range(1, len(names) + 1):
                nxt = names[(i + k) % len(names)]
                if nxt in live:
                    baton[nxt].release()
                    return

    def body(name):
        baton[name].acquire()
        resumed = [None]

        def tick(*_args, **_kwargs):
            now = time.perf_counter()
            if resumed[0] is not None:
                costs[name].append(now - resumed[0])
            hand_on(name)
            baton[name].acquire()
            resumed[0] = time.perf_counter()

        try:
            contenders[name](tick)
        except BaseException as e:  # noqa: BLE001 -- reported below, in the calling thread
            errors[name] = e
        finally:
            with lock:
                live.discard(name)
            hand_on(name)

    threads = [threading.Thread(target=body, args=(n,), name=f"bench-{n}") for n in names]
    for t in threads:
        t.start()
    baton[first].release()
    for t in threads:
        t.join()
    if errors:
        name, e = next(iter(errors.items()))
        raise RuntimeError(f"contender {name!r} failed: {e!r}") from e
    return {n: c[warmup:] for n, c in costs.items()}


def bootstrap_ci(values: list[float], level: float = 0.95, resamples: int = 4000, seed: int = 0) -> tuple:
    """Percentile-bootstrap interval of the median of ``values`` (``resamples`` draws with replacement)."""
    if len(values) == 1:
        return values[0], values[0]
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    lo = meds[int((1 - level) / 2 * resamples)]
    hi = meds[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def compare(contenders: dict[str, Callable[[], float]], baseline: str, *, budget_s: float = 300.0,
            min_pairs: int = 6, max_pairs: int = 60, target: float = 0.02, echo=print) -> dict:
    """Run every contender once per pair, alternating the order, until each ratio ``cost / cost[baseline]`` has a 95%
    interval within +-``target`` of its median (after at least ``min_pairs``), ``max_pairs`` are done, or
    ``budget_s`` seconds have passed (at least 3 pairs whatever the budget).

    Returns ``{"ratios": {name: {"median", "ci": [lo, hi], "half_width", "values"}}, "costs": {name: median cost},
    "pairs", "converged", "elapsed_s", "target"}``; ``costs`` are in the contenders' unit (seconds per pass)."""
    names = list(contenders)
    count = {"n": 0}

    def one_pair():
        order = names if count["n"] % 2 == 0 else names[::-1]
        count["n"] += 1
        return {n: contenders[n]() for n in order}

    return _pairs(one_pair, names, baseline, budget_s=budget_s, min_pairs=min_pairs, max_pairs=max_pairs,
                  target=target, echo=echo)


def _pairs(one_pair, names, baseline, *, budget_s, min_pairs, max_pairs, target, echo, converge_on=None) -> dict:
    others = [n for n in names if n != baseline]
    costs = {n: [] for n in names}
    ratios = {n: [] for n in others}
    start = time.perf_counter()
    summary, converged = {}, False
    for pair in range(max_pairs):
        got = one_pair()
        for n in names:
            costs[n].append(got[n])
        for n in others:
            ratios[n].append(got[n] / got[baseline])
        summary = {}
        for n in others:
            med = statistics.median(ratios[n])
            lo, hi = bootstrap_ci(ratios[n])
            summary[n] = {"median": med, "ci": [lo, hi], "half_width": max(med - lo, hi - med) / med,
                          "values": ratios[n]}
        elapsed = time.perf_counter() - start
        converged = pair + 1 >= min_pairs and all(summary[n]["half_width"] <= target for n in converge_on or others)
        echo(f"  pair {pair + 1}: " + ", ".join(f"{n}/{baseline} {got[n] / got[baseline]:.3f} (median "
                                               f"{s['median']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}])"
                                               for n, s in summary.items()) + f"  [{elapsed:.0f} s]")
        if converged or (pair + 1 >= 3 and elapsed >= budget_s):
            break
    return {"ratios": summary, "costs": {n: statistics.median(v) for n, v in costs.items()},
            "pairs": len(costs[baseline]), "converged": converged, "elapsed_s": time.perf_counter() - start,
            "target": target}


def compare_steps(contenders: dict[str, Callable], baseline: str, *, warmup: int = 3, budget_s: float = 300.0,
                  min_runs: int = 6, max_runs: int = 60, target: float = 0.02, converge_on=None, echo=print) -> dict:
    """Training loops compared step by step: runs of ``interleave`` (alternating which contender starts) until each
    ratio (of the contenders in ``converge_on``, default all) has a 95% interval within +-``target`` of its median
    (after ``min_runs``), or the budget is spent.

    A pair is a run: each contender's cost is its median step time over the run's timed steps (a step on this
    CPU takes +-15% of the typical time with nothing changed; the median keeps one slow step from deciding a run),
    so the ratio holds nothing but the two loops at the same moments. Runs, not steps or windows of steps, are the
    units the interval is drawn over: a run's ratio moves by several percent from run to run with nothing changed,
    far more than steps within a run suggest. Much of that was glibc's malloc arena per thread (which arena's memory
    a contender's buffers got made it faster or slower for a whole run): run the process with ``MALLOC_ARENA_MAX=1``,
    as ``run_all.py`` does, for half the pair-to-pair spread.
    Returns ``compare``'s shape; ``costs`` are seconds per step (medians over runs)."""
    names = list(contenders)
    runs = {"n": 0}

    def one_run():
        got = interleave(contenders, names[runs["n"] % len(names)], warmup)
        runs["n"] += 1
        steps = min(len(c) for c in got.values())
        return {n: statistics.median(c[:steps]) for n, c in got.items()}

    return _pairs(one_run, names, baseline, budget_s=budget_s, min_pairs=min_runs, max_pairs=max_runs, target=target,
                  echo=echo, converge_on=converge_on)


def verdict(median: float, ci: list, goal: float, better: str) -> str:
    """"met" when the median is on the goal's side ("interval inside" when the whole 95% interval is too, "interval
    crosses" when it straddles the goal), else "missed"."""
    ok = (lambda x: x <= goal) if better == "lower" else (lambda x: x >= goal)
    if not ok(median):
        return "missed"
    return "met, interval inside" if ok(ci[1] if better == "lower" else ci[0]) else "met, interval crosses"


def row(comparison: str, result: dict, name: str, goal: float | None = None, better: str = "lower",
        note: str = "") -> dict:
    """One line of run_all's table from ``compare``'s result for contender ``name``."""
    r = result["ratios"][name]
    out = {"comparison": comparison, "ratio": round(r["median"], 4), "ci95": [round(x, 4) for x in r["ci"]],
           "half_width": round(r["half_width"], 4), "pairs": result["pairs"], "converged": result["converged"],
           "goal": None if goal is None else f"{'<=' if better == 'lower' else '>='} {goal}", "note": note}
    if goal is not None:
        out["verdict"] = verdict(r["median"], r["ci"], goal, better)
    return out


def emit(rows: list[dict], extra: dict, json_path: str | None) -> None:
    """Print the rows; write ``{"machine", "rows", ...extra}`` as JSON to ``json_path`` when given."""
    for r in rows:
        print(f"{r['comparison']}: {r['ratio']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] over {r['pairs']} pairs"
              + (f"  goal {r['goal']}: {r['verdict']}" if r.get("goal") else ""))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"machine": machine(), "rows": rows, **extra}, f, indent=1)
