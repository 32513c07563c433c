"""The ``preference`` strategy: preference tuning of a decoder language model on the ``preferences`` source, with the
loss as an option (each as TRL computes it, which the tests check against the formulas):

- ``dpo``: Rafailov et al., "Direct Preference Optimization" (NeurIPS 2023): -log sigmoid(beta * (policy margin -
  reference margin)), margins of summed response log-probabilities; ``label_smoothing`` eps gives the conservative
  variant (cDPO, Mitchell 2023): -(1 - eps) log sigmoid(x) - eps log sigmoid(-x);
- ``ipo``: Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences" (AISTATS
  2024): (h - 1 / (2 beta))^2, h the margin difference of length-averaged log-probabilities (TRL's choice);
- ``orpo``: Hong et al., "ORPO: Monolithic Preference Optimization without Reference Model" (EMNLP 2024): the chosen
  response's mean token cross-entropy minus beta (their lambda) * log sigmoid(log odds ratio), odds of the
  length-averaged probabilities; no reference;
- ``simpo``: Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward" (NeurIPS 2024):
  -log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma); no reference;
- ``kto``: Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization" (ICML 2024), on unpaired
  data: 1 - sigmoid(beta * (r - z)) for desirable and 1 - sigmoid(beta * (z - r)) for undesirable responses, r the
  policy / reference log-ratio, z the micro-batch's mean log-ratio over all processes, clamped at 0 (detached) -- the
  paper's batch estimate of the reference point (TRL estimates it from mismatched prompt/response pairs instead; with
  accumulation each micro-batch has its own z); weights per side.

The reference model (dpo, ipo, kto) is the policy as it starts: with an [adapter], the same network with the
adapter switched off (no second model in memory); otherwise a frozen copy (``reference = "copy"``), or its
log-probabilities of every example computed once and kept on disk (``reference = "cache"``), keyed by the
reference's weights, the data and its options, so any change makes a new cache. Log-probabilities are sums over
response tokens only; the loss is a mean over the optimizer step's pairs (all micro-batches and processes), so batch
4 = batch 2 x accumulation 2. Metrics: reward accuracy (chosen reward above rejected), mean reward margin, mean
chosen and rejected log-probabilities, the loss, and with ``rouge_examples`` ROUGE-L of greedy answers against the
chosen ones; rewards are beta x the log-ratio to the reference (SimPO and ORPO: beta x the mean log-probability).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import GraftError, Strategy, hookimpl, option
from graft.capabilities import TaskModel, require
from graft.supervised import CausalGeneration
from graft.data import IGNORE

REFERENCE_FREE = ("orpo", "simpo")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0}


@dataclass
class PreferenceOptions:
    loss: Literal["dpo", "ipo", "orpo", "simpo", "kto"] = option("dpo", "The preference loss (see the module's "
                                                                         "docstring for each one's source).")
    beta: float = option(0.0, "The loss's beta (ORPO: its lambda); 0 = the usual value: 0.1, SimPO 2.0.")
    label_smoothing: float = option(0.0, "dpo: the conservative variant's eps, the assumed share of flipped labels.")
    gamma: float = option(0.5, "simpo: the target reward margin gamma.")
    desirable_weight: float = option(1.0, "kto: weight of the desirable responses' losses.")
    undesirable_weight: float = option(1.0, "kto: weight of the undesirable responses' losses.")
    reference: Literal["auto", "adapter", "copy", "cache"] = option(
        "auto", "The reference model's log-probabilities: adapter (the policy with its [adapter] switched off), copy "
                "(a frozen copy of the starting model), cache (computed once with it, kept on disk); auto = adapter "
                "with an [adapter], else cache.")
    cache_dir: str = option("", "reference = \"cache\": where; empty = $GRAFT_CACHE_DIR or ~/.cache/graftkit.",
                            path=True)
    rouge_examples: int = option(0, "At each evaluation, generate greedy answers to the prompts of the split's first "
                                    "N pairs and report ROUGE-L F1 (Lin 2004; Google's rouge-score, stemmed) against "
                                    "the chosen answers as rougeL. Needs pip install 'graftkit[lm]'.")
    max_new_tokens: int = option(32, "Tokens generated per answer for rouge_examples, at most (generation also stops "
                                     "at the end-of-sequence and the chat template's end-of-turn tokens).")

    def validate(self):
        if self.beta < 0 or not 0 <= self.label_smoothing < 0.5:
            raise ValueError("beta must not be negative and label_smoothing must be in [0, 0.5).")
        if min(self.desirable_weight, self.undesirable_weight) < 0:
            raise ValueError("desirable_weight and undesirable_weight must not be negative.")
        if self.rouge_examples < 0 or self.max_new_tokens < 1:
            raise ValueError("rouge_examples must be >= 0 and max_new_tokens >= 1.")


def sequence_logps(picked, targets):
    """(sum, count) over each sequence's response tokens: ``picked`` ``[K, V]``, the logits at the K response
    positions of ``targets`` ``[N, T]`` (already shifted: position t predicts targets[:, t]; IGNORE = not a response
    token) -> ``[N]``, ``[N]``."""
    import torch

    keep = targets != IGNORE
    token = picked.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, -1)
    sums = torch.zeros(targets.shape[0], dtype=token.dtype, device=token.device)
    return sums.index_add(0, keep.nonzero()[:, 0], token), keep.sum(-1)


def preference_losses(o: PreferenceOptions, chosen, rejected, n_chosen, n_rejected, ref_chosen=None,
                      ref_rejected=None, nll=None):
    """Per-pair losses ``[B]`` and rewards (chosen, rejected) ``[B]`` of the paired losses from summed response
    log-probabilities (policy, reference) and response lengths. ``nll``: orpo's per-pair chosen cross-entropy."""
    import torch.nn.functional as F

    beta = o.beta or DEFAULT_BETA[o.loss]
    if o.loss == "dpo":
        c, r = chosen - ref_chosen, rejected - ref_rejected
        x = beta * (c - r)
        losses = -(1 - o.label_smoothing) * F.logsigmoid(x) - o.label_smoothing * F.logsigmoid(-x)
        return losses, beta * c.detach(), beta * r.detach()
    if o.loss == "ipo":
        c, r = (chosen - ref_chosen) / n_chosen, (rejected - ref_rejected) / n_rejected
        return (c - r - 1 / (2 * beta)) ** 2, beta * c.detach(), beta * r.detach()
    c, r = chosen / n_chosen, rejected / n_rejected
    if o.loss == "simpo":
        return -F.logsigmoid(beta * (c - r) - o.gamma), beta * c.detach(), beta * r.detach()
    import torch  # orpo: log odds = log(p / (1 - p)) of the mean token probabilities

    below_one = 1 - 1e-6  # a mean log-probability of 0 (certainty) would make the odds infinite
    log_odds = (c - r) - (torch.log1p(-torch.exp(c).clamp(max=below_one)) -
                          torch.log1p(-torch.exp(r).clamp(max=below_one)))
    return nll - beta * F.logsigmoid(log_odds), beta * c.detach(), beta * r.detach()


