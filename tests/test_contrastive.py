"""Embedding transfer (issue 30): the contrastive strategy on pairs (in-batch negatives, CoSENT, triplet), SimCSE on
plain text, GradCache, DDP with gathered negatives, batches without duplicates, retrieval metrics, distillation,
predict and the sentence-transformers export."""

import json
import math
import random

import pytest
import torch

from conftest import (TINY_VIT, assert_resume_from_step_reproduces, assert_same_weights, graft, one_step_weights,
                      weights, write_config)
from test_seq2seq import WORDS, OLD
from test_user_files import assert_bad_input, cli_run
from graft import Run, load_config, train


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A random-init 2-layer BERT (the 'pretrained' encoder), dropout off unless a test turns it on."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("bert")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizerFast(vocab=vocab).save_pretrained(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(d)
    return d


CIPHER = {w: OLD[(i + 7) % len(OLD)] for i, w in enumerate(OLD)}


def rewrite(words):
    """The positive of a text: every word replaced by another (no word shared, so an untrained encoder cannot match
    them by overlap), in another order."""
    return " ".join(CIPHER[w] for w in reversed(words))


def write_pairs(path, n=32, seed=0, duplicates=0, negatives=False, scores=False, negatives_in=None):
    """(text, ciphered text) rows; ``duplicates`` rows repeat an earlier row's anchor."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(OLD, 5) if i < n - duplicates else rows[rng.randrange(n - duplicates)]["w"]
        r = {"w": words, "source": " ".join(words), "target": rewrite(words)}
        if negatives and (negatives_in is None or i < negatives_in):
            r["negative"] = rewrite(rng.sample(OLD, 5))
        if scores:  # a [0, 5] similarity: 4-5 for a text and its cipher, 0-1 for a text and another's
            r["score"] = rng.choice([0, 1, 4, 5])
            if r["score"] < 3:
                r["target"] = rewrite(rng.sample(OLD, 5))
        rows.append(r)
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "w"}) + "\n" for r in rows))
    return rows


def conf(bert, path, loss=None, **train_opts):
    c = {"backbone": {"plugin": "hf", "weights": str(bert)}, "strategy": {"plugin": "contrastive"},
         "data": {"plugin": "pairs", "path": str(path), "val_fraction": 0.25, "test_fraction": 0.0},
         "train": {"seed": 0, "max_steps": 4, "batch_size": 8, "lr": 1e-3, "progress": False, "plot": False,
                   "log_every": 1, **train_opts}}
    if loss:
        c["loss"] = loss
    return c


# -- the losses against hand computations -------------------------------------------------------------------------

def _emb(seed, n, d=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


def _cos(x, y):
    return sum(a * b for a, b in zip(x, y)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))


def test_infonce_equals_a_hand_computation():
    from graft.plugins.embedding_losses import InfoNCE

    a, p, n = _emb(0, 4).tolist(), _emb(1, 4).tolist(), _emb(2, 2).tolist()
    emb = {"anchors": torch.tensor(a), "positives": torch.tensor(p), "negatives": torch.tensor(n),
           "negative_rows": torch.tensor([0, 2])}
    loss = InfoNCE(InfoNCE.Options(temperature=0.1))
    want = 0.0
    for i in range(4):
        logits = [_cos(a[i], c) / 0.1 for c in p + n]
        want += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    assert float(loss(emb)) == pytest.approx(want / 4, rel=1e-5)
    sym = InfoNCE(InfoNCE.Options(scale=10.0, symmetric=True))  # scale 10 = temperature 0.1
    back = sum(-_cos(p[i], a[i]) * 10 + math.log(sum(math.exp(_cos(p[i], x) * 10) for x in a)) for i in range(4)) / 4
    plain = {k: v for k, v in emb.items() if k != "negatives"}
    fwd = sum(-_cos(a[i], p[i]) * 10 + math.log(sum(math.exp(_cos(a[i], x) * 10) for x in p)) for i in range(4)) / 4
    assert float(sym(plain)) == pytest.approx((fwd + back) / 2, rel=1e-5)


def test_cosent_and_triplet_equal_hand_computations():
    from graft.plugins.embedding_losses import CoSENT, Triplet

    a, p = _emb(3, 4).tolist(), _emb(4, 4).tolist()
    scores = [0.1, 0.9, 0.5, 0.5]
    emb = {"anchors": torch.tensor(a), "positives": torch.tensor(p)}
    cos = [_cos(x, y) * 20 for x, y in zip(a, p)]
    terms = [math.exp(cos[i] - cos[j]) for i in range(4) for j in range(4) if scores[i] < scores[j]]
    assert float(CoSENT()(emb, torch.tensor(scores))) == pytest.approx(math.log(1 + sum(terms)), rel=1e-5)

    def d(x, y):
        return math.dist(x, y)
    n = _emb(5, 1).tolist()
    emb.update(negatives=torch.tensor(n), negative_rows=torch.tensor([2]))
    want = 0.0
    for i in range(4):
        neg = d(a[i], n[0]) if i == 2 else min(d(a[i], p[j]) for j in range(4) if j != i)
        want += max(0.0, d(a[i], p[i]) - neg + 1.0)
    assert float(Triplet(Triplet.Options(margin=1.0))(emb)) == pytest.approx(want / 4, rel=1e-5)


def test_retrieval_with_several_relevant_candidates_counts_the_first_found():
    from graft.plugins.contrastive import retrieval_metrics

    cands = torch.eye(4)
    anchors = torch.tensor([[0.1, 0.9, 0.5, 0.0]])  # order: 1, 2, 0, 3
    both = torch.tensor([[True, False, True, False]])  # relevant: 0 and 2 -> the first found is at rank 2
    m = retrieval_metrics(anchors, cands, both)
    assert m["recall@1"] == 0 and m["mrr@10"] == pytest.approx(1 / 2)
    assert retrieval_metrics(anchors, cands, torch.tensor([0]))["mrr@10"] == pytest.approx(1 / 3)


def test_retrieval_metrics_by_hand():
    from graft.plugins.contrastive import retrieval_metrics

    # anchor 0 finds its candidate first; anchor 1 second; anchor 2 twelfth (of 12)
    cands = torch.eye(12)
    anchors = torch.stack([cands[0], 0.9 * cands[5] + 0.5 * cands[1], -cands[2]])
    anchors[2, 2] = -1.0
    m = retrieval_metrics(anchors, cands, torch.tensor([0, 1, 2]))
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@10"] == pytest.approx(2 / 3)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 2) / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 3)


# -- training ---------------------------------------------------------------------------------------------------

def test_fine_tuning_on_pairs_improves_retrieval_and_writes_a_sentence_transformers_folder(bert, tmp_path):
    write_pairs(tmp_path / "p.jsonl", n=96)
    c = conf(bert, tmp_path / "p.jsonl", max_steps=40, eval_every=40)
    before = Run(load_config(c, where="c.toml"))
    base = before.evaluate(before.model, "val")
    train(load_config(c, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val"]["recall@1"] > base["recall@1"] + 0.2, (base, summary["val"])
    assert summary["val"]["mrr@10"] >= summary["val"]["recall@1"]

    texts = ["in the beginning god created", "thou hast said", "the spirit moved upon the waters"]
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    code, out = cli_run("predict", tmp_path / "run", "--file", tmp_path / "t.txt", "--json")
    assert code == 0, out
    mine = torch.tensor([json.loads(line)["embedding"] for line in out.splitlines() if line.startswith("{")])
    assert mine.shape == (3, 32) and torch.allclose(mine.norm(dim=1), torch.ones(3), atol=1e-5)

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tmp_path / "run" / "sentence-transformers"), device="cpu")
    theirs = torch.tensor(st.encode(texts, convert_to_numpy=True))
    assert torch.allclose(mine, theirs, atol=1e-5), (mine - theirs).abs().max()

    # ONNX: the encoder with pooling and normalisation, checked in onnxruntime on inputs of other lengths
    code, out = cli_run("export", tmp_path / "run", "--format", "onnx", "--out", tmp_path / "onnx")
    assert code == 0, out
    info = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert info["outputs"] == ["embeddings"] and info["max_abs_difference"] < 1e-4, info
    import onnxruntime as ort
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "sentence-transformers"))(texts, padding=True,
                                                                                        return_tensors="np")
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: enc[i.name] for i in session.get_inputs()})[0]
    assert torch.allclose(torch.tensor(got), mine, atol=1e-4)
    assert_bad_input(*cli_run("predict", tmp_path / "onnx", "--file", tmp_path / "t.txt"), "onnxruntime")


def test_gradcache_gives_the_big_batch_loss_and_gradients(bert, tmp_path):
    write_pairs(tmp_path / "p.jsonl", n=40, negatives=True)

    def loss_and_grads(chunk):
        c = conf(bert, tmp_path / "p.jsonl")
        c["strategy"]["mini_batch_size"] = chunk
        run = Run(load_config(c, where="c.toml"))
        batch = next(iter(run.loader("train", True)))
        out = run.strategy.training_step(run.model, batch)
        out["loss"].backward()
        return float(out["loss"]), {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}

    big, grads = loss_and_grads(0)
    small, cached = loss_and_grads(3)
    assert small == pytest.approx(big, rel=1e-6)
    assert grads.keys() == cached.keys() and len(grads) > 10
    worst = max((grads[k] - cached[k]).abs().max().item() for k in grads)
    assert worst < 1e-5, worst


def test_gradcache_replays_dropout_masks(bert, tmp_path):
    """With dropout on, each replayed chunk must see its first pass's masks: GradCache's gradient then equals
    autograd's through the same chunked forward passes drawn from the same random state."""
    write_pairs(tmp_path / "p.jsonl", n=24)
    c = conf(bert, tmp_path / "p.jsonl")
    c["backbone"]["overrides"] = {"hidden_dropout_prob": 0.3}
    c["strategy"]["mini_batch_size"] = 3
    run = Run(load_config(c, where="c.toml"))
    s, model = run.strategy, run.model.train()  # from_pretrained leaves it in eval mode: dropout off
    batch = next(iter(run.loader("train", True)))
    torch.manual_seed(1)
    s.training_step(model, batch)["loss"].backward()
    cached = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(1)  # the reference: the same chunks in the same order, with their graphs
    emb = {side: torch.cat([s.encode(model, {k: v[i:i + 3] for k, v in inputs.items()}, side)
                            for i in range(0, 8, 3)]) for side, inputs in s._sides(batch).items()}
    s._objective(emb, batch, None).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert max((cached[k] - reference[k]).abs().max().item() for k in cached) < 1e-5
    model.zero_grad()
    torch.manual_seed(2)  # other masks: another gradient (the check can fail)
    emb = {side: torch.cat([s.encode(model, {k: v[i:i + 3] for k, v in inputs.items()}, side)
                            for i in range(0, 8, 3)]) for side, inputs in s._sides(batch).items()}
    s._objective(emb, batch, None).backward()
    assert max((cached[k] - p.grad).abs().max().item() for k, p in model.named_parameters() if k in cached) > 1e-4


