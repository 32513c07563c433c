"""Sequence-to-sequence transfer (issue 29): the pairs source, the seq2seq strategy on an encoder-decoder checkpoint
(T5, BART, Marian, mBART) and on an encoder-decoder warm-started from an encoder (BERT2BERT), BLEU/chrF from
sacrebleu, word- and sequence-level distillation, graft generate / predict."""

import json
import random

import pytest

from conftest import (assert_resume_from_step_reproduces, assert_same_weights, graft, one_step_weights, read_metrics,
                      weights, write_config)
from test_user_files import assert_bad_input, cli_run
from graft import load_config, train

OLD = "in the beginning god created heaven and earth was without form void darkness upon face of deep spirit moved " \
      "waters said let there be light saw it good divided from thou hast art unto".split()
MODERN = {"created": "made", "void": "empty", "upon": "on", "moved": "was moving", "saw": "looked at",
          "divided": "split", "thou": "you", "hast": "have", "art": "are", "unto": "to"}
WORDS = sorted(set(OLD) | {w for v in MODERN.values() for w in v.split()})


def rewrite(words):
    return " ".join(MODERN.get(w, w) for w in words)


def write_pairs(path, n=16, seed=0, length=6):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        s = rng.sample(OLD, length)
        rows.append({"source": " ".join(s), "target": rewrite(s)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A word-level tokenizer in T5's layout: [PAD] = 0 (the decoder start), </s> = 1 appended to every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("wordtok")
    vocab = {t: i for i, t in enumerate(["[PAD]", "</s>", "[UNK]", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", eos_token="</s>",
                            unk_token="[UNK]").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A random-init 2-layer BERT saved with save_pretrained (the 'pretrained' encoder) and its WordPiece vocab."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("bert")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizerFast(vocab=vocab).save_pretrained(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    return d


def family(kind, tokenizer):
    """A random-init encoder-decoder of the family ``kind`` on the word-level tokenizer, dropout off."""
    ids = {"vocab_size": 3 + len(WORDS), "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None}
    if kind == "t5":
        cfg = {"model_type": "t5", "d_model": 32, "d_ff": 64, "d_kv": 16, "num_layers": 2, "num_heads": 2,
               "dropout_rate": 0.0, "decoder_start_token_id": 0, **ids}
    else:  # bart, marian, mbart: the same layout of keys
        cfg = {"model_type": kind, "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
               "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
               "decoder_ffn_dim": 64, "max_position_embeddings": 64, "dropout": 0.0, "attention_dropout": 0.0,
               "decoder_start_token_id": 1 if kind != "marian" else 0, "forced_eos_token_id": None, **ids}
    return {"plugin": "hf", "config": cfg, "tokenizer": str(tokenizer)}


def conf(backbone, path, val=None, **train_options):
    data = {"plugin": "pairs", "path": str(path), "test_fraction": 0.0}
    data.update({"val_path": str(val)} if val else {"val_fraction": 0.25})
    return {"backbone": backbone, "strategy": {"plugin": "seq2seq", "max_new_tokens": 12}, "data": data,
            "train": {"max_steps": 150, "batch_size": 8, "lr": 1e-2, "warmup_steps": 10, "eval_every": 0,
                      "progress": False, "plot": False, "log_every": 10, **train_options}}


# -- the pairs source ------------------------------------------------------------------------------------------

def test_every_layout_gives_the_same_examples(bert, tmp_path):
    from graft.plugins.hf_backbone import HFBackbone, HFOptions
    from graft.plugins.pairs import Pairs, PairsOptions

    rows = write_pairs(tmp_path / "p.jsonl", n=12)
    rows[3]["source"] = "thou, \"hast\" art"  # a comma and quotes: CSV quoting must hold
    rows[5]["target"] = "you\u2028are"  # a line separator inside a line: only \n ends a line
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (tmp_path / "p.csv").write_text("\ufeffsource,target\n" + "".join(
        '"{}","{}"\n'.format(r["source"].replace('"', '""'), r["target"]) for r in rows), encoding="utf-8")
    (tmp_path / "p.tsv").write_text("target\tsource\n" + "".join(  # TSV: quotes are plain characters
        f"{r['target']}\t{r['source']}\n" for r in rows))
    (tmp_path / "train.src").write_text("".join(r["source"] + "\n" for r in rows) + "\n")
    (tmp_path / "train.tgt").write_text("".join(r["target"] + "\n" for r in rows))
    backbone = HFBackbone(HFOptions(weights=str(bert)))
    backbone.build()
    seen = []
    for options in ({"path": "p.jsonl"}, {"path": "p.csv"}, {"path": "p.tsv"},
                    {"path": "train.src", "target_path": "train.tgt"}):
        source = Pairs(PairsOptions(**{k: str(tmp_path / v) for k, v in options.items()}))
        source.setup(backbone, seed=3)
        seen.append({s: source.dataset(s) for s in ("train", "val", "test")})
    assert all(s == seen[0] for s in seen[1:])
    assert len(seen[0]["train"]) == 10 and len(seen[0]["val"]) == 1 and len(seen[0]["test"]) == 1
    assert any(e[2] == rows[3]["target"] and e[3] == rows[3]["source"] for split in seen[0].values() for e in split)


def test_a_missing_column_and_misaligned_files_exit_2(bert, tmp_path):
    write_pairs(tmp_path / "p.jsonl")
    c = conf({"plugin": "hf", "weights": str(bert)}, tmp_path / "p.jsonl")
    c["data"]["target_column"] = "traget"
    assert_bad_input(*cli_run("train", write_config(tmp_path / "c.toml", c), "--out", tmp_path / "r"),
                     "no field 'traget'", "source, target", "target_column")
    (tmp_path / "p.csv").write_text("src,tgt\na,b\n")
    c["data"].update(path=str(tmp_path / "p.csv"), target_column="tgt")
    assert_bad_input(*cli_run("train", write_config(tmp_path / "c.toml", c), "--out", tmp_path / "r"),
                     "no column 'source'", "src, tgt")
    (tmp_path / "a.src").write_text("thou art\nvoid\n")
    (tmp_path / "a.tgt").write_text("you are\n")
    c["data"] = {"plugin": "pairs", "path": str(tmp_path / "a.src"), "target_path": str(tmp_path / "a.tgt")}
    assert_bad_input(*cli_run("train", write_config(tmp_path / "c.toml", c), "--out", tmp_path / "r"),
                     "a.src has 2 lines", "a.tgt has 1")
    (tmp_path / "a.src").write_text("thou art\nvoid\nunto\n")
    (tmp_path / "a.tgt").write_text("you are\n\nto\n")
    assert_bad_input(*cli_run("train", write_config(tmp_path / "c.toml", c), "--out", tmp_path / "r"),
                     "line 2 has an empty target", "empty_rows")


def test_a_target_longer_than_the_limit_is_cut_and_counted(word_tokenizer, tmp_path):
    rows = write_pairs(tmp_path / "p.jsonl", n=8)
    rows[0]["target"] = " ".join(["void"] * 30)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = conf(family("t5", word_tokenizer), tmp_path / "p.jsonl", max_steps=1)
    c["data"]["max_target_length"] = 10
    summary = train(load_config(c, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    assert summary["data"]["truncated_targets"] == 1 and summary["data"]["truncated_sources"] == 0
    from graft import load_run

    run = load_run(tmp_path / "run")
    longest = max(len(e[1]) for split in ("train", "val") for e in run.data.dataset(split))
    assert longest == 10


# -- training --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["t5", "bert2bert"])
def test_a_tiny_model_overfits_sixteen_pairs_and_scores_as_sacrebleu(model, word_tokenizer, bert, tmp_path):
    """BLEU near 100 on the pairs it learned; the BLEU and chrF of graft eval equal sacrebleu's on the outputs of
    graft predict for the same sources."""
    import sacrebleu

    rows = write_pairs(tmp_path / "p.jsonl", n=16)
    backbone = family("t5", word_tokenizer) if model == "t5" else {"plugin": "hf", "weights": str(bert)}
    c = conf(backbone, tmp_path / "p.jsonl", val=tmp_path / "p.jsonl", eval_every=150)
    train(load_config(c, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    val = [r for r in read_metrics(tmp_path / "run") if r["split"] == "val"][-1]
    assert val["bleu"] > 95 and val["chrf"] > 95, val
    (tmp_path / "src.txt").write_text("".join(r["source"] + "\n" for r in rows))
    out = graft("predict", tmp_path / "run", "--file", tmp_path / "src.txt", check=True).stdout.splitlines()
    assert len(out) == 16
    assert val["bleu"] == pytest.approx(sacrebleu.corpus_bleu(out, [[r["target"] for r in rows]]).score)
    assert val["chrf"] == pytest.approx(sacrebleu.corpus_chrf(out, [[r["target"] for r in rows]]).score)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val"]["bleu_signature"].startswith("nrefs:1|case:mixed")
    code, text = cli_run("generate", tmp_path / "run", rows[0]["source"], "--json")
    assert code == 0 and json.loads(text.splitlines()[-1])["text"] == rows[0]["target"]
    assert (tmp_path / "run" / "seq2seq" / "config.json").is_file()


@pytest.mark.parametrize("kind", ["bart", "marian", "mbart"])
def test_other_encoder_decoder_families_train_and_generate(kind, word_tokenizer, tmp_path):
    write_pairs(tmp_path / "p.jsonl", n=8)
    c = conf(family(kind, word_tokenizer), tmp_path / "p.jsonl", max_steps=3, eval_every=3)
    summary = train(load_config(c, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    assert summary["model"].endswith(("ForConditionalGeneration", "MTModel")) and "bleu" in summary["val"]
    assert cli_run("generate", tmp_path / "run", "thou art", "--max-new-tokens", "4")[0] == 0


def test_accumulation_and_two_processes_match_the_large_batch(word_tokenizer, tmp_path):
    """Token losses are divided by the targets of the whole step: batch 6 = batch 3 x accumulation 2 = two processes
    x batch 3 (pairs of different lengths, so per-batch means would differ)."""
    rows = write_pairs(tmp_path / "p.jsonl", n=12)
    for i, r in enumerate(rows):
        words = r["source"].split()[: 2 + i % 5]
        r.update(source=" ".join(words), target=rewrite(words))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def make(batch, accum):
        c = conf(family("t5", word_tokenizer), tmp_path / "p.jsonl", max_steps=1, batch_size=batch, grad_accum=accum,
                 optimizer="sgd", lr=0.5, warmup_steps=0)
        c["data"]["val_fraction"] = 0.0
        return c

    big, acc, half = one_step_weights(make, tmp_path, (6, 1), (3, 2), (3, 1))
    assert_same_weights(big, acc, atol=1e-6)
    with pytest.raises(AssertionError):
        assert_same_weights(big, half, atol=1e-6)
    cfg = write_config(tmp_path / "c.toml", make(3, 1))
    two = graft("train", cfg, "--nproc", "2", "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    assert_same_weights(big, weights(tmp_path / "two"), atol=1e-5)


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(word_tokenizer, tmp_path):
    write_pairs(tmp_path / "p.jsonl", n=16)
    c = conf(family("t5", word_tokenizer), tmp_path / "p.jsonl", max_steps=8, batch_size=4, checkpoint_every=1,
             keep_checkpoints=10)
    # 3 steps per epoch: cut inside the first
    assert_resume_from_step_reproduces(load_config(c, where="c.toml"), tmp_path, step=2)


def test_warm_start_lora_reaches_both_halves_and_trains_the_new_cross_attention(bert, tmp_path):
    import torch

    write_pairs(tmp_path / "p.jsonl", n=16)
    c = conf({"plugin": "hf", "weights": str(bert)}, tmp_path / "p.jsonl", max_steps=3)
    c["adapter"] = {"plugin": "lora", "r": 4}
    summary = train(load_config(c, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    adapter = (tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    from safetensors.torch import load_file

    names = list(load_file(str(adapter)))
    assert any(".encoder.encoder.layer." in n for n in names) and any(".decoder.bert." in n for n in names)
    start = load_file(str(bert / "model.safetensors"))
    end = weights(tmp_path / "run")
    key = "encoder.encoder.layer.0.attention.self.query.base_layer.weight"
    key = key if key in end else "encoder.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(end[key], start["encoder.layer.0.attention.self.query.weight"])  # frozen under LoRA
    cross = "decoder.bert.encoder.layer.0.crossattention.output.dense.weight"
    from graft import Run

    before = Run(load_config(c, where="c.toml")).model.state_dict()[cross]  # the same seed: the same new weights
    assert not torch.equal(end[cross], before)  # new weights train whole
    assert 0 < summary["parameters"]["trainable"] < summary["parameters"]["total"] / 2


def test_tied_encoder_decoder_and_a_frozen_encoder(bert, tmp_path):
    import torch

    write_pairs(tmp_path / "p.jsonl", n=16)
    base = conf({"plugin": "hf", "weights": str(bert)}, tmp_path / "p.jsonl", max_steps=2)
    separate = train(load_config(base, where="c.toml"), tmp_path / "sep", echo=lambda m: None)
    base["strategy"]["tie_encoder_decoder"] = True
    tied = train(load_config(base, where="c.toml"), tmp_path / "tied", echo=lambda m: None)
    from transformers import BertModel

    shared = sum(p.numel() for n, p in BertModel.from_pretrained(str(bert)).named_parameters()
                 if not n.startswith("pooler"))
    assert separate["parameters"]["total"] - tied["parameters"]["total"] == shared
    base["strategy"].update(tie_encoder_decoder=False, freeze="encoder")
    train(load_config(base, where="c.toml"), tmp_path / "frozen", echo=lambda m: None)
    from safetensors.torch import load_file

    start, end = load_file(str(bert / "model.safetensors")), weights(tmp_path / "frozen")
    assert all(torch.equal(end[f"encoder.{k}"], v) for k, v in start.items() if f"encoder.{k}" in end)
    assert not torch.equal(end["decoder.bert.encoder.layer.0.attention.self.query.weight"],
                           start["encoder.layer.0.attention.self.query.weight"])


# -- distillation ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(word_tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    write_pairs(tmp / "p.jsonl", n=16)
    train(load_config(conf(family("t5", word_tokenizer), tmp / "p.jsonl", max_steps=120), where="t.toml"),
          tmp / "run", echo=lambda m: None)
    return tmp / "run"


def test_word_level_distillation_matches_the_teachers_token_distributions(teacher, word_tokenizer, tmp_path):
    write_pairs(tmp_path / "p.jsonl", n=16)
    student = family("t5", word_tokenizer)
    student["config"].update(num_layers=1, d_model=16, d_ff=32)
    c = conf(student, tmp_path / "p.jsonl", max_steps=60, eval_every=60)
    c["strategy"]["teacher"] = str(teacher)
    assert_bad_input(*cli_run("train", write_config(tmp_path / "c.toml", c), "--out", tmp_path / "r"),
                     "soft-target loss", "kd")
    c["loss"] = {"plugin": "kd", "alpha": 1.0, "temperature": 2.0}
    train(load_config(c, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert losses[-1] < losses[0] / 2, losses


def test_sequence_level_distillation_trains_on_the_teachers_outputs(teacher, bert, tmp_path):
    """The teacher's beam outputs (text) become the training targets, cached once; any tokenizer (here the
    student's WordPiece, not the teacher's word-level one)."""
    from graft import load_run

    write_pairs(tmp_path / "p.jsonl", n=16)
    c = conf({"plugin": "hf", "weights": str(bert)}, tmp_path / "p.jsonl", max_steps=2)
    c["strategy"].update(teacher=str(teacher), distill="sequence", teacher_beams=2, cache_dir=str(tmp_path / "cache"))
    train(load_config(c, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    cached = list((tmp_path / "cache" / "seq2seq").glob("*.json"))
    assert len(cached) == 1
    outputs = json.loads(cached[0].read_text())
    student, master = load_run(tmp_path / "run"), load_run(teacher)
    sources = [e[3] for e in student.data.dataset("train")]  # the source texts themselves, not decoded ids
    assert len(outputs) == len(sources) == 12
    enc = master.backbone.tokenizer()(sources[:4], padding=True, return_tensors="pt")
    assert outputs[:4] == master.strategy._generate(master.model, enc["input_ids"], enc["attention_mask"], num_beams=2)
    targets = student.strategy._teacher_targets(master, "cpu")  # from the cache
    assert targets[:4] == student.backbone.tokenizer()(text_target=outputs[:4])["input_ids"]
    mtime = cached[0].stat().st_mtime
    train(load_config(c, where="c.toml"), tmp_path / "again", echo=lambda m: None)
    assert cached[0].stat().st_mtime == mtime  # generated once


def test_bad_tables_exit_2(bert, tmp_path):
    write_pairs(tmp_path / "p.jsonl")
    c = conf({"plugin": "hf", "weights": str(bert)}, tmp_path / "p.jsonl")
    c["data"] = {"plugin": "text", "path": str(tmp_path / "p.jsonl"), "text_column": "source",
                 "label_column": "target"}
    assert_bad_input(*cli_run("train", write_config(tmp_path / "c.toml", c), "--out", tmp_path / "r"),
                     "plugin = \"pairs\"")
    gpt2 = {"plugin": "hf", "config": {"model_type": "gpt2", "vocab_size": 64, "n_embd": 16, "n_layer": 1,
                                       "n_head": 2}, "tokenizer": str(bert)}
    c = conf(gpt2, tmp_path / "p.jsonl")
    assert_bad_input(*cli_run("train", write_config(tmp_path / "c.toml", c), "--out", tmp_path / "r"),
                     "decoder-only", "clm")
    c = conf({"plugin": "hf", "weights": str(bert)}, tmp_path / "p.jsonl")
    c["strategy"]["tie_encoder_decoder"] = True
    c["adapter"] = {"plugin": "lora"}
    assert_bad_input(*cli_run("train", write_config(tmp_path / "c.toml", c), "--out", tmp_path / "r"),
                     "tie_encoder_decoder", "adapter")


def test_the_new_cross_attention_gets_its_own_learning_rate(bert, tmp_path):
    """fresh_lr_scale: the parameters MiniLM-style checkpoints lack (cross-attention, the LM head's transform) form
    their own group; everything the checkpoint held keeps the base rate."""
    from graft import Run

    write_pairs(tmp_path / "p.jsonl")
    c = conf({"plugin": "hf", "weights": str(bert)}, tmp_path / "p.jsonl")
    c["strategy"]["fresh_lr_scale"] = 10.0
    run = Run(load_config(c, where="c.toml"))
    groups = {g["name"]: g for g in run.strategy.param_groups(run.model)}
    names = {id(p): n for n, p in run.model.named_parameters()}
    fresh = sorted(names[id(p)] for p in groups["fresh"]["params"])
    assert groups["fresh"]["lr_scale"] == 10.0 and groups["pretrained"]["lr_scale"] == 1.0
    assert fresh and all("crossattention" in n or n.startswith("decoder.cls.") for n in fresh), fresh
    assert any("crossattention" in n for n in fresh)
    assert not any("crossattention" in names[id(p)] for p in groups["pretrained"]["params"])


def test_cross_attention_can_start_as_a_copy_of_self_attention(bert, tmp_path):
    import torch
    from graft import Run

    write_pairs(tmp_path / "p.jsonl")
    c = conf({"plugin": "hf", "weights": str(bert)}, tmp_path / "p.jsonl")
    for init in ("random", "self"):
        c["strategy"]["cross_attention"] = init
        layer = Run(load_config(c, where="c.toml")).model.decoder.bert.encoder.layer[1]
        same = torch.equal(layer.crossattention.self.query.weight, layer.attention.self.query.weight)
        assert same == (init == "self")
    c["backbone"] = {"plugin": "hf", "config": {"model_type": "bert", "vocab_size": 64, "hidden_size": 16,
                                                "num_hidden_layers": 1, "num_attention_heads": 2,
                                                "intermediate_size": 32}, "tokenizer": str(bert)}
    assert Run(load_config(c, where="c.toml")).model.config.decoder.add_cross_attention  # random init too


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_a_pretrained_checkpoint_keeps_its_lm_head(kind, word_tokenizer, tmp_path):
    """weights = a save_pretrained folder of T5ForConditionalGeneration (untied LM head) or BART (final_logits_bias):
    before any step the run's model computes what the checkpoint does; beam search evaluates too."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    cfg = dict(family(kind, word_tokenizer)["config"])
    if kind == "t5":
        cfg["tie_word_embeddings"] = False
    torch.manual_seed(0)
    original = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).eval()
    with torch.no_grad():
        if kind == "bart":
            original.final_logits_bias.normal_()
    original.save_pretrained(tmp_path / "ckpt")
    AutoTokenizer.from_pretrained(str(word_tokenizer)).save_pretrained(tmp_path / "ckpt")
    write_pairs(tmp_path / "p.jsonl", n=8)
    c = conf({"plugin": "hf", "weights": str(tmp_path / "ckpt")}, tmp_path / "p.jsonl", max_steps=1)
    c["strategy"]["num_beams"] = 2
    from graft import Run

    model = Run(load_config(c, where="c.toml")).model.eval()  # built, not trained
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        want = original(input_ids=ids, decoder_input_ids=torch.tensor([[0, 5, 6]])).logits
        got = model(input_ids=ids, decoder_input_ids=torch.tensor([[0, 5, 6]])).logits
    assert torch.allclose(want, got, atol=1e-5)
    summary = train(load_config(c, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    assert summary["val"]["generated"] == 2


@pytest.mark.parametrize("sig", ["SIGINT", pytest.param("SIGKILL", marks=pytest.mark.slow)])
def test_a_run_cut_by_a_signal_and_resumed_ends_like_an_uninterrupted_one(word_tokenizer, tmp_path, sig):
    """pairs + seq2seq through the loop's stop paths: SIGINT (checkpoint at the next step, exit 0) and SIGKILL
    (nothing after the last checkpoint), each then --resume: the weights and records (BLEU included) of the
    uninterrupted run. Every run in a one-thread process."""
    import signal

    from conftest import start_train, wait_for_lines

    write_pairs(tmp_path / "p.jsonl", n=16)
    c = conf(family("t5", word_tokenizer), tmp_path / "p.jsonl", max_steps=40, batch_size=4, lr=3e-3,
             log_every=1, checkpoint_every=3, eval_every=10)
    cfg = write_config(tmp_path / "c.toml", c)
    start_train(cfg, tmp_path / "full").communicate(timeout=300)
    proc = start_train(cfg, tmp_path / "cut")
    wait_for_lines(tmp_path / "cut", 12, proc)
    proc.send_signal(getattr(signal, sig))
    proc.communicate(timeout=60)
    assert proc.returncode == (0 if sig == "SIGINT" else -signal.SIGKILL)
    assert len([r for r in read_metrics(tmp_path / "cut") if r["split"] == "train"]) < 40  # cut before the end
    resumed = start_train(cfg, tmp_path / "cut", "--resume", tmp_path / "cut")
    assert resumed.communicate(timeout=300) and resumed.returncode == 0
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [(r["step"], r["split"]) for r in cut] == [(r["step"], r["split"]) for r in full]
    assert [r["loss"] for r in cut] == pytest.approx([r["loss"] for r in full], rel=1e-5)
    scored = [[r["bleu"] for r in records if "bleu" in r] for records in (full, cut)]
    assert len(scored[0]) == 4 and scored[1] == pytest.approx(scored[0], rel=1e-5)


def test_graft_compare_resamples_bleu_from_each_examples_output(word_tokenizer, tmp_path):
    """Per-example records keep each output and its reference; graft compare's BLEU of them is the run's test BLEU,
    and two runs differ by a paired bootstrap."""
    import sacrebleu

    write_pairs(tmp_path / "p.jsonl", n=40)
    for name, steps in (("long", 150), ("short", 20)):
        c = conf(family("t5", word_tokenizer), tmp_path / "p.jsonl", max_steps=steps)
        c["data"].update(test_fraction=0.25, val_fraction=0.25)
        train(load_config(c, where="c.toml"), tmp_path / name, echo=lambda m: None)
    records = [json.loads(x) for x in (tmp_path / "long" / "predictions" / "test.jsonl").read_text().splitlines()]
    pairs = [p for r in records for p in r["sums"]["generated"]]
    summary = json.loads((tmp_path / "long" / "summary.json").read_text())
    assert len(records) == 10 and summary["test"]["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu([h for h, _ in pairs], [[t for _, t in pairs]]).score)
    code, out = cli_run("compare", tmp_path / "long", tmp_path / "short", "--json", "--resamples", "200",
                        "--out", tmp_path / "rep")
    assert code == 0, out
    report = json.loads(out[out.index("{"):])
    base, other = report["rows"]
    assert report["metric"] == "bleu" and base["pooled"]["value"] == pytest.approx(summary["test"]["bleu"])
    vs = other["vs_baseline"]
    short = json.loads((tmp_path / "short" / "summary.json").read_text())["test"]["bleu"]
    assert vs["test"] == "paired bootstrap" and vs["ci"][0] <= vs["difference"] <= vs["ci"][1]
    assert vs["difference"] == pytest.approx(short - summary["test"]["bleu"]) and vs["difference"] != 0
