"""The ``corpus`` data source: unlabelled text for language modelling, tokenized and cut into fixed-length blocks.

A backbone without a tokenizer (random init) gets a WordPiece tokenizer trained on the corpus's training split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import DataSource, GraftError, hookimpl, option, read_text
from graft.data import ENCODING_HELP, check_encoding


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
    vocab_size: int = option(0, "For a backbone without a tokenizer: size of the WordPiece vocabulary trained on "
                                "the corpus; 0 = the model's vocab_size.")

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
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        docs.append(str(json.loads(line)[o.text_field]))
                    except (json.JSONDecodeError, KeyError) as e:
                        raise GraftError(f"{where}: {f}:{i}: no {o.text_field!r} field in valid JSON ({e}).") \
                            from None
        elif o.documents == "lines":
            docs += [line.strip() for line in text.splitlines() if line.strip()]
        else:
            docs += [para.strip() for para in text.split("\n\n") if para.strip()]
        if o.max_documents and len(docs) >= o.max_documents:
            break
    docs = docs[: o.max_documents or None]
    if len(docs) < 2:
        raise GraftError(f"{where}: {o.path!r} holds fewer than two documents.")
    return docs


def cached_wordpiece(texts: list[str], vocab_size: int):
    """``train_wordpiece``, kept in ``$GRAFT_CACHE_DIR`` (default ``~/.cache/graftkit``) under a hash of the texts and
    the size. The trainer breaks ties between equally frequent pieces differently from one call to the next, so
    without this a resumed from-scratch run would continue with another vocabulary than its checkpoint's."""
    import hashlib
    import json
    import os

    from tokenizers import Tokenizer

    key = hashlib.sha256(json.dumps(["wordpiece-1", vocab_size, texts]).encode()).hexdigest()[:24]
    root = Path(os.environ.get("GRAFT_CACHE_DIR") or Path.home() / ".cache" / "graftkit")
    path = root / "tokenizers" / f"wordpiece-{key}.json"
    if path.is_file():
        return _wrap(Tokenizer.from_file(str(path)))
    tok = train_wordpiece(texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tok.backend_tokenizer.save(str(tmp))
    os.replace(tmp, path)  # whole or absent, even with several processes writing the same tokenizer
    return tok


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


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
    # The trainer's threads can order equally frequent pieces differently from one process to the next, so in a
    # distributed run every process takes the first process's tokenizer: one vocabulary for all.
    import torch.distributed as td

    if td.is_available() and td.is_initialized() and td.get_world_size() > 1:
        shared = [tok.to_str()]
        td.broadcast_object_list(shared, src=0)
        tok = Tokenizer.from_str(shared[0])
    return _wrap(tok)


class Corpus(DataSource):
    """Unlabelled text for masked-language modelling: tokenized, cut into fixed-length blocks, held-out split."""

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
            tok = cached_wordpiece(split_docs["train"], size)
            backbone.set_tokenizer(tok)
        self.check_limits(backbone, tokens=o.block_size, tokens_key="block_size", tokenizer=tok, where=where)
        self.tokenizer = tok
        self.special_ids = sorted(set(tok.all_special_ids))
        self.blocks = {s: self._blocks(tok, d) for s, d in split_docs.items()}

    def _blocks(self, tok, docs):
        """Concatenate tokenized documents and cut into blocks; word ids stay unique within the stream."""
        import numpy as np

        enc = tok(docs, add_special_tokens=True)
        ids, words, offset = [], [], 0
        for i, row in enumerate(enc["input_ids"]):
            w = enc.word_ids(i) if getattr(enc, "is_fast", True) else [None] * len(row)
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
