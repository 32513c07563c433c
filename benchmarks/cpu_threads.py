"""CPU threads: OpenMP's wait policy and torch's thread count, on a quiet and on a loaded machine.

The workload is the README's main job (timm ResNet-18 from scratch on digits at 32x32, batch 32, fused AdamW): each
setting trains it in a fresh process (OMP_WAIT_POLICY is read when torch loads OpenMP, so it cannot change inside
one process) and reports the median step time over the measured steps, on a quiet machine and with a load running
for the whole measurement: ``python`` = one pure-Python spin loop per core (another program), ``torch`` = a second
torch job with OpenMP's default settings (another training run). Settings alternate within each repeat; the table
gives medians over repeats and each setting's ratio to PASSIVE with all cores.

    python benchmarks/cpu_threads.py [--steps 30] [--repeats 3] [--threads 1 2] [--loads quiet python torch]

Run it alone. Unset, libgomp spin-waits a while (GOMP_SPINCOUNT) before an idle thread sleeps; ACTIVE spins
without end; PASSIVE makes idle threads sleep at once.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, os, sys, time, tempfile
import torch  # before graft: OpenMP starts with exactly the environment given (graft would default the policy)
from graft import Run, load_config
steps = int(sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
conf = load_config({"backbone": {"plugin": "timm", "model": "resnet18"}, "strategy": {"plugin": "finetune"},
                "data": {"plugin": "digits", "image_size": 32},
                "train": {"batch_size": 32, "lr": 1e-3, "progress": False, "plot": False}}, where="bench")
run = Run(conf)
opt = torch.optim.AdamW(run.model.parameters(), lr=1e-3, fused=True)
times, it = [], iter(run.loader("train", train=True))
for i in range(steps + 3):
    batch = next(it)
    t0 = time.perf_counter()
    loss = run.strategy.training_step(run.model, batch)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= 3:  # warm-up steps (allocator, first-call kernels) are not measured
        times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({"median_ms": 1000 * times[len(times) // 2], "threads": torch.get_num_threads()}))
"""


def spin():
    while True:
        pass


TORCH_LOAD = r"""
import torch
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


def start_load(kind):
    """Busy processes for the whole measurement: ``python`` = one pure-Python spin loop per core (another
    program); ``torch`` = a second torch job with OpenMP's default settings (another training run)."""
    if kind == "quiet":
        return []
    if kind == "python":
        procs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(os.cpu_count() or 1)]
        for p in procs:
            p.start()
    else:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        procs = [subprocess.Popen([sys.executable, "-c", TORCH_LOAD], env=env)]
    time.sleep(2)
    return procs


def measure(policy, threads, steps):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    if policy.startswith("spin"):  # spin=N: OpenMP's default policy with libgomp spinning N times, not 300,000
        env["GOMP_SPINCOUNT"] = policy.split("=")[1]
    elif policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", CHILD, str(steps), str(threads)], env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["median_ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--policies", nargs="+", default=["unset", "PASSIVE", "spin=10000"],
                    help="OMP_WAIT_POLICY values; unset = OpenMP's own default; spin=N sets GOMP_SPINCOUNT")
    ap.add_argument("--loads", nargs="+", default=["quiet", "python", "torch"])
    a = ap.parse_args()
    settings = [(p, t) for t in sorted(set(a.threads)) for p in a.policies]
    results = {}
    for load in a.loads:
        load_procs = start_load(load)
        try:
            runs = {s: [] for s in settings}
            for r in range(a.repeats):
                for s in (settings if r % 2 == 0 else settings[::-1]):
                    runs[s].append(measure(*s, a.steps))
                    print(f"{load:6s} {s[0]:10s} {s[1]} threads: {runs[s][-1]:8.1f} ms/step", flush=True)
            results[load] = {f"{p}/{t}": statistics.median(v) for (p, t), v in runs.items()}
        finally:
            for proc in load_procs:
                proc.terminate()
    base = f"PASSIVE/{os.cpu_count()}"
    print(f"\nmedian ms per step (ratio to {base} on the same machine state):")
    for load, row in results.items():
        print(f"{load:6s} " + "  ".join(f"{k} {v:.1f} ({v / row.get(base, v):.2f}x)" for k, v in row.items()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
