"""Decoder distillation on real text: does a small language model learn the King James Bible better from a tuned
SmolLM2 teacher than from the text alone?

The teacher is a finished clm run: the real SmolLM2-135M-Instruct after continued pretraining on the KJV
(examples/kjv-smollm2-clm.toml). The student is a 2-layer Llama (random init, ~3.5M parameters, most of them its
embedding table) with the teacher's 49,152-token tokenizer. Per seed the student trains twice with the same budget
(steps, batch, learning rate, schedule, evaluations, the same held-out verses): alone (clm, next-token
cross-entropy) and distilled (clm with teacher = the run and [loss] kd: alpha * T^2 * KL(teacher_T || student_T) +
(1 - alpha) * cross-entropy at every token). Prints the held-out perplexity (best evaluation) per seed and the
means, and writes them to OUT/results.json; finished runs in OUT are reused.

    graft train examples/kjv-smollm2-clm.toml --out runs/kjv-smollm2
    python examples/kjv_distill_smollm2.py runs/kjv-smollm2 [--seeds 0 1 2] [--steps 100] [--out runs/kjv-kd]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from graft import GraftError
from graft import load_config, train

STUDENT = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
           "vocab_size": 49152, "tie_word_embeddings": True}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("teacher", help="a finished clm run of SmolLM2 on the KJV")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--out", default="runs/kjv-kd")
    a = ap.parse_args()
    out = Path(a.out)
    teacher = str(Path(a.teacher).absolute())
    results = {"alone": [], "distilled": []}
    try:
        for seed in a.seeds:
            for kind in results:
                conf = {"backbone": {"plugin": "hf", "config": STUDENT, "tokenizer": teacher},
                        "strategy": {"plugin": "clm"},
                        "data": {"plugin": "corpus", "path": "pkg:bible/data/kjv.jsonl", "block_size": 64,
                                 "val_fraction": 0.01},
                        "train": {"seed": seed, "max_steps": a.steps, "batch_size": 8, "lr": 3e-3,
                                  "scheduler": "cosine", "warmup_steps": 10, "eval_every": a.steps // 2,
                                  "eval_batch_size": 32, "progress": False, "plot": False}}
                if kind == "distilled":
                    conf["strategy"]["teacher"] = teacher
                    conf["loss"] = {"plugin": "kd", "alpha": a.alpha, "temperature": a.temperature}
                run_dir = out / f"{kind}-seed{seed}"
                if not (run_dir / "summary.json").exists():
                    train(load_config(conf, where=f"{kind}.toml"), run_dir, echo=lambda msg: None)
                summary = json.loads((run_dir / "summary.json").read_text())
                results[kind].append(summary["best"])
                print(f"seed {seed} {kind:9s} held-out perplexity {results[kind][-1]:.1f}", flush=True)
    except GraftError as e:
        sys.exit(f"error: {e}")
    means = {k: statistics.mean(v) for k, v in results.items()}
    print(f"mean over seeds {a.seeds}: alone {means['alone']:.1f}, distilled {means['distilled']:.1f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"seeds": a.seeds, "steps": a.steps, "alpha": a.alpha,
                                                  "temperature": a.temperature, **results, "mean": means}, indent=2))


if __name__ == "__main__":
    main()
