"""Instruction tuning (issue 15): the instructions source (prompt/response pairs and chats, plain and chat
templates, the loss on response tokens only, truncation), SFT accumulation equivalence with micro-batches of
different numbers of target tokens, ROUGE-L at evaluation, and graft generate in the run's template."""

import json
import re

import pytest

from conftest import assert_same_weights, one_step_weights, read_metrics
from test_clm import NO_DROPOUT
from test_user_files import assert_bad_input, build, cli_run
from graft import load_config
from graft import train

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """A tiny GPT-2 pretrained for a few steps from scratch (byte-level BPE trained on its corpus): a local model
    folder with a tokenizer, as a real pretrained decoder would be."""
    tmp = tmp_path_factory.mktemp("decoder")
    corpus = tmp / "c.txt"
    corpus.write_text("".join(f"say number {i % 9} and the film number {i % 9} was good\n" for i in range(300)))
    conf = {"backbone": {"plugin": "hf", "config": {"model_type": "gpt2", "vocab_size": 300, "n_embd": 32,
                                                    "n_layer": 2, "n_head": 2, "n_positions": 96, **NO_DROPOUT}},
            "strategy": {"plugin": "clm"},
            "data": {"plugin": "corpus", "path": str(corpus), "block_size": 32},
            "train": {"max_steps": 2, "batch_size": 8, "progress": False, "plot": False}}
    train(load_config(conf, where="c.toml"), tmp / "pre", echo=lambda m: None)
    return tmp / "pre"


