"""Preference tuning (issue 32): the preferences source, the losses against their formulas, the reference as a
cache, a copy or the adapter switched off, and the loop's guarantees (accumulation, resume, processes)."""

import json
import math

import pytest
import torch

from conftest import (assert_resume_from_step_reproduces, assert_same_weights, graft, one_step_weights, weights,
                      write_config)
from test_instructions import decoder  # noqa: F401 - the module's tiny pretrained GPT-2 fixture


def write_preferences(path, n=24, unpaired=False):
    rows = []
    for i in range(n):
        prompt, good, bad = f"say number {i % 9}", f"the film number {i % 9} was good", f"number {(i + 1) % 9}"
        if unpaired:
            rows.append({"prompt": prompt, "completion": good if i % 2 else bad, "label": bool(i % 2)})
        else:
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pref_config(decoder, path, strategy=None, **train):
    return {"backbone": {"plugin": "hf", "weights": str(decoder)},
            "strategy": {"plugin": "preference", **(strategy or {})},
            "data": {"plugin": "preferences", "path": str(path), "max_length": 48},
            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "progress": False, "plot": False, **train}}


def test_each_loss_is_its_formula():
    from graft.plugins.preference import PreferenceOptions, kto_losses, preference_losses

    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])  # policy sums
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])  # reference sums
    nc, nr = torch.tensor([3.0, 5.0]), torch.tensor([4.0, 2.0])  # response lengths
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for i in range(2):
        x = 0.1 * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        dpo = preference_losses(PreferenceOptions(loss="dpo", label_smoothing=0.2), pc, pr, nc, nr, rc, rr)[0]
        assert dpo[i].item() == pytest.approx(-0.8 * math.log(sig(x)) - 0.2 * math.log(sig(-x)), rel=1e-6)
        h = ((pc[i] - rc[i]) / nc[i] - (pr[i] - rr[i]) / nr[i]).item()
        ipo = preference_losses(PreferenceOptions(loss="ipo", beta=0.5), pc, pr, nc, nr, rc, rr)[0]
        assert ipo[i].item() == pytest.approx((h - 1 / (2 * 0.5)) ** 2, rel=1e-6)
        mc, mr = (pc[i] / nc[i]).item(), (pr[i] / nr[i]).item()
        simpo = preference_losses(PreferenceOptions(loss="simpo", gamma=0.3), pc, pr, nc, nr)[0]
        assert simpo[i].item() == pytest.approx(-math.log(sig(2.0 * (mc - mr) - 0.3)), rel=1e-6)
        nll = torch.tensor([0.7, 1.1])
        odds = (mc - mr) - (math.log(1 - math.exp(mc)) - math.log(1 - math.exp(mr)))
        orpo = preference_losses(PreferenceOptions(loss="orpo", beta=0.25), pc, pr, nc, nr, nll=nll)[0]
        assert orpo[i].item() == pytest.approx(nll[i].item() - 0.25 * math.log(sig(odds)), rel=1e-6)
    logps, ref = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-3.5, -4.0, -2.5])
    desirable = torch.tensor([True, False, True])
    r = (logps - ref).tolist()
    z = max(0.0, sum(r) / 3)
    kto = kto_losses(PreferenceOptions(loss="kto", desirable_weight=1.0, undesirable_weight=2.0), logps, ref,
                     desirable)[0]
    expected = [1 - sig(0.1 * (r[0] - z)), 2 * (1 - sig(0.1 * (z - r[1]))), 1 - sig(0.1 * (r[2] - z))]
    assert kto.tolist() == pytest.approx(expected, rel=1e-6)


