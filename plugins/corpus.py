"""The ``corpus`` data source: unlabelled text for language modelling, tokenized and cut into fixed-length blocks.

A backbone without a tokenizer (random init) gets one trained on the corpus's training split: byte-level BPE for a
decoder-only model (GPT-2, Llama), WordPiece for an encoder (BERT).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import DataSource, GraftError, hookimpl, option, read_text
from graft.capabilities import SettableTokenizer, require
from graft.data import ENCODING_HELP, check_encoding, check_limits, text_lines


@dataclass
class CorpusOptions:
    path: str = option("", "A .txt file or folder of them (one document per line, or blank-line separated with "
                           "split = \"paragraphs\"), or a JSONL file with a text field.", path=True)
    text_field: str = option("text", "JSONL field holding the text.")
    encoding: str = option("utf-8", ENCODING_HELP)
    documents: Literal["lines", "paragraphs"] = option("lines", "How plain text splits into documents.")
    block_size: int = option(128, "Tokens per training block (documents are concatenated, then cut).")
    val_fraction: float = option(0.05, "Fraction of documents held out for perplexity.")
    max_documents: int = option(0, "Use only the first N documents; 0 = all.")
    vocab_size: int = option(0, "For a backbone without a tokenizer: size of the vocabulary trained on the corpus; "
                                "0 = the model's vocab_size.")
    tokenizer_type: Literal["auto", "wordpiece", "bpe"] = option(
        "auto", "For a backbone without a tokenizer: the kind trained on the corpus. auto = byte-level BPE (GPT-2's: "
                "any text, no unknown tokens) for a decoder-only model, WordPiece (BERT's) otherwise.")

    def validate(self):
        if not self.path:
            raise ValueError("path is required.")
        if self.block_size < 8:
            raise ValueError("block_size must be at least 8.")
        if not 0 < self.val_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1).")
        check_encoding(self.encoding)


def read_documents(o: CorpusOptions, where: str) -> list[str]:
    p = Path(o.path)
    if not p.exists():
        raise GraftError(f"{where}: {o.path!r} does not exist.")
    # hidden files and folders (.git, .ipynb_checkpoints, editors' swap files) are never documents
    files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file()
                   and not any(part.startswith(".") for part in f.relative_to(p).parts)) if p.is_dir() else [p]
    docs: list[str] = []
    for f in files:
        text = read_text(f, o.encoding, where).replace("\r\n", "\n")  # Windows files split like others
        if f.suffix == ".jsonl":
            for i, line in enumerate(text_lines(text), 1):
                if line.strip():
                    try:
                        docs.append(str(json.loads(line)[o.text_field]))
                    except (json.JSONDecodeError, KeyError) as e:
                        raise GraftError(f"{where}: {f}:{i}: no {o.text_field!r} field in valid JSON ({e}).") \
                            from None
        elif o.documents == "lines":
            docs += [line.strip() for line in text_lines(text) if line.strip()]
        else:
            docs += [para.strip() for para in text.split("\n\n") if para.strip()]
        if o.max_documents and len(docs) >= o.max_documents:
            break
    docs = docs[: o.max_documents or None]
    if len(docs) < 2:
        raise GraftError(f"{where}: {o.path!r} holds fewer than two documents.")
    return docs


def cached_tokenizer(texts: list[str], vocab_size: int, kind: str = "wordpiece"):
    """``train_wordpiece`` or ``train_bpe``, kept in ``$GRAFT_CACHE_DIR`` (default ``~/.cache/graftkit``) under a
    hash of the texts and the size. The trainers break ties between equally frequent pieces differently from one
    call to the next, so without this a resumed from-scratch run would continue with another vocabulary than its
    checkpoint's."""
    import hashlib
    import json
    import os

    from tokenizers import Tokenizer

    key = hashlib.sha256(json.dumps([f"{kind}-1", vocab_size, texts]).encode()).hexdigest()[:24]
    root = Path(os.environ.get("GRAFT_CACHE_DIR") or Path.home() / ".cache" / "graftkit")
    path = root / "tokenizers" / f"{kind}-{key}.json"
    if path.is_file():
        return _wrap(Tokenizer.from_file(str(path)), kind)
    tok = (train_wordpiece if kind == "wordpiece" else train_bpe)(texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tok.backend_tokenizer.save(str(tmp))
    os.replace(tmp, path)  # whole or absent, even with several processes writing the same tokenizer
    return tok


def _wrap(tok, kind: str = "wordpiece"):
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                       pad_token=EOT)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


EOT = "<|endoftext|>"


def _same_everywhere(tok):
    """The first process's tokenizer in a distributed run: the trainers' threads can order equally frequent pieces
    differently from one process to the next, and all processes must share one vocabulary."""
    import torch.distributed as td
    from tokenizers import Tokenizer

    if td.is_available() and td.is_initialized() and td.get_world_size() > 1:
        shared = [tok.to_str()]
        td.broadcast_object_list(shared, src=0)
        tok = Tokenizer.from_str(shared[0])
    return tok