def test_two_processes_with_gathered_negatives_train_like_one_with_twice_the_batch(bert, tmp_path):
    write_pairs(tmp_path / "p.jsonl", n=32, negatives=True, negatives_in=4)  # some steps of a process have none

    def make(batch, accum):
        c = conf(bert, tmp_path / "p.jsonl", max_steps=2, batch_size=batch, grad_accum=accum, optimizer="sgd",
                 lr=0.5)
        c["data"].update(val_fraction=0.0, negative_columns=["negative"])
        return c

    big, half = one_step_weights(make, tmp_path, (8, 1), (4, 1))
    with pytest.raises(AssertionError):
        assert_same_weights(big, half, atol=1e-6)
    cfg = write_config(tmp_path / "c.toml", make(4, 1))
    two = graft("train", cfg, "--nproc", "2", "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    assert_same_weights(big, weights(tmp_path / "two"), atol=1e-5)
    c = make(4, 1)
    c["strategy"]["mini_batch_size"] = 3  # GradCache under DDP too
    two = graft("train", write_config(tmp_path / "g.toml", c), "--nproc", "2", "--out", tmp_path / "two-cached")
    assert two.returncode == 0, two.stderr
    assert_same_weights(big, weights(tmp_path / "two-cached"), atol=1e-5)
    c["strategy"]["gather"] = False  # each process its own negatives: GradCache still = the plain step (DDP's mean)
    cached = graft("train", write_config(tmp_path / "n.toml", c), "--nproc", "2", "--out", tmp_path / "own-cached")
    c["strategy"]["mini_batch_size"] = 0
    plain = graft("train", write_config(tmp_path / "p.toml", c), "--nproc", "2", "--out", tmp_path / "own")
    assert cached.returncode == 0 and plain.returncode == 0, cached.stderr + plain.stderr
    assert_same_weights(weights(tmp_path / "own"), weights(tmp_path / "own-cached"), atol=1e-5)


def test_duplicates_never_share_a_step(bert, tmp_path):
    from graft.batches import distinct_order

    write_pairs(tmp_path / "p.jsonl", n=48, duplicates=12)
    run = Run(load_config(conf(bert, tmp_path / "p.jsonl", batch_size=6), where="c.toml"))
    train_rows = run.data.dataset("train")
    assert len({e[3] for e in train_rows}) < len(train_rows)  # the split holds duplicates
    for epoch in range(3):
        loader = run.loader("train", True)
        loader.sampler.set_epoch(epoch)
        seen = []
        for batch in loader:
            sources = [train_rows[i][3] for i in batch["index"].tolist()]
            assert len(set(sources)) == len(sources), sources
            seen += batch["index"].tolist()
        assert sorted(seen) == list(range(len(train_rows)))  # every example, once
    # an order in which each example sits beside its duplicate is rearranged, keeping every example
    keys = [frozenset([i // 2]) for i in range(24)]
    fixed = distinct_order(list(range(24)), keys, 4)
    assert sorted(fixed) == list(range(24))
    assert all(len({i // 2 for i in fixed[k:k + 4]}) == 4 for k in range(0, 24, 4))


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(bert, tmp_path):
    write_pairs(tmp_path / "p.jsonl", n=40, duplicates=6)
    c = conf(bert, tmp_path / "p.jsonl", max_steps=8, batch_size=8, checkpoint_every=1, keep_checkpoints=10)
    c["strategy"]["mini_batch_size"] = 5
    c["backbone"]["overrides"] = {"hidden_dropout_prob": 0.2}
    # 4 steps per epoch: cut inside the first
    assert_resume_from_step_reproduces(load_config(c, where="c.toml"), tmp_path, step=2)


def test_frozen_layers_stay_as_they_were(bert, tmp_path):
    write_pairs(tmp_path / "p.jsonl", n=32)
    c = conf(bert, tmp_path / "p.jsonl", max_steps=3)
    c["strategy"]["freeze_layers"] = 2  # embeddings and the first block
    start = Run(load_config(c, where="c.toml")).model.state_dict()
    train(load_config(c, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    end = weights(tmp_path / "run")
    moved = {k for k in end if not torch.equal(end[k], start[k])}
    assert moved and not any(".embeddings." in k or ".layer.0." in k for k in moved), sorted(moved)[:5]
    assert any(".layer.1." in k for k in moved)
    c["strategy"]["freeze_layers"] = 9
    assert_bad_input(*cli_run("train", write_config(tmp_path / "f.toml", c), "--out", tmp_path / "f"),
                     "freeze_layers = 9", "layer groups")


def test_scored_pairs_with_cosent_report_spearman(bert, tmp_path):
    write_pairs(tmp_path / "p.jsonl", n=128, scores=True)
    c = conf(bert, tmp_path / "p.jsonl", {"plugin": "cosent"}, max_steps=60, eval_every=60)
    c["data"]["score_column"] = "score"
    untrained = Run(load_config(c, where="c.toml"))
    before = untrained.evaluate(untrained.model, "val")["spearman"]
    train(load_config(c, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    val = json.loads((tmp_path / "run" / "summary.json").read_text())["val"]
    assert val["spearman"] > before + 0.15, (before, val)
    assert "recall@1" not in val


def test_triplet_with_hard_negatives_and_simcse_on_plain_text(bert, tmp_path):
    write_pairs(tmp_path / "p.jsonl", n=48, negatives=True)
    c = conf(bert, tmp_path / "p.jsonl", {"plugin": "triplet", "margin": 0.5, "distance": "cosine"}, max_steps=20)
    c["data"]["negative_columns"] = ["negative"]
    train(load_config(c, where="c.toml"), tmp_path / "triplet", echo=lambda m: None)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "triplet" / "metrics.jsonl").read_text().splitlines()
              if '"train"' in x]
    assert sum(losses[-5:]) < sum(losses[:5])

    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": " ".join(random.Random(i).sample(OLD, 6)),
                                                          "label": "x"}) + "\n" for i in range(40)))
    c = conf(bert, tmp_path / "p.jsonl", max_steps=6)
    c["data"] = {"plugin": "text", "path": str(tmp_path / "t.jsonl")}
    c["backbone"]["overrides"] = {"hidden_dropout_prob": 0.1}  # SimCSE: the two views differ by dropout
    train(load_config(c, where="c.toml"), tmp_path / "simcse", echo=lambda m: None)
    summary = json.loads((tmp_path / "simcse" / "summary.json").read_text())
    assert math.isfinite(summary["val"]["loss"])


def test_distilled_student_moves_towards_the_teachers_embeddings(bert, tmp_path):
    write_pairs(tmp_path / "p.jsonl", n=64)
    c = conf(bert, tmp_path / "p.jsonl", max_steps=20)
    train(load_config(c, where="c.toml"), tmp_path / "teacher", echo=lambda m: None)
    s = conf(bert, tmp_path / "p.jsonl", max_steps=20)
    s["backbone"]["overrides"] = {"num_hidden_layers": 1}
    s["strategy"]["teacher"] = str(tmp_path / "teacher")
    config = load_config(s, where="s.toml")
    before = Run(config)
    teacher = before.strategy.teacher
    batch = next(iter(before.loader("val", False)))

    def gap(run):
        with torch.no_grad():
            mine = run.strategy.encode(run.model.eval(), batch["inputs"])
            theirs = run.strategy.encode(teacher, batch["inputs"])
        return float(((mine - theirs) ** 2).sum(1).mean())

    start = gap(before)
    train(config, tmp_path / "student", echo=lambda m: None)
    after = Run(config)
    after.load_weights(tmp_path / "student" / "model.safetensors")
    assert gap(after) < start / 2, (start, gap(after))


def test_bad_input_exits_2(bert, tmp_path):
    write_pairs(tmp_path / "p.jsonl", n=16)
    rows = (tmp_path / "p.jsonl").read_text().splitlines()
    rows[5] = json.dumps({"source": "thou hast", "target": "  "})
    (tmp_path / "e.jsonl").write_text("\n".join(rows) + "\n")
    cfg = write_config(tmp_path / "e.toml", conf(bert, tmp_path / "e.jsonl"))
    assert_bad_input(*cli_run("train", cfg, "--out", tmp_path / "e"), "e.jsonl, line 6", "empty target")
    cfg = write_config(tmp_path / "s.toml", conf(bert, tmp_path / "p.jsonl", {"plugin": "cosent"}))
    assert_bad_input(*cli_run("train", cfg, "--out", tmp_path / "s"), "score_column")
    cfg = write_config(tmp_path / "l.toml", conf(bert, tmp_path / "p.jsonl", {"plugin": "cross_entropy"}))
    assert_bad_input(*cli_run("train", cfg, "--out", tmp_path / "l"), "not an embedding loss", "infonce")
    c = conf(bert, tmp_path / "p.jsonl")
    c["data"]["negative_columns"] = ["hard"]
    cfg = write_config(tmp_path / "n.toml", c)
    assert_bad_input(*cli_run("train", cfg, "--out", tmp_path / "n"), "'hard'", "negative_columns")
    (tmp_path / "x.jsonl").write_text(json.dumps({"source": "a", "target": "b", "score": "high"}) + "\n" +
                                      json.dumps({"source": "c", "target": "d", "score": 1}) + "\n")
    c = conf(bert, tmp_path / "x.jsonl", {"plugin": "cosent"})
    c["data"]["score_column"] = "score"
    assert_bad_input(*cli_run("train", write_config(tmp_path / "x.toml", c), "--out", tmp_path / "x"),
                     "x.jsonl, line 1", "'high'")


def test_simclr_views_of_unlabelled_images(tmp_path):
    """SimCLR on digits (labels unused): each example's two views are drawn from its own seed, so a view does not
    depend on the batch it came in, differs between the two sides and between epochs; training lowers the loss."""
    c = {"backbone": dict(TINY_VIT), "strategy": {"plugin": "contrastive", "crop_scale": 0.5},
         "data": {"plugin": "digits", "image_size": 8},
         "train": {"seed": 0, "max_steps": 30, "batch_size": 32, "lr": 3e-3, "progress": False, "plot": False,
                   "log_every": 1, "eval_every": 30}}
    run = Run(load_config(c, where="c.toml"))
    s = run.strategy
    batch = next(iter(run.loader("train", True)))
    a0, p0 = s._views(batch, 0), s._views(batch, 1)
    half = {k: (v[:5] if hasattr(v, "shape") else v) for k, v in batch.items()}
    assert torch.equal(s._views(half, 0), a0[:5])  # the same view of an example in another batch
    assert not torch.allclose(a0, p0)
    run.data.set_epoch(1)
    assert not torch.allclose(s._views(batch, 0), a0)
    train(load_config(c, where="c.toml"), tmp_path / "simclr", echo=lambda m: None)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "simclr" / "metrics.jsonl").read_text().splitlines()
              if '"train"' in x]
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    assert (tmp_path / "simclr" / "backbone").is_dir()


@pytest.fixture(scope="module")
def wide_bert(tmp_path_factory, bert):
    """A second random-init BERT of another width (48), same vocabulary: a tower."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("wide")
    BertTokenizerFast.from_pretrained(str(bert)).save_pretrained(d)
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=5 + len(WORDS), hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(d)
    return d


def test_two_towers_one_locked_meet_in_the_locked_ones_space(bert, wide_bert, tmp_path):
    write_pairs(tmp_path / "p.jsonl", n=96)
    c = conf(bert, tmp_path / "p.jsonl", max_steps=40, eval_every=40)
    c["strategy"].update(tower={"plugin": "hf", "weights": str(wide_bert)}, lock="positives")
    before = Run(load_config(c, where="c.toml"))
    assert set(before.strategy.model.project) == {"anchors"}  # 32 -> the locked tower's 48
    base = before.evaluate(before.model, "val")
    train(load_config(c, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    val = json.loads((tmp_path / "run" / "summary.json").read_text())["val"]
    assert val["recall@1"] > base["recall@1"] + 0.2, (base, val)
    trained = weights(tmp_path / "run", "model.safetensors")
    start = before.model.state_dict()
    tower = [k for k in trained if k.startswith("tower.")]
    assert tower and all(torch.equal(trained[k], start[k]) for k in tower)  # locked
    assert not torch.equal(trained["project.anchors.weight"], start["project.anchors.weight"])
    assert (tmp_path / "run" / "tower" / "config.json").is_file()
    import os
    here = os.getcwd()
    try:  # a relative tower path is saved absolute: the run reloads from another folder
        os.chdir(wide_bert.parent)
        tower = {"plugin": "hf", "weights": wide_bert.name}
        relative = load_config({**c, "strategy": {**c["strategy"], "tower": tower}}, where="c.toml")
    finally:
        os.chdir(here)
    assert relative.plugins["strategy"].options.tower["weights"] == str(wide_bert)
    assert not (tmp_path / "run" / "sentence-transformers").exists()
    c["strategy"]["lock"] = "none"
    cfg = write_config(tmp_path / "w.toml", c)
    assert_bad_input(*cli_run("train", cfg, "--out", tmp_path / "w"), "projection_dim")


def test_an_image_tower_learns_to_meet_a_locked_text_tower(bert, tmp_path):
    """LiT-style: digits images (anchors, a tiny ViT that trains) against their digit's name embedded by a locked
    text tower; retrieval of the right name among the ten."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(300):
        Image.fromarray((digits.images[i] * 15).astype(np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"source": f"img/{i}.png", "target": f"{OLD[digits.target[i]]} {OLD[10 + digits.target[i]]}"})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = conf(bert, tmp_path / "p.jsonl", max_steps=60, eval_every=60, batch_size=8, lr=3e-3)
    c["backbone"] = dict(TINY_VIT)
    c["data"]["source_images"] = True
    # GradCache over image chunks; the locked text side is neither a leaf nor replayed
    c["strategy"].update(tower={"plugin": "hf", "weights": str(bert)}, lock="positives", mini_batch_size=3)
    untrained = Run(load_config(c, where="c.toml"))
    base = untrained.evaluate(untrained.model, "val")
    train(load_config(c, where="c.toml"), tmp_path / "lit", echo=lambda m: None)
    val = json.loads((tmp_path / "lit" / "summary.json").read_text())["val"]
    assert val["candidates"] == 10 and val["recall@1"] > max(0.4, base["recall@1"] + 0.2), (base, val)
    code, out = cli_run("predict", tmp_path / "lit", tmp_path / "img" / "0.png", "--json")
    assert code == 0, out
    assert len(json.loads(out.splitlines()[-1])["embedding"]) == 32
    rows[3]["source"] = "img/missing.png"
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c["data"]["path"] = str(tmp_path / "m.jsonl")
    assert_bad_input(*cli_run("train", write_config(tmp_path / "m.toml", c), "--out", tmp_path / "m"),
                     "m.jsonl, line 4", "img/missing.png")


def test_lora_run_exports_merged_weights_that_sentence_transformers_reproduces(bert, tmp_path):
    from sentence_transformers import SentenceTransformer

    write_pairs(tmp_path / "p.jsonl", n=48)
    c = conf(bert, tmp_path / "p.jsonl", max_steps=6, precision="bf16")
    c["adapter"] = {"plugin": "lora", "r": 4}
    c["strategy"]["mini_batch_size"] = 3  # GradCache replays under the step's autocast
    train(load_config(c, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    assert (tmp_path / "run" / "adapter").is_dir()
    texts = ["in the beginning", "thou hast said unto"]
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    code, out = cli_run("predict", tmp_path / "run", "--file", tmp_path / "t.txt", "--json")
    assert code == 0, out
    mine = torch.tensor([json.loads(line)["embedding"] for line in out.splitlines() if line.startswith("{")])
    st = SentenceTransformer(str(tmp_path / "run" / "sentence-transformers"), device="cpu")
    theirs = torch.tensor(st.encode(texts))
    assert torch.allclose(mine, theirs, atol=2e-2), (mine - theirs).abs().max()  # bf16 prediction vs fp32


def test_images_on_the_target_side_with_an_image_tower_or_one_image_backbone(bert, tmp_path):
    """Text anchors against images through an image tower, and image -> image pairs through one image backbone."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    (tmp_path / "img").mkdir()
    for i in range(200):
        Image.fromarray((digits.images[i] * 15).astype(np.uint8)).save(tmp_path / "img" / f"{i}.png")
    names = [f"{OLD[d]} {OLD[10 + d]}" for d in range(10)]
    rows = [{"source": names[digits.target[i]], "target": f"img/{i}.png"} for i in range(200)]
    (tmp_path / "t2i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = conf(bert, tmp_path / "t2i.jsonl", max_steps=40, eval_every=40, batch_size=8, lr=3e-3)
    c["data"]["target_images"] = True
    c["strategy"]["tower"] = dict(TINY_VIT)
    untrained = Run(load_config(c, where="c.toml"))
    base = untrained.evaluate(untrained.model, "val")
    train(load_config(c, where="c.toml"), tmp_path / "t2i", echo=lambda m: None)
    val = json.loads((tmp_path / "t2i" / "summary.json").read_text())["val"]
    assert val["recall@1"] > base["recall@1"] + 0.2, (base, val)  # a query per name, any image of its digit counts

    same = {d: [i for i in range(200) if digits.target[i] == d] for d in range(10)}
    rows = [{"source": f"img/{i}.png", "target": f"img/{same[digits.target[i]][0]}.png"} for i in range(200)]
    (tmp_path / "i2i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = conf(bert, tmp_path / "i2i.jsonl", max_steps=3, batch_size=8)
    c["backbone"] = dict(TINY_VIT)
    c["data"].update(source_images=True, target_images=True)
    train(load_config(c, where="c.toml"), tmp_path / "i2i", echo=lambda m: None)
    val = json.loads((tmp_path / "i2i" / "summary.json").read_text())["val"]
    assert val["candidates"] <= 10 and 0 <= val["recall@1"] <= 1
    c["data"]["target_images"] = False
    c["backbone"] = {"plugin": "hf", "weights": str(bert)}
    c["data"].update(source_images=False, target_images=True)
    assert_bad_input(*cli_run("train", write_config(tmp_path / "x.toml", c), "--out", tmp_path / "x"),
                     "image tower")