def write_pairs(path, n=40, long_prompt=False):
    rows = [{"prompt": ("tell me " * 60 if long_prompt and i % 2 else "") + f"say number {i % 9}",
             "response": f"the film number {i % 9}" + " was good" * (i % 3)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_config(decoder, path, **train_options):
    return {"backbone": {"plugin": "hf", "weights": str(decoder)},
            "strategy": {"plugin": "clm"},
            "data": {"plugin": "instructions", "path": str(path), "max_length": 64},
            "train": {"max_steps": 30, "batch_size": 8, "lr": 3e-3, "eval_every": 30, "eval_at_start": True,
                      "progress": False, "plot": False, **train_options}}


def test_byte_level_bpe_for_a_decoder_from_scratch(decoder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(decoder / "lm")
    assert type(tok.backend_tokenizer.model).__name__ == "BPE"
    text = "Zürich — naïve 東京 🙂"  # never in the corpus: every byte is a token, nothing is unknown
    assert tok.decode(tok(text)["input_ids"]) == text
    config = json.loads((decoder / "lm" / "config.json").read_text())
    assert config["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")


def test_targets_are_the_response_tokens_only(decoder, tmp_path):
    path = write_pairs(tmp_path / "i.jsonl")
    _, data = build(sft_config(decoder, path))
    tok = data.tokenizer
    for ids, labels in data.dataset("train"):
        target = [int(t) for t in labels if t != -100]
        assert tok.decode(target).startswith("the film number") and tok.decode(target).endswith("<|endoftext|>\n\n")
        first = next(i for i, t in enumerate(labels) if t != -100)
        prompt = tok.decode(ids[:first].tolist())
        assert prompt.startswith("### User:\nsay number") and prompt.endswith("### Assistant:\n")
        assert ids[first:].tolist() == target  # everything after the prompt is learned, nothing before


def test_chat_template_and_multi_turn_messages(decoder, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(decoder / "lm")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(tmp_path / "tok")
    chat = [{"role": "user", "content": "say number 1"}, {"role": "assistant", "content": "the film number 1"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "number 1 was good"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"messages": chat}) for _ in range(4)))
    conf = sft_config(decoder, tmp_path / "c.jsonl")
    conf["backbone"] = {"plugin": "hf", "config": {"model_type": "gpt2", "vocab_size": 320, "n_embd": 16,
                                                   "n_layer": 1, "n_head": 2, "n_positions": 256},
                        "tokenizer": str(tmp_path / "tok")}
    conf["data"].update(system="be brief", val_fraction=0.0, max_length=256)
    _, data = build(conf)
    ids, labels = data.dataset("train")[0]
    learned = tok.decode([int(t) for t in labels if t != -100])
    assert learned == "the film number 1<|im_end|>\nnumber 1 was good<|im_end|>\n"  # both assistant turns
    assert tok.decode(ids.tolist()).startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nsay number 1")
    conf["data"]["template"] = "plain"
    assert tok.decode(build(conf)[1].dataset("train")[0][0].tolist()).startswith("### System:\nbe brief\n\n### User:\n")


def test_long_prompts_are_cut_and_responses_kept(decoder, tmp_path):
    path = write_pairs(tmp_path / "i.jsonl", long_prompt=True)
    _, data = build(sft_config(decoder, path))
    tok = data.tokenizer
    assert data.report()["truncated_examples"] > 10 and data.report()["dropped_examples"] == 0
    for ids, labels in data.dataset("train"):
        assert len(ids) <= 64
        assert tok.decode([int(t) for t in labels if t != -100]).startswith("the film number")


def test_sft_lowers_the_response_loss_reports_rouge_and_generates_in_its_template(decoder, tmp_path):
    path = write_pairs(tmp_path / "i.jsonl", n=80)
    conf = sft_config(decoder, path, max_steps=80, eval_every=80)
    conf["strategy"].update(rouge_examples=4, max_new_tokens=8)
    train(load_config(conf, where="s.toml"), tmp_path / "run", echo=lambda m: None)
    val = [r for r in read_metrics(tmp_path / "run") if r["split"] == "val"]
    assert val[-1]["loss"] < val[0]["loss"] / 2, val
    assert val[-1]["rougeL"] > val[0]["rougeL"] and val[-1]["rougeL"] >= 0.5, val
    code, out = cli_run("generate", tmp_path / "run", "say number 4", "--max-new-tokens", "6", "--json")
    assert code == 0, out
    assert json.loads(out.splitlines()[-1])["text"].startswith("the film number")


def test_sft_accumulation_matches_the_large_batch(decoder, tmp_path):
    """Responses of 4 to 8 tokens: the micro-batches hold different numbers of targets, and each token weighs the
    same in batch 6 as in batch 3 x accumulation 2 (a mean per micro-batch would not)."""
    path = write_pairs(tmp_path / "i.jsonl", n=12)

    def conf(batch, accum):
        c = sft_config(decoder, path, max_steps=1, batch_size=batch, grad_accum=accum, optimizer="sgd", lr=0.5,
                       eval_at_start=False)
        c["data"]["val_fraction"] = 0.0
        return c

    _, data = build(conf(6, 1))
    counts = [int((data.dataset("train")[i][1] != -100).sum()) for i in range(6)]
    assert len(set(counts)) > 1, counts
    big, acc, half = one_step_weights(conf, tmp_path, (6, 1), (3, 2), (3, 1))
    assert_same_weights(big, acc, atol=1e-6)
    with pytest.raises(AssertionError):
        assert_same_weights(big, half, atol=1e-6)


def test_the_output_layer_runs_only_at_response_tokens_with_the_same_loss_and_gradients(decoder, tmp_path,
                                                                                        monkeypatch):
    """clm asks transformers for logits at the target positions only (logits_to_keep as a mask): the loss and every
    gradient equal those of the full output layer, which saw every position."""
    import torch

    from graft import Run

    run = Run(load_config(sft_config(decoder, write_pairs(tmp_path / "i.jsonl", n=16)), where="s.toml"))
    batch = next(iter(run.loader("train", True)))
    model = run.model.train()
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape[:-1].numel()))

    def loss_and_grads():
        model.zero_grad()
        loss = run.strategy.training_step(model, batch)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    masked, masked_grads = loss_and_grads()
    monkeypatch.setattr(type(run.strategy), "sliced_logits", False)
    full, full_grads = loss_and_grads()
    targets = int((batch["targets"][:, 1:] != -100).sum())
    assert rows == [targets, batch["targets"].numel()], rows
    torch.testing.assert_close(masked, full)
    assert masked_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(masked_grads[name], full_grads[name], msg=name)

    class PluginModel(torch.nn.Module):  # a TaskModel of the documented (input_ids, attention_mask) kind
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask)

    monkeypatch.undo()
    keep = batch["targets"][:, 1:] != -100
    torch.testing.assert_close(run.strategy.response_logits(PluginModel(model), batch, keep),
                               run.strategy.response_logits(model, batch, keep))


