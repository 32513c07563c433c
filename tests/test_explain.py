"""graft explain (issue 33): attributions with Captum on tiny models whose answer depends on one known feature --
a bright block in one corner of an image, the one sentiment word of a review -- trained in the test."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import graft, reviews
from graft import load_config, load_run, train
from graft.explain import explain

pytest.importorskip("captum")

BLOCK = 8  # the top-left BLOCK x BLOCK pixels of a 32 x 32 image decide its class


def block_images(root, n=48, seed=0):
    """Grey noise around the normalisation's mean (the baseline); class "block" has a bright square in the top-left
    corner, class "plain" has none."""
    rng = np.random.default_rng(seed)
    for label in ("block", "plain"):
        (root / label).mkdir(parents=True)
        for i in range(n // 2):
            x = rng.uniform(70, 160, (32, 32)).astype(np.uint8)
            if label == "block":
                x[:BLOCK, :BLOCK] = 255
            Image.fromarray(x).convert("RGB").save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain-img")
    block_images(d / "images")
    conf = {"backbone": {"plugin": "timm", "model": "test_resnet", "model_kwargs": {"output_stride": 8}},
            "strategy": {"plugin": "finetune"},
            "data": {"plugin": "imagefolder", "path": str(d / "images"), "image_size": 32, "val_fraction": 0.1},
            "train": {"seed": 0, "epochs": 15, "batch_size": 8, "lr": 1e-2, "progress": False, "plot": False}}
    train(load_config(conf), d / "run", echo=lambda m: None)
    probe = d / "probe.png"
    x = np.random.default_rng(7).uniform(70, 160, (32, 32)).astype(np.uint8)
    x[:BLOCK, :BLOCK] = 255
    Image.fromarray(x).convert("RGB").save(probe)
    return d / "run", probe


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_bert):
    d = tmp_path_factory.mktemp("explain-text")
    conf = {"backbone": {"plugin": "hf", "weights": str(tiny_bert)}, "strategy": {"plugin": "finetune"},
            "data": {"plugin": "text", "path": str(reviews(d / "r.jsonl", n=160)), "max_length": 16},
            "train": {"seed": 0, "epochs": 8, "batch_size": 16, "lr": 3e-3, "progress": False, "plot": False}}
    train(load_config(conf), d / "run", echo=lambda m: None)
    return d / "run"


@pytest.mark.parametrize("method", ["integrated_gradients", "gradcam", "occlusion"])
def test_every_image_method_points_at_the_block_and_beats_random_order(image_run, method):
    run_dir, probe = image_run
    run = load_run(run_dir, for_prediction=True)
    [r] = explain(run, [str(probe)], method)
    assert r["predicted"] == "block" and r["probability"] > 0.9, r
    heat = r["heat"]
    y, x = divmod(int(heat.flatten().argmax()), heat.shape[1])
    assert y < BLOCK and x < BLOCK, (method, y, x)
    assert r["deletion_auc"] < r["deletion_auc_random"], r
    assert r["insertion_auc"] > r["insertion_auc_random"], r


def test_gradcam_takes_the_layer_it_is_given(image_run):
    run_dir, probe = image_run
    run = load_run(run_dir, for_prediction=True)
    [r] = explain(run, [str(probe)], "gradcam", layer="backbone.model.layer2")
    assert r["heat"].shape == (32, 32) and float(r["heat"].max()) > 0
    assert not torch.equal(r["heat"], explain(run, [str(probe)], "gradcam")[0]["heat"])


def test_integrated_gradients_sum_to_the_change_of_the_output(image_run, text_run):
    """Completeness (Sundararajan et al. 2017): sum of attributions = f(input) - f(baseline), up to the
    convergence delta Captum reports -- checked here against f computed directly."""
    run_dir, probe = image_run
    run = load_run(run_dir, for_prediction=True)
    [r] = explain(run, [str(probe)], "integrated_gradients", steps=200)
    x = run.data.encode(run.backbone, [str(probe)])
    t = run.data.label_names.index(r["target"])
    with torch.no_grad():
        f = [float(torch.softmax(run.model(v), 1)[0, t]) for v in (x, torch.zeros_like(x))]
    assert float(r["heat"].sum()) == pytest.approx(f[0] - f[1], abs=max(0.02, 2 * r["convergence_delta"]))
    assert r["convergence_delta"] < 0.05
    run = load_run(text_run, for_prediction=True)
    [r] = explain(run, ["the film was very good"], steps=200)
    assert r["convergence_delta"] < 0.05


def test_text_attributions_are_per_word_and_find_the_sentiment_word(text_run):
    run = load_run(text_run, for_prediction=True)
    for text, word in (("movie was very awful", "awful"), ("very nice film", "nice")):
        [r] = explain(run, [text])
        words = [w for w, _ in r["words"]]
        assert words == text.split()
        assert max(r["words"], key=lambda ws: ws[1])[0] == word, r["words"]
        assert r["deletion_auc"] < r["deletion_auc_random"] and r["insertion_auc"] > r["insertion_auc_random"], r
    # a word of several pieces: its attribution is the sum of its pieces'
    [r] = explain(run, ["very good-film"])  # BERT's pre-tokenizer: good - film, three pieces of one word
    pieces = [s for t, s in r["tokens"] if t not in ("[CLS]", "[SEP]")]
    assert len(pieces) == 4 and [w for w, _ in r["words"]] == ["very", "good-film"]
    assert r["words"][0][1] == pytest.approx(pieces[0], abs=1e-6)
    assert r["words"][1][1] == pytest.approx(sum(pieces[1:]), abs=1e-6)


def test_the_cli_writes_heatmaps_and_a_page_and_refuses_bad_input(image_run, text_run, tmp_path):
    run_dir, probe = image_run
    r = graft("explain", run_dir, probe, "--method", "gradcam", "--out", tmp_path / "e", "--json", "--sanity")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout.splitlines()[-1])
    assert Image.open(record["heatmap"]).size[0] > 100 and -1 <= record["sanity_spearman"] <= 1
    r = graft("explain", text_run, "a very good film", "--out", tmp_path / "t")
    assert r.returncode == 0 and "good" in r.stdout and "deletion AUC" in r.stdout, r.stderr
    assert "good</span>" in (tmp_path / "t" / "explanations.html").read_text()
    for args, words in (((run_dir, probe, "--target", "blok"), ["'blok'", "block, plain", "Did you mean"]),
                        ((run_dir, "a text"), ["not an image file"]),
                        ((text_run, probe), ["image file", "takes text"]),
                        ((text_run, "good film", "--method", "gradcam"), ["not one for text runs"]),
                        ((run_dir, probe, "--method", "gradcam", "--layer", "backbone.model.layer9"),
                         ["'backbone.model.layer9'", "Did you mean"])):
        r = graft("explain", *args)
        assert r.returncode == 2 and all(w in r.stderr for w in words), r.stderr
        assert "Traceback" not in r.stderr


def test_a_split_report_names_each_class_s_words_and_confident_images(image_run, text_run, tmp_path):
    r = graft("explain", text_run, "--split", "val", "--limit", "12", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    sentiment = {"pos": set("good great fine nice".split()), "neg": set("bad awful poor sad".split())}
    for name, c in report["classes"].items():
        assert c["top_words"][0]["word"] in sentiment[name], c
    assert report["mean"]["deletion_auc"] < report["mean"]["deletion_auc_random"]
    assert (text_run / "explanations" / "report.html").exists()
    run_dir, _ = image_run
    r = graft("explain", run_dir, "--split", "val", "--limit", "4", "--method", "occlusion", "--out", tmp_path / "i")
    assert r.returncode == 0 and "most confident" in r.stdout, r.stderr
    saved = json.loads((tmp_path / "i" / "report.json").read_text())
    assert saved["examples"] == 4 and Image.open(tmp_path / "i" / "report.png").size[0] > 100
    r = graft("explain", run_dir)
    assert r.returncode == 2 and "INPUTS" in r.stderr


def test_adapter_runs_and_distilled_students_are_explained_like_any_run(text_run, tiny_bert, tmp_path):
    """A LoRA run (peft layers in place) and a student distilled from text_run: the same explanation of what each
    one predicts, with IG's completeness holding."""
    base = {"backbone": {"plugin": "hf", "weights": str(tiny_bert)},
            "data": {"plugin": "text", "path": str(text_run.parent / "r.jsonl"), "max_length": 16},  # the teacher's
            "train": {"seed": 0, "epochs": 8, "batch_size": 16, "lr": 1e-2, "progress": False, "plot": False}}
    lora = {**base, "strategy": {"plugin": "finetune"}, "adapter": {"plugin": "lora", "r": 4}}
    student = {**base, "strategy": {"plugin": "distill", "teacher": str(text_run), "cache_dir": str(tmp_path / "c")},
               "loss": {"plugin": "kd", "temperature": 2.0}}
    for name, conf in (("lora", lora), ("student", student)):
        train(load_config(conf), tmp_path / name, echo=lambda m: None)
        [r] = explain(load_run(tmp_path / name, for_prediction=True), ["film was very great"])  # words it knows
        assert [w for w, _ in r["words"]] == "film was very great".split() and r["convergence_delta"] < 0.05, r
        assert r["predicted"] == "pos" and max(r["words"], key=lambda ws: ws[1])[0] == "great", (name, r["words"])


