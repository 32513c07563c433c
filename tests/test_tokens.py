"""Issue 20, token classification: CoNLL / CoNLL-U data, word tags aligned to sub-word pieces, entity-level metrics
(seqeval's), `graft predict` as word/TAG pairs; bad files exit 2 naming file and line."""

import random

import pytest

from conftest import graft, write_config
from graft import UNLABELLED, load_config
from graft.config import resolve
from graft.loop import train
from graft.run import Run

pytest.importorskip("seqeval")

PEOPLE, PLACES = ["anna", "bob", "carl"], ["paris", "rome", "oslo"]


@pytest.fixture(scope="module")
def ner_tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("tok")
    words = ["the", "went", "to", "is", "in", "smith", *PEOPLE, *PLACES]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "##s", "##y"])}
    BertTokenizerFast(vocab=vocab).save_pretrained(d)  # vocab_file= is ignored by transformers 5
    return d


def ner_file(path, n=150, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        p, q = rng.choice(PEOPLE), rng.choice(PLACES)
        sent = [("the", "O"), (p, "B-PER"), ("went", "O"), ("to", "O"), (q, "B-LOC")]
        if rng.random() < 0.5:
            sent = [(p, "B-PER"), ("smith", "I-PER"), ("is", "O"), ("in", "O"), (q + "s", "B-LOC")]
        lines += [f"{w} NN {t}" for w, t in sent] + [""]
    path.write_text("-DOCSTART- -X- O\n\n" + "\n".join(lines))
    return path


def conf(tokenizer, path, **data):
    return {"backbone": {"plugin": "hf", "tokenizer": str(tokenizer),
                         "config": {"model_type": "bert", "vocab_size": 32, "hidden_size": 32, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "intermediate_size": 64,
                                    "max_position_embeddings": 64}},
            "strategy": {"plugin": "finetune"}, "data": {"plugin": "conll", "path": str(path), **data},
            "train": {"epochs": 4, "batch_size": 16, "lr": 3e-3, "progress": False, "plot": False}}


def test_first_piece_carries_the_tag(ner_tokenizer, tmp_path):
    """Hand-checked: "annas" is two pieces (anna ##s); only the first is labelled, specials never are."""
    path = tmp_path / "one.conll"
    path.write_text("annas B-PER\nwent O\nto O\nromey B-LOC\n")
    r = Run(resolve(conf(ner_tokenizer, path, val_fraction=0.0, test_fraction=0.0), "c.toml"))
    tok = r.backbone.tokenizer()
    ids, labels = r.data.dataset("train")[0]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "anna", "##s", "went", "to", "rome", "##y", "[SEP]"]
    names = r.data.label_names
    assert names == ["B-LOC", "B-PER", "O"]
    assert labels == [UNLABELLED, 1, UNLABELLED, 2, 2, 0, UNLABELLED, UNLABELLED]


def test_entity_counts_match_seqeval_and_a_hand_count():
    from seqeval.metrics import f1_score, precision_score, recall_score

    from graft.supervised import entity_counts

    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["O", "I-ORG", "I-ORG", "O"]]
    # by hand: gold PER(0-1) LOC(3) | ORG(1-2); predicted PER(0-0) LOC(3) | ORG(1-2) (an I- after O opens an
    # entity, conlleval's rule) -> correct LOC and ORG: 2 of 3 predicted, 2 of 3 gold
    assert entity_counts(gold, pred) == (2, 3, 3)
    tp, n_pred, n_gold = entity_counts(gold, pred)
    assert tp / n_pred == pytest.approx(precision_score(gold, pred)) == pytest.approx(2 / 3)
    assert tp / n_gold == pytest.approx(recall_score(gold, pred))
    assert 2 * tp / (n_pred + n_gold) == pytest.approx(f1_score(gold, pred)) == pytest.approx(2 / 3)


def test_tiny_ner_trains_reports_entity_f1_and_predicts_word_tags(ner_tokenizer, tmp_path):
    cfg = write_config(tmp_path / "c.toml", conf(ner_tokenizer, ner_file(tmp_path / "ner.conll")))
    summary = train(load_config(cfg), tmp_path / "run", echo=lambda m: None)
    assert summary["metric"] == "entity_f1" and summary["test"]["entity_f1"] >= 0.9
    assert {"accuracy", "entity_precision", "entity_recall"} <= set(summary["test"])
    out = graft("predict", tmp_path / "run", "anna smith went to oslo", "the bob is in romes", check=True).stdout
    assert out.splitlines() == ["anna/B-PER smith/I-PER went/O to/O oslo/B-LOC",
                                "the/O bob/B-PER is/O in/O romes/B-LOC"]


def test_conllu_reads_forms_and_upos(ner_tokenizer, tmp_path):
    path = tmp_path / "t.conllu"
    rows = ["# sent_id = 1", "# text = anna went to rome",
            "1\tanna\tanna\tPROPN\tNNP\t_\t2\tnsubj\t_\t_", "2-3\twentto\t_\t_\t_\t_\t_\t_\t_\t_",
            "2\twent\tgo\tVERB\tVBD\t_\t0\troot\t_\t_", "3\tto\tto\tADP\tIN\t_\t4\tcase\t_\t_",
            "3.1\tx\t_\t_\t_\t_\t_\t_\t_\t_", "4\trome\trome\tPROPN\tNNP\t_\t2\tobl\t_\t_", ""]
    path.write_text(("\n".join(rows) + "\n") * 3)
    r = Run(resolve(conf(ner_tokenizer, path, val_fraction=0.0, test_fraction=0.0), "c.toml"))
    assert r.data.label_names == ["ADP", "PROPN", "VERB"] and len(r.data.dataset("train")) == 3
    r = Run(resolve(conf(ner_tokenizer, path, conllu_tag="xpos", val_fraction=0.0, test_fraction=0.0), "c.toml"))
    assert r.data.label_names == ["IN", "NNP", "VBD"]
    assert r.strategy.primary_metric == "accuracy"  # POS tags: token accuracy, no entities