@pytest.mark.parametrize("line, needle", [
    ("not json", "not valid JSON"),
    ('{"question": "a", "answer": "b"}', "found fields ['answer', 'question']"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "'messages' must be a list"),
    ('{"prompt": "a", "response": "  "}', "no assistant message with text"),
])
def test_bad_instruction_files(decoder, tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n' + line + "\n")
    cfg = tmp_path / "c.toml"
    from conftest import write_config

    write_config(cfg, sft_config(decoder, path, max_steps=1))
    assert_bad_input(*cli_run("train", cfg, "--out", tmp_path / "run"), needle, f"{path}:2")


def test_instructions_need_a_tokenizer_and_a_chat_template_when_asked(decoder, tmp_path):
    path = write_pairs(tmp_path / "i.jsonl")
    conf = sft_config(decoder, path)
    conf["data"]["template"] = "chat"
    with pytest.raises(Exception, match="no chat template"):
        build(conf)
    conf["backbone"] = {"plugin": "hf", "config": {"model_type": "gpt2", "vocab_size": 50, "n_embd": 16,
                                                   "n_layer": 1, "n_head": 2}}
    with pytest.raises(Exception, match="has no tokenizer"):
        build(conf)


def test_sft_two_processes_match_one(decoder, tmp_path):
    """Each process holds other responses (other numbers of targets): the step divides by the targets of both,
    so 2 processes with batch 4 end where 1 process with batch 8 does."""
    from conftest import assert_same_weights, write_config
    from test_ddp import one_vs_two

    conf = sft_config(decoder, write_pairs(tmp_path / "i.jsonl", n=40), max_steps=4, optimizer="sgd", lr=0.5,
                      eval_at_start=False, grad_accum=2)
    one, two = one_vs_two(tmp_path, conf, batch=4)
    assert_same_weights(one, two, atol=1e-5)


def test_sft_interrupted_and_resumed_reproduces_the_run(decoder, tmp_path):
    from conftest import assert_same_records, assert_same_weights, interrupted_and_resumed, weights, write_config

    conf = sft_config(decoder, write_pairs(tmp_path / "i.jsonl", n=80), max_steps=30, eval_every=10,
                      eval_at_start=False, log_every=1)
    interrupted_and_resumed(write_config(tmp_path / "c.toml", conf), tmp_path, lines=12)
    assert_same_records(read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut"))
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"), atol=1e-6)


# -- issue 25: the first word of a response, where generation stops, chats that open with the assistant ------------

ALPACA = ("{% for m in messages %}{% if m['role'] == 'assistant' %}### Response: {{ m['content'] }}{{ eos_token }}\n"
          "{% else %}### Instruction: {{ m['content'] }}\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}### Response: {% endif %}")  # the generation prompt ends in a space
LLAMA3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
          "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}")
GEMMA = ("{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
         "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
               "{% if add_generation_prompt %}assistant: {% endif %}")  # Llama-2 / Mistral style
PAIRS = [("name a city", "Paris is a city"), ("name a fruit", "Apples are fruit"), ("say hello", "Hello there"),
         ("count to two", "One two")]


def tokenizer_of_kind(kind, texts):
    """A fast tokenizer trained offline on ``texts``: byte-level BPE (GPT-2's, and graft's own for a decoder from
    scratch), WordPiece (BERT's, lower-cased, spaces in no token) or SentencePiece-style BPE (Llama's: a space is
    the "▁" that starts the next word)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from graft.plugins.corpus import train_bpe, train_wordpiece

    if kind == "bpe":
        return train_bpe(texts, 400)
    if kind == "wordpiece":
        tok = train_wordpiece(texts, 200)
        tok.add_special_tokens({"eos_token": "[SEP]"})
        return tok
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.normalizer = normalizers.NFKC()
    sp.pre_tokenizer, sp.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    sp.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                      show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def chat_config(tokenizer_dir, path, **data):
    """A random-init GPT-2 with the tokenizer in ``tokenizer_dir`` (its vocabulary fits 420 ids)."""
    return {"backbone": {"plugin": "hf", "config": {"model_type": "gpt2", "vocab_size": 420, "n_embd": 32,
                                                    "n_layer": 2, "n_head": 2, "n_positions": 96, **NO_DROPOUT},
                         "tokenizer": str(tokenizer_dir)},
            "strategy": {"plugin": "clm"},
            "data": {"plugin": "instructions", "path": str(path), "max_length": 64, "val_fraction": 0.0, **data},
            "train": {"max_steps": 1, "batch_size": 4, "progress": False, "plot": False}}


def chatml_tokenizer(decoder, folder):
    """The decoder's byte-level BPE with ChatML: <|im_start|> and <|im_end|> added as special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(decoder / "lm")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return tok


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "sentencepiece"])
def test_the_first_word_after_a_generation_prompt_ending_in_a_space_is_learned(kind, tmp_path):
    """Issue 25, item 4a (trl#1920, #2059, #1623): with "### Response: " + "Paris is a city", byte-level BPE and
    SentencePiece make one token " Paris" that begins on the template's space, before the response. The old code
    made targets only of tokens that start inside the response, so the first word was never learned (bpe, reported:
    the targets read ' is a city<|endoftext|>\\n'; sentencepiece likewise). WordPiece keeps spaces out of its tokens
    and passed before too. graft generate's prompt ends where training's context ends (without the space), so the
    model answers from the tokens it was trained on, and its answer comes without the template's space."""
    texts = [f"### Instruction: {p}\n### Response: {r}" for p, r in PAIRS] * 20
    tok = tokenizer_of_kind(kind, texts)
    tok.chat_template = ALPACA
    tok.save_pretrained(tmp_path / "tok")
    path = tmp_path / "i.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    _, data = build(chat_config(tmp_path / "tok", path))
    for (ids, labels), (prompt, response) in zip(data.dataset("train"), PAIRS):
        first = next(i for i, t in enumerate(labels) if t != -100)
        learned = tok.decode([int(t) for t in labels[first:]])
        assert learned.strip().lower().startswith(response.lower()), (kind, learned)
        assert (labels[first:] == ids[first:]).all()  # the response, its EOS and the newline after: nothing skipped
        text, special, lead = data.prompt_text(tok, prompt)
        assert text.endswith("### Response:") and lead == " "
        assert tok(text, add_special_tokens=special)["input_ids"] == ids[:first].tolist()