def test_the_cached_reference_gives_the_live_references_loss(decoder, tmp_path):
    import graft as g

    path = write_preferences(tmp_path / "p.jsonl")
    losses = {}
    for mode in ("copy", "cache"):
        conf = pref_config(decoder, path, {"reference": mode, "cache_dir": str(tmp_path / "cache")})
        conf["data"]["max_length"] = 40
        run = g.Run(g.load_config(conf))
        batch = next(iter(run.loader("train", train=True)))
        run.model.train()
        losses[mode] = run.strategy.training_step(run.model, batch)["loss"]
        assert run.strategy.reference_logps(run.model, batch).shape == (8,)
    assert float(losses["copy"].detach()) == pytest.approx(float(losses["cache"].detach()), rel=1e-5)
    assert len(list((tmp_path / "cache" / "reference").glob("*.safetensors"))) == 1
    conf = pref_config(decoder, path, {"reference": "cache", "cache_dir": str(tmp_path / "cache")})
    same = pref_config(decoder, path, {"reference": "cache", "cache_dir": str(tmp_path / "cache")})
    before = g.Run(g.load_config(same)).strategy.cache_file()
    assert g.Run(g.load_config(conf)).strategy.cache_file() == before
    path.write_text(path.read_text().replace("number 3 was good", "number 3 was fine", 1))  # same rows, one edited
    assert g.Run(g.load_config(same)).strategy.cache_file() != before


def test_the_adapter_off_reference_is_the_base_model(decoder, tmp_path):
    import graft as g

    conf = pref_config(decoder, write_preferences(tmp_path / "p.jsonl"), {"reference": "adapter"})
    conf["adapter"] = {"plugin": "lora", "r": 4, "target_modules": ["c_attn"]}
    run = g.Run(g.load_config(conf))
    with torch.no_grad():  # a trained adapter: its B matrices no longer zero
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = next(iter(run.loader("train", train=True)))
    base = g.Run(g.load_config(pref_config(decoder, tmp_path / "p.jsonl", {"reference": "copy"})))
    base.model.eval()
    with torch.no_grad():
        expected = base.strategy._logps(base.model, batch)[0]
        adapted = run.strategy._logps(run.model.eval(), batch)[0]
    torch.testing.assert_close(run.strategy.reference_logps(run.model, batch), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, expected, atol=1e-3)  # the adapter is on again afterwards
    torch.testing.assert_close(run.strategy._logps(run.model, batch)[0], adapted)


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_batch_4_equals_batch_2_times_accumulation_2(decoder, tmp_path, loss):
    path = write_preferences(tmp_path / "p.jsonl")

    def make(batch, accum):
        return pref_config(decoder, path, {"loss": loss, "reference": "copy"}, max_steps=2, batch_size=batch,
                           grad_accum=accum, optimizer="sgd", lr=0.5)

    big, small, half = one_step_weights(make, tmp_path, (4, 1), (2, 2), (2, 1))
    assert_same_weights(big, small, atol=1e-5)
    with pytest.raises(AssertionError):
        assert_same_weights(big, half, atol=1e-6)


def test_resume_is_exact_with_the_cached_reference(decoder, tmp_path):
    import graft as g

    conf = pref_config(decoder, write_preferences(tmp_path / "p.jsonl"),
                       {"reference": "cache", "cache_dir": str(tmp_path / "cache"), "rouge_examples": 2,
                        "max_new_tokens": 8}, max_steps=5, checkpoint_every=1, keep_checkpoints=10, eval_every=5)
    assert_resume_from_step_reproduces(g.load_config(conf), tmp_path, step=2)
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert {"reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected", "rougeL"} <= set(summary["val"])
    assert 0 <= summary["val"]["rougeL"] <= 1
    assert summary["reference"] == "cache" and (tmp_path / "full" / "lm" / "config.json").is_file()


def test_kto_trains_on_unpaired_rows(decoder, tmp_path):
    import graft as g

    conf = pref_config(decoder, write_preferences(tmp_path / "k.jsonl", unpaired=True),
                       {"loss": "kto", "reference": "copy"})
    summary = g.train(g.load_config(conf), tmp_path / "run", echo=lambda m: None)
    assert summary["metric"] == "reward_margin" and "desirable_reward" in summary["val"]


