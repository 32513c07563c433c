"""The ``preferences`` data source: preference data for a decoder language model -- a prompt with a chosen and a
rejected response (DPO, IPO, ORPO, SimPO), or a prompt with one response labelled desirable or not (KTO).

Each JSONL line is ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (paired) or ``{"prompt": ..., "completion":
..., "label": true | false}`` (unpaired; field names are options). A prompt is text (the user's message) or a list of
``{role, content}`` messages; a response is text (the assistant's message) or a list of assistant messages -- TRL's
standard and conversational formats. Each conversation is rendered with the tokenizer's chat template like the
``instructions`` source's (``graft.data.ChatRenderer``), and its targets are the response's tokens only (-100
elsewhere; earlier assistant turns of a prompt are context). A row whose longest conversation is over ``max_length``
loses the end of its prompt's last user message first (at a token boundary; the same cut for the chosen and the
rejected response, so both answer the same prompt); only when a response does not fit even then is it cut, and those
are counted (``truncated_responses`` in data.json) and warned about, never silently dropped.

Batches: paired -- ``inputs`` ``[2B, T]`` with the B chosen conversations first, then the B rejected ones, in the
same order, ``targets`` ``[2B, T]``; unpaired -- ``[B, T]`` and ``desirable`` ``[B]`` (bool). Padded on the right.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import DataSource, GraftError, hookimpl, option, read_text, warn
from graft.data import ENCODING_HELP, IGNORE, ROLES, ChatRenderer, check_encoding, check_limits, text_lines


@dataclass
class PreferencesOptions:
    path: str = option("", "A JSONL file: {prompt, chosen, rejected} per line, or {prompt, completion, label}.",
                       path=True)
    kind: Literal["auto", "paired", "unpaired"] = option(
        "auto", "paired (chosen and rejected), unpaired (one completion and a desirable label), or auto (the first "
                "line decides). Every line must then be of that kind.")
    prompt_field: str = option("prompt", "Field holding the prompt: text, or a list of {role, content} messages.")
    chosen_field: str = option("chosen", "Paired: the preferred response (text or assistant messages).")
    rejected_field: str = option("rejected", "Paired: the dispreferred response.")
    completion_field: str = option("completion", "Unpaired: the response.")
    label_field: str = option("label", "Unpaired: true (desirable) or false (undesirable).")
    system: str = option("", "System message put first in every conversation that has none; empty = none.")
    template: Literal["auto", "chat", "plain"] = option(
        "auto", "auto = the tokenizer's chat template when it has one, else plain; chat = require it; plain = the "
                "documented ### User: / ### Assistant: template (see the instructions source).")
    max_length: int = option(512, "Tokens per conversation (prompt + response) at most; the prompt is cut first. 0 = "
                                  "the model's limit.")
    val_fraction: float = option(0.1, "Fraction of examples held out for validation (seeded).")
    test_fraction: float = option(0.0, "Fraction of examples held out for test (seeded).")
    max_examples: int = option(0, "Use only the first N examples of the file; 0 = all.")
    encoding: str = option("utf-8", ENCODING_HELP)

    def validate(self):
        if not self.path:
            raise ValueError("path is required.")
        if self.max_length < 0 or 0 < self.max_length < 8:
            raise ValueError("max_length must be 0 (the model's limit) or at least 8.")
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1 \
                or self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction and test_fraction must be in [0, 1) and leave training examples.")
        check_encoding(self.encoding)


def _messages(value, role: str, field: str, at: str) -> list[dict]:
    """A prompt (``role`` "user") or response ("assistant") as messages: text becomes one message of ``role``."""
    if isinstance(value, str):
        if not value.strip():
            raise GraftError(f"{at}: {field!r} is empty.")
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and m.get("role") in ROLES
                                                 and isinstance(m.get("content"), str) for m in value):
        msgs = [{"role": m["role"], "content": m["content"]} for m in value]
        if role == "assistant" and any(m["role"] != "assistant" for m in msgs):
            raise GraftError(f"{at}: {field!r} holds messages of other roles than assistant: a response is what the "
                             f"model says; put the rest of the conversation in the prompt.")
        return msgs
    raise GraftError(f"{at}: {field!r} must be text or a list of {{\"role\": one of {list(ROLES)}, \"content\": "
                     f"text}} objects, got {type(value).__name__}.")


def read_rows(o: PreferencesOptions, where: str) -> tuple[str, list]:
    """(kind, [(prompt messages, [response messages...], label or None, "path:line")]): paired rows carry two
    responses (chosen, rejected), unpaired ones one and its desirable label. GraftError naming file and line for a
    row that is not of the file's kind."""
    path = Path(o.path)
    if not path.is_file():
        raise GraftError(f"{where}: path = {o.path!r} is not a file.")
    kind, rows = (None if o.kind == "auto" else o.kind), []
    for i, line in enumerate(text_lines(read_text(path, o.encoding, where)), 1):
        if not line.strip():
            continue
        at = f"{where}: {path}:{i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GraftError(f"{at}: not valid JSON ({e}).") from None
        if not isinstance(row, dict) or o.prompt_field not in row:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise GraftError(f"{at}: each line must be a JSON object with {o.prompt_field!r}; found {found}.")
        if kind is None:
            kind = "paired" if o.chosen_field in row or o.rejected_field in row else "unpaired"
        need = (o.chosen_field, o.rejected_field) if kind == "paired" else (o.completion_field, o.label_field)
        missing = [f for f in need if f not in row]
        if missing:
            raise GraftError(f"{at}: no {missing[0]!r} field: {kind} preference data needs {need[0]!r} and "
                             f"{need[1]!r} on every line (found {sorted(row)}). Fix the line, or set kind / the "
                             f"field names.")
        prompt = _messages(row[o.prompt_field], "user", o.prompt_field, at)
        if o.system and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": o.system}] + prompt
        if kind == "paired":
            responses = [_messages(row[f], "assistant", f, at) for f in need]
            label = None
        else:
            label = row[o.label_field]
            if not isinstance(label, bool):
                raise GraftError(f"{at}: {o.label_field!r} must be true (desirable) or false (undesirable), got "
                                 f"{label!r}.")
            responses = [_messages(row[o.completion_field], "assistant", o.completion_field, at)]
        rows.append((prompt, responses, label, at))
        if o.max_examples and len(rows) >= o.max_examples:
            break
    if len(rows) < 2:
        raise GraftError(f"{where}: {o.path!r} holds fewer than two examples.")
    return kind, rows


