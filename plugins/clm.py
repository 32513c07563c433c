"""The ``clm`` strategy: causal language modelling (next-token prediction) of a Hugging Face decoder backbone.

Continued pretraining of a pretrained decoder (GPT-2, Llama, ...) on the ``corpus`` source's packed blocks, or
pretraining from scratch (a random-init ``hf`` backbone; the corpus trains a tokenizer). The loss is the summed
cross-entropy of every next token divided by the targets of the whole optimizer step (all micro-batches and
processes), so accumulation and process count do not change the update. Perplexity = exp(mean token loss) on the
held-out blocks. The language model is saved with ``save_pretrained`` under ``lm/`` (``AutoModelForCausalLM`` and
``graft generate`` load it); ``backbone/`` is the decoder alone, the hand-off to other runs.
"""

from __future__ import annotations

from pathlib import Path

from graft import GraftError, Strategy, hookimpl


class CLM(Strategy):
    """Causal (next-token) language modelling of an hf decoder: continued pretraining or from scratch; perplexity."""

    primary_metric = "perplexity"
    supports_adapters = True
    metric_modes = {"loss": "min", "perplexity": "min", "next_token_accuracy": "max"}

    def build(self):
        if self.data.task != "mlm":  # the corpus source: unlabelled token blocks
            raise GraftError("[strategy] plugin = \"clm\" needs [data] plugin = \"corpus\" (unlabelled text).")
        self.model = self.backbone.task_model("causal-lm")
        return self.model

    def param_groups(self, model):
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr_scale": 1.0, "name": "all"}]

    def _loss_sum(self, model, batch):
        """(summed next-token cross-entropy, logits [B, T-1, V], targets [B, T-1])."""
        import torch

        ids = batch["inputs"]["input_ids"]
        logits = model(input_ids=ids, attention_mask=batch["inputs"]["attention_mask"]).logits[:, :-1].float()
        targets = ids[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 reduction="sum")
        return loss, logits, targets

    def step_targets(self, batch):
        ids = batch["inputs"]["input_ids"]
        return int(ids.shape[0] * (ids.shape[1] - 1))

    def training_step(self, model, batch):
        loss, _, targets = self._loss_sum(model, batch)
        return {"loss": loss / batch.get("step_targets", targets.numel())}

    def eval_step(self, model, batch):
        loss, logits, targets = self._loss_sum(model, batch)
        return {"loss_sum": loss, "tokens": loss.new_tensor(float(targets.numel())),
                "correct": (logits.argmax(-1) == targets).sum().float()}

    def compute_metrics(self, sums):
        import math

        loss = float(sums["loss_sum"]) / max(1.0, float(sums["tokens"]))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "next_token_accuracy": float(sums["correct"]) / max(1.0, float(sums["tokens"]))}

    def generate(self, model, prompt, max_new_tokens=50, temperature=0.0, top_p=1.0, stream=None):
        """Text continuing ``prompt`` through transformers' ``generate`` (greedy at temperature 0, else sampling
        with nucleus ``top_p``); ``stream(text)`` receives it piece by piece as it is made."""
        import torch
        from transformers import TextStreamer

        tok = self.backbone.tokenizer()
        streamer = None
        if stream is not None:
            class Streamer(TextStreamer):
                def on_finalized_text(self, text, stream_end=False):
                    stream(text)

            streamer = Streamer(tok, skip_prompt=True, skip_special_tokens=True)
        enc = tok(prompt, return_tensors="pt").to(next(model.parameters()).device)
        sample = temperature > 0
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample,
                                 temperature=temperature if sample else None, top_p=top_p if sample else None,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                                 streamer=streamer)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def export(self, model, directory):
        """backbone/ (the decoder + tokenizer: the hand-off) and lm/ (the whole causal LM + tokenizer)."""
        Path(directory, "backbone").mkdir(exist_ok=True)
        self.backbone.export(str(Path(directory, "backbone")))
        self.model.save_pretrained(str(Path(directory, "lm")), safe_serialization=True)
        self.backbone.tokenizer().save_pretrained(str(Path(directory, "lm")))


@hookimpl
def register_strategies(register):
    register(CLM, name="clm")
