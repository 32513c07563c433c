"""The ``timm`` backbone: any image model from timm, random init or weights from a local file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import Backbone, GraftError, did_you_mean, hookimpl, option, warn


@dataclass
class TimmOptions:
    model: str = option("resnet18", "Any name from timm.list_models(), e.g. resnet18, convnext_nano, "
                                    "vit_tiny_patch16_224.")
    weights: str = option("", "Local weights: a .safetensors file, or a .pth/.bin/.ckpt file (loaded with "
                              "weights_only=True), or a graft run directory. Lightning / DDP / torch.compile "
                              "checkpoints load as they are (prefixes model., module., _orig_mod., backbone. "
                              "dropped); the file's classifier is left out.", path=True)
    remap: Literal["auto", "names", "order"] = option(
        "auto", "How weights map onto the model: by name; by order with every shape checked (foreign checkpoints, "
        "e.g. torchvision's); auto = by name, or by order when no name matches.")
    pretrained: bool = option(False, "Fetch timm's pretrained weights from the hub. Never done offline: pass weights.")
    model_kwargs: dict = option(default_factory=dict, help="Extra keyword arguments for timm.create_model, e.g. "
                                "{ drop_path_rate = 0.1, in_chans = 1 }.")


#: entries other frameworks wrap a state dict in (Lightning, timm's train script, DDP-wrapped saves), looked in first
#: to last, nested ones too
WRAPPERS = ("state_dict", "model_state_dict", "model", "module")
#: key prefixes other frameworks add, in any order and nesting: Lightning's module attribute (``model.``), DDP
#: (``module.``), ``torch.compile`` (``_orig_mod.``, also mid-name when a submodule was compiled), a wrapping model's
#: trunk (``backbone.``)
PREFIXES = ("model.", "module.", "_orig_mod.", "backbone.")


def load_state_file(path: str, where: str) -> dict:
    """A state dict from safetensors or a weights-only torch file; unwraps {"state_dict": ...} / {"model": ...} /
    {"model_state_dict": ...} / {"module": ...}, nested ones too, and drops entries that are no tensors (epoch
    counters beside the weights). A graft run directory (or its exported backbone folder) stands for its
    ``model.safetensors``. GraftError when the file is missing, refused by ``weights_only`` or holds no tensors."""
    from graft import exported_backbone

    p = exported_backbone(Path(path).expanduser())
    if p.is_dir() and (p / "model.safetensors").is_file():
        p = p / "model.safetensors"
    if not p.is_file():
        raise GraftError(f"{where}: weights file {path!r} does not exist.")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001 - safetensors' own error is no OSError/ValueError
            raise GraftError(f"{where}: cannot read {path!r} as safetensors: {e}.") from None
    import pickle

    import torch

    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise GraftError(f"{where}: {path!r} is not a plain weights file (torch.load with weights_only=True "
                         f"refused it: {str(e).splitlines()[0] if str(e) else type(e).__name__}). If you trust it, "
                         f"save its state dict alone (torch.save(torch.load(path, weights_only=False)['state_dict'], "
                         f"'weights.pth')) or convert it to safetensors.") from None
    top = list(state) if isinstance(state, dict) else []
    while isinstance(state, dict):
        inner = next((state[k] for k in WRAPPERS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        entries = ", ".join(map(str, top[:8])) or "none"
        raise GraftError(f"{where}: {path!r} holds no state dict (its entries: {entries}); graftkit looks for "
                         f"tensors at the top or under {', '.join(WRAPPERS)}.")
    return tensors


def match_names(source: dict, target: dict) -> dict:
    """{file key: model key} for the file's keys that name a model tensor, once the prefixes of ``PREFIXES`` are
    stripped from their front (as many as needed, in any order; ``_orig_mod.`` from anywhere). A key the model
    has as it is keeps its name, so a model whose own names start with ``model.`` is not renamed."""
    names = {k: k for k in source if k in target}  # a key named as it is wins over one renamed onto it
    claimed = set(names)
    for key in source:
        k = key.replace("_orig_mod.", "")
        while k not in target and k.startswith(PREFIXES):
            k = k[k.index(".") + 1:]
        if k in target and k not in claimed:
            names[key] = k
            claimed.add(k)
    return names


def remap_by_order(source: dict, target: dict, where: str, head=lambda k: False) -> dict:
    """Map a foreign checkpoint onto ``target``'s keys by order, checking every shape: {file key: model key}.

    Architectures ported between libraries (torchvision -> timm) keep the order of their tensors even when the
    names differ; this only succeeds when the counts match and each shape lines up, else it says where not. A
    classifier tensor (``head(model key)``) of another shape is paired but skipped later, as with names.
    """
    # BatchNorm's num_batches_tracked counters are scalars; they carry no weights and differ in count.
    src = [(k, v) for k, v in source.items() if v.ndim > 0]
    tgt = [(k, v) for k, v in target.items() if v.ndim > 0]
    if len(src) != len(tgt):
        raise GraftError(f"{where}: cannot remap by order: the file has {len(src)} tensors, the model {len(tgt)}.")
    out = {}
    for (sk, sv), (tk, tv) in zip(src, tgt):
        if tuple(sv.shape) != tuple(tv.shape) and not head(tk):
            raise GraftError(f"{where}: cannot remap by order: {sk} {tuple(sv.shape)} does not fit {tk} "
                             f"{tuple(tv.shape)}.")
        out[sk] = tk
    return out


def _examples(items, n=2) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


class TimmBackbone(Backbone):
    """Any timm image model; pooled pre-logits features; random init or local weights."""

    Options = TimmOptions
    modality = "image"

    def build(self):
        import timm
        import torch

        o = self.options
        where = f"[backbone] plugin = \"{self.name or 'timm'}\""
        if not timm.is_model(o.model):
            names = timm.list_models()
            raise GraftError(f"{where}: timm has no model {o.model!r}.{did_you_mean(o.model, names)} "
                             f"List them with python -c \"import timm; print(timm.list_models('*{o.model[:4]}*'))\".")
        if o.pretrained:
            raise GraftError(f"{where}: pretrained = true would download weights from a model hub, which graftkit "
                             f"never does. Download the file once elsewhere and pass weights = \"PATH\" (safetensors "
                             f"or .pth).")
        try:
            model = timm.create_model(o.model, pretrained=False, **o.model_kwargs)
        except TypeError as e:
            raise GraftError(f"{where}: timm.create_model({o.model!r}) rejected model_kwargs: {e}.") from None
        if o.weights:
            # safetensors files list tensors by name, so only torch files keep an order to remap by
            # A directory is a graft run or its backbone/ export: timm's own names, nothing to remap.
            note = self.load_weights(model, load_state_file(o.weights, where), where,
                                     ordered=not o.weights.endswith(".safetensors"),
                                     remap="names" if Path(o.weights).is_dir() else o.remap,
                                     source=Path(o.weights).name)
            if note:  # the CLI prints it as one line; a plain load of the model's own names goes unsaid
                warn(note)
        model.reset_classifier(0)
        self.timm_model = model

        class TimmFeatures(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.model = m

            def forward(self, x, hidden=False, dense=False):
                if dense:  # the last 4 feature maps, input side first (a ViT's last 4 blocks): segmentation heads
                    levels = min(4, len(getattr(self.model, "feature_info", [])) or 4)
                    return self.model.forward_intermediates(x, indices=levels, intermediates_only=True)
                if not hidden:
                    return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
                if not hasattr(self.model, "forward_intermediates"):
                    raise NotImplementedError(f"timm model {type(self.model).__name__} has no forward_intermediates")
                final, inter = self.model.forward_intermediates(x)
                pooled = [h.flatten(2).mean(2) if h.ndim > 2 else h for h in inter]  # NCHW -> NC
                return self.model.forward_head(final, pre_logits=True), pooled

        self.module = TimmFeatures(model)
        self.dense_features = "maps" if hasattr(model, "forward_intermediates") else None
        # Models with a pre-logits layer (MobileNetV3, LCNet, EfficientNet-lite heads...) widen the features after
        # pooling; head_hidden_size is what forward_head(pre_logits=True) returns.
        self.num_features = getattr(model, "head_hidden_size", None) or model.num_features
        return self.module

    @classmethod
    def reload_options(cls, options, export_dir, trust_remote_code):
        if options.weights and export_dir is not None:
            return dataclasses.replace(options, weights=str(export_dir))
        return options

    @staticmethod
    def load_weights(model, state: dict, where: str, ordered: bool = True, remap: str = "auto",
                     source: str = "the weights file") -> str | None:
        """Load ``state`` into the timm ``model`` (trunk only). Returns one line saying what was loaded, renamed,
        skipped and left out, or None when the file held the model's own names and nothing else. Names first
        (``PREFIXES`` stripped), by order when ``remap`` says so or no name matches. The file's classifier never
        loads (the strategy brings its own head), whatever its size. GraftError when a trunk tensor is missing or
        has another shape: the file is for another architecture."""
        own = model.state_dict()
        classifiers = model.default_cfg.get("classifier") or ()
        classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)

        def head(k):
            return any(k.startswith(c + ".") for c in classifiers)

        names = match_names(state, own)
        if remap == "names" and not names:
            raise GraftError(f"{where}: no tensor name in {source} matches the model, e.g. {next(iter(state))}, "
                             f"even without the prefixes {', '.join(PREFIXES)}; is it for another library's naming? "
                             f"remap = \"order\" maps by order with shapes checked.")
        if remap == "order" or (remap == "auto" and not names):
            if not ordered:
                raise GraftError(f"{where}: the names in {source} do not match "
                                 f"{model.default_cfg.get('architecture')} (e.g. {next(iter(state))}), even without "
                                 f"the prefixes {', '.join(PREFIXES)}, and a safetensors file keeps no tensor order "
                                 f"to map them by. Convert the original .pth file instead.")
            names = remap_by_order(state, own, where, head)
        mismatched = [k for k, t in names.items() if tuple(state[k].shape) != tuple(own[t].shape) and not head(t)]
        if mismatched:
            k = mismatched[0]
            raise GraftError(f"{where}: weights do not fit the model: {k} is {tuple(state[k].shape)} in {source}, "
                             f"{names[k]} is {tuple(own[names[k]].shape)} in the model ({len(mismatched)} mismatched "
                             f"tensors).")
        skipped = [k for k, t in names.items() if head(t)]
        loaded = {t: state[k] for k, t in names.items() if not head(t)}
        unused = [k for k in state if k not in names and not k.endswith("num_batches_tracked")]
        missing = [k for k in own if k not in loaded and not head(k) and not k.endswith("num_batches_tracked")]
        if missing:
            hint = (f" Its names that fit no tensor of the model, e.g. {_examples(unused)}, may carry a prefix "
                    f"graftkit does not strip ({', '.join(PREFIXES)} are stripped)." if unused else "")
            raise GraftError(f"{where}: {source} lacks {len(missing)} tensors of the model, e.g. {missing[0]}. "
                             f"Is it for another architecture?{hint}")
        model.load_state_dict(loaded, strict=False)
        if len(names) == len(state) and all(k == t and not head(t) for k, t in names.items()):
            return None
        renamed = [(k, t) for k, t in names.items() if k != t and not head(t)]
        note = f"{where}: {source}: loaded {len(loaded)} tensors"
        if renamed:
            prefixes = {k[:-len(t)] if k.endswith("." + t) else None for k, t in renamed}
            if len(prefixes) == 1 and None not in prefixes:
                how = f"prefix {prefixes.pop()!r} dropped"
            else:  # BatchNorm counters make poor examples
                how = "e.g. " + _examples([f"{k} -> {t}" for k, t in renamed if state[k].ndim], 1)
            note += f", {len(renamed)} of them renamed ({how})"
        if skipped:
            weight = next((state[k] for k in skipped if state[k].ndim >= 1 and names[k].endswith("weight")), None)
            classes = f" ({weight.shape[0]} classes)" if weight is not None else ""
            note += (f"; skipped {len(skipped)}, the file's classifier{classes}: {_examples(skipped)} (the "
                     f"strategy's own head takes its place)")
        if unused:
            note += f"; {len(unused)} fit no tensor of the model and were left out: {_examples(unused)}"
        return note + "."

    def image_config(self) -> dict:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=self.timm_model)
        c, h, w = cfg["input_size"]
        fixed = self._fixed_size()
        return {"size": fixed or (h, w), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "channels": c}

    def _fixed_size(self):
        """(H, W) of a model that takes one input size only (ViTs without dynamic_img_size), else None. Read from
        the patch embedding: model_kwargs such as img_size change it, the pretrained config does not follow."""
        m = self.timm_model
        pe = getattr(m, "patch_embed", None)
        if getattr(m, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", False):
            return None
        size = getattr(pe, "img_size", None)
        return tuple(size) if size else None

    def enable_gradient_checkpointing(self):
        """timm's ``set_grad_checkpointing``: its blocks run through ``torch.utils.checkpoint``."""
        model = self.timm_model
        try:
            model.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError, AttributeError) as e:
            raise GraftError(f"[train] gradient_checkpointing = true: timm model {self.options.model!r} has no "
                             f"gradient checkpointing ({e or type(e).__name__}). Set it to false.") from None

    def native_model(self):
        return self.timm_model

    def limits(self) -> dict:
        fixed = self._fixed_size()
        return {"image_size": fixed} if fixed else {}

    def layer_groups(self) -> list[list[str]]:
        from timm.models import group_parameters

        m = self.timm_model
        try:
            groups = group_parameters(m, m.group_matcher(coarse=True))
        except (AttributeError, NotImplementedError):
            return super().layer_groups()
        return [[f"model.{n}" for n in groups[g]] for g in sorted(groups) if groups[g]]

    def export(self, directory: str) -> None:
        """``model.safetensors`` with timm's own key names (no classifier): ``timm.create_model(name,
        pretrained=True, pretrained_cfg_overlay=dict(file=...), num_classes=0)`` or ``load_state_dict`` take it."""
        from safetensors.torch import save_file

        from graft import clean_state_dict

        save_file(clean_state_dict(self.timm_model.state_dict()), str(Path(directory) / "model.safetensors"),
                  metadata={"format": "pt", "timm_model": self.options.model})


@hookimpl
def register_backbones(register):
    register(TimmBackbone, name="timm")
