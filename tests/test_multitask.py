"""Multi-task learning (issue 31): [tasks.NAME] tables, task sampling, loss weights, Delta-m, predictions per task."""

import json
import random

import pytest
import torch

from conftest import (assert_resume_from_step_reproduces, assert_same_weights, graft, one_step_weights,
                      tiny_config, weights, write_config)
from test_adapt import mnist_csv

pytest.importorskip("seqeval")

WORDS = {"NOUN": (["cat", "dog", "tree"], ["NN", "NNS"]), "VERB": (["runs", "sees", "eats"], ["VB", "VBZ"]),
         "DET": (["the", "a"], ["DT"])}


def digits_tasks(tmp_path, **strategy):
    """Two image tasks on one backbone: UCI digits and MNIST-form digits (the bars of test_adapt)."""
    conf = tiny_config(strategy={"plugin": "multitask", **strategy}, data=None,
                       train={"max_steps": 4, "eval_every": 2, "batch_size": 16})
    conf["tasks"] = {"uci": {"plugin": "digits", "image_size": 8},
                     "mnist": {"plugin": "digits", "dataset": "mnist", "image_size": 8,
                               "path": str(mnist_csv(tmp_path / "m.csv", n=100))}}
    return conf


def test_one_task_trains_exactly_as_finetune(tmp_path):
    import graft as g

    plain = tiny_config(train={"max_steps": 6, "eval_every": 3})
    g.train(g.load_config(plain), tmp_path / "finetune", echo=lambda m: None)
    multi = tiny_config(strategy={"plugin": "multitask"}, data=None, loss=None,
                        train={"max_steps": 6, "eval_every": 3})
    multi["tasks"] = {"digits": {"plugin": "digits", "image_size": 8}}
    summary = g.train(g.load_config(multi), tmp_path / "multi", echo=lambda m: None)
    a, b = weights(tmp_path / "finetune"), weights(tmp_path / "multi")
    b = {k.replace("heads.digits.", "head."): v for k, v in b.items()}
    assert_same_weights(a, b, atol=1e-6)
    finetune = json.loads((tmp_path / "finetune" / "summary.json").read_text())
    assert summary["test"]["digits/accuracy"] == pytest.approx(finetune["test"]["accuracy"], abs=1e-9)
    assert summary["test"]["task_mean"] == summary["test"]["digits/accuracy"]


def _mixture(sizes, sampling="proportional", temperature=1.0):
    from graft.data import TaskMixture

    class Listed:
        def __init__(self, n):
            self.n = n

        def dataset(self, split):
            return list(range(self.n)) if split == "train" else None

    return TaskMixture({f"t{i}": Listed(n) for i, n in enumerate(sizes)}, sampling, temperature)


@pytest.mark.parametrize("sampling", ["proportional", "temperature", "round_robin"])
def test_sampling_proportions_hold_over_an_epoch(sampling):
    sizes, group = [400, 100, 30], 8
    mix = _mixture(sizes, sampling, temperature=2.0)
    order = mix.epoch_order(epoch=0, seed=0, group=group)
    starts = [0, 400, 500, 530]
    task_of = [next(t for t in range(3) if starts[t] <= i < starts[t + 1]) for i in order]
    chunks = [task_of[i:i + group] for i in range(0, len(order), group)]
    assert all(len(set(c)) == 1 for c in chunks)  # every step's examples come from one task
    counts = [task_of.count(t) for t in range(3)]
    if sampling == "temperature":  # shares proportional to n^(1/2): 20 : 10 : 5.48 of 530 examples
        w = [n ** 0.5 for n in sizes]
        expected = [530 * x / sum(w) for x in w]
    else:
        expected = sizes
    for c, e in zip(counts, expected):  # up to the one group a task's last examples are topped up to
        assert e - 1 <= c < e + group
    assert sum(mix.shares(sizes)) == sum(sizes)
    if sampling == "round_robin":
        assert [c[0] for c in chunks[:6]] == [0, 1, 2, 0, 1, 2]
    for t in range(3):  # a task sampled at or below its size sees distinct examples
        seen = [i for i, k in zip(order, task_of) if k == t]
        if counts[t] <= sizes[t]:
            assert len(set(seen)) == len(seen) or len(seen) % group == 0
    assert mix.epoch_order(0, 0, group) == order and mix.epoch_order(1, 0, group) != order


