"""Masked-language-model training: the ``corpus`` data source and the ``mlm`` strategy.

Continued pretraining of a pretrained text model, or pretraining from scratch (a random-init ``hf`` backbone gets
a WordPiece tokenizer trained on the corpus). The adapted backbone is exported like any run's, so
``[backbone] weights = "runs/<mlm-run>"`` hands it to a fine-tune or distill run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import DataSource, GraftError, Strategy, hookimpl, option, read_text
from graft.files import ENCODING_HELP, check_encoding


# -- masking --------------------------------------------------------------------------------------------
def mask_tokens(input_ids, maskable, mask_id: int, vocab_size: int, probability=0.15, mask_ratio=0.8,
                random_ratio=0.1, word_ids=None, generator=None):
    """Dynamic MLM masking. Returns (inputs, labels); labels are -100 where nothing is predicted.

    ``maskable`` is False for special and padding tokens, which are never chosen. Of the chosen positions,
    ``mask_ratio`` become the mask token, ``random_ratio`` a random token, the rest stay. With ``word_ids``
    (one id per token, unique within the row, -1 for none) whole words are chosen together, and all tokens of a
    word get the same one of the three treatments, so the split holds for words and tokens alike.
    """
    import torch

    device = input_ids.device
    rand = lambda shape: torch.rand(shape, device=device, generator=generator)  # noqa: E731
    if word_ids is None:
        chosen = (rand(input_ids.shape) < probability) & maskable
        u = rand(input_ids.shape)
    else:
        # One draw per word: gather each token's word draw. Word ids index a per-row table of draws.
        w = word_ids.clamp(min=0)
        n_words = int(w.max().item()) + 1 if w.numel() else 1
        draws = rand((input_ids.shape[0], n_words))
        kinds = rand((input_ids.shape[0], n_words))
        chosen = (draws.gather(1, w) < probability) & maskable & (word_ids >= 0)
        u = kinds.gather(1, w)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    inputs = input_ids.clone()
    to_mask = chosen & (u < mask_ratio)
    to_random = chosen & (u >= mask_ratio) & (u < mask_ratio + random_ratio)
    inputs[to_mask] = mask_id
    random_tokens = torch.randint(vocab_size, input_ids.shape, device=device, generator=generator)
    inputs[to_random] = random_tokens[to_random]
    return inputs, labels


# -- the corpus data source -------------------------------------------------------------------------------
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
        text = read_text(f, o.encoding, where)
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


def train_wordpiece(texts: list[str], vocab_size: int):
    """A BERT-style WordPiece tokenizer trained on ``texts``, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

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
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


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
            if not hasattr(backbone, "set_tokenizer"):
                raise GraftError(f"{where}: backbone {backbone.name!r} has no tokenizer and cannot take one.")
            size = o.vocab_size or backbone.hf_model.config.vocab_size
            tok = train_wordpiece(split_docs["train"], size)
            backbone.set_tokenizer(tok)
        self.check_limits(backbone, tokens=o.block_size, tokens_key="block_size", tokenizer=tok, where=where)
        if tok.mask_token_id is None:
            raise GraftError(f"{where}: the tokenizer has no mask token, so it cannot do masked-LM.")
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


# -- the strategy -----------------------------------------------------------------------------------------
@dataclass
class MLMOptions:
    probability: float = option(0.15, "Share of (non-special) tokens chosen for prediction.")
    mask_ratio: float = option(0.8, "Of the chosen tokens: share replaced by the mask token.")
    random_ratio: float = option(0.1, "Of the chosen tokens: share replaced by a random token (the rest stay).")
    whole_word: bool = option(False, "Choose whole words (from the fast tokenizer's word ids), not single tokens.")

    def validate(self):
        if not 0 < self.probability < 1 or self.mask_ratio < 0 or self.random_ratio < 0 \
                or self.mask_ratio + self.random_ratio > 1:
            raise ValueError("need 0 < probability < 1 and mask_ratio + random_ratio <= 1.")


