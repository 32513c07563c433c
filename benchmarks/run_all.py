"""Every comparison in turn, one table: the figures benchmarks/README.md claims, each a median ratio of paired runs
with its 95% bootstrap interval (``harness``), beside its goal; then the README's main job, whole process, timed.

Each benchmark runs in its own process, one after another, so none shares the CPU with another. Run it alone, on a
quiet machine: the machine's description (CPU, cores, load, torch, threads, OpenMP wait policy) is printed and saved
beside the figures.

    python benchmarks/run_all.py [--json benchmarks/results.json] [--budget-scale 1.0] [--only loop distill ...]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

HERE = Path(__file__).resolve().parent
BENCHMARKS = {  # name -> (script, arguments, budget in seconds)
    "loop": ("loop_overhead.py", ["--model", "resnet18"], 300),
    "distill": ("distill.py", [], 200),
    "masking": ("mlm_masking.py", [], 30),
    "lora": ("adapters.py", [], 360),
    "detection": ("detection.py", [], 240),
    "seq2seq": ("seq2seq.py", [], 360),
    "contrastive": ("contrastive.py", [], 360),
}


def run_benchmark(name: str, scale: float, work: Path) -> list[dict]:
    script, args, budget = BENCHMARKS[name]
    out = work / f"{name}.json"
    cmd = [sys.executable, str(HERE / script), *args, "--budget", str(budget * scale), "--json", str(out)]
    print(f"\n== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    # One malloc arena: the interleaved loops run in threads, and glibc gives each thread its own arena; where a
    # run's buffers land then made one contender faster or slower for a whole run (the loop's pair ratios: standard
    # deviation 6.2% over 73 pairs with an arena per thread, 3.0% over 22 with one).
    env = {**os.environ, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "1")}
    subprocess.run(cmd, check=True, cwd=HERE, env=env)
    rows = json.loads(out.read_text())["rows"]
    for r in rows:
        r["seconds"] = round(time.perf_counter() - t0)
    return rows


def readme_job(repeats: int) -> dict:
    """`graft train examples/digits.toml`, the whole process (start-up, training, evaluation, exports, plots):
    median wall time over ``repeats`` and the test accuracy of the run."""
    graft = Path(sys.executable).with_name("graft")
    walls, accuracy = [], None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            subprocess.run([str(graft), "train", str(HERE.parent / "examples" / "digits.toml"), "--out", d, "--set",
                            "train.progress=false"], check=True, capture_output=True)
            walls.append(time.perf_counter() - t0)
            summary = json.loads(Path(d, "summary.json").read_text())
            accuracy = summary["test"]["accuracy"]
            train_s = summary["train_time_s"]
    print(f"\n== README main job: {', '.join(f'{w:.1f}' for w in walls)} s; test accuracy {accuracy:.4f}")
    return {"wall_s_median": round(statistics.median(walls), 1), "wall_s": [round(w, 1) for w in walls],
            "last_train_time_s": round(train_s, 1), "test_accuracy": accuracy, "repeats": repeats}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(HERE / "results.json"))
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every benchmark's time budget")
    ap.add_argument("--only", nargs="+", choices=[*BENCHMARKS, "readme"], default=[*BENCHMARKS, "readme"])
    ap.add_argument("--readme-repeats", type=int, default=3)
    a = ap.parse_args()
    env_note = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset (graft sets PASSIVE)"),
                "MALLOC_ARENA_MAX in the benchmarks' processes": os.environ.get("MALLOC_ARENA_MAX", "1"),
                "MALLOC_ARENA_MAX for the README job": os.environ.get("MALLOC_ARENA_MAX", "unset (as a user runs it)")}
    machine = harness.machine()
    print(f"machine: {machine}", flush=True)
    t0 = time.perf_counter()
    rows, job = [], None
    with tempfile.TemporaryDirectory() as work:
        for name in a.only:
            if name == "readme":
                job = readme_job(a.readme_repeats)
            else:
                rows += run_benchmark(name, a.budget_scale, Path(work))
    print(f"\nmachine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {machine['threads']} "
          f"threads, OMP_WAIT_POLICY={machine['OMP_WAIT_POLICY']}, load {machine['load_1min']} at the start; "
          f"{(time.perf_counter() - t0) / 60:.1f} min in all\n")
    print("| comparison | ratio | 95% interval | pairs | goal | verdict | note |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['comparison']} | **{r['ratio']:.3f}** | {r['ci95'][0]:.3f} - {r['ci95'][1]:.3f} | {r['pairs']} | "
              f"{r.get('goal') or ''} | {r.get('verdict', '')} | {r['note']} |")
    if job:
        print(f"\nREADME main job (`graft train examples/digits.toml`, whole process): **{job['wall_s_median']} s** "
              f"wall (median of {job['repeats']}: {job['wall_s']}), test accuracy {job['test_accuracy']:.4f}")
    Path(a.json).write_text(json.dumps({"machine": machine, "env": env_note, "rows": rows, "readme_job": job,
                                        "minutes": round((time.perf_counter() - t0) / 60, 1)}, indent=1) + "\n")
    print(f"\nwritten: {a.json}")


if __name__ == "__main__":
    main()
