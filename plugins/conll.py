"""The ``conll`` data source: word-level tags (NER, POS) from CoNLL-style and CoNLL-U files, for token
classification."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import UNLABELLED, DataSource, GraftError, hookimpl, option, read_text, warn
from graft.data import (ENCODING_HELP, SplitOptions, check_encoding, check_limits, few_labels, pad_tokens,
                        stratified_split, text_lines)
from graft.supervised import outside_tag

CONLLU_TAGS = {"upos": 3, "xpos": 4}


@dataclass
class CoNLLOptions(SplitOptions):
    path: str = option("", "A CoNLL file (one word per line, columns split by whitespace, a blank line between "
                           "sentences) or a CoNLL-U file (.conllu).", path=True)
    format: Literal["auto", "conll", "conllu"] = option("auto", "auto: conllu for .conllu files, else conll.")
    word_column: int = option(0, "conll: column of the word (0 = first).")
    tag_column: int = option(-1, "conll: column of the tag (-1 = last).")
    conllu_tag: Literal["upos", "xpos"] = option("upos", "conllu: which tag column to predict.")
    encoding: str = option("utf-8", ENCODING_HELP)
    val_path: str = option("", "Separate validation file (same format); else split off path.", path=True)
    test_path: str = option("", "Separate test file (same format); else split off path.", path=True)
    max_length: int = option(0, "Tokens per sentence (sub-word pieces; the words past it get no prediction and "
                                "count in data.json as words_past_max_length); 0 = the backbone's usable "
                                "positions, at most 256.")
    max_sentences: int = option(0, "Use only this many sentences of path (seeded sample); 0 = all.")

    def validate(self):
        super().validate()
        if not self.path:
            raise ValueError("path is required: a CoNLL or CoNLL-U file.")
        if self.max_length == 1 or self.max_length < 0 or self.max_sentences < 0:
            raise ValueError("max_length must be 0 or at least 2; max_sentences must not be negative.")
        check_encoding(self.encoding)


def read_sentences(path: str, o: CoNLLOptions, where: str) -> list[tuple[list[str], list[str]]]:
    """(words, tags) per sentence. CoNLL: -DOCSTART- lines are skipped. CoNLL-U: comments, multi-word token ranges
    (3-4) and empty nodes (5.1) are skipped; the surface words are FORM. Raises GraftError naming file and line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise GraftError(f"{where}: {path!r} is not a file.")
    conllu = o.format == "conllu" or (o.format == "auto" and p.suffix.lower() == ".conllu")
    sentences, words, tags = [], [], []
    for n, line in enumerate(text_lines(read_text(p, o.encoding, where)), 1):
        text = line.strip()
        if not text or (not conllu and text.split()[0] == "-DOCSTART-"):
            if words:
                sentences.append((words, tags))
            words, tags = [], []
            continue
        if conllu:
            if text.startswith("#"):
                continue
            cols = line.rstrip("\n").split("\t")
            if len(cols) != 10:
                raise GraftError(f"{where}: {p}, line {n}: a CoNLL-U word line has 10 tab-separated columns, this "
                                 f"one {len(cols)}.")
            if "-" in cols[0] or "." in cols[0]:
                continue
            word, tag = cols[1], cols[CONLLU_TAGS[o.conllu_tag]]
            if tag in ("", "_"):
                raise GraftError(f"{where}: {p}, line {n}: word {word!r} has no {o.conllu_tag.upper()} tag.")
        else:
            cols = text.split()
            try:
                word, tag = cols[o.word_column], cols[o.tag_column]
            except IndexError:
                raise GraftError(f"{where}: {p}, line {n} has {len(cols)} column(s) ({text!r}); word_column = "
                                 f"{o.word_column} and tag_column = {o.tag_column} need more. Is the tag column "
                                 f"missing?") from None
            if len(cols) < 2:
                raise GraftError(f"{where}: {p}, line {n} has one column ({text!r}): the tag column is missing.")
        words.append(word)
        tags.append(tag)
    if words:
        sentences.append((words, tags))
    if not sentences:
        raise GraftError(f"{where}: {p} holds no sentences.")
    return sentences


def align(word_ids: list, tags: list[int]) -> list[int]:
    """Word-level tag ids onto a tokenizer's pieces: the first piece of each word carries its tag; the word's other
    pieces and special tokens get UNLABELLED (-100), which the loss and the metrics skip (Devlin et al., BERT,
    section 4.3: one prediction per word, from its first piece)."""
    out, previous = [], None
    for w in word_ids:
        out.append(tags[w] if w is not None and w != previous else UNLABELLED)
        previous = w
    return out


def piece_counts(tok, words) -> dict[str, int]:
    """Sub-word pieces of each distinct word of ``words``: 0 for a word the tokenizer normalises away entirely
    (U+200B ZERO WIDTH SPACE, U+00AD SOFT HYPHEN, a lone combining accent, control characters...). Each word is
    tokenized alone, as ``is_split_into_words`` tokenizes every word of a sentence (its neighbours change nothing),
    without truncation: such a word has no piece at any ``max_length``."""
    unique = sorted(set(words))
    if not unique:
        return {}
    enc = tok([[w] for w in unique], is_split_into_words=True, add_special_tokens=False)
    return {w: len(ids) for w, ids in zip(unique, enc["input_ids"])}


