"""The ``instructions`` data source: prompt/response pairs and chat conversations for supervised fine-tuning
(instruction tuning) of a decoder language model, with the loss on the response tokens only.

Each JSONL line is either ``{"prompt": ..., "response": ...}`` or ``{"messages": [{"role": "system" | "user" |
"assistant", "content": ...}, ...]}`` (field names are options). A conversation is rendered to text with the
tokenizer's chat template when it has one (``template = "auto"``), else with the plain template::

    ### System:\\n{system}\\n\\n### User:\\n{prompt}\\n\\n### Assistant:\\n{response}<eos>\\n\\n

The targets of every token outside an assistant message are -100 (ignored), so the loss is on the responses
(and their end-of-turn / end-of-sequence tokens, so the model learns to stop) -- TRL's ``completion_only_loss``
and ``assistant_only_loss``. A token is a target when its characters overlap a response's, so a first word that
merges with the template's last character (``"### Response: "`` + ``"Paris"`` is ``" Paris"`` in byte-level BPE and
SentencePiece) is learned. Assistant messages before the first user message (a greeting the chat opens with) are
context. Batches are padded on the right to their longest example. Generation stops at the end-of-sequence token
and at the template's end-of-turn tokens (``stop_ids``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import DataSource, GraftError, hookimpl, option, read_text, warn
from graft.data import (ENCODING_HELP, IGNORE, ROLES, check_encoding, check_limits, replies, text_lines,
                        ChatRenderer as Renderer)


@dataclass
class InstructionsOptions:
    path: str = option("", "A JSONL file: one example per line, {prompt, response} or {messages: [...]}.", path=True)
    prompt_field: str = option("prompt", "Field holding the prompt (the user's message).")
    response_field: str = option("response", "Field holding the response the model learns to write.")
    messages_field: str = option("messages", "Field holding a chat: a list of {role, content} messages.")
    system: str = option("", "System message put first in every conversation that has none; empty = none.")
    template: Literal["auto", "chat", "plain"] = option(
        "auto", "auto = the tokenizer's chat template when it has one, else plain; chat = require it; plain = the "
                "documented ### User: / ### Assistant: template.")
    max_length: int = option(512, "Tokens per example at most. A longer conversation loses the end of its last user "
                                  "message (at a token boundary); responses are kept whole when they fit. 0 = the "
                                  "model's limit.")
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


def read_conversations(o: InstructionsOptions, where: str) -> list[tuple[list[dict], str]]:
    """Each line of ``o.path`` as (its {role, content} messages, "where: path:line" for errors about it); each has
    an assistant message with text after a user message."""
    path = Path(o.path)
    if not path.is_file():
        raise GraftError(f"{where}: path = {o.path!r} is not a file.")
    convs = []
    for i, line in enumerate(text_lines(read_text(path, o.encoding, where)), 1):
        if not line.strip():
            continue
        at = f"{where}: {path}:{i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GraftError(f"{at}: not valid JSON ({e}).") from None
        if not isinstance(row, dict):
            raise GraftError(f"{at}: each line must be a JSON object.")
        if o.messages_field in row:
            msgs = row[o.messages_field]
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and m.get("role") in ROLES
                                                     and isinstance(m.get("content"), str) for m in msgs):
                raise GraftError(f"{at}: {o.messages_field!r} must be a list of {{\"role\": one of {list(ROLES)}, "
                                 f"\"content\": text}} objects.")
            msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        elif o.prompt_field in row and o.response_field in row:
            msgs = [{"role": "user", "content": str(row[o.prompt_field])},
                    {"role": "assistant", "content": str(row[o.response_field])}]
        else:
            raise GraftError(f"{at}: found fields {sorted(row)}; each line needs {o.prompt_field!r} and "
                             f"{o.response_field!r}, or {o.messages_field!r}. Set prompt_field / response_field / "
                             f"messages_field to your names.")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in replies(msgs)):
            raise GraftError(f"{at}: no assistant message with text after a user message: nothing to learn from "
                             f"this example (assistant messages before the first user message are context).")
        if o.system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": o.system}] + msgs
        convs.append((msgs, at))
        if o.max_examples and len(convs) >= o.max_examples:
            break
    if len(convs) < 2:
        raise GraftError(f"{where}: {o.path!r} holds fewer than two examples.")
    return convs


class Instructions(DataSource):
    """Prompt/response pairs or chats (JSONL) for instruction tuning of a decoder: loss on the responses only."""

    Options = InstructionsOptions
    task = "sft"
    view_options = ("max_length",)
    training_options = ()

    def setup(self, backbone, seed):
        import numpy as np

        o = self.options
        where = f"[data] plugin = \"{self.name or 'instructions'}\""
        self.require(backbone, "text")
        tok = backbone.tokenizer()
        if tok is None:
            raise GraftError(f"{where}: backbone {backbone.name!r} has no tokenizer. Instruction tuning starts from a "
                             f"language model: pass its folder (weights = \"DIR\"), or tokenizer = \"DIR\".")
        limit = check_limits(backbone, where=where, tokens=o.max_length or None, tokens_key="max_length",
                             tokenizer=tok)
        self.max_length = o.max_length or limit or 2048
        self.renderer = Renderer(tok, o.template, where)
        self.tokenizer = tok
        turn_end, after = self.renderer.turn_end()
        if self.renderer.chat and not turn_end and after is not None:
            warn(f"{where}: the chat template closes an assistant turn with {after!r}, which holds no special token of "
                 f"this tokenizer: the model learns no token that ends its answer, so generation stops only at the "
                 f"end-of-sequence token ({tok.eos_token!r}). Add the end-of-turn marker as a special token to the "
                 f"tokenizer (and the template), or use template = \"plain\".")
        convs = read_conversations(o, where)
        order = np.random.default_rng(seed).permutation(len(convs))
        n_val, n_test = int(round(len(convs) * o.val_fraction)), int(round(len(convs) * o.test_fraction))
        if o.val_fraction:
            n_val = max(1, n_val)
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        self.truncated = self.dropped = 0
        self.examples = {}
        for split, idx in parts.items():
            rows = [r for r in (self._encode(*convs[i]) for i in sorted(idx)) if r is not None]
            self.examples[split] = rows or None
        if self.dropped:
            warn(f"{where}: {self.dropped} example(s) kept no response token within max_length = {self.max_length} "
                 f"and were left out; raise max_length to keep them.")
        if not self.examples["train"]:
            raise GraftError(f"{where}: no training examples left.")

    def _encode(self, messages, at):
        import numpy as np

        ids, labels = self.renderer.encode(messages, at)
        if len(ids) > self.max_length:
            self.truncated += 1
            cut = len(ids) - self.max_length
            for _ in range(4):  # tokens can merge differently at the new end: cut a little more until it fits
                ids, labels = self.renderer.encode(self._shorten(messages, cut), at)
                if len(ids) <= self.max_length:
                    break
                cut += len(ids) - self.max_length
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if not any(t != IGNORE for t in labels[1:]):
            self.dropped += 1
            return None
        return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)

    def _shorten(self, messages, excess):
        """``messages`` with the end of its last user message cut by ``excess`` tokens, at a token boundary."""
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            return messages
        i = users[-1]
        text = messages[i]["content"]
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        keep = max(0, len(offsets) - excess)
        cut = offsets[keep - 1][1] if keep else 0
        return messages[:i] + [{"role": "user", "content": text[:cut]}] + messages[i + 1:]

    def report(self):
        return {"truncated_examples": self.truncated, "dropped_examples": self.dropped}

    def dataset(self, split):
        return self.examples.get(split)

    def collate(self, examples):
        import torch

        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        n = max(len(e[0]) for e in examples)
        ids = torch.full((len(examples), n), pad, dtype=torch.long)
        labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), n), dtype=torch.long)
        for row, (x, y) in enumerate(examples):
            ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = (torch.from_numpy(x),
                                                                                torch.from_numpy(y), 1)
        return {"inputs": {"input_ids": ids, "attention_mask": mask}, "targets": labels}

    def _renderer(self, tokenizer):
        return Renderer(tokenizer, self.options.template, f"[data] plugin = \"{self.name or 'instructions'}\"")

    def prompt_text(self, tokenizer, prompt) -> tuple[str, bool, str]:
        """``prompt`` as the user's message in this source's template (or a chat: a list of {role, content}
        messages), ready for the model to answer: (text, whether the tokenizer should add its special tokens, the
        end of the generation prompt that the model's first token holds, as in training -- drop it from the answer).
        Works without ``setup`` (``graft generate``)."""
        return self._renderer(tokenizer).prompt_text(prompt, self.options.system)

    def stop_ids(self, tokenizer) -> list[int]:
        """Token ids that end a response in this source's template: end-of-sequence and the chat template's
        end-of-turn tokens (<|im_end|>, <|eot_id|>, ...). Works without ``setup``: a saved run's tokenizer and config
        give the same ids (``graft generate``)."""
        return self._renderer(tokenizer).stop_ids()


@hookimpl
def register_datasources(register):
    register(Instructions, name="instructions")