def test_a_language_model_s_token_is_attributed_to_the_prompt_word_that_decides_it(tmp_path):
    """A tiny GPT-2 trained in the test to answer "say X ..." with X's partner word: the first answer token's
    largest attribution is on X, not on the filler words, and inserting by attribution beats random order."""
    from test_instructions import chat_config, tokenizer_of_kind

    pairs = {"red": "apple", "blue": "sky", "green": "grass", "black": "night"}
    fillers = ["please now", "kindly", "if you can", "quickly please"]
    rows = [{"prompt": f"say {c} {f}", "response": w} for c, w in pairs.items() for f in fillers]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 6))
    tok = tokenizer_of_kind("bpe", [f"### User:\n{r['prompt']}\n\n### Assistant:\n{r['response']}" for r in rows] * 10)
    tok.save_pretrained(tmp_path / "tok")
    conf = chat_config(tmp_path / "tok", tmp_path / "d.jsonl", template="plain")
    conf["train"].update(max_steps=400, batch_size=8, lr=3e-3)
    train(load_config(conf), tmp_path / "run", echo=lambda m: None)
    run = load_run(tmp_path / "run", for_prediction=True)
    [r] = explain(run, ["say green if you can"], steps=64)
    assert r["answer"].strip().startswith("grass"), r
    assert [w for w, _ in r["words"]] == "say green if you can".split()
    assert max(r["words"], key=lambda ws: ws[1])[0] == "green", r["words"]
    # deleting any word of so short a prompt confuses a tiny model; putting "green" back first restores it
    assert r["insertion_auc"] > r["insertion_auc_random"] and r["deletion_auc"] <= r["deletion_auc_random"], r
    bad = graft("explain", tmp_path / "run", "say red", "--token", "50")
    assert bad.returncode == 2 and "--token 50" in bad.stderr, bad.stderr