def test_two_processes_train_like_one(decoder, tmp_path):
    path = write_preferences(tmp_path / "p.jsonl")

    def make(batch, accum):
        return pref_config(decoder, path, {"reference": "copy"}, max_steps=2, batch_size=batch, grad_accum=accum,
                           optimizer="sgd", lr=0.5)

    big, = one_step_weights(make, tmp_path, (4, 1))
    two = graft("train", write_config(tmp_path / "c.toml", make(2, 1)), "--nproc", "2", "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    assert_same_weights(big, weights(tmp_path / "two"), atol=1e-5)


def test_bad_preference_rows_exit_2_naming_file_and_line(decoder, tmp_path):
    path = write_preferences(tmp_path / "p.jsonl", n=6)
    lines = path.read_text().splitlines()
    lines[3] = json.dumps({"prompt": "say number 1", "chosen": "the film"})
    path.write_text("\n".join(lines) + "\n")
    r = graft("train", write_config(tmp_path / "c.toml", pref_config(decoder, path)), "--out", tmp_path / "run")
    assert r.returncode == 2 and f"{path}:4: no 'rejected' field" in r.stderr and "Traceback" not in r.stderr, r.stderr
    conf = pref_config(decoder, write_preferences(tmp_path / "q.jsonl"), {"loss": "kto"})
    r = graft("train", write_config(tmp_path / "d.toml", conf), "--out", tmp_path / "run2")
    assert r.returncode == 2 and "needs unpaired preference data" in r.stderr, r.stderr


def test_long_prompts_are_cut_before_responses_and_counted(decoder, tmp_path):
    import graft as g

    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "say " * 60 + "number 1", "chosen": "the film number 1 was good", "rejected": "number 2"},
            {"prompt": "say number 2", "chosen": "the film was good " * 30, "rejected": "number 3"},
            {"prompt": [{"role": "user", "content": "say number 3"}, {"role": "assistant", "content": "number 3"},
                        {"role": "user", "content": "again"}],
             "chosen": [{"role": "assistant", "content": "the film number 3"}], "rejected": "number"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    conf = pref_config(decoder, path)
    conf["data"].update(val_fraction=0.0, max_length=80)
    with pytest.warns(UserWarning, match="1 response"):
        run = g.Run(g.load_config(conf))
    assert run.data.report()["truncated_responses"] == 1 and run.data.report()["truncated_prompts"] == 2  # rows
    tok = run.backbone.tokenizer()
    for e in run.data.dataset("train"):
        for ids, labels in ((e[0], e[1]), (e[2], e[3])):
            assert len(ids) <= 80 and (labels != -100).any()
    for e in run.data.dataset("train"):  # chosen and rejected answer the same (cut) prompt
        first = [int((labels != -100).nonzero()[0][0]) for labels in (e[1], e[3])]
        assert e[0][:first[0]].tolist() == e[2][:first[1]].tolist()
    third = [e for e in run.data.dataset("train") if "again" in tok.decode(e[0])][0]
    assert tok.decode(third[0][third[1] != -100]).strip().startswith("the film number 3")  # not the earlier turn


def test_the_dpo_loss_and_gradients_equal_trls(decoder, tmp_path):
    """TRL's DPOTrainer (the reference implementation, a test-only dependency) on the same model, reference and
    batch: the same loss and the same gradient of every parameter. (TRL 1.x keeps label smoothing for its robust and
    EXO losses only; the conservative variant is checked against its formula above.)"""
    import copy

    import graft as g

    trl = pytest.importorskip("trl")
    from datasets import Dataset

    path = write_preferences(tmp_path / "p.jsonl")
    run = g.Run(g.load_config(pref_config(decoder, path, {"reference": "copy"})))
    with torch.no_grad():  # a policy that has moved away from its reference: the loss is not log 2
        for p in run.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch = next(iter(run.loader("train", train=True)))
    policy = copy.deepcopy(run.model)
    run.model.train()
    ours = run.strategy.training_step(run.model, batch)["loss"]
    ours.backward()
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, report_to=[],
                         per_device_train_batch_size=4, use_cpu=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    trainer = trl.DPOTrainer(model=policy, ref_model=copy.deepcopy(run.strategy.reference), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=run.backbone.tokenizer())
    trainer.model.train()
    inputs = {"input_ids": batch["inputs"]["input_ids"], "attention_mask": batch["inputs"]["attention_mask"],
              "completion_mask": (batch["targets"] != -100).long()}
    theirs = trainer._compute_loss(trainer.model, inputs, False)
    theirs.backward()
    assert abs(float(ours.detach()) - 0.6931) > 1e-3
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), abs=1e-5)
    for (name, a), b in zip(run.model.named_parameters(), policy.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-5, msg=name)


