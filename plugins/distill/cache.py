"""The teacher cache: the teacher's logits (and hidden features) for every example of every split, computed once
and kept as one safetensors file named by a hash of everything that decides them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_key(teacher_model, teacher_backbone, teacher_data, seed: int, layers: list[int]) -> str:
    """Teacher weights + data + preprocessing: any change makes a new cache."""
    import torch

    h = hashlib.sha256()
    for v in teacher_model.state_dict().values():  # values, not names: one teacher, however it was given
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    if teacher_backbone.modality == "image":
        preprocessing = repr(sorted(teacher_backbone.image_config().items()))
    else:
        tok = teacher_backbone.tokenizer()
        preprocessing = f"{type(tok).__name__}:{len(tok)}:{getattr(tok, 'init_kwargs', {}).get('do_lower_case')}"
    spec = {"data": teacher_data.name, "options": repr(teacher_data.options), "preprocessing": preprocessing,
            "seed": seed, "layers": layers,
            "sizes": [len(teacher_data.dataset(s) or []) for s in ("train", "val", "test")]}
    h.update(json.dumps(spec, sort_keys=True).encode())
    return h.hexdigest()[:24]


def cache_path(cache_dir: str, key: str) -> Path:
    root = cache_dir or os.environ.get("GRAFT_CACHE_DIR") or Path.home() / ".cache" / "graftkit"
    return Path(root) / "teacher" / f"{key}.safetensors"


def load_or_build(path: Path, run_teacher, teacher_data, device) -> dict:
    """``{"<split>.logits": [n, classes], "<split>.hidden.<j>": [n, width]}`` from ``path``, or computed with
    ``run_teacher(split, indices) -> (logits, [hidden...])`` and saved there (whole or absent, even with several
    processes writing)."""
    import torch
    from safetensors.torch import load_file, save_file

    if path.is_file():
        return load_file(str(path), device=str(device))
    flat = {}
    for split in ("train", "val", "test"):
        n = len(teacher_data.dataset(split) or [])
        logits, hidden = [], []
        for start in range(0, n, 64):
            out, hs = run_teacher(split, range(start, min(n, start + 64)))
            logits.append(out)
            hidden.append(hs)
        if n:
            flat[f"{split}.logits"] = torch.cat(logits)
            for j in range(len(hidden[0])):
                flat[f"{split}.hidden.{j}"] = torch.cat([hs[j] for hs in hidden])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.cpu().contiguous() for k, v in flat.items()}, str(tmp))
    os.replace(tmp, path)
    return flat