def test_a_tagger_s_tag_is_attributed_to_the_word_that_decides_it(tmp_path):
    """Token classification: the last word's tag (a person or a place) is decided by the sentence's first word;
    explaining that word's tag (--token 3) puts the largest attribution on the first word."""
    import random

    from transformers import BertTokenizerFast

    words = ["the", "went", "to", "is", "in", "anna", "bob", "carl"]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    BertTokenizerFast(vocab=vocab).save_pretrained(tmp_path / "tok")
    rng, lines = random.Random(0), []
    for _ in range(200):
        cue, name = rng.choice(["the", "is"]), rng.choice(["anna", "bob", "carl"])
        lines += [f"{cue} O", *(f"{rng.choice(['went', 'to', 'in'])} O" for _ in range(2)),
                  f"{name} {'B-PER' if cue == 'the' else 'B-LOC'}", ""]
    (tmp_path / "t.conll").write_text("\n".join(lines))
    conf = {"backbone": {"plugin": "hf", "tokenizer": str(tmp_path / "tok"),
                         "config": {"model_type": "bert", "vocab_size": 16, "hidden_size": 32, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "intermediate_size": 64,
                                    "max_position_embeddings": 64}},
            "strategy": {"plugin": "finetune"}, "data": {"plugin": "conll", "path": str(tmp_path / "t.conll")},
            "train": {"seed": 0, "epochs": 6, "batch_size": 16, "lr": 3e-3, "progress": False, "plot": False}}
    train(load_config(conf), tmp_path / "run", echo=lambda m: None)
    run = load_run(tmp_path / "run", for_prediction=True)
    for text, cue, tag in (("the went to bob", "the", "B-PER"), ("is in to anna", "is", "B-LOC")):
        [r] = explain(run, [text], token=3)
        assert r["predicted"] == tag and r["word"] == text.split()[3], r
        assert [w for w, _ in r["words"]] == text.split() and max(r["words"], key=lambda ws: ws[1])[0] == cue, r
        assert r["deletion_auc"] < r["deletion_auc_random"] and r["insertion_auc"] > r["insertion_auc_random"], r
    r = graft("explain", tmp_path / "run", "the went to bob", "--token", "4")
    assert r.returncode == 2 and "--token 4" in r.stderr and "4 word(s)" in r.stderr, r.stderr