def test_bad_files_exit_2_naming_file_and_line(ner_tokenizer, tmp_path):
    from graft import GraftError

    bad = tmp_path / "bad.conll"
    bad.write_text("anna B-PER\nwent O\nto\nrome B-LOC\n")
    proc = graft("train", write_config(tmp_path / "c.toml", conf(ner_tokenizer, bad)))
    assert proc.returncode == 2 and f"{bad}, line 3" in proc.stderr and "tag column is missing" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad = tmp_path / "bad.conllu"
    bad.write_text("1\tanna\tanna\tPROPN\n")
    with pytest.raises(GraftError, match=f"{bad}, line 1: a CoNLL-U word line has 10 tab-separated columns"):
        Run(resolve(conf(ner_tokenizer, bad), "d.toml"))


def test_a_backbone_without_token_features_is_refused(ner_tokenizer, tmp_path):
    from graft import GraftError
    from graft.plugins.hf_backbone import HFBackbone
    from graft.testing import registry_with

    class Pooled(HFBackbone):
        def build(self):
            module = super().build()
            self.dense_features = None  # e.g. a sentence encoder that only returns pooled vectors
            return module

    c = conf(ner_tokenizer, ner_file(tmp_path / "n.conll", n=20))
    c["backbone"]["plugin"] = "pooled"
    with pytest.raises(GraftError, match="one feature vector per token.*'pooled' gives none"):
        Run(resolve(c, "c.toml", registry_with(Pooled, "backbone", "pooled")))


def test_lora_and_layer_decay_on_a_token_task(ner_tokenizer, tmp_path):
    """The per-token head trains with an adapter (peft LoRA) in the backbone and layer-wise LR decay: the
    pretrained weights stay as they were, the adapter and the head learn."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    c = conf(ner_tokenizer, ner_file(tmp_path / "n.conll", n=60))
    c["adapter"] = {"plugin": "lora", "r": 4, "target_modules": ["query", "value"]}
    c["strategy"]["layer_decay"] = 0.8
    c["train"].update(max_steps=6, eval_every=6)
    before = Run(resolve(c, "c.toml")).model.state_dict()
    summary = train(resolve(c, "c.toml"), tmp_path / "run", echo=lambda m: None)
    after = load_file(str(tmp_path / "run" / "last.safetensors"))
    base = [k for k in after if "lora_" not in k and k.startswith("backbone.") and "weight" in k]
    assert base and all(before[k].equal(after[k]) for k in base)
    assert any(not before[k].equal(after[k]) for k in after if "lora_B" in k)
    assert not before["head.1.weight"].equal(after["head.1.weight"])
    assert "entity_f1" in summary["test"] and summary["adapter"]["plugin"] == "lora"


def test_two_processes_match_one(ner_tokenizer, tmp_path):
    """Token losses are normalised over the labelled tokens of the whole step: 2 processes x batch 8 end where
    1 process x batch 16 does although the halves hold different token counts (the loop's resume tests cover the
    rest: the normalisation keeps no state)."""
    from conftest import assert_same_weights, weights

    c = conf(ner_tokenizer, ner_file(tmp_path / "n.conll", n=80))
    c["backbone"]["config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    c["train"].update(max_steps=4, optimizer="sgd", lr=0.1, batch_size=16)
    cfg = write_config(tmp_path / "c.toml", c)
    two = graft("train", cfg, "--nproc", "2", "--out", tmp_path / "two", "--set", "train.batch_size=8")
    assert two.returncode == 0, two.stderr
    train(load_config(cfg), tmp_path / "one", echo=lambda m: None)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-5)


def test_per_token_distillation(ner_tokenizer, tmp_path):
    """A 1-layer student learns the 2-layer teacher's tags from its per-token soft targets (same tokenizer); a
    student with another tokenizer is refused with the fix."""
    path = ner_file(tmp_path / "n.conll")
    train(resolve(conf(ner_tokenizer, path), "t.toml"), tmp_path / "teacher", echo=lambda m: None)
    c = conf(ner_tokenizer, path)
    c["backbone"]["config"]["num_hidden_layers"] = 1
    c["strategy"] = {"plugin": "distill", "teacher": str(tmp_path / "teacher")}
    c["loss"] = {"plugin": "kd", "temperature": 2.0, "alpha": 0.5}
    summary = train(resolve(c, "s.toml"), tmp_path / "student", echo=lambda m: None)
    assert summary["test"]["teacher_accuracy"] >= 0.9 and summary["test"]["agreement"] >= 0.9
    assert summary["test"]["entity_f1"] >= 0.8
    c["data"]["max_length"] = 5  # other pieces than the teacher's
    from graft import GraftError

    with pytest.raises(GraftError, match="per-token distillation needs the teacher's tokens"):
        Run(resolve(c, "s.toml"))