def train_bpe(texts: list[str], vocab_size: int):
    """A GPT-2-style byte-level BPE tokenizer trained on ``texts`` (Radford et al. 2019; the ``tokenizers``
    library): every byte is in the vocabulary, so no text is unknown; ``<|endoftext|>`` separates documents and
    pads. Wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return _wrap(_same_everywhere(tok), "bpe")


def train_wordpiece(texts: list[str], vocab_size: int):
    """A BERT-style WordPiece tokenizer trained on ``texts``, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                        show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return _wrap(_same_everywhere(tok))


class Corpus(DataSource):
    """Unlabelled text for language modelling (mlm, clm): tokenized, cut into fixed-length blocks, held-out split."""

    Options = CorpusOptions
    task = "mlm"

    def setup(self, backbone, seed):
        import numpy as np

        o = self.options
        where = "[data] plugin = \"corpus\""
        self.require(backbone, "text")
        docs = read_documents(o, where)
        order = np.random.default_rng(seed).permutation(len(docs))
        n_val = max(1, int(round(len(docs) * o.val_fraction)))
        split_docs = {"val": [docs[i] for i in sorted(order[:n_val])],
                      "train": [docs[i] for i in sorted(order[n_val:])]}
        tok = backbone.tokenizer()
        if tok is None:
            size = o.vocab_size or backbone.limits().get("vocab_size")
            if not size:
                raise GraftError(f"{where}: backbone {backbone.name!r} has no tokenizer; set vocab_size to train one.")
            kind = o.tokenizer_type
            if kind == "auto":
                kind = "bpe" if backbone.limits().get("decoder") else "wordpiece"
            if kind == "bpe" and size < 257:
                raise GraftError(f"{where}: a byte-level BPE tokenizer holds the 256 bytes and <|endoftext|>, so it "
                                 f"needs a vocabulary of at least 257; the model has {size}. Set the backbone's "
                                 f"vocab_size (or [data] vocab_size) to 257 or more, or tokenizer_type = "
                                 f"\"wordpiece\".")
            tok = cached_tokenizer(split_docs["train"], size, kind)
            require(backbone, SettableTokenizer, f"{where} (training a tokenizer for a model without one)",
                    "Give the backbone a tokenizer of its own.").set_tokenizer(tok)
        check_limits(backbone, tokens=o.block_size, tokens_key="block_size", tokenizer=tok, where=where)
        self.tokenizer = tok
        self.special_ids = sorted(set(tok.all_special_ids))
        self.blocks = {s: self._blocks(tok, d) for s, d in split_docs.items()}

    def _blocks(self, tok, docs):
        """Concatenate tokenized documents and cut into blocks; word ids stay unique within the stream."""
        import numpy as np

        enc = tok(docs, add_special_tokens=True)
        # A tokenizer that marks no document boundary itself (GPT-2's, Llama's) gets its end-of-sequence token
        # after each document, so a block never runs one text into the next unmarked.
        eot = [tok.eos_token_id] if tok.eos_token_id is not None and len(tok("a")["input_ids"]) == len(
            tok("a", add_special_tokens=False)["input_ids"]) else []
        ids, words, offset = [], [], 0
        for i, row in enumerate(enc["input_ids"]):
            w = enc.word_ids(i) if getattr(enc, "is_fast", True) else [None] * len(row)
            row, w = row + eot, w + [None] * len(eot)
            ids += row
            words += [-1 if x is None else x + offset for x in w]
            offset += (max((x for x in w if x is not None), default=-1) + 1)
        b = self.options.block_size
        n = len(ids) // b
        if n == 0:
            return []
        ids = np.asarray(ids[: n * b], dtype=np.int64).reshape(n, b)
        words = np.asarray(words[: n * b], dtype=np.int64).reshape(n, b)
        # Renumber words from 0 within each block, so a batch's table of per-word draws stays small.
        first = np.where(words >= 0, words, np.iinfo(np.int64).max).min(1, keepdims=True)
        words = np.where(words >= 0, words - np.minimum(first, words.max(1, keepdims=True)), -1)
        return list(zip(ids, words))

    def dataset(self, split):
        return self.blocks.get(split) or None

    def collate(self, examples):
        import numpy as np
        import torch

        ids = torch.from_numpy(np.stack([e[0] for e in examples]))
        words = torch.from_numpy(np.stack([e[1] for e in examples]))
        special = torch.isin(ids, torch.tensor(self.special_ids))
        return {"inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "targets": ids,
                "word_ids": words, "maskable": ~special}


@hookimpl
def register_datasources(register):
    register(Corpus, name="corpus")
