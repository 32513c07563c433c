"""Domain adaptation (issue 31): the [target] table, its batch stream, and the adapt strategy's methods."""

import math

import pytest
import torch

from conftest import (assert_resume_from_step_reproduces, assert_same_weights, graft, one_step_weights,
                      read_metrics, reviews, tiny_config, weights, write_config)


def mnist_csv(path, n=200, seed=0):
    """An MNIST-style CSV (784 pixels 0-255, label last) whose digits are bars at a height set by the label: a
    domain of its own, learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        label = i % 10
        img = torch.zeros(28, 28)
        img[3 + 2 * label:9 + 2 * label, 5:23] = 255 * (0.5 + 0.5 * torch.rand(6, 18, generator=g))
        lines.append(",".join(str(int(v)) for v in img.flatten().tolist()) + f",{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def adapt_config(tmp_path, strategy=None, target=None, **train):
    return tiny_config(strategy={"plugin": "adapt", "domain_hidden": 16, "domain_batch_norm": False,
                                 **(strategy or {})},
                       target={"plugin": "digits", "dataset": "mnist", "path": str(mnist_csv(tmp_path / "m.csv")),
                               "image_size": 8, **(target or {})},
                       train={"max_steps": 4, "eval_every": 2, **train})


def test_gradient_reversal_flips_and_scales_gradients_exactly():
    from graft.plugins.adapt import dann_coefficient, reverse_gradient

    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(4, 3)
    y = reverse_gradient(x, 0.37)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.equal(x.grad, -0.37 * w)
    assert dann_coefficient(0.0) == 0.0
    assert dann_coefficient(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert dann_coefficient(0.3, gamma=5) == pytest.approx(2 / (1 + math.exp(-1.5)) - 1)


def test_a_dann_step_moves_the_backbone_to_confuse_the_domain_classifier(tmp_path):
    """The step's backbone gradient is the source loss's minus (coefficient x trade-off) times the domain loss's: the
    adaptation's share of the update is gradient ascent on the domain classifier's loss, which it raises."""
    import graft as g
    from graft.plugins.adapt import domain_loss

    conf = adapt_config(tmp_path, strategy={"schedule": "constant", "trade_off": 0.5})
    run = g.Run(g.load_config(conf))
    model, strategy = run.model, run.strategy
    batch = next(iter(run.loader("train", train=True)))
    backbone = [p for p in model.backbone.parameters()]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in backbone]

    total = grads(strategy.training_step(model, batch)["loss"])
    strategy.stream.position = 0
    target = strategy.stream.next()
    out = model(batch["inputs"], target["inputs"], None, -1.0)  # coefficient -1: the domain loss's plain gradient
    source = grads(strategy.loss(out["source"], batch["targets"]))
    out = model(batch["inputs"], target["inputs"], None, -1.0)
    plain = grads(domain_loss(out["domain_source"], out["domain_target"]))
    for t, s, d in zip(total, source, plain):
        torch.testing.assert_close(t, s - 0.5 * d, rtol=1e-4, atol=1e-6)
    assert any(float(d.abs().sum()) > 0 for d in plain)

    def confusion_loss():
        with torch.no_grad():
            o = model(batch["inputs"], target["inputs"], None, 0.0)
            return float(domain_loss(o["domain_source"], o["domain_target"]))

    before = confusion_loss()
    with torch.no_grad():  # the adaptation's share of an SGD step: -(total - source) = +0.5 x the plain gradient
        for p, t, s in zip(backbone, total, source):
            p -= 1e-3 * (t - s)
    assert confusion_loss() > before


def test_pseudo_labels_below_the_threshold_contribute_nothing():
    from graft.plugins.adapt import self_training_loss

    weak = torch.tensor([[4.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 0.0, 9.0], [0.0, 0.3, 0.0]])
    strong = torch.randn(4, 3, requires_grad=True)
    loss, kept = self_training_loss(weak, strong, threshold=0.9)
    assert float(kept) == 0.5  # rows 0 and 2 reach 0.9
    loss.backward()
    assert torch.count_nonzero(strong.grad[[1, 3]]) == 0
    expected = (torch.nn.functional.cross_entropy(strong[[0, 2]], torch.tensor([0, 2]), reduction="sum") / 4)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    changed = strong.detach().clone()
    changed[[1, 3]] = torch.randn(2, 3) * 10
    assert float(self_training_loss(weak, changed, 0.9)[0]) == pytest.approx(float(loss.detach()), rel=1e-6)
    assert float(self_training_loss(weak, strong, 1.0)[0].detach()) == 0.0


def test_mcc_loss_is_the_papers_formula():
    """Jin et al. 2020, Eqs. 1-7, computed element by element (tllib's MinimumClassConfusionLoss)."""
    from graft.plugins.adapt import mcc_loss

    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 3
    t, (b, k) = 2.5, logits.shape
    p = [[math.exp(logits[i, j] / t) for j in range(k)] for i in range(b)]
    p = [[v / sum(row) for v in row] for row in p]
    h = [-sum(v * math.log(v + 1e-5) for v in row) for row in p]
    w = [1 + math.exp(-x) for x in h]
    w = [b * x / sum(w) for x in w]
    c = [[sum(p[i][j] * w[i] * p[i][l] for i in range(b)) for l in range(k)] for j in range(k)]
    col = [sum(c[j][l] for j in range(k)) for l in range(k)]
    c = [[c[j][l] / col[l] for l in range(k)] for j in range(k)]
    expected = (sum(map(sum, c)) - sum(c[j][j] for j in range(k))) / k
    assert float(mcc_loss(logits, t)) == pytest.approx(expected, rel=1e-5)
    certain = torch.eye(4)[[0, 1, 2, 3, 0, 1]] * 100  # one class per example: no confusion
    assert float(mcc_loss(certain, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_cdan_conditions_on_predictions_with_the_randomized_map_when_wide(tmp_path):
    import graft as g

    for randomized, width in (("never", 32 * 10), ("always", 64)):
        conf = adapt_config(tmp_path, strategy={"method": "cdan", "randomized": randomized, "randomized_dim": 64,
                                                "entropy_conditioning": True})
        run = g.Run(g.load_config(conf))
        assert run.model.domain[0].in_features == width
        f, logits = torch.randn(3, 32), torch.randn(3, 10)
        h = run.model.condition(f, logits)
        if randomized == "never":  # the outer product f x softmax(g), flattened
            torch.testing.assert_close(h, (torch.softmax(logits, 1)[:, :, None] * f[:, None, :]).flatten(1))
        else:
            torch.testing.assert_close(h, (f @ run.model.random_f) * (torch.softmax(logits, 1) @ run.model.random_g)
                                       / 8.0)
        out = run.strategy.training_step(run.model, next(iter(run.loader("train", train=True))))
        assert math.isfinite(float(out["loss"].detach())) and 0 <= float(out["domain_accuracy"]) <= 1


def test_every_method_trains_and_scores_both_domains(tmp_path):
    import graft as g

    for method in ("none", "dann", "cdan", "mcc"):
        conf = adapt_config(tmp_path, strategy={"method": method, "self_training": method == "none",
                                                "threshold": 0.2})
        summary = g.train(g.load_config(conf), tmp_path / method, echo=lambda m: None)
        for split in ("val", "test"):
            assert {"accuracy", "target_accuracy", "target_loss", "target_macro_f1"} <= set(summary[split])
        train = [r for r in read_metrics(tmp_path / method) if r["split"] == "train"]
        assert ("transfer_loss" in train[-1]) == (method != "none")
        assert summary["weights_chosen_by"] == "the source's validation split"
        assert ("pseudo_labelled" in train[-1]) == (method == "none")
    none = [r for r in read_metrics(tmp_path / "none") if r["split"] == "train"]
    assert any(r["pseudo_labelled"] > 0 for r in none)
    conf = adapt_config(tmp_path, strategy={"select_on": "target"})
    summary = g.train(g.load_config(conf), tmp_path / "oracle", echo=lambda m: None)
    assert summary["metric"] == "target_accuracy" and "ORACLE" in summary["weights_chosen_by"]


def test_target_batches_resume_exactly(tmp_path):
    import graft as g

    conf = adapt_config(tmp_path, strategy={"self_training": True, "threshold": 0.2}, max_steps=6,
                        checkpoint_every=1, keep_checkpoints=10, batch_size=16)
    assert_resume_from_step_reproduces(g.load_config(conf), tmp_path, step=3)


def test_two_processes_draw_and_train_like_one_with_twice_the_batch(tmp_path):
    mnist_csv(tmp_path / "m.csv")

    def make(batch, accum):
        c = adapt_config(tmp_path, strategy={"self_training": True, "threshold": 0.2, "schedule": "constant"},
                         max_steps=2, batch_size=batch, grad_accum=accum, optimizer="sgd", lr=0.5)
        c["data"]["val_fraction"] = c["target"]["val_fraction"] = 0.0
        return c

    big, half, accum = one_step_weights(make, tmp_path, (16, 1), (8, 1), (8, 2))
    with pytest.raises(AssertionError):
        assert_same_weights(big, half, atol=1e-6)
    assert_same_weights(big, accum, atol=1e-5)
    two = graft("train", write_config(tmp_path / "c.toml", make(8, 1)), "--nproc", "2", "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    assert_same_weights(big, weights(tmp_path / "two"), atol=1e-5)


def test_a_target_with_other_labels_is_refused_naming_both(tmp_path):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "pets" / name / f"{i}.png")
    conf = adapt_config(tmp_path, target={"plugin": "imagefolder", "path": str(tmp_path / "pets")})
    conf["target"] = {"plugin": "imagefolder", "path": str(tmp_path / "pets"), "image_size": 8}
    r = graft("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "run")
    assert r.returncode == 2
    for part in ("[target] plugin = 'imagefolder'", "[data] plugin = 'digits'", "'cat'", "same classes"):
        assert part in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_target_table_needs_a_strategy_that_adapts(tmp_path):
    conf = adapt_config(tmp_path)
    conf["strategy"] = {"plugin": "finetune"}
    r = graft("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "run")
    assert r.returncode == 2 and "[target]" in r.stderr and "adapt" in r.stderr, r.stderr
    conf = adapt_config(tmp_path)
    del conf["target"]
    r = graft("train", write_config(tmp_path / "d.toml", conf), "--out", tmp_path / "run2")
    assert r.returncode == 2 and "add a [target] table" in r.stderr, r.stderr


def test_text_adaptation_with_lora_masks_the_strong_view(tmp_path, tiny_bert):
    """A text source and a text target (other words for the same labels), MCC + self-training on a LoRA adapter."""
    import graft as g

    reviews(tmp_path / "source.jsonl", n=60)
    text = (tmp_path / "source.jsonl").read_text().replace("film", "movie")
    (tmp_path / "target.jsonl").write_text(text)
    table = {"plugin": "text", "max_length": 16}
    conf = tiny_config(backbone={"plugin": "hf", "weights": str(tiny_bert)},
                       strategy={"plugin": "adapt", "method": "mcc", "self_training": True, "threshold": 0.01,
                                 "mask_probability": 0.5},
                       data={**table, "path": str(tmp_path / "source.jsonl")},
                       target={**table, "path": str(tmp_path / "target.jsonl")},
                       adapter={"plugin": "lora", "r": 4},
                       train={"max_steps": 3, "batch_size": 8})
    run = g.Run(g.load_config(conf))
    target = run.strategy.stream.next()
    strong = run.strategy.strong_view(target)
    ids, masked = target["inputs"]["input_ids"], strong["input_ids"]
    tok = run.backbone.tokenizer()
    changed = ids != masked
    assert changed.any() and bool((masked[changed] == tok.mask_token_id).all())
    assert not bool(torch.isin(ids[changed], torch.tensor(tok.all_special_ids)).any())
    torch.testing.assert_close(run.strategy.strong_view(target)["input_ids"], masked)  # seeded per example
    summary = g.train(g.load_config(conf), tmp_path / "run", echo=lambda m: None)
    assert "target_accuracy" in summary["test"] and (tmp_path / "run" / "adapter").is_dir()


def test_mnist_rows_become_uci_style_8x8_digits(tmp_path):
    from graft import GraftError
    from graft.plugins.digits import mnist_8x8

    path = mnist_csv(tmp_path / "m.csv", n=10)
    x, y = mnist_8x8(str(path))
    assert x.shape == (10, 1, 8, 8) and y.tolist() == list(range(10))
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert float(x[0, 0, [0, 1, 6, 7]].sum()) == 0 and float(x[0].sum()) > 0  # a wide bar keeps its aspect: centred
    assert float(x[0, 0].sum(1).max()) == pytest.approx(8.0)  # its box spans the width: whole rows of ink
    bad = tmp_path / "bad.csv"
    bad.write_text(path.read_text().splitlines()[0] + "\n1,2,3\n")
    with pytest.raises(GraftError, match=r"bad.csv, line 2: expected 784 pixel values"):
        mnist_8x8(str(bad))


@pytest.mark.parametrize("n, batch", [(7, 2), (7, 3), (40, 4), (9, 4)])
def test_a_stream_on_two_processes_draws_what_one_draws_with_twice_the_batch(n, batch):
    from graft.batches import Stream
    from graft.distributed import Dist

    class Numbers:
        epoch = 0

        def dataset(self, split):
            return list(range(n))

        def collate(self, items):
            return {"inputs": torch.tensor(items)}

        def set_epoch(self, epoch):
            self.epoch = epoch

    one = Stream(Numbers(), "train", 2 * batch, 5, Dist(), torch.device("cpu"))
    two = [Stream(Numbers(), "train", batch, 5, Dist(rank=r, world_size=2), torch.device("cpu")) for r in (0, 1)]
    for _ in range(7):  # across epochs
        whole = one.next()["index"].tolist()
        halves = [s.next()["index"].tolist() for s in two]
        assert sorted(whole) == sorted(halves[0] + halves[1])
        assert len(set(whole)) == len(whole)  # no example twice in one step


@pytest.mark.parametrize("sig", ["SIGINT", pytest.param("SIGKILL", marks=pytest.mark.slow)])
def test_dann_with_self_training_cut_by_a_signal_resumes_like_an_uninterrupted_run(tmp_path, sig):
    """The target stream's position, the GRL schedule and the pseudo-labels through the CLI's stop paths."""
    from conftest import assert_signal_resume, write_config

    conf = adapt_config(tmp_path, {"method": "dann", "self_training": True, "self_training_start": 0.5},
                        max_steps=16, log_every=1, checkpoint_every=2, eval_every=8)
    assert_signal_resume(write_config(tmp_path / "c.toml", conf), tmp_path, sig, steps=16, lines=6)