class Preferences(DataSource):
    """Preference data for a decoder: prompts with chosen/rejected responses (DPO...) or labelled ones (KTO)."""

    Options = PreferencesOptions
    task = "preference"
    view_options = ("max_length",)
    training_options = ()

    def setup(self, backbone, seed):
        import numpy as np

        o = self.options
        where = f"[data] plugin = \"{self.name or 'preferences'}\""
        self.require(backbone, "text")
        tok = backbone.tokenizer()
        if tok is None:
            raise GraftError(f"{where}: backbone {backbone.name!r} has no tokenizer. Preference tuning starts from a "
                             f"language model: pass its folder (weights = \"DIR\"), or tokenizer = \"DIR\".")
        limit = check_limits(backbone, where=where, tokens=o.max_length or None, tokens_key="max_length",
                             tokenizer=tok)
        self.max_length = o.max_length or limit or 2048
        self.renderer, self.tokenizer = self._renderer(tok), tok
        self.kind, rows = read_rows(o, where)
        order = np.random.default_rng(seed).permutation(len(rows))
        n_val, n_test = int(round(len(rows) * o.val_fraction)), int(round(len(rows) * o.test_fraction))
        if o.val_fraction:
            n_val = max(1, n_val)
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        self.truncated_prompts = self.truncated_responses = 0
        self.examples = {split: [self._example(*rows[i]) for i in sorted(idx)] or None for split, idx in parts.items()}
        if self.truncated_responses:
            warn(f"{where}: {self.truncated_responses} response(s) did not fit in max_length = {self.max_length} "
                 f"even with the prompt's last user message cut, and were cut at their end; raise max_length to keep "
                 f"them whole.")

    def _example(self, prompt, responses, label, at):
        """One row's arrays: (ids, targets) per response (and the label). Every response follows the same prompt: when
        the longest conversation is over max_length, the prompt's last user message is cut for all of them alike."""
        import numpy as np

        encoded = [self._targets(prompt + r, len(r), at) for r in responses]
        over = max(len(ids) for ids, _ in encoded) - self.max_length
        if over > 0:
            self.truncated_prompts += 1
            cut = over
            for _ in range(4):  # tokens can merge differently at the new end: cut a little more until it fits
                shorter, left = self._shorten(prompt, cut)
                encoded = [self._targets(shorter + r, len(r), at) for r in responses]
                over = max(len(ids) for ids, _ in encoded) - self.max_length
                if over <= 0 or not left:
                    break
                cut += over
            if over > 0:  # a response does not fit even so: its end goes, counted
                self.truncated_responses += sum(len(ids) > self.max_length for ids, _ in encoded)
                encoded = [(ids[: self.max_length], labels[: self.max_length]) for ids, labels in encoded]
        out = [np.asarray(x, dtype=np.int64) for pair in encoded for x in pair]
        return tuple(out) if label is None else (*out, bool(label))

    def _targets(self, messages, responses: int, at):
        """Token ids, and targets on the last ``responses`` assistant messages only (a token is a target when its
        characters overlap theirs, as in instructions)."""
        full, spans = self.renderer.render(messages, at)
        enc = self.renderer.encode_text(full)
        spans = spans[len(spans) - responses:]
        ids = list(enc["input_ids"])
        return ids, [t if e > s and any(s < b and e > a for a, b in spans) else IGNORE
                     for t, (s, e) in zip(ids, enc["offset_mapping"])]

    def _shorten(self, prompt, excess):
        """(``prompt`` with the end of its last user message cut by ``excess`` tokens, whether any text is left)."""
        users = [i for i, m in enumerate(prompt) if m["role"] == "user"]
        if not users:
            return prompt, False
        i = users[-1]
        text = prompt[i]["content"]
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        keep = max(0, len(offsets) - excess)
        cut = offsets[keep - 1][1] if keep else 0
        return prompt[:i] + [{"role": "user", "content": text[:cut]}] + prompt[i + 1:], cut > 0

    def prompt_text(self, tokenizer, prompt) -> tuple[str, bool, str]:
        """``prompt`` in this source's template with its system message, ready for the model to answer (see
        ``graft.data.ChatRenderer.prompt_text``). Works without ``setup`` (``graft generate`` on a saved run)."""
        return self._renderer(tokenizer).prompt_text(prompt, self.options.system)

    def stop_ids(self, tokenizer) -> list[int]:
        """End-of-sequence and the chat template's end-of-turn token ids. Works without ``setup``."""
        return (getattr(self, "renderer", None) or self._renderer(tokenizer)).stop_ids()

    def _renderer(self, tokenizer):
        return ChatRenderer(tokenizer, self.options.template, f"[data] plugin = \"{self.name or 'preferences'}\"")

    def report(self):
        return {"kind": self.kind, "truncated_prompts": self.truncated_prompts,
                "truncated_responses": self.truncated_responses}

    def dataset(self, split):
        return self.examples.get(split)

    def collate(self, examples):
        import torch

        paired = self.kind == "paired"
        seqs = [(e[0], e[1]) for e in examples] + ([(e[2], e[3]) for e in examples] if paired else [])
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        n = max(len(x) for x, _ in seqs)
        ids = torch.full((len(seqs), n), pad, dtype=torch.long)
        labels = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for row, (x, y) in enumerate(seqs):
            ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = (torch.from_numpy(x),
                                                                                torch.from_numpy(y), 1)
        batch = {"inputs": {"input_ids": ids, "attention_mask": mask}, "targets": labels}
        if not paired:
            batch["desirable"] = torch.tensor([e[2] for e in examples], dtype=torch.bool)
        return batch


@hookimpl
def register_datasources(register):
    register(Preferences, name="preferences")
