"""The ``seq2seq`` strategy: sequence-to-sequence transfer (translation, rewriting) of an hf text backbone.

Two kinds of model, one loss:

- an encoder-decoder checkpoint (T5, BART, Marian, mBART: ``AutoModelForSeq2SeqLM`` of the backbone's config, its
  pretrained LM head included);
- an encoder-decoder warm-started from an encoder (BERT, MiniLM, RoBERTa): Rothe, Narayan & Severyn 2020,
  "Leveraging Pre-trained Checkpoints for Sequence Generation Tasks" (BERT2BERT). Encoder and decoder start from the
  same checkpoint, the decoder with causal masks and new cross-attention (``transformers.EncoderDecoderModel``);
  ``tie_encoder_decoder`` shares their weights (BERT2BERT "share").

Training is teacher forcing: the decoder reads the target shifted right (after the model's decoder start token)
and the cross-entropy, with optional label smoothing (Szegedy et al. 2016; torch's, which equals transformers'
``label_smoothing_factor``), is summed over target tokens and divided by the target tokens of the whole optimizer
step (all micro-batches and processes), as ``clm`` does. Evaluation reports the loss, perplexity = exp(mean token
loss), next-token accuracy, and BLEU and chrF from sacrebleu (Post 2018: the field's reference implementation; its
signature strings are reported) of generated outputs (greedy or beam search) against the references.

Distillation from a finished seq2seq run (``teacher``):

- ``distill = "word"``: word-level KD (Kim & Rush 2016, after Hinton et al. 2015): at every target token the
  student matches the teacher's softened distribution, through ``[loss] plugin = "kd"`` (alpha, temperature); the
  teacher must share the student's target vocabulary;
- ``distill = "sequence"``: sequence-level KD (Kim & Rush 2016): the teacher's beam-search outputs for the training
  sources become the student's training targets (any tokenizer: they are text). They are generated once and cached
  (a JSON file named by a hash of the teacher's weights, the data and the search settings).

A warm-started decoder's cross-attention can start as a copy of each layer's self-attention instead of random
(``cross_attention = "self"``), and parameters the checkpoint did not hold can learn faster (``fresh_lr_scale``):
on KJV -> WEB rewriting the copy reached a validation loss of 3.12 after 250 steps where random cross-attention
reached 3.92 (examples/README.md).

The whole model is saved with ``save_pretrained`` under ``seq2seq/`` (``AutoModelForSeq2SeqLM`` loads it, and
``graft generate`` / ``graft predict`` use the run); ``backbone/`` is the backbone (the encoder of a warm-started
model), the hand-off to other runs. No ONNX export: transformers 5 has no exporter of its own, and its ONNX tooling
(optimum-onnx 0.1.0) requires transformers < 4.58; an encoder + decoder export would need a decoding loop of
graft's own, which this project does not write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import UNLABELLED, GraftError, SoftTargetLoss, Strategy, hookimpl, option
from graft.capabilities import TaskModel, require


@dataclass
class Seq2SeqOptions:
    tie_encoder_decoder: bool = option(False, "Warm-started from an encoder: the decoder shares the encoder's "
                                              "weights (embeddings, self-attention, feed-forward; BERT2BERT share).")
    cross_attention: Literal["random", "self"] = option(
        "random", "Warm-started from an encoder: the decoder's new cross-attention starts random (Rothe et al. 2020) "
                  "or as a copy of the same layer's pretrained self-attention (self).")
    freeze: Literal["none", "encoder", "embeddings"] = option(
        "none", "Parameters that do not train: the encoder (with its embeddings, except what the decoder shares: "
                "T5's tied embedding, tied halves), or only the token embeddings.")
    label_smoothing: float = option(0.0, "Label smoothing of the token cross-entropy (0.1 is usual).")
    fresh_lr_scale: float = option(1.0, "Learning-rate multiplier of the parameters the checkpoint did not hold (a "
                                        "warm-started decoder's new cross-attention and LM-head transform), as a new "
                                        "head gets a larger rate than the pretrained body.")
    num_beams: int = option(1, "Beam search width for generated outputs (evaluation, predict, generate); 1 = greedy.")
    max_new_tokens: int = option(64, "Tokens generated per output at most (generation stops at end-of-sequence).")
    length_penalty: float = option(1.0, "Beam search: the score is divided by length ** length_penalty; above 1 "
                                        "favours longer outputs.")
    generate_examples: int = option(0, "BLEU and chrF on generated outputs for the first N examples of each evaluated "
                                       "split; 0 = all of them.")
    lowercase: bool = option(False, "BLEU and chrF ignore case (sacrebleu's lowercase): for an uncased tokenizer "
                                    "(MiniLM, bert-base-uncased), whose outputs have no capitals.")
    teacher: str = option("", "Distil a finished seq2seq run into this model: see distill.", path=True)
    distill: Literal["word", "sequence"] = option(
        "word", "With teacher: word = per-token soft targets through [loss] plugin = \"kd\" (same target "
                "vocabulary); sequence = the teacher's beam outputs replace the training targets (Kim & Rush 2016).")
    teacher_beams: int = option(4, "Sequence-level distillation: the teacher's beam width.")
    cache_dir: str = option("", "Where sequence-level distillation keeps the teacher's outputs; default "
                                "$GRAFT_CACHE_DIR or ~/.cache/graftkit.")

    def validate(self):
        if not 0 <= self.label_smoothing < 1:
            raise ValueError("label_smoothing must be in [0, 1).")
        if self.fresh_lr_scale <= 0:
            raise ValueError("fresh_lr_scale must be > 0.")
        if self.num_beams < 1 or self.teacher_beams < 1 or self.max_new_tokens < 1 or self.generate_examples < 0:
            raise ValueError("num_beams, teacher_beams and max_new_tokens must be >= 1, generate_examples >= 0.")


def sacrebleu_scores(hypotheses: list[str], references: list[str], lowercase: bool = False) -> dict:
    """Corpus BLEU and chrF (0-100) of ``hypotheses`` against one reference each, with sacrebleu's defaults
    (13a tokenisation, exponential smoothing; chrF: character 6-grams, beta 2), case-insensitive with
    ``lowercase``, and their signature strings. GraftError when sacrebleu is not installed."""
    try:
        from sacrebleu.metrics import BLEU, CHRF
    except ImportError:
        raise GraftError("seq2seq scores generated text with sacrebleu: pip install 'graftkit[seq2seq]'.") from None
    bleu, chrf = BLEU(lowercase=lowercase), CHRF(lowercase=lowercase)
    return {"bleu": bleu.corpus_score(hypotheses, [references]).score,
            "chrf": chrf.corpus_score(hypotheses, [references]).score,
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


class Seq2Seq(Strategy):
    """Seq2seq (translation, rewriting): T5/BART/Marian, or an encoder-decoder warm-started from an encoder."""

    Options = Seq2SeqOptions
    primary_metric = "bleu"
    #: graft.predictions: every metric is a sum over examples (BLEU / chrF from the examples' output pairs)
    per_example = True
    supports_adapters = True
    metric_modes = {"loss": "min", "perplexity": "min", "next_token_accuracy": "max", "bleu": "max", "chrf": "max"}

    @classmethod
    def prepare_backbone(cls, options, backbone):
        """An encoder becomes the encoder-decoder here, before an adapter goes in (LoRA then adapts both halves)."""
        require(backbone, TaskModel, "[strategy] plugin = \"seq2seq\"", "Use an hf text backbone.").task_model(
            "seq2seq-lm", tie_encoder_decoder=options.tie_encoder_decoder, cross_attention=options.cross_attention)

    def build(self):
        o = self.options
        if self.data.task != "seq2seq":
            raise GraftError("[strategy] plugin = \"seq2seq\" needs source/target pairs: [data] plugin = \"pairs\".")
        self.model = self.backbone.task_model("seq2seq-lm", tie_encoder_decoder=o.tie_encoder_decoder,
                                              cross_attention=o.cross_attention)
        if o.tie_encoder_decoder and self.model.config.model_type != "encoder-decoder":
            raise GraftError("[strategy] tie_encoder_decoder = true shares a warm-started decoder's weights with its "
                             f"encoder; {type(self.model).__name__} is an encoder-decoder checkpoint already. Remove "
                             f"the option.")
        if o.tie_encoder_decoder and self.backbone.adapter_frozen:
            raise GraftError("[strategy] tie_encoder_decoder = true with an [adapter]: the halves share their layers, "
                             "and an adapter would go into the encoder's copy only. Use one or the other.")
        if o.freeze == "encoder":  # not what the decoder uses too (T5's shared embedding, tied halves)
            decoder = {id(p) for p in self.model.get_decoder().parameters()}
            decoder |= {id(p) for p in self.model.get_output_embeddings().parameters()}
            for p in self.model.get_encoder().parameters():
                if id(p) not in decoder:
                    p.requires_grad_(False)
        elif o.freeze == "embeddings":
            self.model.get_input_embeddings().requires_grad_(False)
        self.tokenizer = self.backbone.tokenizer()
        cfg = self.model.config
        self.start = cfg.decoder_start_token_id
        self.pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        if self.start is None:
            raise GraftError(f"[backbone] {type(self.model).__name__}'s config has no decoder_start_token_id: set it "
                             f"(e.g. [backbone] overrides = {{ decoder_start_token_id = 0 }}).")
        self.teacher, self.progress, self.targets_of, self.teacher_run = None, 0.0, None, None
        if o.teacher and not self.predicting:  # predicting needs no teacher
            self.teacher = self._load_teacher(o.teacher)
        elif self.loss is not None:
            raise GraftError(f"[loss] plugin = {self.loss.name!r} with [strategy] plugin = \"seq2seq\": its loss is "
                             f"the token cross-entropy; a [loss] table is used only for word-level distillation, with "
                             f"[strategy] teacher = \"runs/<seq2seq run>\". Remove [loss], or set teacher.")
        return self.model

    # -- distillation ------------------------------------------------------------------------------------------
    def _load_teacher(self, path):
        from graft import load_run

        o = self.options
        run = load_run(Path(path), for_prediction=True, device="cpu")
        if not isinstance(run.strategy, Seq2Seq):
            raise GraftError(f"[strategy] teacher = {path!r} is a {run.strategy.name!r} run; seq2seq distillation "
                             f"needs a seq2seq run.")
        if o.distill == "sequence":
            if self.loss is not None:
                raise GraftError("[strategy] distill = \"sequence\" trains on the teacher's outputs with the token "
                                 "cross-entropy: remove the [loss] table (it is for distill = \"word\").")
            self.teacher_run = run  # its outputs are made at the first training step: evaluation needs none
            return None
        if not isinstance(self.loss, SoftTargetLoss):
            raise GraftError("[strategy] distill = \"word\" needs a soft-target loss: [loss] plugin = \"kd\" with "
                             "alpha = 0.5 and temperature = 1.0.")
        mine, theirs = self.tokenizer, run.backbone.tokenizer()
        if mine.get_vocab() != theirs.get_vocab():
            raise GraftError(f"[strategy] teacher = {path!r} has another vocabulary than the student ({len(theirs)} "
                             f"tokens vs {len(mine)} here): word-level distillation compares distributions over the "
                             f"same tokens. Use distill = \"sequence\" (any tokenizer), or give the student the "
                             f"teacher's tokenizer.")
        self.vocab, self.teacher_strategy = len(mine), run.strategy
        return run.model.eval().requires_grad_(False)

    def _teacher_targets(self, run, device) -> list[list[int]]:
        """The teacher's beam outputs for every training source (the source text itself, as the teacher's tokenizer
        reads it), as target ids of this model's tokenizer. Cached as text under a hash of the teacher's weights,
        the sources and the search settings; with several processes the first makes them, the others wait."""
        import hashlib
        import json
        import os

        import torch
        import torch.distributed as td

        o, train = self.options, self.data.dataset("train") or []
        sources = [e[3] if len(e) > 3 else self.tokenizer.decode(e[0], skip_special_tokens=True) for e in train]
        h = hashlib.sha256()
        for v in run.model.state_dict().values():
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        h.update(json.dumps([sources, o.teacher_beams, o.max_new_tokens, o.length_penalty]).encode())
        root = o.cache_dir or os.environ.get("GRAFT_CACHE_DIR") or Path.home() / ".cache" / "graftkit"
        path = Path(root) / "seq2seq" / f"{h.hexdigest()[:24]}.json"
        several = td.is_available() and td.is_initialized()
        if not path.is_file() and (not several or td.get_rank() == 0):
            model, tok, texts = run.model.to(device), run.backbone.tokenizer(), []
            for i in range(0, len(sources), 32):
                enc = tok(sources[i:i + 32], truncation=True, padding=True, return_tensors="pt").to(device)
                texts += run.strategy._generate(model, enc["input_ids"], enc["attention_mask"],
                                                num_beams=o.teacher_beams, max_new_tokens=o.max_new_tokens,
                                                length_penalty=o.length_penalty)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(texts))
            os.replace(tmp, path)
        if several:
            td.barrier()
        texts = json.loads(path.read_text())
        limit = getattr(self.data, "max_target", None)
        return self.tokenizer(text_target=texts, truncation=limit is not None, max_length=limit)["input_ids"]

    # -- training ----------------------------------------------------------------------------------------------
    def param_groups(self, model):
        fresh = getattr(self.backbone, "fresh_parameters", frozenset())
        groups = {"pretrained": [], "fresh": []}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                groups["fresh" if name.replace(".base_layer.", ".") in fresh else "pretrained"].append(p)
        scale = {"pretrained": 1.0, "fresh": self.options.fresh_lr_scale}
        return [{"params": ps, "lr_scale": scale[n], "name": n} for n, ps in groups.items() if ps]

    def on_step_start(self, step, total_steps):
        self.progress = step / max(1, total_steps - 1)

    def _labels(self, batch):
        """[B, T] target ids (UNLABELLED = padding), without a leading decoder start token (a BERT tokenizer's
        [CLS]: the decoder reads it, it is no target); sequence-level KD swaps in the teacher's outputs."""
        import torch

        if self.teacher_run is not None and batch.get("split") == "train" and self.targets_of is None:
            self.targets_of = self._teacher_targets(self.teacher_run, batch["targets"].device)
            self.teacher_run = None
        if self.targets_of is not None and batch.get("split") == "train" and "labels" not in batch:
            rows = [self.targets_of[i] for i in batch["index"].tolist()]
            n = max(len(r) for r in rows)
            t = torch.full((len(rows), n), UNLABELLED, dtype=torch.long)
            for j, r in enumerate(rows):
                t[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            batch["targets"] = t.to(batch["targets"].device)
        t = batch["targets"]
        if t.shape[1] > 1 and bool((t[:, 0] == self.start).all()):
            t = t[:, 1:]
        batch["labels"] = t
        return t

    def _decoder_inputs(self, labels, start):
        import torch

        shifted = torch.full_like(labels, self.pad)
        shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == UNLABELLED, self.pad)
        shifted[:, 0] = start
        return shifted

    def _logits(self, model, batch, labels, keep, start=None):
        """[N, V] float32 logits at the target positions ``keep`` ([B, T] bool)."""
        inputs = batch["inputs"]
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    decoder_input_ids=self._decoder_inputs(labels, self.start if start is None else start))
        return out.logits[keep].float()

    def step_targets(self, batch):
        labels = batch["labels"] if "labels" in batch else self._labels(batch)
        return int((labels != UNLABELLED).sum())

    def training_step(self, model, batch):
        import torch
        import torch.nn.functional as F

        labels = batch["labels"] if "labels" in batch else self._labels(batch)
        keep = labels != UNLABELLED
        logits, targets = self._logits(model, batch, labels, keep), labels[keep]
        n = batch.get("step_targets", targets.numel())
        if self.teacher is None:
            loss = F.cross_entropy(logits, targets, reduction="sum", label_smoothing=self.options.label_smoothing)
            return {"loss": loss / max(1, n)}
        if next(self.teacher.parameters()).device != logits.device:
            self.teacher.to(logits.device)
        with torch.no_grad():
            teacher = self._logits(self.teacher, batch, labels, keep, start=self.teacher_strategy.start)
        v = min(self.vocab, logits.shape[-1], teacher.shape[-1])
        mean = self.loss(logits[:, :v], {"teacher": teacher[:, :v], "labels": targets, "progress": self.progress})
        return {"loss": mean * targets.numel() / max(1, n)}

    def eval_step(self, model, batch):
        import torch.nn.functional as F

        labels = self._labels(dict(batch, split="eval"))
        keep = labels != UNLABELLED
        logits, flat = self._logits(model, batch, labels, keep), labels[keep]
        sums = {"loss_sum": F.cross_entropy(logits, flat, reduction="sum"),
                "tokens": logits.new_tensor(float(flat.numel())),
                "correct": (logits.argmax(-1) == flat).sum().float()}
        limit = self.options.generate_examples
        rows = [i for i, k in enumerate(batch["index"].tolist()) if not limit or k < limit]
        if rows:
            inputs = batch["inputs"]
            hyps = self._generate(model, inputs["input_ids"][rows], inputs["attention_mask"][rows])
            sums["generated"] = [[h, batch["references"][i]] for h, i in zip(hyps, rows)]
        return sums

    def compute_metrics(self, sums):
        import math

        loss = float(sums["loss_sum"]) / max(1.0, float(sums["tokens"]))
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
               "next_token_accuracy": float(sums["correct"]) / max(1.0, float(sums["tokens"]))}
        pairs = sums.get("generated") or []
        if pairs:
            out.update(sacrebleu_scores([h for h, _ in pairs], [r for _, r in pairs], self.options.lowercase),
                       generated=len(pairs))
        return out

    # -- generation --------------------------------------------------------------------------------------------
    def _generate(self, model, input_ids, attention_mask, num_beams=None, sample=0.0, top_p=1.0,
                  max_new_tokens=None, length_penalty=None) -> list[str]:
        import torch

        o = self.options
        beams = num_beams or o.num_beams
        length_penalty = o.length_penalty if length_penalty is None else length_penalty
        model = getattr(model, "module", model)  # DDP: generate is the model's own
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=beams,
                                 max_new_tokens=max_new_tokens or o.max_new_tokens, do_sample=sample > 0,
                                 temperature=sample if sample > 0 else None, top_p=top_p if sample > 0 else None,
                                 length_penalty=length_penalty if beams > 1 else 1.0,
                                 decoder_start_token_id=self.start, pad_token_id=self.pad)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def predict(self, model, inputs):
        return [{"text": t} for t in self._generate(model, inputs["input_ids"], inputs["attention_mask"])]

    def generate(self, model, prompt, max_new_tokens=50, temperature=0.0, top_p=1.0, stream=None, raw=False):
        """The output for the source text ``prompt``: beam search with the run's num_beams at temperature 0, else
        sampling; ``max_new_tokens`` bounds it; ``stream`` receives it whole."""
        enc = self.tokenizer([prompt], truncation=True, return_tensors="pt").to(next(model.parameters()).device)
        text = self._generate(model, enc["input_ids"], enc["attention_mask"], sample=temperature, top_p=top_p,
                              max_new_tokens=max_new_tokens)[0]
        if stream is not None:
            stream(text)
        return text

    def report(self, model):
        return {"model": type(self.model).__name__}

    def export(self, model, directory):
        """backbone/ (the backbone: the encoder of a warm-started model) and seq2seq/ (the whole model +
        tokenizer, for AutoModelForSeq2SeqLM)."""
        Path(directory, "backbone").mkdir(exist_ok=True)
        self.backbone.export(str(Path(directory, "backbone")))
        # transformers 5 no longer ties an encoder-decoder's halves, and refuses to save the weights they share
        # (tie_encoder_decoder): seq2seq/ holds each half's own copy, which loads as an untied model
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()} \
            if self.options.tie_encoder_decoder else None
        self.model.save_pretrained(str(Path(directory, "seq2seq")), state_dict=state, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(Path(directory, "seq2seq")))


@hookimpl
def register_strategies(register):
    register(Seq2Seq, name="seq2seq")
