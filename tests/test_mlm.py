"""Masked-LM: statistics of the masking, whole words, special tokens; corpus blocks; tokenizer training; hand-off."""

import json

import pytest
import torch

from conftest import tiny_config
from graft import load_config
from graft import train
from graft.run import Run
from graft.plugins.mlm import mask_tokens

MASK, VOCAB = 4, 1000


def batch(rows=256, length=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (rows, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    ids[: rows // 2, -40:] = 0  # padding in half the rows
    maskable = ~torch.isin(ids, torch.tensor([0, 2, 3]))
    return ids, maskable


def draws(kind, rows):
    """mask_tokens' keyword for each way it draws: torch's generator, or a seed per row (graft's training path)."""
    return {} if kind == "generator" else {"seeds": torch.randint(0, 2**62, (rows,))}


@pytest.mark.parametrize("kind", ["generator", "seeds"])
def test_masked_fraction_and_80_10_10(kind):
    ids, maskable = batch()
    torch.manual_seed(1)
    inputs, labels = mask_tokens(ids, maskable, MASK, VOCAB, **draws(kind, len(ids)))
    chosen = labels != -100
    frac = chosen.sum().item() / maskable.sum().item()
    assert frac == pytest.approx(0.15, abs=0.005)  # ~56k candidates: sd ~0.0015
    n = chosen.sum().item()
    as_mask = (inputs[chosen] == MASK).sum().item() / n
    unchanged = (inputs[chosen] == ids[chosen]).sum().item() / n
    randomised = 1 - as_mask - unchanged
    assert as_mask == pytest.approx(0.8, abs=0.01)
    assert randomised == pytest.approx(0.1, abs=0.01) and unchanged == pytest.approx(0.1, abs=0.01)
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # nothing else changes
    replaced = inputs[chosen & (inputs != MASK) & (inputs != ids)]
    expected_distinct = VOCAB * (1 - (1 - 1 / VOCAB) ** len(replaced))  # of len(replaced) uniform draws
    assert replaced.unique().numel() > 0.9 * expected_distinct
    assert replaced.float().mean().item() == pytest.approx((VOCAB - 1) / 2, rel=0.05)  # uniform over the vocabulary


def test_seeded_rows_do_not_depend_on_their_batch():
    """Issue 27: one draw per row from its seed, as a counter-based generator, so an example is masked alike in any
    batch (graft's training masks) -- and different seeds give different masks."""
    ids, maskable = batch(rows=16)
    seeds = torch.arange(16) * 7919 + 3
    whole, whole_labels = mask_tokens(ids, maskable, MASK, VOCAB, seeds=seeds)
    for r in (0, 5, 15):
        one, one_labels = mask_tokens(ids[r:r + 1], maskable[r:r + 1], MASK, VOCAB, seeds=seeds[r:r + 1])
        assert torch.equal(one[0], whole[r]) and torch.equal(one_labels[0], whole_labels[r])
    reordered, _ = mask_tokens(ids.flip(0), maskable.flip(0), MASK, VOCAB, seeds=seeds.flip(0))
    assert torch.equal(reordered.flip(0), whole)
    _, other = mask_tokens(ids, maskable, MASK, VOCAB, seeds=seeds + 1)
    assert not torch.equal(other, whole_labels)


def test_special_and_padding_never_masked():
    ids, maskable = batch()
    for seed in range(5):
        torch.manual_seed(seed)
        inputs, labels = mask_tokens(ids, maskable, MASK, VOCAB, mlm_probability=0.9)
        assert (labels[~maskable] == -100).all()
        assert torch.equal(inputs[~maskable], ids[~maskable])


@pytest.mark.parametrize("kind", ["generator", "seeds"])
def test_ratios_are_configurable(kind):
    ids, maskable = batch()
    torch.manual_seed(2)
    inputs, labels = mask_tokens(ids, maskable, MASK, VOCAB, mlm_probability=0.3, mask_ratio=0.5, random_ratio=0.2,
                                 **draws(kind, len(ids)))
    chosen = labels != -100
    assert chosen.sum().item() / maskable.sum().item() == pytest.approx(0.3, abs=0.006)
    assert (inputs[chosen] == MASK).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert (inputs[chosen] == ids[chosen]).float().mean().item() == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("kind", ["generator", "seeds"])
def test_whole_words_masked_together_with_the_split_kept(kind):
    ids, maskable = batch()
    rows, length = ids.shape
    # words of 1-4 tokens, numbered from 0 in each row; special/padding tokens have no word
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 5, (rows, length), generator=g)
    word_ids = torch.zeros_like(ids)
    for r in range(rows):
        word_ids[r] = torch.repeat_interleave(torch.arange(length), lengths[r])[:length]
    word_ids[~maskable] = -1
    torch.manual_seed(4)
    inputs, labels = mask_tokens(ids, maskable, MASK, VOCAB, word_ids=word_ids, **draws(kind, rows))
    chosen = labels != -100
    treat = torch.where(inputs == MASK, 0, torch.where(inputs == ids, 2, 1))
    for r in range(0, rows, 7):
        for w in word_ids[r][word_ids[r] >= 0].unique():
            at = word_ids[r] == w
            assert chosen[r][at].all() or not chosen[r][at].any()  # a word is chosen whole or not at all
            if chosen[r][at].all():
                assert treat[r][at].unique().numel() == 1  # one treatment per word
    assert chosen.sum().item() / maskable.sum().item() == pytest.approx(0.15, abs=0.02)
    assert (inputs[chosen] == MASK).float().mean().item() == pytest.approx(0.8, abs=0.03)


@pytest.fixture
def corpus(tmp_path):
    lines = ["in the beginning god created the heaven and the earth",
             "and the earth was without form and void and darkness was upon the face of the deep",
             "and god said let there be light and there was light unbelievably",
             "and god saw the light that it was good and god divided the light from the darkness"] * 30
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(lines) + "\n")
    return p


def scratch_config(corpus, **strategy):
    return {"backbone": {"plugin": "hf", "config": {"model_type": "bert", "vocab_size": 120, "hidden_size": 32,
                                                    "num_hidden_layers": 2, "num_attention_heads": 2,
                                                    "intermediate_size": 64, "max_position_embeddings": 64}},
            "strategy": {"plugin": "mlm", **strategy},
            "data": {"plugin": "corpus", "path": str(corpus), "block_size": 32, "val_fraction": 0.1},
            "train": {"max_steps": 60, "batch_size": 8, "lr": 2e-3, "eval_every": 20, "eval_at_start": True,
                      "progress": False, "plot": False, "log_every": 5}}


def test_corpus_blocks_and_word_ids_from_the_fast_tokenizer(corpus):
    r = Run(load_config(scratch_config(corpus, whole_word=True), where="m.toml"))
    tok = r.backbone.tokenizer()
    assert tok is not None and len(tok) <= 120  # trained on the corpus, within the model's vocabulary
    ds = r.data.dataset("train")
    b = r.data.collate([ds[i] for i in range(4)])
    assert b["inputs"]["input_ids"].shape == (4, 32)
    ids, words = b["inputs"]["input_ids"][0], b["word_ids"][0]
    assert (words[~b["maskable"][0]] == -1).all()  # special tokens belong to no word
    pieces = [i for i in range(32) if tok.convert_ids_to_tokens(int(ids[i])).startswith("##")]
    for i in pieces:  # a continuation piece shares its word with the token before it
        assert words[i] == words[i - 1] >= 0


def test_from_scratch_learns_and_hands_off_to_finetune(tmp_path, corpus):
    summary = train(load_config(scratch_config(corpus), where="m.toml"), tmp_path / "mlm", echo=lambda m: None)
    vals = [json.loads(x) for x in (tmp_path / "mlm" / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["split"] == "val"]
    assert vals[0]["step"] == 0 and vals[-1]["perplexity"] < vals[0]["perplexity"] / 2
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tmp_path / "mlm" / "backbone"))
    assert summary["val"]["perplexity"] < vocab / 2  # well below the vocabulary size

    AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm" / "mlm")
    AutoTokenizer.from_pretrained(tmp_path / "mlm" / "backbone")

    # hand-off: the adapted encoder and its tokenizer become a fine-tune backbone
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": t.split()[1]}) + "\n"
                            for t in ["and god said", "and the earth", "and god saw", "and the light"] * 10))
    conf = tiny_config(backbone={"plugin": "hf", "weights": str(tmp_path / "mlm")},
                       data={"plugin": "text", "path": str(data), "max_length": 16}, train={"max_steps": 2})
    r = Run(load_config(conf, where="ft.toml"))
    mlm_state = AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm" / "mlm").state_dict()
    key = "embeddings.word_embeddings.weight"
    assert torch.equal(r.backbone.hf_model.state_dict()[key], mlm_state[f"bert.{key}"])
    assert len(r.backbone.tokenizer()) == len(AutoTokenizer.from_pretrained(tmp_path / "mlm" / "backbone"))
    train(load_config(conf, where="ft.toml"), tmp_path / "ft", echo=lambda m: None)


