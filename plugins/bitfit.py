"""The ``bitfit`` adapter: only the backbone's bias terms train (Ben Zaken et al., "BitFit: Simple
Parameter-efficient Fine-tuning for Transformer-based Masked Language-models", ACL 2022). The simplest baseline for
the peft adapters; no library needed."""

from __future__ import annotations

from pathlib import Path

from graft import Adapter, GraftError, hookimpl


class BitFit(Adapter):
    """BitFit: train only the backbone's biases (the head trains fully); no extra modules."""

    def apply(self, backbone):
        params = dict(backbone.native_model().named_parameters())
        biases = {n for n in params if n.split(".")[-1] == "bias"}
        if not biases:
            raise GraftError(f"[adapter] plugin = \"bitfit\": backbone {backbone.name!r} has no bias parameters "
                             f"to train.")
        frozen = set()
        for name, p in params.items():
            p.requires_grad_(name in biases)
            if name not in biases:
                frozen.add(id(p))
        return frozen

    def save(self, directory, backbone):
        """``bitfit.safetensors``: the trained biases under the native model's parameter names."""
        import json

        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        biases = {n: p.detach().cpu().contiguous() for n, p in backbone.native_model().named_parameters()
                  if n.split(".")[-1] == "bias"}
        save_file(biases, str(out / "bitfit.safetensors"), metadata={"format": "pt"})
        (out / "bitfit_config.json").write_text(json.dumps({"adapter": "bitfit", "tensors": len(biases)}) + "\n")
        return sum(f.stat().st_size for f in out.iterdir() if f.is_file())


@hookimpl
def register_adapters(register):
    register(BitFit, name="bitfit")
