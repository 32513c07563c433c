"""Adapters on the peft library: ``lora`` (with DoRA and rsLoRA) and ``ia3``, on any backbone family.

LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022); DoRA: Liu et al. (ICML 2024);
rsLoRA: Kalajdzievski (2023); IA3: Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (NeurIPS 2022). The modules are put into the backbone's native model with peft's
``inject_adapter_in_model``; the run saves them in peft's own format (``adapter/``), which
``peft.PeftModel.from_pretrained(base_model, "RUN/adapter")`` loads on the base model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from graft import Adapter, GraftError, did_you_mean, hookimpl, option
from graft.capabilities import FreshParameters, PretrainedFolder

#: leaf names of a timm vision transformer's attention input projection
_VIT_QKV = "qkv"


def _leaf_layers(native) -> dict[str, str]:
    """{module name: type name} of the layers peft can adapt (Linear, Conv1d/2d, Embedding, transformers' Conv1D)."""
    kinds = ("Linear", "Conv1d", "Conv2d", "Conv1D", "Embedding")
    return {n: type(m).__name__ for n, m in native.named_modules() if n and type(m).__name__ in kinds}


def default_targets(native, mapping: dict) -> list[str]:
    """The usual modules for this family: peft's table by ``config.model_type`` (e.g. BERT's attention query and
    value; a warm-started encoder-decoder: its encoder's family), a timm ViT's ``qkv``, else every Linear and ungrouped convolution of a CNN (not its classifier)."""
    import torch

    config = getattr(native, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "encoder-decoder":  # a warm-started EncoderDecoderModel: both halves are the encoder's family
        model_type = config.encoder.model_type
    if model_type in mapping:
        return list(mapping[model_type])
    names = _leaf_layers(native)
    if any(n.split(".")[-1] == _VIT_QKV for n in names):
        return [_VIT_QKV]
    head = {getattr(native, "default_cfg", {}).get("classifier", "")} - {""}
    return [n for n, m in native.named_modules() if n and n.split(".")[0] not in head and (
        isinstance(m, torch.nn.Linear) or isinstance(m, torch.nn.Conv2d) and m.groups == 1)]


def check_targets(native, targets: list[str], key: str) -> None:
    """Every target names some module (exactly, or as the last part of its name, as peft matches); else GraftError
    listing the model's adaptable layers and the closest name."""
    names = [n for n, _ in native.named_modules() if n]
    layers = _leaf_layers(native)
    suffixes = sorted({n.split(".")[-1] for n in layers})
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise GraftError(f"[adapter] {key}: {type(native).__name__} has no module {t!r}.{did_you_mean(t, suffixes)} "
                             f"Its adaptable layers end in: {', '.join(suffixes[:20])}"
                             f"{' ...' if len(suffixes) > 20 else ''}.")


class PeftAdapter(Adapter):
    """What LoRA and IA3 share: injection, saving in peft's format, merging for export."""

    def peft_config(self, native):
        raise NotImplementedError

    def apply(self, backbone):
        from peft import inject_adapter_in_model

        native = backbone.native_model()
        self.config = self.peft_config(native)
        try:
            inject_adapter_in_model(self.config, native)
        except (ValueError, TypeError) as e:
            raise GraftError(f"[adapter] plugin = {self.name!r}: peft cannot adapt {type(native).__name__}: "
                             f"{str(e).splitlines()[0]}") from None
        fresh = backbone.fresh_parameters if isinstance(backbone, FreshParameters) else frozenset()
        for name, p in native.named_parameters():
            if "ia3_l" in name:
                p.no_weight_decay = True  # IA3's scales start at 1: decay would pull them towards 0, not to 1
            if name.replace(".base_layer.", ".") in fresh:
                p.requires_grad_(True)  # random weights (new cross-attention): nothing pretrained to stand in for
        # peft leaves only the adapter trainable; the backbone's own parameters stay frozen for good
        return {id(p) for p in backbone.module.parameters() if not p.requires_grad}

    def save(self, directory, backbone):
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        native = backbone.native_model()
        state = get_peft_model_state_dict(native, adapter_name="default")
        # keys as PeftModel.save_pretrained writes them, so that PeftModel.from_pretrained(base) loads the file
        state = {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        folder = backbone.source_dir if isinstance(backbone, PretrainedFolder) else None
        self.config.base_model_name_or_path = str(folder) if folder else None
        self.config.save_pretrained(str(out))
        save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        return sum(f.stat().st_size for f in out.iterdir() if f.is_file())

    @contextlib.contextmanager
    def merged(self, backbone):
        """Merge every adapted layer into its base layer and put the base layer back in its place; undo on exit."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        native = backbone.native_model()
        swapped = []
        for name, module in list(native.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                parent = native.get_submodule(parent_name) if parent_name else native
                base = module.get_base_layer()
                # the base weights are put back exactly afterwards (peft's unmerge divides by IA3's scales)
                saved = {k: v.detach().clone() for k, v in base.state_dict().items()}
                module.merge()
                setattr(parent, child, base)
                swapped.append((parent, child, module, saved))
        try:
            yield
        finally:
            for parent, child, module, saved in reversed(swapped):
                setattr(parent, child, module)
                module.get_base_layer().load_state_dict(saved)
                module.merged_adapters.clear()


@dataclass
class LoraOptions:
    r: int = option(8, "Rank of the update B @ A added to each target layer's weight.")
    lora_alpha: float = option(16.0, "Scaling: the update is multiplied by lora_alpha / r (lora_alpha / sqrt(r) with "
                                     "use_rslora).")
    lora_dropout: float = option(0.0, "Dropout on the adapter's input.")
    target_modules: list[str] = field(default_factory=list, metadata={
        "help": "Module names (or their last parts) to adapt; empty = the family's usual ones: attention query and "
                "value of BERT-like models (peft's table), qkv of timm ViTs, linear and ungrouped convolutional "
                "layers of CNNs."})
    use_dora: bool = option(False, "DoRA: learn a magnitude per output and a LoRA direction (Liu et al., 2024).")
    use_rslora: bool = option(False, "rsLoRA: scale by lora_alpha / sqrt(r), stable for large ranks.")
    init_lora_weights: Literal["default", "gaussian", "pissa", "olora"] = option(
        "default", "Initialisation: default (A Kaiming-uniform, B zero: the model starts unchanged), gaussian, or "
                   "from the weights' principal components (pissa, olora; these change the base weights).")
    bias: Literal["none", "all", "lora_only"] = option("none", "Which biases train as well.")

    def validate(self):
        if self.r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("need r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1.")


class Lora(PeftAdapter):
    """LoRA (peft): low-rank updates of the attention or linear/conv layers; DoRA and rsLoRA as options."""

    Options = LoraOptions

    def peft_config(self, native):
        from peft import LoraConfig
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TARGETS

        o = self.options
        targets = list(o.target_modules) or default_targets(native, TARGETS)
        check_targets(native, targets, "target_modules")
        # GPT-2's Conv1D stores its weight transposed; peft needs to be told
        conv1d = any(kind == "Conv1D" and any(n == t or n.endswith("." + t) for t in targets)
                     for n, kind in _leaf_layers(native).items())
        return LoraConfig(r=o.r, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout, target_modules=targets,
                          fan_in_fan_out=conv1d,
                          use_dora=o.use_dora, use_rslora=o.use_rslora, bias=o.bias,
                          init_lora_weights=True if o.init_lora_weights == "default" else o.init_lora_weights)


@dataclass
class IA3Options:
    target_modules: list[str] = field(default_factory=list, metadata={
        "help": "Modules whose activations are rescaled; empty = the family's usual ones (peft's table; qkv and "
                "fc2 of timm ViTs; linear and convolutional layers of CNNs)."})
    feedforward_modules: list[str] = field(default_factory=list, metadata={
        "help": "Of target_modules, those rescaled at their input (feed-forward layers); empty = the family's."})

    def validate(self):
        if set(self.feedforward_modules) - set(self.target_modules) and self.target_modules:
            raise ValueError("feedforward_modules must be a subset of target_modules.")


class IA3(PeftAdapter):
    """IA3 (peft): learned rescaling vectors of attention and feed-forward activations; the fewest parameters."""

    Options = IA3Options

    def peft_config(self, native):
        from peft import IA3Config
        from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD
        from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

        o = self.options
        targets = list(o.target_modules)
        feedforward = list(o.feedforward_modules)
        if not targets:
            model_type = getattr(getattr(native, "config", None), "model_type", None)
            targets = default_targets(native, TARGETS)
            if targets == [_VIT_QKV]:
                targets = [_VIT_QKV, "fc2"]
            if not feedforward:
                feedforward = list(FEEDFORWARD.get(model_type, ["fc2"] if "fc2" in targets else []))
        check_targets(native, targets, "target_modules")
        return IA3Config(target_modules=targets, feedforward_modules=feedforward)


@hookimpl
def register_adapters(register):
    register(Lora, name="lora")
    register(IA3, name="ia3")