def test_two_tasks_resume_exactly_and_score_each(tmp_path):
    import graft as g

    conf = digits_tasks(tmp_path, sampling="temperature", weighting="uncertainty")
    conf["train"].update(max_steps=6, checkpoint_every=1, keep_checkpoints=10)
    assert_resume_from_step_reproduces(g.load_config(conf), tmp_path, step=3)
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    for key in ("uci/accuracy", "mnist/accuracy", "uci/loss", "task_mean", "loss"):
        assert key in summary["test"]
    assert set(summary["learned_weights"]) == {"uci", "mnist"}
    assert summary["metric"] == "task_mean"
    assert sorted(p.name for p in (tmp_path / "full" / "heads").iterdir()) == ["mnist.safetensors",
                                                                               "uci.safetensors"]
    tasks = json.loads((tmp_path / "full" / "tasks.json").read_text())
    assert tasks["uci"]["task"] == "classification" and tasks["mnist"]["label_names"][0] == "0"


def test_uncertainty_weighting_is_kendalls_form(tmp_path):
    import graft as g

    run = g.Run(g.load_config(digits_tasks(tmp_path, weighting="uncertainty", weights={"mnist": 0.5})))
    with torch.no_grad():
        run.model.log_vars.copy_(torch.tensor([0.7, -0.3]))
    batch = next(iter(run.loader("train", train=True)))
    (name, sub), = batch["tasks"].items()
    out = run.strategy.training_step(run.model, batch)
    s = run.model.log_vars[run.strategy.data.names.index(name)]
    plain = torch.nn.functional.cross_entropy(run.model(sub["inputs"], name)[0], sub["targets"])
    weight = 0.5 if name == "mnist" else 1.0
    expected = weight * (torch.exp(-s) * plain + s / 2)
    assert float(out["loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_two_processes_train_like_one_with_twice_the_batch(tmp_path):
    def make(batch, accum):
        c = digits_tasks(tmp_path)
        c["train"].update(max_steps=3, batch_size=batch, grad_accum=accum, optimizer="sgd", lr=0.5)
        return c

    big, half = one_step_weights(make, tmp_path, (16, 1), (8, 1))
    with pytest.raises(AssertionError):
        assert_same_weights(big, half, atol=1e-6)
    two = graft("train", write_config(tmp_path / "c.toml", make(8, 1)), "--nproc", "2", "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    assert_same_weights(big, weights(tmp_path / "two"), atol=1e-5)


def conllu(path, n=60, seed=0):
    """Sentences of NOUN / VERB / DET words, each with a fine tag (XPOS) that depends on the word."""
    rng = random.Random(seed)
    rows = []
    for s in range(n):
        rows.append(f"# sent_id = {s}")
        for i, upos in enumerate(rng.choice([["DET", "NOUN", "VERB"], ["NOUN", "VERB", "DET", "NOUN"]]), 1):
            words, tags = WORDS[upos]
            w = rng.choice(words)
            rows.append(f"{i}\t{w}\t{w}\t{upos}\t{tags[len(w) % len(tags)]}\t_\t0\tdep\t_\t_")
        rows.append("")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def pos_tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("postok")
    words = [w for ws, _ in WORDS.values() for w in ws]
    BertTokenizerFast(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
                      ).save_pretrained(d)
    return d


def pos_config(tok, path, **strategy):
    table = {"plugin": "conll", "path": str(path), "max_length": 16}
    return {"backbone": {"plugin": "hf", "tokenizer": str(tok),
                         "config": {"model_type": "bert", "vocab_size": 16, "hidden_size": 32, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "intermediate_size": 64,
                                    "max_position_embeddings": 32}},
            "strategy": {"plugin": "multitask", **strategy},
            "tasks": {"upos": {**table, "conllu_tag": "upos"}, "xpos": {**table, "conllu_tag": "xpos"}},
            "train": {"max_steps": 8, "batch_size": 8, "lr": 3e-3, "progress": False, "plot": False}}


def test_upos_and_xpos_delta_m_predict_every_task(tmp_path, pos_tokenizer):
    """Two tagging tasks on one text backbone; single-task runs give Delta-m; predict answers both tasks."""
    import graft as g

    path = conllu(tmp_path / "t.conllu")
    base = pos_config(pos_tokenizer, path)
    refs = {}
    for name in ("upos", "xpos"):
        single = {k: v for k, v in base.items() if k != "tasks"}
        single["strategy"], single["data"] = {"plugin": "finetune"}, base["tasks"][name]
        g.train(g.load_config(single), tmp_path / name, echo=lambda m: None)
        refs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    conf = pos_config(pos_tokenizer, path, single_task={"upos": str(tmp_path / "upos"), "xpos": str(tmp_path / "xpos")},
                      sampling="round_robin")
    summary = g.train(g.load_config(conf), tmp_path / "multi", echo=lambda m: None)
    assert summary["metric"] == "delta_m"
    for split in ("val", "test"):
        m = summary[split]
        expected = sum((m[f"{t}/accuracy"] - refs[t][split]["accuracy"]) / refs[t][split]["accuracy"] * 100
                       for t in ("upos", "xpos")) / 2
        assert m["delta_m"] == pytest.approx(expected, rel=1e-9)
        assert m["upos/single_task"] == refs["upos"][split]["accuracy"]
    r = graft("predict", tmp_path / "multi", "the cat runs", "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout.splitlines()[0])
    assert set(record) == {"input", "upos", "xpos"} and len(record["upos"]["tags"]) == 3
    assert set(record["xpos"]["tags"]) <= {"NN", "NNS", "VB", "VBZ", "DT"}


def test_task_tables_are_checked(tmp_path):
    conf = digits_tasks(tmp_path)
    conf["strategy"] = {"plugin": "finetune"}
    r = graft("train", write_config(tmp_path / "a.toml", conf), "--out", tmp_path / "a")
    assert r.returncode == 2 and "[tasks.*]" in r.stderr and "multitask" in r.stderr, r.stderr
    conf = digits_tasks(tmp_path)
    conf["data"] = {"plugin": "digits"}
    r = graft("train", write_config(tmp_path / "b.toml", conf), "--out", tmp_path / "b")
    assert r.returncode == 2 and "remove [data]" in r.stderr, r.stderr
    conf = digits_tasks(tmp_path, weights={"uci": 1.0, "mnsit": 2.0})
    r = graft("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "c")
    assert r.returncode == 2 and "'mnsit'" in r.stderr and "uci, mnist" in r.stderr, r.stderr
    conf = digits_tasks(tmp_path)
    conf["tasks"]["mnist"]["imag_size"] = 8
    r = graft("train", write_config(tmp_path / "d.toml", conf), "--out", tmp_path / "d")
    assert r.returncode == 2 and "[tasks.mnist]: unknown key 'imag_size'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_tasks_share_a_lora_adapter(tmp_path, pos_tokenizer):
    import graft as g

    conf = pos_config(pos_tokenizer, conllu(tmp_path / "t.conllu"), weighting="uncertainty")
    conf["adapter"] = {"plugin": "lora", "r": 4}
    conf["train"]["max_steps"] = 3
    run = g.Run(g.load_config(conf))
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    run.strategy.on_epoch_start(0, run.model)
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and {"log_vars"} <= trainable
    assert any(n.startswith("heads.upos.") for n in trainable) and any(n.startswith("heads.xpos.") for n in trainable)
    assert not any(n.startswith("backbone.") and "lora_" not in n for n in trainable)
    g.train(g.load_config(conf), tmp_path / "run", echo=lambda m: None)
    assert (tmp_path / "run" / "adapter").is_dir() and (tmp_path / "run" / "heads" / "xpos.safetensors").is_file()


@pytest.mark.parametrize("sig", ["SIGKILL", pytest.param("SIGINT", marks=pytest.mark.slow)])
def test_two_tasks_cut_by_a_signal_resume_like_an_uninterrupted_run(tmp_path, sig):
    """The task order of the epoch and the learned loss weights through the CLI's stop paths."""
    from conftest import assert_signal_resume, write_config

    conf = digits_tasks(tmp_path, sampling="temperature", weighting="uncertainty")
    conf["train"].update(max_steps=16, log_every=1, checkpoint_every=2, eval_every=8)
    assert_signal_resume(write_config(tmp_path / "c.toml", conf), tmp_path, sig, steps=16, lines=6)