@pytest.mark.parametrize("template, marker", [(CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>"),
                                              (GEMMA, "<end_of_turn>"), (ALPACA, None), (None, None)])
def test_generation_stops_at_the_templates_end_of_turn_token(decoder, template, marker):
    """The ids that stop generation: the tokenizer's EOS (which the plain template and ALPACA write after a
    response) and the special token a chat template closes an assistant turn with."""
    from transformers import AutoTokenizer

    from graft.plugins.instructions import Renderer

    tok = AutoTokenizer.from_pretrained(decoder / "lm")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                                                         "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>",
                                                         "<end_of_turn>"]})
    tok.chat_template = template
    stops = Renderer(tok, "auto", "w").stop_ids()
    assert stops == [tok.eos_token_id] + ([tok.convert_tokens_to_ids(marker)] if marker else [])


def test_a_chatml_run_stops_at_im_end_in_generate_and_rouge(decoder, tmp_path):
    """Issue 25, item 4b (trl#1920, #2059): a ChatML template on a base decoder. The model learns to write
    <|im_end|> after each answer, but the old code stopped only at <|endoftext|>: graft generate ran to the token
    limit ('the film number 6\\nthe film number number number number ...'), and ROUGE-L scored that tail (0.33).
    The template's end-of-turn token now stops both (0.75: this tiny model has not learned which number to say),
    in the saved run too, and lm/generation_config.json lists it for transformers' own generate."""
    tok = chatml_tokenizer(decoder, tmp_path / "tok")
    path = tmp_path / "i.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say number {i % 9}", "response": f"the film number {i % 9}"})
                            + "\n" for i in range(80)))
    conf = chat_config(tmp_path / "tok", path, val_fraction=0.1)
    conf["strategy"].update(rouge_examples=4, max_new_tokens=16)
    conf["train"].update(max_steps=80, batch_size=8, lr=3e-3, eval_every=80)
    train(load_config(conf, where="s.toml"), tmp_path / "run", echo=lambda m: None)
    assert read_metrics(tmp_path / "run")[-1]["rougeL"] >= 0.7
    code, out = cli_run("generate", tmp_path / "run", "say number 4", "--max-new-tokens", "16", "--json")
    assert code == 0, out
    assert re.fullmatch(r"the film number \d", json.loads(out.splitlines()[-1])["text"]), out
    saved = json.loads((tmp_path / "run" / "lm" / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in saved["eos_token_id"]


def test_an_end_of_turn_marker_that_is_no_token_is_warned_about(decoder, tmp_path):
    """ChatML on a tokenizer without <|im_end|> as a token: the model cannot learn one token that ends its answer,
    so nothing but EOS stops it -- said when the data is read, not found at generation."""
    from transformers import AutoTokenizer

    from graft import GraftWarning

    tok = AutoTokenizer.from_pretrained(decoder / "lm")
    tok.chat_template = CHATML
    tok.save_pretrained(tmp_path / "tok")
    conf = chat_config(tmp_path / "tok", write_pairs(tmp_path / "i.jsonl", n=4))
    with pytest.warns(GraftWarning, match="closes an assistant turn with '<\\|im_end\\|>\\\\n', which holds no spec"):
        build(conf)


def test_a_chat_that_opens_with_the_assistant(decoder, tmp_path):
    """Issue 25, item 5 (trl PR #6025): a chat whose first message is the assistant's greeting. The old code
    rendered the conversation before it -- no message -- through the chat template, and the run ended with exit 1:
    'ValueError: Cannot apply chat template to an empty conversation. Provide at least one message. (This looks
    like a bug ...)'. The opening turn answers nothing, so it is context (no target), with either template; a
    template that refuses the order of roles, or a chat with no reply after a user message, is bad input at its
    file and line."""
    from conftest import write_config

    tok = chatml_tokenizer(decoder, tmp_path / "tok")
    chat = [{"role": "assistant", "content": "hello, what number"}, {"role": "user", "content": "say number 1"},
            {"role": "assistant", "content": "the film number 1"}]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(4)))
    conf = chat_config(tmp_path / "tok", path)
    code, out = cli_run("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "run")
    assert code == 0, out
    ids, labels = build(conf)[1].dataset("train")[0]
    assert tok.decode([int(t) for t in labels if t != -100]) == "the film number 1<|im_end|>\n"
    assert tok.decode(ids.tolist()).startswith("<|im_start|>assistant\nhello, what number<|im_end|>")
    conf["data"]["template"] = "plain"
    ids, labels = build(conf)[1].dataset("train")[0]
    assert tok.decode([int(t) for t in labels if t != -100]) == "the film number 1<|endoftext|>\n\n"

    tok.chat_template = ALTERNATING
    tok.save_pretrained(tmp_path / "tok")
    conf["data"]["template"] = "auto"
    write_config(tmp_path / "c.toml", conf)
    assert_bad_input(*cli_run("train", tmp_path / "c.toml", "--out", tmp_path / "run2"), f"{path}:1",
                     "chat template cannot render", "roles must alternate")
    path.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"messages": chat[:1]}) + "\n")
    assert_bad_input(*cli_run("train", tmp_path / "c.toml", "--out", tmp_path / "run3"), f"{path}:2",
                     "no assistant message with text after a user message")


def test_a_run_on_a_template_ending_in_a_space_answers_with_its_first_word(tmp_path):
    """Issue 25, item 4a end to end (byte-level BPE): trained on "### Response: " + response, the old code never
    learned the first words and graft generate answered 'name a city' with ' two' and 'say hello' with ' there'.
    Now it answers with the whole response, without the template's space, streamed or not."""
    texts = [f"### Instruction: {p}\n### Response: {r}" for p, r in PAIRS] * 20
    tok = tokenizer_of_kind("bpe", texts)
    tok.chat_template = ALPACA
    tok.save_pretrained(tmp_path / "tok")
    path = tmp_path / "i.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS * 20))
    conf = chat_config(tmp_path / "tok", path)
    conf["train"].update(max_steps=150, batch_size=8, lr=3e-3)
    train(load_config(conf, where="s.toml"), tmp_path / "run", echo=lambda m: None)
    for prompt, response in PAIRS:
        code, out = cli_run("generate", tmp_path / "run", prompt, "--max-new-tokens", "12", "--json")
        assert code == 0 and json.loads(out.splitlines()[-1])["text"] == response, out
    assert cli_run("generate", tmp_path / "run", "say hello", "--max-new-tokens", "12") == (0, "Hello there\n")
