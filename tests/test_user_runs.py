"""Failure kinds reported against other toolkits (issue 12): resume in the middle of an accumulation window and
after the trainable set changed, damaged checkpoints, run directories that cannot be written or are in use,
foreign classifier heads, and whole-word masking with byte-level BPE and SentencePiece-style tokenizers."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (assert_same_records, assert_same_weights, graft, read_metrics, start_train, tiny_config,
                      wait_for_lines, weights, write_config)
from test_user_files import assert_bad_input, build, cli_run
from graft import checkpoint as ckpt
from graft import load_config
from graft import train


def test_resume_after_sigkill_inside_an_accumulation_window(tmp_path):
    tables = dict(train={"epochs": 2, "batch_size": 4, "grad_accum": 4, "checkpoint_every": 1, "log_every": 1},
                  strategy={"dropout": 0.1})
    cfg = write_config(tmp_path / "c.toml", tiny_config(**tables))
    graft("train", cfg, "--out", tmp_path / "full", check=True)
    proc = start_train(cfg, tmp_path / "cut")
    wait_for_lines(tmp_path / "cut", 25, proc)
    time.sleep(0.013)  # most of a step is inside its 4 micro-batches
    proc.kill()
    proc.communicate()
    graft("train", cfg, "--resume", tmp_path / "cut", check=True)
    assert_same_records(read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut"))
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"), atol=0)


def test_resume_after_gradual_unfreezing_changed_the_trainable_set(tmp_path):
    tables = dict(train={"epochs": 4, "batch_size": 16}, strategy={"unfreeze_every": 1})
    cfg = write_config(tmp_path / "c.toml", tiny_config(**tables))
    graft("train", cfg, "--out", tmp_path / "full", check=True)
    proc = start_train(cfg, tmp_path / "cut")
    wait_for_lines(tmp_path / "cut", 150, proc)  # past the first unfreeze (79 steps per epoch)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert "Interrupted at step" in err
    assert ckpt.load_checkpoint(ckpt.latest(tmp_path / "cut" / "checkpoints"))[1]["position"]["epoch"] >= 1
    resumed = graft("train", cfg, "--resume", tmp_path / "cut")
    assert resumed.returncode == 0 and "parameter group" not in resumed.stderr, resumed.stderr
    assert_same_records(read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut"))
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"), atol=1e-6)


def test_resume_from_a_truncated_latest_checkpoint_falls_back(tmp_path):
    conf = load_config(tiny_config(train={"epochs": 3, "batch_size": 64}), where="x")
    train(conf, tmp_path / "full", echo=lambda m: None)
    train(conf, tmp_path / "cut", echo=lambda m: None)
    latest = ckpt.latest(tmp_path / "cut" / "checkpoints")
    model = latest / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 3])
    said = []
    train(conf, tmp_path / "cut", resume=True, echo=said.append)
    assert any(f"checkpoint {latest.name} is damaged; resuming from step-" in m for m in said), said
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"), atol=0)


def test_a_damaged_checkpoint_is_set_aside_and_not_counted(tmp_path):
    """Issue 25 (from earlier notes): after the fallback, the old code left the damaged newer step directory among
    the checkpoints, where it counted against keep_checkpoints (a good one was deleted in its place) and stayed the
    newest one on disk."""
    conf = tiny_config(train={"epochs": 1, "checkpoint_every": 10, "keep_checkpoints": 2})
    train(load_config(conf, where="x"), tmp_path / "cut", echo=lambda m: None)
    directory = tmp_path / "cut" / "checkpoints"
    latest = ckpt.latest(directory)
    model = latest / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 3])
    conf["train"]["max_steps"] = int(latest.name.split("-")[1]) - 5  # the resumed run ends before that step
    said = []
    train(load_config(conf, where="x"), tmp_path / "cut", resume=True, echo=said.append)
    steps = sorted(p.name for p in directory.glob("step-*"))
    assert len(steps) == 2 and all(ckpt.load_checkpoint(directory / name) for name in steps), steps
    assert (directory / f"damaged-{latest.name}").is_dir() and ckpt.latest(directory).name == steps[-1]
    assert any(f"kept as {directory / ('damaged-' + latest.name)}" in m for m in said), said


def test_out_that_cannot_be_written_is_bad_input(tmp_path):
    cfg = write_config(tmp_path / "c.toml", tiny_config(train={"max_steps": 1}))
    (tmp_path / "a-file").write_text("x")
    assert_bad_input(*cli_run("train", cfg, "--out", tmp_path / "a-file" / "run"), "Cannot write the run directory",
                     "Choose another --out")
    if os.geteuid() != 0:  # root writes through permission bits
        (tmp_path / "ro").mkdir(mode=0o500)
        assert_bad_input(*cli_run("train", cfg, "--out", tmp_path / "ro" / "run"), "Cannot write the run directory")


def test_two_runs_on_one_out_the_second_refuses(tmp_path):
    cfg = write_config(tmp_path / "c.toml", tiny_config(train={"epochs": 3, "batch_size": 16}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "graft.cli", "train", str(cfg), "--out", str(tmp_path / "run")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "in use by another graft process" in refused or "already holds a run" in refused, refused
    assert "Traceback" not in refused
    assert (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_timm_checkpoint_with_another_number_of_classes(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=1000)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"imagenet{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    conf = tiny_config(backbone={"plugin": "timm", "model": "test_resnet", "weights": str(path)},
                       train={"max_steps": 1})
    with pytest.warns(UserWarning, match=r"loaded \d+ tensors; skipped 2, the file's classifier \(1000 classes\)"):
        backbone, _ = build(conf)
    trunk = backbone.timm_model.state_dict()
    assert all(torch.equal(trunk[k], state[k]) for k in trunk if not k.startswith("fc."))
    code, out = cli_run("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "run")
    assert code == 0, out
    assert sum("classifier (1000 classes)" in line for line in out.splitlines()) == 1


# -- whole-word masking with other tokenizer families -------------------------------------------------------
def bpe_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["<s>", "<pad>", "</s>",
                                                                                       "<unk>", "<mask>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")


def unigram_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "<unk>", "<cls>",
                                                                                         "<sep>", "<mask>"],
                                                           unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<cls> $A <sep>", special_tokens=[("<cls>", 2),
                                                                                                 ("<sep>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", cls_token="<cls>",
                                   sep_token="<sep>", mask_token="<mask>")


@pytest.mark.parametrize("family, marker", [("bpe", "\u0120"), ("unigram", "\u2581")])
def test_whole_word_masking_with_byte_level_bpe_and_unigram(family, marker):
    from graft.plugins.corpus import Corpus, CorpusOptions
    from graft.plugins.mlm import mask_tokens

    texts = [f"the unbelievably wonderful cinematography of film {i} overwhelmed everybody" for i in range(60)]
    tok = (bpe_tokenizer if family == "bpe" else unigram_tokenizer)(texts)
    pieces = tok.convert_ids_to_tokens(tok(texts[0])["input_ids"])
    assert any(p.startswith(marker) for p in pieces) and len(pieces) > len(texts[0].split()) + 2  # words split

    corpus = Corpus(CorpusOptions(path="-", block_size=24))
    corpus.special_ids = sorted(set(tok.all_special_ids))
    blocks = corpus._blocks(tok, texts)
    batch = corpus.collate(blocks)
    inputs, labels = mask_tokens(batch["inputs"]["input_ids"], batch["maskable"], tok.mask_token_id, len(tok),
                                 mlm_probability=0.3, word_ids=batch["word_ids"], generator=torch.Generator().manual_seed(0))
    chosen = labels != -100
    special = torch.isin(batch["inputs"]["input_ids"], torch.tensor(corpus.special_ids))
    assert chosen.any() and not (chosen & special).any()  # special tokens never
    words = batch["word_ids"]
    for row in range(words.shape[0]):
        for w in words[row].unique().tolist():
            if w < 0:
                continue
            in_word = words[row] == w
            assert chosen[row][in_word].all() or not chosen[row][in_word].any()  # all pieces of a word together
    multi = [(r, w) for r in range(words.shape[0]) for w in words[r].unique().tolist()
             if w >= 0 and (words[r] == w).sum() > 1 and chosen[r][words[r] == w].all()]
    assert multi  # the check above saw words of several pieces masked
