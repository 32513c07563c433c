#!/usr/bin/env bash
# One prepared GPU check (for a session lent a CUDA machine): trains the digits example on CUDA in fp32, bf16 and
# bf16 + torch.compile, then reads each run's throughput from summary.json. Writes under ${OUT:-/tmp/gpu-check}.
# Usage (from the repo root, with graftkit installed): bash benchmarks/gpu_check.sh
set -euo pipefail
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0))"
for variant in "fp32:false" "bf16:false" "bf16:true"; do
  prec=${variant%%:*}; comp=${variant##*:}
  graft train examples/digits.toml --out "$out/digits-$prec-compile-$comp" \
    --set train.device='"cuda"' --set train.precision="\"$prec\"" --set train.compile=$comp \
    --set train.progress=false --set train.batch_size=256 --set train.epochs=8 2>&1 | tail -3
done
python - "$out" <<'PY'
import json, pathlib, sys
for d in sorted(pathlib.Path(sys.argv[1]).glob("digits-*")):
    s = json.loads((d / "summary.json").read_text())
    print(f"{d.name:28s} test acc {s['test']['accuracy']:.4f}  {s['train_samples_per_s']:9.0f} samples/s  "
          f"train {s['train_time_s']:.1f} s  wall {s['wall_time_s']:.1f} s")
PY
