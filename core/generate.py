"""Answers to a file of prompts from a finished language-model run (``graft generate RUN --file F --out O`` and a
pipeline's generate stage), and self-play preference pairs made of them (SPIN: Chen et al., "Self-Play Fine-Tuning
Converts Weak Language Models to Strong Language Models", ICML 2024 -- the reference answer of the SFT data is the
chosen one, the SFT model's own answer the rejected one)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import GraftError
from .files import read_text, text_lines


def read_prompts(path: str | Path, field: str = "prompt") -> list[dict]:
    """The rows of ``path``: a JSONL file's objects (each with ``field``: text, or a list of {role, content}
    messages), or a text file's non-empty lines as {field: line}. GraftError naming the file and line of a bad row."""
    path = Path(path)
    if not path.is_file():
        raise GraftError(f"--file {path}: no such file.")
    lines = text_lines(read_text(path, "utf-8", "--file", fix="Save it as UTF-8."))
    if path.suffix != ".jsonl":
        return [{field: line} for line in lines if line.strip()]
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GraftError(f"{path}:{i}: not valid JSON ({e}).") from None
        prompt = row.get(field) if isinstance(row, dict) else None
        if not (isinstance(prompt, str) and prompt.strip() or isinstance(prompt, list) and prompt):
            raise GraftError(f"{path}:{i}: each line needs {field!r}: the prompt, as text or a list of {{role, "
                             f"content}} messages (--field names another field).")
        rows.append(row)
    if not rows:
        raise GraftError(f"{path} holds no prompts.")
    return rows


def answer_file(run, source: str | Path, out: str | Path, field: str = "prompt", chosen: str = "",
                batch_size: int = 8, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                seed: int = 0, raw: bool = False, echo=None) -> dict:
    """Answer every prompt of ``source`` with ``run`` (a ``BatchGeneration`` strategy's) in batches of ``batch_size``
    (batch k sampled from seed + k) and write ``out`` (JSONL, whole or not at all): each row with "answer" added, or
    with ``chosen`` (a field of the rows, e.g. "response") preference pairs {"prompt", "chosen": that field,
    "rejected": the answer} for the preferences source, leaving out a pair whose answer is empty or the chosen one
    itself. Returns {"rows": written, "left_out": pairs left out}."""
    from .capabilities import BatchGeneration, require
    from .files import atomic_write_text

    strategy = require(run.strategy, BatchGeneration, "graft generate --file",
                       "Answering a file of prompts needs a language model run (clm).")
    rows = read_prompts(source, field)
    if chosen and any(chosen not in r for r in rows):
        line = next(i for i, r in enumerate(rows, 1) if chosen not in r)
        raise GraftError(f"{source}: row {line} has no {chosen!r} field, the chosen answer of its pair.")
    answers: list[str] = []
    for k in range(0, len(rows), batch_size):
        batch = [r[field] for r in rows[k:k + batch_size]]
        answers += strategy.generate_batch(run.model, batch, max_new_tokens, temperature, top_p, seed + k // batch_size,
                                           raw)
        if echo is not None:
            echo(f"{len(answers)}/{len(rows)} answered")
    if chosen:  # an empty answer, or the reference itself, prefers nothing over anything: left out, counted
        # trimmed: a trailing newline the chosen answers never have would be a cue for the loss, not a preference
        lines = [{"prompt": r[field], "chosen": r[chosen], "rejected": a.strip()} for r, a in zip(rows, answers)
                 if a.strip() and a.strip() != str(r[chosen]).strip()]
    else:
        lines = [{**r, "answer": a} for r, a in zip(rows, answers)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return {"rows": len(lines), "left_out": len(rows) - len(lines)}


class _Streamer:
    """transformers' streamer protocol (``put(token ids)``, ``end()``): the answer's new text to ``stream`` as it
    grows, without the prompt (the first ``put``), the template's ``lead`` or anything after a stop token."""

    def __init__(self, tok, stops, lead: str, stream):
        self.tok, self.stops, self.rest, self.stream = tok, set(stops), lead, stream
        self.ids, self.sent, self.prompt_seen, self.done = [], "", False, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for t in value.flatten().tolist():
            if self.done or t in self.stops:
                self.done = True
                break
            self.ids.append(t)
        self._flush(final=False)

    def end(self):
        self._flush(final=True)

    def _flush(self, final: bool):
        import os

        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):  # a character split across tokens: wait for its last byte
            return
        new, self.sent = text[len(self.sent):], text
        if self.rest:
            n = len(os.path.commonprefix([new, self.rest]))
            new, self.rest = new[n:], self.rest[n:] if n == len(new) else ""
        if new:
            self.stream(new)


def _slices_logits(model) -> bool:
    """Whether ``model`` (DDP / torch.compile unwrapped) is a transformers model whose forward slices the output
    layer by a boolean ``logits_to_keep`` mask: transformers' own classes once it has ``slice_logits_to_keep``; not a
    plugin's TaskModel or remote code written for another transformers."""
    import inspect

    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    # read, never imported here: the hf backbone plugin has loaded transformers for the model
    if not hasattr(sys.modules.get("transformers.modeling_utils"), "slice_logits_to_keep"):
        return False
    if not type(inner).__module__.startswith("transformers.models."):
        return False
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


