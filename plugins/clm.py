"""The ``clm`` strategy: causal language modelling (next-token prediction) of a Hugging Face decoder backbone.

Three uses, one loss:

- continued pretraining of a pretrained decoder (GPT-2, Llama, ...) on the ``corpus`` source's packed blocks, or
  pretraining from scratch (a random-init ``hf`` backbone; the corpus trains it a byte-level BPE tokenizer);
- instruction tuning (SFT) on the ``instructions`` source: the loss on response tokens only;
- token-level distillation (``teacher`` = a finished clm run with the same tokenizer, and ``[loss] plugin = "kd"``):
  alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy at every target token (Hinton et al. 2015
  applied per token, as in Kim & Rush 2016's word-level KD and MiniLLM/GKD's forward-KL baseline).

The loss is summed over the target tokens and divided by the target tokens of the whole optimizer step (all
micro-batches and processes), so accumulation and process count do not change the update. Perplexity =
exp(mean token loss) on held-out data. The language model is saved with ``save_pretrained`` under ``lm/``
(``AutoModelForCausalLM`` and ``graft generate`` load it); ``backbone/`` is the decoder alone, the hand-off to other
runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from graft import UNLABELLED, GraftError, SoftTargetLoss, Strategy, hookimpl, option
from graft.capabilities import TaskModel, require
from graft.supervised import CausalGeneration


@dataclass
class CLMOptions:
    teacher: str = option("", "Token-level distillation: a finished clm or preference run (the teacher) whose "
                              "tokenizer is this model's; its softened next-token distributions teach through [loss] "
                              "plugin = \"kd\" (alpha, temperature).", path=True)
    rouge_examples: int = option(0, "Instruction data: at each evaluation, generate greedy responses to the first N "
                                    "examples of the split and report ROUGE-L F1 (Lin 2004; Google's rouge-score, "
                                    "stemmed) against the references as rougeL. Needs pip install 'graftkit[lm]'.")
    max_new_tokens: int = option(32, "Tokens generated per response for rouge_examples, at most: generation stops at "
                                     "the end-of-sequence token and the chat template's end-of-turn tokens.")

    def validate(self):
        if self.rouge_examples < 0 or self.max_new_tokens < 1:
            raise ValueError("rouge_examples must be >= 0 and max_new_tokens >= 1.")


class CLM(CausalGeneration, Strategy):
    """Causal (next-token) language modelling of an hf decoder: pretraining, instruction tuning, distillation."""

    Options = CLMOptions
    primary_metric = "perplexity"
    #: graft.predictions: loss, perplexity and ROUGE-L are sums over examples
    per_example = True
    supports_adapters = True
    metric_modes = {"loss": "min", "perplexity": "min", "next_token_accuracy": "max", "rougeL": "max"}

    def build(self):
        o = self.options
        if self.data.task not in ("mlm", "sft"):  # corpus: unlabelled token blocks; instructions: responses
            raise GraftError("[strategy] plugin = \"clm\" needs [data] plugin = \"corpus\" (unlabelled text) or "
                             "\"instructions\" (prompt/response pairs, chats).")
        if o.rouge_examples and self.data.task != "sft":
            raise GraftError("[strategy] rouge_examples compares generated responses with reference ones: it needs "
                             "[data] plugin = \"instructions\".")
        # built once here: a missing package is bad input now, not an error at the first evaluation
        self.scorer = self._scorer() if o.rouge_examples else None
        self.model = require(self.backbone, TaskModel, "[strategy] plugin = \"clm\"",
                             "Use an hf text backbone.").task_model("causal-lm")
        self.teacher, self.progress = None, 0.0
        if o.teacher:
            self.teacher = self._load_teacher(o.teacher)
        elif self.loss is not None:
            raise GraftError(f"[loss] plugin = {self.loss.name!r} with [strategy] plugin = \"clm\": clm's loss is "
                             f"next-token cross-entropy; a [loss] table is used only for distillation, with "
                             f"[strategy] teacher = \"runs/<clm run>\". Remove [loss], or set teacher.")
        return self.model

    def _load_teacher(self, path):
        from graft import load_run

        if not isinstance(self.loss, SoftTargetLoss):
            raise GraftError("[strategy] teacher is set, so clm distils: it needs a soft-target loss, e.g. [loss] "
                             "plugin = \"kd\" with alpha = 0.5 and temperature = 1.0.")
        run = load_run(Path(path), for_prediction=True, device="cpu")
        if not isinstance(run.strategy, CausalGeneration):  # clm, preference: a causal LM with its tokenizer
            raise GraftError(f"[strategy] teacher = {path!r} is a {run.strategy.name!r} run; token-level "
                             f"distillation needs a causal language model's run (clm, preference).")
        mine, theirs = self.backbone.tokenizer(), run.backbone.tokenizer()
        if mine is None or theirs is None or mine.get_vocab() != theirs.get_vocab():
            sizes = f"{len(theirs) if theirs else 0} tokens vs {len(mine) if mine else 0} here"
            raise GraftError(f"[strategy] teacher = {path!r} has another vocabulary than the student ({sizes}): "
                             f"token-level distillation compares distributions over the same tokens. Give the "
                             f"student the teacher's tokenizer: [backbone] tokenizer = \"{path}\".")
        self.vocab = len(mine)
        return run.model.eval().requires_grad_(False)

    def param_groups(self, model):
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr_scale": 1.0, "name": "all"}]

    def on_step_start(self, step, total_steps):
        self.progress = step / max(1, total_steps - 1)

    def _targets(self, batch):
        """[B, T-1] next-token targets: the corpus's ids, or the instructions' labels (UNLABELLED = context)."""
        return batch["targets"][:, 1:]

    def _logits(self, model, batch, keep):
        """Logits at the target positions ``keep`` ([B, T-1] bool): [N, V] (float32)."""
        return self.response_logits(model, batch, keep)

    def step_targets(self, batch):
        return int((self._targets(batch) != UNLABELLED).sum())

    def training_step(self, model, batch):
        import torch.nn.functional as F

        targets = self._targets(batch)
        keep = targets != UNLABELLED
        logits, targets = self._logits(model, batch, keep), targets[keep]
        n = batch.get("step_targets", targets.numel())
        if self.teacher is None:
            return {"loss": F.cross_entropy(logits, targets, reduction="sum") / max(1, n)}
        import torch

        device = logits.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            teacher = self._logits(self.teacher, batch, keep)
        v = min(self.vocab, logits.shape[-1], teacher.shape[-1])  # embedding tables may be padded past the tokenizer
        if targets.numel() == 0:
            return {"loss": logits.sum() * 0.0}
        mean = self.loss(logits[:, :v], {"teacher": teacher[:, :v], "labels": targets, "progress": self.progress})
        return {"loss": mean * targets.numel() / max(1, n)}

    def eval_step(self, model, batch):
        import torch.nn.functional as F

        targets = self._targets(batch)
        keep = targets != UNLABELLED
        logits, flat = self._logits(model, batch, keep), targets[keep]
        sums = {"loss_sum": F.cross_entropy(logits, flat, reduction="sum"),
                "tokens": logits.new_tensor(float(flat.numel())),
                "correct": (logits.argmax(-1) == flat).sum().float()}
        if self.options.rouge_examples:
            sums["rouge_sum"], sums["rouge_count"] = self._rouge(model, batch, keep)
        return sums

    def compute_metrics(self, sums):
        import math

        loss = float(sums["loss_sum"]) / max(1.0, float(sums["tokens"]))
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
               "next_token_accuracy": float(sums["correct"]) / max(1.0, float(sums["tokens"]))}
        if "rouge_sum" in sums:
            out["rougeL"] = float(sums["rouge_sum"]) / max(1.0, float(sums["rouge_count"]))
        return out

    # -- generation ------------------------------------------------------------------------------------------
    def _scorer(self):
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise GraftError("[strategy] rouge_examples needs the rouge-score package: pip install "
                             "'graftkit[lm]'.") from None
        return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def _rouge(self, model, batch, keep):
        """(sum of ROUGE-L F1, count) over the batch's examples among the split's first ``rouge_examples``: the
        greedy response to each prompt (the tokens before its first target), up to a stop token, against the
        reference (the first response: the targets from there to the first stop token or context token)."""
        import torch

        ids, total, count = batch["inputs"]["input_ids"], 0.0, 0
        rows = (batch["index"] < self.options.rouge_examples).nonzero().flatten().tolist()
        if not rows:  # most batches: no template rendering for the stop tokens
            return ids.new_tensor(0.0, dtype=torch.float32), ids.new_tensor(0.0, dtype=torch.float32)
        tok, scorer = self.backbone.tokenizer(), self.scorer
        stops = self.stop_ids(model, tok)
        for row in rows:
            where = keep[row].nonzero().flatten()
            if where.numel() == 0:
                continue
            start = int(where[0]) + 1  # target j is token j + 1 of the input
            prompt = ids[row, :start].unsqueeze(0)
            turn = keep[row, start - 1:].tolist()
            n = turn.index(False) if False in turn else len(turn)
            reference = self._decode(tok, ids[row, start:start + n], stops)
            with torch.no_grad():
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=self.options.max_new_tokens, pad_token_id=self._pad_id(tok),
                                     eos_token_id=stops)
            total += scorer.score(reference, self._decode(tok, out[0, start:], stops))["rougeL"].fmeasure
            count += 1
        return ids.new_tensor(total, dtype=torch.float32), ids.new_tensor(float(count), dtype=torch.float32)

    def export(self, model, directory):
        """backbone/ (the decoder + tokenizer: the hand-off) and lm/ (the whole causal LM + tokenizer)."""
        Path(directory, "backbone").mkdir(exist_ok=True)
        self.backbone.export(str(Path(directory, "backbone")))
        tok = self.backbone.tokenizer()
        if tok is not None:  # transformers' generate on lm/ then stops at the template's end of turn too
            self.model.generation_config.eos_token_id = self.stop_ids(self.model, tok)
        self.model.save_pretrained(str(Path(directory, "lm")), safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(str(Path(directory, "lm")))


@hookimpl
def register_strategies(register):
    register(CLM, name="clm")
