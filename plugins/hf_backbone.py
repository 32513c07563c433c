"""The ``hf`` backbone: any Hugging Face ``AutoModel`` from a local directory, or random init from a config table."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import Backbone, GraftError, hookimpl, option


@dataclass
class HFOptions:
    weights: str = option("", "Local directory with config.json and weights (a save_pretrained folder), or a graft "
                              "run directory whose backbone to continue from. Hub names are never downloaded.",
                          path=True)
    config: dict = option(default_factory=dict, help="Random init instead: { model_type = \"bert\", hidden_size = "
                          "128, ... } (keyword arguments of AutoConfig.for_model).")
    overrides: dict = option(default_factory=dict, help="Config values changed when loading weights, e.g. "
                             "{ num_hidden_layers = 2 } keeps only the first two layers (a smaller student).")
    tokenizer: str = option("", "Tokenizer directory; default: the weights directory (text models).", path=True)
    pooling: Literal["cls", "mean", "pooler"] = option("mean", "How token features become one vector: the first "
                                                       "token, the mask-aware mean, or the model's pooler output.")
    trust_remote_code: bool = option(False, "Allow model code shipped inside the weights directory to run.")
    attn_implementation: str = option("", "e.g. sdpa or eager; empty lets transformers choose.")

    def validate(self):
        if bool(self.weights) == bool(self.config):
            raise ValueError("set exactly one of weights = \"DIR\" (pretrained) or config = { model_type = ... } "
                             "(random init).")
        if self.config and "model_type" not in self.config:
            raise ValueError("config needs model_type, e.g. config = { model_type = \"bert\", hidden_size = 128 }.")


def pool(hidden, mask, how: str):
    """[B, T, D] token features (or [B, C, H, W] maps) -> [B, D]: first token, or the mask-aware mean."""
    if hidden.ndim == 4:  # convolutional vision models
        return hidden.mean((2, 3))
    if how == "cls":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-6)


def feature_maps(hidden_states, size, patch_size, count: int = 4):
    """A vision model's hidden states as ``count`` feature maps ``[B, C, H, W]``, input side first: a convolutional
    model's stage outputs as they are; a ViT's token sequences (class and register tokens dropped) laid back on the
    patch grid, from ``count`` evenly spaced layers (as ViTDet / UPerNet heads on ViTs do)."""
    states = list(hidden_states[1:])  # [0] is the embedding output
    if states[0].ndim == 3:
        if len({s.shape[1] for s in states}) > 1:
            raise GraftError("this hf vision model's hidden states are token sequences of several lengths with no "
                             "grid to lay them on; segmentation needs a convolutional, ViT or Swin-style model.")
        patch = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size
        h, w = size[0] // patch, size[1] // patch
        step = max(1, len(states) // count)
        states = [s[:, -h * w:].transpose(1, 2).reshape(s.shape[0], s.shape[2], h, w)
                  for s in states[step - 1::step][-count:]]
    return states


_LAYER = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


class HFBackbone(Backbone):
    """Any Hugging Face AutoModel (text or vision) from a local directory, or random init from a config.

    Beyond ``graft.Backbone`` it has the capabilities (``graft.capabilities``) ``TaskModel``, ``SettableTokenizer``,
    ``SavedTokenizer``, ``PretrainedFolder`` and ``FreshParameters``.
    """

    Options = HFOptions
    #: the underlying ``transformers.PreTrainedModel``, set by ``build``
    hf_model = None
    #: the local folder the pretrained weights came from (a ``save_pretrained`` folder), or None for random init
    source_dir = None
    #: names (in ``native_model()``) of parameters its checkpoint did not hold: a warm-started decoder's
    #: cross-attention; an adapter trains them whole
    fresh_parameters: frozenset = frozenset()

    def build(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach a hub
        import torch
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        from graft import exported_backbone

        hf_logging.disable_progress_bar()

        o = self.options
        where = f"[backbone] plugin = \"{self.name or 'hf'}\""
        kwargs = {"trust_remote_code": o.trust_remote_code}
        if o.attn_implementation:
            kwargs["attn_implementation"] = o.attn_implementation
        self.source_dir = None
        if o.weights:
            path = exported_backbone(Path(o.weights).expanduser())
            if not (path / "config.json").is_file():
                hint = (" It looks like a hub name: graftkit never downloads; save the model locally "
                        "(save_pretrained) and pass that directory.") if not path.exists() else ""
                raise GraftError(f"{where}: weights = {o.weights!r} is not a local model directory with a "
                                 f"config.json.{hint}")
            try:
                model = AutoModel.from_pretrained(str(path), local_files_only=True, **kwargs, **o.overrides)
            except ValueError as e:
                raise GraftError(f"{where}: cannot load {path}: {str(e).splitlines()[0]}") from None
            self.source_dir = path
        else:
            cfg = dict(o.config)
            # The family's default special ids (GPT-2's 50256) mean nothing in a small random-init vocabulary; the
            # tokenizer sets them (``set_tokenizer``).
            for key in ("bos_token_id", "eos_token_id"):
                if "vocab_size" in cfg and key not in cfg:
                    cfg[key] = None
            try:
                config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
                model = AutoModel.from_config(config, **kwargs)
            except (ValueError, KeyError, TypeError) as e:
                raise GraftError(f"{where}: config = {o.config}: {e}") from None
        self.hf_model = model
        main_input = getattr(model, "main_input_name", "input_ids")
        self.modality = "image" if main_input == "pixel_values" else "text"
        cfg = model.config
        self.num_features = getattr(cfg, "hidden_size", None) or cfg.hidden_sizes[-1]
        pooling, modality = o.pooling, self.modality
        if pooling == "pooler" and getattr(model, "pooler", None) is None:
            raise GraftError(f"{where}: pooling = \"pooler\", but {type(model).__name__} has no pooler. "
                             f"Use cls or mean.")

        class HFFeatures(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.model = m

            def forward(self, inputs, hidden=False, dense=False):
                if modality == "image":
                    out = self.model(pixel_values=inputs, output_hidden_states=hidden or dense)
                    mask = None
                    if dense:  # multi-scale maps: segmentation (Swin-style models give them already shaped)
                        states = getattr(out, "reshaped_hidden_states", None) or out.hidden_states
                        return feature_maps(states, inputs.shape[-2:], getattr(cfg, "patch_size", None))
                else:
                    out = self.model(**inputs, output_hidden_states=hidden)
                    mask = inputs.get("attention_mask")
                    if dense:  # one vector per token: token classification
                        return out.last_hidden_state
                if pooling == "pooler":
                    features = out.pooler_output
                else:
                    features = pool(out.last_hidden_state, mask, pooling)
                if not hidden:
                    return features
                return features, [pool(h, mask, "mean") for h in out.hidden_states]

        self.module = HFFeatures(model)
        self.dense_features = "tokens" if modality == "text" else "maps"
        self._tokenizer = None
        return self.module

    @classmethod
    def reload_options(cls, options, export_dir, trust_remote_code):
        if options.trust_remote_code and not trust_remote_code:
            raise GraftError("The run's config sets trust_remote_code = true, so loading it would run code shipped "
                             "with its model. If you trust its source, pass --trust-remote-code.")
        if export_dir is not None and (Path(export_dir) / "config.json").is_file():
            # the run's own export: its weights, and the tokenizer a random-init run trained on its corpus
            return dataclasses.replace(options, weights=str(export_dir), config={})
        return options

    def tokenizer(self):
        if self.modality != "text":
            return super().tokenizer()
        if self._tokenizer is None:
            src = self.options.tokenizer or (str(self.source_dir) if self.source_dir else "")
            if not src:
                return None  # random init without a tokenizer: a data source may train one
            from transformers import AutoTokenizer

            from graft import exported_backbone

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(exported_backbone(Path(src))),
                                                                local_files_only=True)
            except (OSError, ValueError) as e:
                raise GraftError(f"[backbone] tokenizer: cannot load a tokenizer from {src!r} ({e}). Pass "
                                 f"tokenizer = \"DIR\" with tokenizer.json or vocab.txt.") from None
            if self.source_dir is None:
                self._follow(self._tokenizer)  # a random-init model takes its given tokenizer's special ids
        return self._tokenizer

    @classmethod
    def load_tokenizer(cls, directory):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as e:
            raise GraftError(f"Cannot load the tokenizer saved in {directory} ({e}); export the run again.") from None

    def set_tokenizer(self, tokenizer):
        """Attach a tokenizer made elsewhere (e.g. trained on a corpus for a random-init model). The model's special
        token ids follow it (a random-init GPT-2 config says 50256), so generation stops at its end of text."""
        self._tokenizer = tokenizer
        self._follow(tokenizer)

    def _follow(self, tokenizer):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                setattr(self.hf_model.config, key, value)
                if getattr(self.hf_model, "generation_config", None) is not None:
                    setattr(self.hf_model.generation_config, key, value)

    def image_config(self) -> dict:
        if self.modality != "image":
            return super().image_config()
        cfg = self.hf_model.config
        size = getattr(cfg, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        pre = self.source_dir / "preprocessor_config.json" if self.source_dir else None
        if pre is not None and pre.is_file():
            p = json.loads(pre.read_text())
            mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
        return {"size": size, "mean": mean, "std": std, "channels": getattr(cfg, "num_channels", 3)}

    def enable_gradient_checkpointing(self):
        """transformers' ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` before 5.x) with
        torch's non-reentrant checkpoint: the one that works with frozen embeddings and adapters, without
        ``enable_input_require_grads``."""
        model = self.hf_model
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise GraftError(f"[train] gradient_checkpointing = true: {type(model).__name__} "
                             f"({model.config.model_type}) has no gradient checkpointing in transformers. Set it to "
                             f"false.")
        if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def task_model(self, task, tie_encoder_decoder: bool = False, cross_attention: str = "random"):
        """``AutoModelForMaskedLM`` / ``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM`` of this model's config
        around the backbone's own network, with the pretrained head from ``source_dir`` when its checkpoint has one
        (BertForMaskedLM, GPT-2, T5 and BART checkpoints do) and the output layer tied to the embeddings where the
        config says so. "seq2seq-lm" of an encoder-only model (BERT, MiniLM, RoBERTa) is an encoder-decoder
        warm-started from it (``seq2seq``); it is built once, and from then on ``native_model()`` is the whole
        encoder-decoder, so that an adapter goes into both halves."""
        import transformers

        if task == "seq2seq-lm" and not self.hf_model.config.is_encoder_decoder:
            return self.seq2seq(tie_encoder_decoder, cross_attention)
        auto = {"masked-lm": transformers.AutoModelForMaskedLM, "causal-lm": transformers.AutoModelForCausalLM,
                "seq2seq-lm": transformers.AutoModelForSeq2SeqLM}[task]
        if getattr(self, "_task_models", {}).get(task) is not None:
            return self._task_models[task]
        base = self.hf_model
        if self.modality != "text":
            raise GraftError(f"backbone {self.name!r} has no {task} form; use an hf text backbone.")
        try:
            model = auto.from_config(base.config)
        except ValueError as e:
            raise GraftError(f"[backbone] {type(base).__name__} has no {task} form ({str(e).splitlines()[0]}).") \
                from None
        prefix = model.base_model_prefix
        own_base = getattr(model, prefix, None)
        if own_base is None:  # T5's seq2seq model holds the base model's parts (shared, encoder, decoder) itself
            parts = dict(base.named_children())
            for name in parts:
                if getattr(model, name, None) is not None:
                    setattr(model, name, parts[name])
            prefixes = tuple(f"{name}." for name in parts)
        else:
            for name, module in list(base.named_children()):  # e.g. BERT's pooler: no task head uses it
                if getattr(own_base, name, None) is None:
                    module.requires_grad_(False)
            setattr(model, prefix, base)
            prefixes = (prefix + ".",)
        weights = Path(self.source_dir or "") / "model.safetensors"
        if self.source_dir is not None and weights.is_file():
            from safetensors.torch import load_file

            own = model.state_dict()
            head = {k: v for k, v in load_file(str(weights)).items()
                    if k in own and not k.startswith(prefixes) and v.shape == own[k].shape}
            model.load_state_dict(head, strict=False)
        model.tie_weights()
        self._task_models = {**getattr(self, "_task_models", {}), task: model}
        return model

    def seq2seq(self, tie_encoder_decoder: bool = False, cross_attention: str = "random"):
        """This encoder warm-starting both halves of a ``transformers.EncoderDecoderModel`` (Rothe, Narayan &
        Severyn 2020, BERT2BERT): the decoder is the same checkpoint loaded as ``AutoModelForCausalLM`` with causal
        masks and new cross-attention; ``tie_encoder_decoder`` shares every decoder module the encoder also has
        (their "shared" variant: cross-attention and the LM head stay the decoder's own). The new cross-attention
        starts random (Rothe et al.), or with ``cross_attention = "self"`` as a copy of the same layer's pretrained
        self-attention, so that it starts out matching tokens with tokens. Parameters the checkpoint did not hold
        are listed in ``fresh_parameters`` (names in ``native_model()``): an adapter trains them whole. Special
        ids come from the tokenizer: decoding starts at [CLS] (or BOS) and ends at [SEP] (or EOS). Raises
        GraftError for a decoder-only model or one without a tokenizer."""
        if getattr(self, "_seq2seq", None) is not None:
            return self._seq2seq
        from transformers import AutoModelForCausalLM, EncoderDecoderModel

        base = self.hf_model
        if self.modality != "text" or self.is_decoder():
            raise GraftError(f"[strategy] plugin = \"seq2seq\": {type(base).__name__} is "
                             f"{'a decoder-only' if self.modality == 'text' else 'a vision'} model. Use an "
                             f"encoder-decoder checkpoint (T5, BART, Marian) or an encoder to warm-start one from "
                             f"(BERT, MiniLM, RoBERTa); a decoder-only model learns pairs as instructions (clm).")
        tok = self.tokenizer()
        if tok is None:
            raise GraftError(f"[backbone] plugin = \"{self.name}\": a warm-started encoder-decoder needs a "
                             f"tokenizer; set tokenizer = \"DIR\".")
        config = base.config.__class__.from_dict(base.config.to_dict())
        config.is_decoder, config.add_cross_attention = True, True
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its table of new cross-attention weights: fresh_parameters says it
        try:
            if self.source_dir is not None:
                decoder, info = AutoModelForCausalLM.from_pretrained(
                    str(self.source_dir), config=config, local_files_only=True, output_loading_info=True,
                    trust_remote_code=self.options.trust_remote_code)
                fresh = set(info["missing_keys"])
            else:
                decoder = AutoModelForCausalLM.from_config(config)
                fresh = {n for n, _ in decoder.named_parameters()}
        except ValueError as e:  # DistilBERT, MPNet, DeBERTa, ALBERT: no decoder form in transformers
            raise GraftError(f"[strategy] plugin = \"seq2seq\": {type(base).__name__} has no decoder form to "
                             f"warm-start ({str(e).splitlines()[0]}). Warm-start from a BERT, RoBERTa, XLM-R or "
                             f"ELECTRA checkpoint, or use an encoder-decoder checkpoint (T5, BART, Marian).") from None
        finally:
            hf_logging.set_verbosity(level)
        on = base.is_activation_checkpointing if hasattr(base, "is_activation_checkpointing") else \
            getattr(base, "is_gradient_checkpointing", False)  # the name before transformers 5.x
        if on:
            if hasattr(decoder, "activation_checkpointing_enable"):  # [train] gradient_checkpointing: both halves
                decoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cross_attention == "self":
            self._copy_self_attention(decoder)
        for name, module in list(base.named_children()):
            if name == "pooler":  # no decoder reads it
                module.requires_grad_(False)
        if tie_encoder_decoder:
            shared = self._share(base, decoder.base_model)
            fresh -= {f"{decoder.base_model_prefix}.{n}" for n in shared}
        model = EncoderDecoderModel(encoder=base, decoder=decoder)
        start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else end
        for cfg in (model.config, model.generation_config):
            cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = start, end, pad
        model.config.vocab_size = model.config.decoder.vocab_size
        self.fresh_parameters = frozenset(f"decoder.{n}" for n in fresh)
        self._seq2seq = model
        return model

    @staticmethod
    def _copy_self_attention(decoder) -> None:
        """Each layer's ``crossattention`` loaded with its sibling ``attention``'s weights (BERT-family layers)."""
        copied = 0
        for name, module in decoder.named_modules():
            if name.endswith(".crossattention") or name == "crossattention":
                parent = decoder.get_submodule(name.rpartition(".")[0]) if "." in name else decoder
                own = getattr(parent, "attention", None)
                if own is None or type(own) is not type(module):
                    break
                module.load_state_dict(own.state_dict())
                copied += 1
        if not copied:
            raise GraftError(f"[strategy] cross_attention = \"self\": {type(decoder).__name__} has no layers with an "
                             f"'attention' beside their 'crossattention' to copy from. Use cross_attention = "
                             f"\"random\".")

    @staticmethod
    def _share(encoder, decoder) -> list[str]:
        """Point every decoder submodule that the encoder has under the same name and type at the encoder's
        (embeddings, self-attention, feed-forward); return the parameter names now shared."""
        mine = dict(encoder.named_modules())
        shared = []
        for name, module in list(decoder.named_modules()):
            other = mine.get(name)
            if not name or other is None or type(other) is not type(module) or list(module.children()):
                continue
            if any(a.shape != b.shape for a, b in zip(module.parameters(), other.parameters())):
                continue
            parent, _, child = name.rpartition(".")
            setattr(decoder.get_submodule(parent) if parent else decoder, child, other)
            shared += [f"{name}.{n}" for n, _ in other.named_parameters()]
        return shared

    def native_model(self):
        return getattr(self, "_seq2seq", None) or self.hf_model

    def limits(self) -> dict:
        """Usable positions of learned absolute position embeddings (RoBERTa-style ones start after the padding
        index, so they lose padding_idx + 1), the vocabulary size, whether a text model is decoder-only, and the
        fixed size of ViT-style image models."""
        import torch

        out = {}
        positions = next((m for name, m in self.hf_model.named_modules()
                          if isinstance(m, torch.nn.Embedding) and name.split(".")[-1] in
                          ("position_embeddings", "wpe", "embed_positions")), None)
        if self.modality == "text":
            if positions is not None:
                n, pad = positions.num_embeddings, positions.padding_idx
                out["max_tokens"] = n - (pad + 1 if pad is not None else 0)
                out["max_tokens_why"] = (f" (max_position_embeddings = {n}; position ids start after the padding "
                                         f"index {pad}, as in RoBERTa, so {n - pad - 1} are usable)"
                                         if pad is not None else f" (max_position_embeddings = {n})")
            vocab = getattr(self.hf_model.config, "vocab_size", None)
            if isinstance(vocab, int):
                out["vocab_size"] = vocab
            out["decoder"] = self.is_decoder()
        elif isinstance(getattr(getattr(self.hf_model, "embeddings", None), "position_embeddings", None),
                        torch.nn.Parameter):  # ViT-style: one learned embedding per patch of one image size
            out["image_size"] = self.image_config()["size"]
        return out

    def is_decoder(self) -> bool:
        """Decoder-only (GPT-2, Llama): its family has a causal-LM head and no masked-LM one."""
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                            MODEL_FOR_MASKED_LM_MAPPING_NAMES)

        kind = self.hf_model.config.model_type
        return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES

    def layer_groups(self) -> list[list[str]]:
        """embeddings, then each encoder layer in order, then whatever follows (final norm, pooler)."""
        embeddings, layers, rest = [], {}, []
        for name, _ in self.module.named_parameters():
            m = _LAYER.search(name)
            if m:
                layers.setdefault(int(m.group(1)), []).append(name)
            elif "embed" in name and not layers:
                embeddings.append(name)
            else:
                rest.append(name)
        groups = [embeddings] + [layers[i] for i in sorted(layers)]
        if rest:
            groups.append(rest)
        return [g for g in groups if g]

    def export(self, directory: str) -> None:
        """A save_pretrained folder: ``transformers.AutoModel.from_pretrained(directory)`` loads it."""
        self.hf_model.save_pretrained(directory, safe_serialization=True)
        tok = self.tokenizer() if self.modality == "text" else None
        if tok is not None:
            tok.save_pretrained(directory)
        if self.source_dir and (self.source_dir / "preprocessor_config.json").is_file():
            (Path(directory) / "preprocessor_config.json").write_text(
                (self.source_dir / "preprocessor_config.json").read_text())


@hookimpl
def register_backbones(register):
    register(HFBackbone, name="hf")
