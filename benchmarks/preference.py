"""graft's DPO step against TRL's ``DPOTrainer`` step on the same model, LoRA, batch and lengths.

The model is SmolLM2-135M-Instruct when ``examples/smollm2.py`` has put it in ~/.cache/graftkit (else a random-init
2-layer Llama of its tokenizer-free shape is not worth timing: the benchmark says so and stops). Both train LoRA (r 8,
alpha 16, q_proj / v_proj) with the reference as the same network with the adapter switched off, the sigmoid DPO
loss at beta 0.1, batches of 4 pairs rendered with the model's chat template (prompts and answers of random words,
``--prompt-words`` / ``--answer-words`` long), AdamW lr 5e-5, constant schedule, no weight decay.

Step time: the two loops in one process, step by step in turn (``harness.compare_steps``); the figure is the median
ratio graft / TRL over runs with its 95% bootstrap interval (goal: <= 1.02). Peak memory (``--memory``): each loop
alone in a fresh process, its peak resident set (ru_maxrss) after the same steps.

    python benchmarks/preference.py [--steps 6] [--budget 600] [--memory] [--json out.json]

Run it alone: a second busy process distorts CPU timings.
"""

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

MODEL = Path("~/.cache/graftkit/smollm2-135m-instruct").expanduser()
WORDS = "the a film was good bad river city light house day night old new small large green blue red".split()


def rows(n: int, prompt_words: int, answer_words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"prompt": [{"role": "user", "content": say(prompt_words)}],
             "chosen": [{"role": "assistant", "content": say(answer_words)}],
             "rejected": [{"role": "assistant", "content": say(answer_words)}]} for _ in range(n)]


def run_graft(args, tmp: Path, tick, data: Path):
    from graft import load_config, train
    from loop_overhead import ticking

    conf = {"backbone": {"plugin": "hf", "weights": str(MODEL)},
            "strategy": {"plugin": "preference", "loss": "dpo", "beta": 0.1, "reference": "adapter"},
            "adapter": {"plugin": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "data": {"plugin": "preferences", "path": str(data), "max_length": 512, "val_fraction": 0.0},
            "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": 5e-5, "weight_decay": 0.0,
                      "progress": False, "plot": False, "keep_checkpoints": 1, "log_every": 10}}
    out = Path(tempfile.mkdtemp(dir=tmp, prefix="graft-"))
    train(load_config(conf, where="bench"), out, echo=lambda m: None,
          prepare=lambda run: ticking(run, tick) if tick else None)


def run_trl(args, tmp: Path, tick, data: list[dict]):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(MODEL))
    tok = AutoTokenizer.from_pretrained(str(MODEL))

    class Tick(TrainerCallback):
        def on_step_begin(self, *a, **k):
            tick()

    targs = DPOConfig(output_dir=tempfile.mkdtemp(dir=tmp, prefix="trl-"), per_device_train_batch_size=args.batch,
                      max_steps=args.steps, learning_rate=5e-5, lr_scheduler_type="constant", weight_decay=0.0,
                      beta=0.1, max_length=512, logging_steps=10, save_strategy="no", report_to=[], use_cpu=True,
                      dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=model, args=targs, train_dataset=Dataset.from_list(data), processing_class=tok,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"),
                         callbacks=[Tick()] if tick else [])
    trainer.remove_callback(PrinterCallback)
    trainer.train()


def memory(args) -> dict:
    """Each loop alone in a fresh process: its peak resident set in MiB."""
    out = {}
    for name in ("trl", "graft"):
        cmd = [sys.executable, __file__, "--only", name, "--steps", str(args.steps), "--batch", str(args.batch),
               "--prompt-words", str(args.prompt_words), "--answer-words", str(args.answer_words)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-words", type=int, default=40)
    p.add_argument("--answer-words", type=int, default=30)
    p.add_argument("--budget", type=float, default=600.0, help="seconds of runs at most")
    p.add_argument("--memory", action="store_true", help="also each loop's peak memory, in fresh processes")
    p.add_argument("--only", choices=["graft", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not (MODEL / "config.json").is_file():
        sys.exit(f"{MODEL} is missing: python examples/smollm2.py puts SmolLM2-135M-Instruct there.")
    import transformers

    transformers.logging.set_verbosity_error()
    data = rows(args.batch * (args.steps + 2), args.prompt_words, args.answer_words)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        if args.only:
            (run_graft(args, tmp, None, path) if args.only == "graft" else run_trl(args, tmp, None, data))
            print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
            return
        print(f"model: {MODEL}, LoRA r 8, batch {args.batch} pairs; {harness.machine()}")
        result = harness.compare_steps({"trl": lambda tick: run_trl(args, tmp, tick, data),
                                        "graft": lambda tick: run_graft(args, tmp, tick, path)}, "trl",
                                       warmup=args.warmup, budget_s=args.budget)
    extra = {"result": result}
    if args.memory:
        extra["peak_rss_mib"] = memory(args)
        print("peak memory (MiB):", json.dumps(extra["peak_rss_mib"]))
    ms = {k: 1000 * v for k, v in result["costs"].items()}
    harness.emit([harness.row("graft preference (DPO) / TRL DPOTrainer, step time (SmolLM2-135M, LoRA r 8, 4 pairs)",
                              result, "graft", 1.02, note=f"{ms['trl']:.0f} vs {ms['graft']:.0f} ms/step")],
                 extra, args.json)


if __name__ == "__main__":
    main()
