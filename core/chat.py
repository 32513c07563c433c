"""Chat conversations as a decoder language model reads them (``graft.data``, public): a conversation rendered by
the tokenizer's chat template (or a plain one), the character spans and tokens of its assistant messages, the prompt
a model answers from, and the tokens that end a turn. The ``instructions`` and ``preferences`` sources use it."""

from __future__ import annotations

from .errors import GraftError

IGNORE = -100  # torch's cross-entropy ignore_index: a token that is context, not a target
ROLES = ("system", "user", "assistant")


def replies(messages: list[dict]) -> list[dict]:
    """The messages from the first user message on: an assistant message before it (the chat opens with a greeting)
    answers nothing, so it is context, not a target."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    return messages[first:]


class ChatRenderer:
    """Conversation -> text with the character spans of its assistant messages, by one template."""

    PROBE = "Sure"  # a response, to find where the template's text after one begins
    WORD = "a"  # the commonest first piece of a word: it takes the space before it in any byte-level or SentencePiece
    # vocabulary, as the first word of a response does

    def __init__(self, tokenizer, template: str, where: str):
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise GraftError(f"{where}: template = \"chat\", but the tokenizer has no chat template. Use template = "
                             f"\"plain\" (or \"auto\").")
        self.tok, self.chat = tokenizer, has_chat and template != "plain"
        if not self.chat and not tokenizer.eos_token:
            raise GraftError(f"{where}: the plain template ends each response with the tokenizer's end-of-sequence "
                             f"token, and this tokenizer has none.")
        self.where = where

    def text(self, messages: list[dict], generation_prompt: bool = False, at: str = "") -> str:
        """Raises GraftError (at ``at``, a file and line) when the chat template refuses the conversation."""
        if self.chat:
            try:
                return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            except Exception as e:  # noqa: BLE001 - the template is the user's Jinja code (raise_exception, ...)
                raise GraftError(f"{at or self.where}: the tokenizer's chat template cannot render this conversation "
                                 f"({type(e).__name__}: {e}). Give it the roles in the order the template accepts, "
                                 f"or use template = \"plain\".") from None
        out = "".join(f"### {m['role'].capitalize()}:\n{m['content']}"
                      f"{self.tok.eos_token if m['role'] == 'assistant' else ''}\n\n" for m in messages)
        return out + ("### Assistant:\n" if generation_prompt else "")

    def encode_text(self, text: str):
        # a chat template writes its own special tokens (BOS, turn markers); the plain one takes the tokenizer's
        return self.tok(text, add_special_tokens=not self.chat, return_offsets_mapping=True)

    def render(self, messages: list[dict], at: str = "") -> tuple[str, list[tuple[int, int]]]:
        full = self.text(messages, at=at)
        spans = []
        first = len(messages) - len(replies(messages))
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or i < first:  # an opening assistant message is context
                continue
            upto = self.text(messages[: i + 1], at=at)
            if not full.startswith(upto):
                raise GraftError(f"{at or self.where}: the tokenizer's chat template renders a conversation "
                                 f"differently from its beginning, so the response tokens cannot be found. Use "
                                 f"template = \"plain\".")
            spans.append((len(self.text(messages[:i], generation_prompt=True, at=at)), len(upto)))
        return full, spans

    def encode(self, messages: list[dict], at: str = ""):
        """(input ids, targets: the id at tokens whose characters overlap an assistant message's, IGNORE
        elsewhere). Overlap, not "starts inside": byte-level BPE and SentencePiece join the last space of a
        generation prompt such as "### Response: " to the response's first word."""
        full, spans = self.render(messages, at)
        enc = self.encode_text(full)
        ids = list(enc["input_ids"])
        labels = [t if e > s and any(s < b and e > a for a, b in spans) else IGNORE
                  for t, (s, e) in zip(ids, enc["offset_mapping"])]
        return ids, labels

    def generation_prompt(self, messages: list[dict]) -> tuple[str, str]:
        """(the text the model answers ``messages`` from, the end of the template's generation prompt it leaves
        out). Training tokenizes prompt and response together, so its first target token may begin inside the
        generation prompt (" Paris" after "### Response: "): the prompt here ends where training's last context
        token ends, and the model writes the rest (which the caller drops from its answer)."""
        text = self.text(messages, generation_prompt=True)
        probe = self.text(messages + [{"role": "assistant", "content": self.WORD}])
        if not probe.startswith(text):
            return text, ""
        cut = max((e for s, e in self.encode_text(probe)["offset_mapping"] if s < e <= len(text)), default=0)
        return (text[:cut], text[cut:]) if cut else (text, "")

    def prompt_text(self, prompt, system: str = "") -> tuple[str, bool, str]:
        """``prompt`` (text: the user's message; or a chat: a list of {role, content} messages), with ``system`` put
        first when it has none, ready for the model to answer: (text, whether the tokenizer should add its special
        tokens, the end of the generation prompt that the model's first token holds -- drop it from the answer)."""
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system}] + msgs
        text, lead = self.generation_prompt(msgs)
        return text, not self.chat, lead

    def turn_end(self) -> tuple[list[int], str | None]:
        """(the special or added tokens the chat template writes right after an assistant message's text, e.g.
        <|im_end|>, <|eot_id|>, <end_of_turn>, </s>; that text, None where the template renders no plain user and
        assistant exchange). Empty for the plain template (it ends with EOS)."""
        if not self.chat:
            return [], ""
        tok = self.tok
        try:
            text = self.text([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": self.PROBE}])
        except GraftError:
            return [], None
        if self.PROBE not in text:
            return [], None
        after = text[text.rindex(self.PROBE) + len(self.PROBE):]
        special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
        special -= {tok.bos_token_id} - {tok.eos_token_id}  # GPT-2's BOS is its EOS
        ids = []
        for t in tok(after, add_special_tokens=False)["input_ids"]:
            if t in special:
                ids.append(t)
            elif tok.decode([t]).strip():  # ordinary text: the turn's end marker is over
                break
        return ids, after

    def stop_ids(self) -> list[int]:
        """Token ids that end a response: the tokenizer's end-of-sequence and the template's end-of-turn tokens."""
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        return list(dict.fromkeys(eos + self.turn_end()[0]))