@pytest.mark.parametrize("method", ["integrated_gradients", "gradcam", "occlusion"])
def test_a_segmenter_s_class_is_attributed_to_its_pixels(tmp_path_factory, method):
    """Segmentation: the "square" class (a bright square at a random place) explained over the pixels predicted as
    it -- the largest attribution lies in the square."""
    run_dir, probe, box = segmentation_run(tmp_path_factory)
    [r] = explain(load_run(run_dir, for_prediction=True), [str(probe)], method)
    assert r["target"] == "square" and r["pixels"] > 0.02, r
    y, x = divmod(int(r["heat"].flatten().argmax()), r["heat"].shape[1])
    assert box[0] <= y < box[0] + BLOCK and box[1] <= x < box[1] + BLOCK, (method, y, x, box)
    assert r["deletion_auc"] < r["deletion_auc_random"], r


_SEGMENTATION = {}


def segmentation_run(tmp_path_factory):
    if _SEGMENTATION:
        return _SEGMENTATION["run"]
    d = tmp_path_factory.mktemp("explain-seg")
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (d / "data" / folder).mkdir(parents=True)

    def square(i, path, mask_path=None):
        x = rng.uniform(70, 160, (32, 32)).astype(np.uint8)
        y0, x0 = (int(v) for v in rng.integers(0, 32 - BLOCK, 2))
        x[y0:y0 + BLOCK, x0:x0 + BLOCK] = 255
        Image.fromarray(x).convert("RGB").save(path)
        if mask_path is not None:
            m = np.zeros((32, 32), np.uint8)
            m[y0:y0 + BLOCK, x0:x0 + BLOCK] = 1
            Image.fromarray(m).save(mask_path)
        return y0, x0

    for i in range(48):
        square(i, d / "data" / "images" / f"{i}.png", d / "data" / "masks" / f"{i}.png")
    conf = {"backbone": {"plugin": "timm", "model": "test_resnet", "model_kwargs": {"output_stride": 8}},
            "strategy": {"plugin": "finetune"},
            "data": {"plugin": "segfolder", "path": str(d / "data"), "image_size": 32,
                     "class_names": ["background", "square"]},
            "train": {"seed": 0, "epochs": 15, "batch_size": 8, "lr": 1e-2, "progress": False, "plot": False}}
    train(load_config(conf), d / "run", echo=lambda m: None)
    box = square(99, d / "probe.png")
    _SEGMENTATION["run"] = (d / "run", d / "probe.png", box)
    return _SEGMENTATION["run"]