def test_generate_a_file_of_prompts_seeded_and_as_spin_pairs(decoder, tmp_path):
    from test_instructions import sft_config, write_pairs

    from graft import load_config, train

    data = write_pairs(tmp_path / "sft.jsonl", n=20)
    train(load_config(sft_config(decoder, data, max_steps=3, eval_at_start=False)), tmp_path / "sft",
          echo=lambda m: None)
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        r = graft("generate", tmp_path / "sft", "--file", data, "--out", tmp_path / f"{name}.jsonl", "--temperature",
                  "1.0", "--seed", seed, "--batch-size", "8", "--max-new-tokens", "6")
        assert r.returncode == 0, r.stderr
        runs.append([json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()])
    assert len(runs[0]) == 20 and all("answer" in row and "response" in row for row in runs[0])
    assert runs[0] == runs[1] and runs[0] != runs[2]  # seeded sampling
    r = graft("generate", tmp_path / "sft", "--file", data, "--chosen", "response", "--max-new-tokens", "6",
              "--temperature", "1.0")
    pairs = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 0 and set(pairs[0]) == {"prompt", "chosen", "rejected"}, r.stderr
    assert all(p["rejected"] == p["rejected"].strip() != "" and p["rejected"] != p["chosen"] for p in pairs)
    r = graft("generate", tmp_path / "sft", "--file", data, "--chosen", "reply")
    assert r.returncode == 2 and "row 1 has no 'reply' field" in r.stderr, r.stderr


def test_a_pipeline_makes_spin_pairs_and_tunes_on_them(decoder, tmp_path):
    from test_instructions import write_pairs

    write_pairs(tmp_path / "sft.jsonl", n=20)
    (tmp_path / "p.toml").write_text(f"""
[pipeline]
out = "{tmp_path / 'runs'}"

[[stage]]
name = "sft"
backbone = {{ plugin = "hf", weights = "{decoder}" }}
strategy = {{ plugin = "clm" }}
data = {{ plugin = "instructions", path = "{tmp_path / 'sft.jsonl'}", max_length = 64 }}
train = {{ max_steps = 3, batch_size = 8, lr = 3e-3, progress = false, plot = false }}

[[stage]]
name = "pairs"
generate = "@sft"
file = "sft.jsonl"   # beside the pipeline file
chosen = "response"
max_new_tokens = 6
temperature = 1.0

[[stage]]
name = "dpo"
backbone = {{ plugin = "hf", weights = "@sft/lm" }}
strategy = {{ plugin = "preference", loss = "dpo" }}
adapter = {{ plugin = "lora", r = 4, target_modules = ["c_attn"] }}
data = {{ plugin = "preferences", path = "@pairs/pairs.jsonl", max_length = 64 }}
train = {{ max_steps = 3, batch_size = 4, lr = 1e-2, progress = false, plot = false }}
""")
    r = graft("pipeline", tmp_path / "p.toml")
    assert r.returncode == 0, r.stderr + r.stdout
    pairs = (tmp_path / "runs" / "pairs" / "pairs.jsonl").read_text().splitlines()
    made = json.loads((tmp_path / "runs" / "pairs" / "summary.json").read_text())
    assert len(pairs) == made["rows"] and made["rows"] + made["left_out"] == 20 and made["rows"] >= 10
    summary = json.loads((tmp_path / "runs" / "dpo" / "summary.json").read_text())
    assert summary["reference"] == "adapter" and "reward_accuracy" in summary["val"]
    again = graft("pipeline", tmp_path / "p.toml")
    assert again.returncode == 0 and again.stdout.count("up to date") == 3, again.stdout