class CausalGeneration:
    """Generation for a decoder strategy (a mixin: ``class MyStrategy(CausalGeneration, Strategy)``): ``generate``
    (capability ``TextGeneration``, ``graft generate RUN PROMPT``) and ``generate_batch`` (``BatchGeneration``,
    ``graft generate --file`` and a pipeline's generate stage) with transformers' ``generate`` on the strategy's
    causal LM. It uses ``self.backbone.tokenizer()`` and, when the run's data source has them, its
    ``prompt_text(tokenizer, prompt) -> (text, add_special_tokens, lead)`` (the instruction template, as in
    training) and ``stop_ids(tokenizer)`` (end-of-turn tokens); ``clm`` and ``preference`` use it."""

    #: response_logits: the output layer at the target positions only, where transformers can (False: everywhere)
    sliced_logits = True

    def response_logits(self, model, batch, keep):
        """The causal LM's logits at the target positions ``keep`` (``[B, T-1]`` bool, position t predicting input
        token t + 1) of ``batch["inputs"]``: ``[N, V]`` float32, N = ``keep.sum()``. Where transformers slices the
        output layer by a boolean mask (``logits_to_keep``, transformers >= 5) the output layer runs only at those
        positions: in instruction and preference tuning most positions are the prompt, and a 49k-token output layer
        at every one of them was ~a fifth of a SmolLM2 step for nothing. The loss and gradients are the same."""
        import torch

        ids, mask = batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"]
        if self.sliced_logits and _slices_logits(model):
            where = torch.cat([keep, keep.new_zeros(keep.shape[0], 1)], dim=1)
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=where).logits
            if logits.dim() == 2:
                return logits.float()
            return logits[:, :-1][keep].float()  # all positions came back after all
        return model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float()

    @staticmethod
    def _pad_id(tok):
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @staticmethod
    def _decode(tok, ids, stops, strip: bool = True) -> str:
        """The text of ``ids`` up to the first stop token (an end-of-turn token need not be special)."""
        ids = ids.tolist()
        ends = [i for i, t in enumerate(ids) if t in stops]
        text = tok.decode(ids[: ends[0]] if ends else ids, skip_special_tokens=True)
        return text.strip() if strip else text

    def stop_ids(self, model, tok) -> list[int]:
        """Token ids that end generation: the instruction template's end-of-turn tokens and end-of-sequence (the
        data source derives them from the run's tokenizer and template, so a saved run gives the same), and the
        model's own end-of-sequence ids."""
        own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        own = [] if own is None else [own] if isinstance(own, int) else list(own)
        mine = self.data.stop_ids(tok) if hasattr(self.data, "stop_ids") else [tok.eos_token_id]
        return list(dict.fromkeys(t for t in mine + own if t is not None))

    def generate(self, model, prompt, max_new_tokens=50, temperature=0.0, top_p=1.0, stream=None, raw=False):
        """Text continuing ``prompt`` through transformers' ``generate`` (greedy at temperature 0, else sampling
        with nucleus ``top_p``); ``stream(text)`` receives it piece by piece as it is made. A run tuned on
        instructions wraps the prompt in its template as the user's message, unless ``raw``."""
        import torch

        tok = self.backbone.tokenizer()
        text, special, lead = prompt, True, ""
        if not raw and hasattr(self.data, "prompt_text"):
            text, special, lead = self.data.prompt_text(tok, prompt)
        sample, stops = temperature > 0, self.stop_ids(model, tok)
        streamer = None if stream is None else _Streamer(tok, stops, lead, stream)
        enc = tok(text, return_tensors="pt", add_special_tokens=special).to(next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample,
                                 temperature=temperature if sample else None, top_p=top_p if sample else None,
                                 pad_token_id=self._pad_id(tok), eos_token_id=stops, streamer=streamer)
        answer = self._decode(tok, out[0, enc["input_ids"].shape[1]:], stops, strip=False)
        return answer[len(lead):] if lead and answer.startswith(lead) else answer

    def generate_batch(self, model, prompts, max_new_tokens=50, temperature=0.0, top_p=1.0, seed=0, raw=False):
        """Answers to ``prompts`` (texts, or chats as lists of {role, content} messages) in one batch: each wrapped
        in the run's instruction template (unless ``raw``), padded on the left, greedy at temperature 0, else sampled
        from ``seed`` (the same answers for the same seed, prompts and batch), stopping at the end-of-sequence and
        the template's end-of-turn tokens."""
        import torch

        tok = self.backbone.tokenizer()
        texts, leads, special = [], [], True
        for prompt in prompts:
            text, lead = prompt, ""
            if not raw and hasattr(self.data, "prompt_text"):
                text, special, lead = self.data.prompt_text(tok, prompt)
            elif not isinstance(prompt, str):
                raise GraftError("A chat (a list of messages) needs the run's instruction template: this run was not "
                                 "tuned on instructions, so give plain text prompts (--raw).")
            texts.append(text)
            leads.append(lead)
        side, tok.padding_side = tok.padding_side, "left"  # generation continues every row from its last token
        pad = self._pad_id(tok)
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=special) if tok.pad_token_id \
                is not None else self._pad_left(tok, texts, special, pad)
        finally:
            tok.padding_side = side
        enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
        sample, stops = temperature > 0, self.stop_ids(model, tok)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if enc["input_ids"].is_cuda:
                torch.cuda.manual_seed_all(seed)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample,
                                 temperature=temperature if sample else None, top_p=top_p if sample else None,
                                 pad_token_id=pad, eos_token_id=stops)
        answers = []
        for row, lead in zip(out[:, enc["input_ids"].shape[1]:], leads):
            answer = self._decode(tok, row, stops, strip=False)
            answers.append(answer[len(lead):] if lead and answer.startswith(lead) else answer)
        return answers

    @staticmethod
    def _pad_left(tok, texts, special, pad):
        """Left-padded ids and mask for a tokenizer without a pad token (GPT-2's): padded with ``pad``."""
        import torch

        rows = [tok(t, add_special_tokens=special)["input_ids"] for t in texts]
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, n - len(r):], mask[i, n - len(r):] = torch.tensor(r, dtype=torch.long), 1
        return {"input_ids": ids, "attention_mask": mask}