class CoNLL(DataSource):
    """Word-level tags (NER, POS) from CoNLL-style or CoNLL-U files, aligned to sub-word tokens."""

    Options = CoNLLOptions
    view_options = ("max_length",)
    training_options = ("train_fraction", "unlabelled", "max_sentences")
    task = "token_classification"

    def setup(self, backbone, seed):
        import numpy as np

        o = self.options
        where = "[data] plugin = \"conll\""
        self.require(backbone, "text")
        tok = backbone.tokenizer()
        if tok is None or not getattr(tok, "is_fast", False):
            raise GraftError(f"{where}: backbone {backbone.name!r} needs a fast (Rust) tokenizer: the alignment of "
                             f"words to pieces reads its word_ids().")
        limit = check_limits(backbone, tokens=o.max_length or None, tokens_key="max_length", tokenizer=tok,
                             where=where)
        self.max_length = o.max_length or min(256, limit or 256)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        parts = {"": read_sentences(o.path, o, where)}
        for split, p in (("val", o.val_path), ("test", o.test_path)):
            if p:
                parts[split] = read_sentences(p, o, where)
        self.label_names = sorted({t for sents in parts.values() for _, tags in sents for t in tags})
        index = {t: i for i, t in enumerate(self.label_names)}
        main = parts[""]
        if o.max_sentences and o.max_sentences < len(main):
            keep = np.random.default_rng(seed).permutation(len(main))[: o.max_sentences]
            main = [main[i] for i in sorted(keep)]
        idx = stratified_split([0] * len(main), 0.0 if o.val_path else o.val_fraction,
                               0.0 if o.test_path else o.test_fraction, seed)
        idx["train"], hidden = few_labels(idx["train"], [0] * len(main), o, seed)
        # a word with no piece has no token to carry its tag: it is no target (counted apart from the words cut
        # off by max_length, which have pieces but no room)
        pieces = piece_counts(tok, [w for sents in parts.values() for words, _ in sents for w in words])
        self.truncated = self.pieceless = 0

        def encode(sentences, unlabelled=()):
            if not sentences:
                return []
            enc = tok([w for w, _ in sentences], is_split_into_words=True, truncation=True,
                      max_length=self.max_length)
            out = []
            for i, (words, tags) in enumerate(sentences):
                word_ids = enc.word_ids(i)
                labels = align(word_ids, [index[t] for t in tags])
                empty = sum(1 for w in words if not pieces[w])
                self.pieceless += empty
                self.truncated += len(words) - empty - len({w for w in word_ids if w is not None})
                out.append((enc["input_ids"][i], [UNLABELLED] * len(labels) if i in unlabelled else labels))
            return out

        train = [main[i] for i in idx["train"]]
        self.splits = {"train": encode(train, {k for k, i in enumerate(idx["train"]) if i in hidden})}
        for split in ("val", "test"):
            self.splits[split] = encode(parts[split] if split in parts else [main[i] for i in idx[split]])
        for split, examples in self.splits.items():  # no target at all: nothing to learn or score
            if examples and all(y == UNLABELLED for _, labels in examples for y in labels):
                source = {"val": o.val_path, "test": o.test_path}.get(split) or o.path
                raise GraftError(f"{where}: no word of the {split} split ({source}) has a sub-word piece within "
                                 f"max_length = {self.max_length} tokens: each is past it or gives no piece at all "
                                 f"with this tokenizer, so there is nothing to "
                                 f"{'learn' if split == 'train' else 'score'}. Check the file's words, or raise "
                                 f"max_length.")
        if self.pieceless:
            example = next(w for sents in parts.values() for words, _ in sents for w in words if not pieces[w])
            n = self.pieceless
            warn(f"{where}: {n} word{'s give' if n > 1 else ' gives'} no sub-word piece with the tokenizer of "
                 f"{backbone.name!r} (e.g. {example!r}: it normalises such characters away); "
                 f"{'they are' if n > 1 else 'it is'} no training target and not scored (data.json: "
                 f"words_without_pieces); graft predict tags such a word "
                 f"{'O' if outside_tag(self.label_names) else 'with none (the tags have no outside tag)'}.")

    def report(self):
        return {"sentences": {s: len(v) for s, v in self.splits.items()}, "words_past_max_length": self.truncated,
                "words_without_pieces": self.pieceless} if hasattr(self, "splits") else {}

    def dataset(self, split):
        return self.splits.get(split) or None

    def collate(self, examples):
        input_ids, mask, targets = pad_tokens([ids for ids, _ in examples], self.pad_id, [y for _, y in examples])
        return {"inputs": {"input_ids": input_ids, "attention_mask": mask}, "targets": targets}

    def encode(self, backbone, items):
        """Texts split into words at whitespace (as ``graft predict`` prints them back), with ``word_ids``: each
        token's word index, -1 for special and padding tokens, and ``word_pieces``: ``[B, W]`` each word's number
        of pieces (0: none, the tokenizer normalises it away), -1 past the text's last word."""
        import torch

        limit = backbone.limits().get("max_tokens")
        max_length = self.options.max_length or min(256, limit or 256)
        tok = backbone.tokenizer()
        words = [item.split() for item in items]
        enc = tok(words, is_split_into_words=True, truncation=True, max_length=max_length, padding=True,
                  return_tensors="pt")
        word_ids = torch.tensor([[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(items))])
        pieces = piece_counts(tok, [w for ws in words for w in ws])
        width = max(len(ws) for ws in words)
        word_pieces = torch.tensor([[pieces[w] for w in ws] + [-1] * (width - len(ws)) for ws in words],
                                   dtype=torch.long).reshape(len(words), width)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "word_ids": word_ids,
                "word_pieces": word_pieces}


@hookimpl
def register_datasources(register):
    register(CoNLL, name="conll")