def kto_losses(o: PreferenceOptions, logps, ref_logps, desirable):
    """Per-response KTO losses ``[N]`` and rewards ``[N]``: r = policy - reference log-probability, z = the batch's
    mean r clamped at 0 (no gradient)."""
    import torch

    beta = o.beta or DEFAULT_BETA["kto"]
    r = logps - ref_logps
    z = r.detach().mean()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # the micro-batch's mean over every process, as TRL's
        dist.all_reduce(z)
        z = z / dist.get_world_size()
    z = z.clamp(min=0)
    losses = torch.where(desirable, o.desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
                         o.undesirable_weight * (1 - torch.sigmoid(beta * (z - r))))
    return losses, beta * r.detach()


class Preference(CausalGeneration, Strategy):
    """Preference tuning of a decoder: DPO, IPO, ORPO, SimPO, KTO; the reference as a cache or the adapter off."""

    Options = PreferenceOptions
    primary_metric = "reward_accuracy"
    supports_adapters = True
    metric_modes = {"loss": "min", "reward_accuracy": "max", "reward_margin": "max", "logps_chosen": "max",
                    "logps_rejected": "min", "rougeL": "max"}

    def build(self):
        o = self.options
        if self.data.task != "preference":
            raise GraftError("[strategy] plugin = \"preference\" needs [data] plugin = \"preferences\" (prompts with "
                             "chosen and rejected responses, or labelled ones for kto).")
        kind = getattr(self.data, "kind", None)
        if kind is not None and (kind == "unpaired") != (o.loss == "kto"):
            raise GraftError(f"[strategy] loss = {o.loss!r} needs {'unpaired' if o.loss == 'kto' else 'paired'} "
                             f"preference data, and [data] holds {kind} rows. Paired losses (dpo, ipo, orpo, simpo) "
                             f"need chosen and rejected on every line; kto needs completion and label.")
        self.scorer = None
        if o.rouge_examples:
            if kind == "unpaired":
                raise GraftError("[strategy] rouge_examples scores answers against the chosen ones: it needs paired "
                                 "preference data.")
            try:  # built now: a missing package is bad input at the start, not an error at the first evaluation
                from rouge_score import rouge_scorer
            except ImportError:
                raise GraftError("[strategy] rouge_examples needs the rouge-score package: pip install "
                                 "'graftkit[lm]'.") from None
            self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        self.model = require(self.backbone, TaskModel, "[strategy] plugin = \"preference\"",
                             "Use an hf text backbone.").task_model("causal-lm")
        self.mode = None if o.loss in REFERENCE_FREE else o.reference
        if self.mode == "auto":  # a peft adapter switches off; any other (bitfit) changes the base weights
            self.mode = "adapter" if self._adapter_layers() else "cache"
        if self.mode == "adapter" and not self._adapter_layers():
            raise GraftError("[strategy] reference = \"adapter\" switches the [adapter] off to get the reference, and "
                             "this run has no peft adapter (lora, ia3). Add one, or use reference = \"cache\".")
        self.reference, self.cache = None, None
        if o.loss == "kto":  # no pairs: no accuracy of pairs; the gap between the two sides' rewards instead
            self.primary_metric = "reward_margin"
        if self.mode == "copy" or self.mode == "cache" and not self.predicting:
            import copy

            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        return self.model

    def param_groups(self, model):
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr_scale": 1.0, "name": "all"}]

    # -- log-probabilities ---------------------------------------------------------------------------------
    def _logps(self, model, batch):
        """Summed response log-probabilities and response lengths of every sequence of the batch ``[N]``, and the
        logits' per-sequence cross-entropy sum (orpo)."""
        targets = batch["targets"][:, 1:]
        return sequence_logps(self.response_logits(model, batch, targets != IGNORE), targets)

    def _adapter_layers(self):
        """The model's peft adapter layers (lora, ia3): each switches its adapter off with enable_adapters(False)."""
        try:
            from peft.tuners.tuners_utils import BaseTunerLayer
        except ImportError:  # no peft: no adapter
            return []
        return [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]

    @contextlib.contextmanager
    def adapter_off(self):
        layers = self._adapter_layers()
        for m in layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m in layers:
                m.enable_adapters(True)

    def reference_logps(self, model, batch):
        """The reference's summed response log-probabilities ``[N]`` of the batch's sequences (no gradient)."""
        import torch

        if self.mode == "cache":
            return self._cached(batch)
        with torch.no_grad():
            if self.mode == "adapter":
                was = self.model.training
                self.model.eval()  # no adapter dropout in the reference
                with self.adapter_off():
                    out = self._logps(self.model, batch)[0]
                self.model.train(was)
                return out
            return self._logps(self._on_device(batch), batch)[0]

    def _on_device(self, batch):
        device = batch["targets"].device
        if next(self.reference.parameters()).device != device:
            self.reference.to(device)
        return self.reference

    def _cached(self, batch):
        """Log-probabilities of the batch's sequences from the cache (built on first use for every split)."""
        import torch

        if self.cache is None:
            self.cache = self._load_or_build(batch["targets"].device)
        table = self.cache[batch["split"]].to(batch["targets"].device)  # [n, 1 or 2]
        rows = table[batch["index"]]
        return rows.t().reshape(-1) if rows.shape[1] == 2 else rows[:, 0]

    def cache_file(self) -> Path:
        """Reference weights + every encoded example of every split (its ids and targets, so the file, the split, the
        template and the tokenizer): any change, a new file. Computed in float32 whatever the run's precision."""
        import torch

        h = hashlib.sha256()
        for v in self.reference.state_dict().values():
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        for split in ("train", "val", "test"):  # the encoded examples: file, template and tokenizer all show there
            for example in self.data.dataset(split) or []:
                for a in example[:4]:
                    h.update(a.tobytes() if hasattr(a, "tobytes") else repr(a).encode())
            h.update(split.encode())
        root = self.options.cache_dir or os.environ.get("GRAFT_CACHE_DIR") or Path.home() / ".cache" / "graftkit"
        return Path(root) / "reference" / f"{h.hexdigest()[:24]}.safetensors"

    def _load_or_build(self, device) -> dict:
        import torch
        from safetensors.torch import load_file, save_file

        path = self.cache_file()
        if path.is_file():
            try:
                cached = load_file(str(path))
                self.reference = None  # the copy was only for the cache: free it
                return cached
            except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
                pass
        reference = self._on_device({"targets": torch.zeros(1, device=device)})
        out = {}
        for split in ("train", "val", "test"):
            ds = self.data.dataset(split)
            if not ds:
                continue
            parts = []
            for i in range(0, len(ds), 8):
                batch = self.data.collate([ds[j] for j in range(i, min(len(ds), i + 8))])
                batch = {"inputs": {k: v.to(device) for k, v in batch["inputs"].items()},
                         "targets": batch["targets"].to(device)}
                with torch.no_grad(), torch.autocast(device.type, enabled=False):
                    logps = self._logps(reference, batch)[0].float().cpu()
                parts.append(logps.reshape(2, -1).t() if self.data.kind == "paired" else logps[:, None])
            out[split] = torch.cat(parts).contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file(out, str(tmp))
        os.replace(tmp, path)  # whole or absent, however many processes write it
        self.reference = None  # the copy was only for the cache: free it
        return out

    # -- steps -------------------------------------------------------------------------------------------
    def step_targets(self, batch):
        """Pairs (kto: responses) in the micro-batch: the loss is a mean over the whole step's."""
        n = batch["targets"].shape[0]
        return n if self.options.loss == "kto" else n // 2

    def _losses(self, model, batch):
        import torch

        o = self.options
        logps, lengths = self._logps(model, batch)
        ref = None if o.loss in REFERENCE_FREE else self.reference_logps(model, batch)
        if o.loss == "kto":
            losses, rewards = kto_losses(o, logps, ref, batch["desirable"])
            return losses, logps, rewards, None
        b = logps.shape[0] // 2
        nll = None
        if o.loss == "orpo":  # the chosen response's mean token cross-entropy
            nll = -logps[:b] / lengths[:b].clamp(min=1)
        lengths = lengths.clamp(min=1).float()
        losses, rc, rr = preference_losses(o, logps[:b], logps[b:], lengths[:b], lengths[b:],
                                           None if ref is None else ref[:b], None if ref is None else ref[b:], nll)
        return losses, logps, torch.stack([rc, rr]), b

    def training_step(self, model, batch):
        losses, logps, rewards, b = self._losses(model, batch)
        n = batch.get("step_targets", losses.numel())
        logs = {} if b is None else {"reward_accuracy": (rewards[0] > rewards[1]).float().mean(),
                                     "reward_margin": (rewards[0] - rewards[1]).mean()}
        return {"loss": losses.sum() / n, **logs}

    def eval_step(self, model, batch):
        losses, logps, rewards, b = self._losses(model, batch)
        sums = {"loss_sum": losses.sum().float(), "count": losses.new_tensor(float(losses.numel()))}
        if b is None:  # kto: rewards of each side
            d = batch["desirable"]
            return {**sums, "desirable_reward": rewards[d].sum(), "undesirable_reward": rewards[~d].sum(),
                    "desirable": d.sum().float(), "undesirable": (~d).sum().float()}
        sums.update(correct=(rewards[0] > rewards[1]).sum().float(), margin=(rewards[0] - rewards[1]).sum(),
                    logps_chosen=logps[:b].sum().float(), logps_rejected=logps[b:].sum().float())
        if self.scorer is not None:
            sums["rouge_sum"], sums["rouge_count"] = self._rouge(batch, b)
        return sums

    def _rouge(self, batch, b):
        """(sum of ROUGE-L F1, count) of greedy answers to the prompts of the batch's pairs among the split's first
        ``rouge_examples``, each against its chosen answer."""
        import torch

        ids, targets = batch["inputs"]["input_ids"][:b], batch["targets"][:b]
        tok = self.backbone.tokenizer()
        stops, pad = self.stop_ids(self.model, tok), self._pad_id(tok)
        total, count = 0.0, 0
        for row in (batch["index"] < self.options.rouge_examples).nonzero().flatten().tolist():
            where = (targets[row] != IGNORE).nonzero().flatten()
            if where.numel() == 0:
                continue
            start = int(where[0])
            prompt = ids[row, :start].unsqueeze(0)
            with torch.no_grad():
                out = self.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                          max_new_tokens=self.options.max_new_tokens, pad_token_id=pad,
                                          eos_token_id=stops)
            answer, reference = (self._decode(tok, t, stops) for t in (out[0, start:], ids[row, where]))
            total += self.scorer.score(reference, answer)["rougeL"].fmeasure
            count += 1
        return ids.new_tensor(total, dtype=torch.float32), ids.new_tensor(float(count), dtype=torch.float32)

    def compute_metrics(self, sums):
        n = max(1.0, float(sums["count"]))
        out = {"loss": float(sums["loss_sum"]) / n}
        if "correct" in sums:
            out.update(reward_accuracy=float(sums["correct"]) / n, reward_margin=float(sums["margin"]) / n,
                       logps_chosen=float(sums["logps_chosen"]) / n, logps_rejected=float(sums["logps_rejected"]) / n)
            if "rouge_sum" in sums:
                out["rougeL"] = float(sums["rouge_sum"]) / max(1.0, float(sums["rouge_count"]))
        else:
            out.update(desirable_reward=float(sums["desirable_reward"]) / max(1.0, float(sums["desirable"])),
                       undesirable_reward=float(sums["undesirable_reward"]) / max(1.0, float(sums["undesirable"])))
            out["reward_margin"] = out["desirable_reward"] - out["undesirable_reward"]
        return out

    def metric_mode(self, metric):
        if metric in ("desirable_reward",):
            return "max"
        if metric in ("undesirable_reward",):
            return "min"
        return super().metric_mode(metric)

    def export(self, model, directory):
        """backbone/ (the decoder + tokenizer) and lm/ (the whole causal LM + tokenizer), as clm writes them."""
        Path(directory, "backbone").mkdir(exist_ok=True)
        self.backbone.export(str(Path(directory, "backbone")))
        tok = self.backbone.tokenizer()
        if tok is not None:  # transformers' generate on lm/ then stops at the template's end of turn too
            self.model.generation_config.eos_token_id = self.stop_ids(self.model, tok)
        self.model.save_pretrained(str(Path(directory, "lm")), safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(str(Path(directory, "lm")))

    def report(self, model):
        return {"loss_type": self.options.loss, "reference": self.mode or "none (reference-free)",
                "beta": self.options.beta or DEFAULT_BETA[self.options.loss]}


@hookimpl
def register_strategies(register):
    register(Preference, name="preference")