class MLM(Strategy):
    """Masked-language-model training of an hf backbone (continued pretraining or from scratch); reports perplexity."""

    Options = MLMOptions
    primary_metric = "perplexity"

    def build(self):
        from transformers import AutoModelForMaskedLM

        if not hasattr(self.backbone, "hf_model"):
            raise GraftError(f"[strategy] plugin = \"mlm\" needs an hf backbone; {self.backbone.name!r} is not one.")
        if self.data.task != "mlm":
            raise GraftError("[strategy] plugin = \"mlm\" needs [data] plugin = \"corpus\" (unlabelled text).")
        base = self.backbone.hf_model
        try:
            mlm = AutoModelForMaskedLM.from_config(base.config)
        except ValueError as e:
            raise GraftError(f"[strategy] mlm: {type(base).__name__} has no masked-LM form ({e}).") from None
        prefix = mlm.base_model_prefix
        own_base = getattr(mlm, prefix)
        # Share the backbone's (pretrained) network; keep only parameters the MLM model has (no pooler).
        for name, module in list(base.named_children()):
            if not hasattr(own_base, name) or getattr(own_base, name) is None:
                for p in module.parameters():
                    p.requires_grad_(False)
        setattr(mlm, prefix, base)
        source = getattr(self.backbone, "source_dir", None)
        if source is not None:
            self._load_head(mlm, Path(source))
        mlm.tie_weights()
        self.mask_id = self.data.tokenizer.mask_token_id
        self.vocab_size = base.config.vocab_size
        self.model = mlm
        return mlm

    @staticmethod
    def _load_head(mlm, directory: Path):
        """The pretrained MLM head, when the weights directory has one (BertForMaskedLM checkpoints do)."""
        from safetensors.torch import load_file

        f = directory / "model.safetensors"
        if not f.is_file():
            return
        state = load_file(str(f))
        own = mlm.state_dict()
        head = {k: v for k, v in state.items() if k in own and not k.startswith(mlm.base_model_prefix + ".")
                and v.shape == own[k].shape}
        if head:
            mlm.load_state_dict(head, strict=False)

    def param_groups(self, model):
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr_scale": 1.0, "name": "all"}]

    def _masked(self, batch, generator=None):
        o = self.options
        return mask_tokens(batch["inputs"]["input_ids"], batch["maskable"], self.mask_id, self.vocab_size,
                           o.probability, o.mask_ratio, o.random_ratio,
                           word_ids=batch["word_ids"] if o.whole_word else None, generator=generator)

    def _predict_masked(self, model, batch, generator=None):
        """(logits, labels, summed cross-entropy over the masked tokens) for one freshly masked batch."""
        import torch

        inputs, labels = self._masked(batch, generator=generator)
        logits = model(input_ids=inputs, attention_mask=batch["inputs"]["attention_mask"]).logits.float()
        loss_sum = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1),
                                                     ignore_index=-100, reduction="sum")
        return logits, labels, loss_sum

    def training_step(self, model, batch):
        _, labels, loss_sum = self._predict_masked(model, batch)
        # Mean over masked tokens, and 0 (not NaN) for a batch where the draw masked none.
        return {"loss": loss_sum / (labels != -100).sum().clamp(min=1)}

    def eval_step(self, model, batch):
        import torch

        # The same masks at every evaluation, so perplexities compare across steps and runs.
        g = torch.Generator(device=batch["index"].device).manual_seed(int(batch["index"][0]) + 1)
        logits, labels, loss_sum = self._predict_masked(model, batch, generator=g)
        masked = labels != -100
        return {"loss_sum": loss_sum, "tokens": masked.sum().float(),
                "correct": ((logits.argmax(-1) == labels) & masked).sum().float()}

    def compute_metrics(self, sums):
        import math

        loss = float(sums["loss_sum"]) / max(1.0, float(sums["tokens"]))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "masked_accuracy": float(sums["correct"]) / max(1.0, float(sums["tokens"]))}

    def export(self, model, directory):
        """backbone/ (save_pretrained base model + tokenizer: the hand-off) and mlm/ (the whole masked-LM model)."""
        Path(directory, "backbone").mkdir(exist_ok=True)
        self.backbone.export(str(Path(directory, "backbone")))
        self.model.save_pretrained(str(Path(directory, "mlm")), safe_serialization=True)
        self.data.tokenizer.save_pretrained(str(Path(directory, "mlm")))


@hookimpl
def register_datasources(register):
    register(Corpus, name="corpus")


@hookimpl
def register_strategies(register):
    register(MLM, name="mlm")