def test_a_preference_run_answers_with_graft_generate_as_its_lm_folder_does(decoder, tmp_path):
    """After DPO with LoRA the run is used like an SFT run: graft generate (one prompt or a file) wraps the prompt in
    the data's template with its system message, and RUN/lm (the adapter merged) gives the same greedy answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graft import load_config, train
    from graft.data import ChatRenderer

    conf = pref_config(decoder, write_preferences(tmp_path / "p.jsonl"), max_steps=12)
    conf["data"].update(system="Answer briefly.", max_length=96)
    conf["adapter"] = {"plugin": "lora", "r": 4, "target_modules": ["c_attn"]}
    train(load_config(conf), tmp_path / "run", echo=lambda m: None)
    r = graft("generate", tmp_path / "run", "say number 3", "--max-new-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout.splitlines()[-1])["text"]
    (tmp_path / "q.txt").write_text("say number 3\n")
    r = graft("generate", tmp_path / "run", "--file", tmp_path / "q.txt", "--max-new-tokens", "6")
    assert r.returncode == 0 and json.loads(r.stdout)["answer"] == answer, r.stderr + r.stdout
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "lm")
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "lm").eval()
    text, special, lead = ChatRenderer(tok, "auto", "test").prompt_text("say number 3", "Answer briefly.")
    assert "Answer briefly." in text
    ids = tok(text, return_tensors="pt", add_special_tokens=special)["input_ids"]
    with torch.no_grad():
        out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          pad_token_id=tok.eos_token_id)
    theirs = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert answer.strip() and (theirs.startswith(lead + answer) or (lead + answer).startswith(theirs)), (theirs, answer)


def test_a_preference_run_teaches_a_clm_student(decoder, tmp_path):
    """The pipeline's last step: token-level KD from the preference-tuned model (its tokenizer, its LM)."""
    from test_instructions import sft_config, write_pairs

    from graft import load_config, train

    train(load_config(pref_config(decoder, write_preferences(tmp_path / "p.jsonl"), max_steps=2)), tmp_path / "dpo",
          echo=lambda m: None)
    conf = sft_config(decoder, write_pairs(tmp_path / "sft.jsonl", n=20), max_steps=2, eval_at_start=False)
    conf["strategy"]["teacher"] = str(tmp_path / "dpo")
    conf["loss"] = {"plugin": "kd", "alpha": 0.5, "temperature": 2.0}
    summary = train(load_config(conf), tmp_path / "student", echo=lambda m: None)
    assert summary["steps"] == 2 and math.isfinite(summary["val"]["loss"])


@pytest.mark.parametrize("sig", ["SIGKILL", pytest.param("SIGINT", marks=pytest.mark.slow)])
def test_dpo_with_a_cached_reference_cut_by_a_signal_resumes_like_an_uninterrupted_run(decoder, tmp_path, sig):
    """The reference cache (built before the first step, shared by both runs) and the pairs' order through the
    CLI's stop paths."""
    from conftest import assert_signal_resume, write_config

    conf = pref_config(decoder, write_preferences(tmp_path / "p.jsonl", n=40), {"reference": "cache",
                                                                                 "cache_dir": str(tmp_path / "c")},
                       max_steps=16, log_every=1, checkpoint_every=2, eval_every=8)
    assert_signal_resume(write_config(tmp_path / "c.toml", conf), tmp_path, sig, steps=16, lines=6)