def test_continued_pretraining_keeps_a_pretrained_tokenizer(tmp_path, corpus, tiny_bert):
    conf = scratch_config(corpus)
    conf["backbone"] = {"plugin": "hf", "weights": str(tiny_bert)}
    r = Run(load_config(conf, where="m.toml"))
    assert len(r.backbone.tokenizer()) == 20  # the saved toy vocabulary, not a new one
    assert r.strategy.model.bert is r.backbone.hf_model  # the MLM model trains the backbone itself


def test_a_batch_without_masked_tokens_gives_zero_loss_not_nan(corpus):
    r = Run(load_config(scratch_config(corpus, mlm_probability=1e-9), where="m.toml"))
    ds = r.data.dataset("train")
    batch = r.data.collate([ds[i] for i in range(2)])
    loss = r.strategy.training_step(r.model, batch)["loss"]
    assert loss.item() == 0.0


def test_accumulation_normalises_masked_tokens_over_the_whole_step(corpus, tmp_path):
    """Batch 6 and batch 3 x accumulation 2 give the same weights after one SGD step, although the two micro-batches
    hold different numbers of masked tokens: the loss is summed over the step's masked tokens and divided by their
    total (a mean per micro-batch would weight the tokens of the smaller one more)."""
    from conftest import assert_same_weights, one_step_weights

    def conf(batch, accum):
        c = scratch_config(corpus)
        c["backbone"]["config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        c["train"].update(max_steps=1, batch_size=batch, grad_accum=accum, optimizer="sgd", lr=0.5,
                          eval_at_start=False, eval_every=0)
        return c

    r = Run(load_config(conf(3, 2), where="m.toml"))
    order = r.loader("train", train=True)
    order.sampler.set_epoch(0)
    first, second = list(iter(order))[:2]
    counts = [r.strategy.step_targets(b) for b in (first, second)]
    assert counts[0] != counts[1], counts  # the case the normalisation is for
    big, acc, half = one_step_weights(conf, tmp_path, (6, 1), (3, 2), (3, 1))
    assert_same_weights(big, acc, atol=1e-6)
    with pytest.raises(AssertionError):  # the comparison can fail: half the batch is another update
        assert_same_weights(big, half, atol=1e-6)
