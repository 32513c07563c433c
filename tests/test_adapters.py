"""Adapters (issue 14): LoRA / IA3 on peft and BitFit, on both backbone families and every strategy that trains a
backbone; the saved adapter in plain peft, merged export, exact resume, bad targets, third-party adapters."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import (TINY_VIT, assert_same_records, assert_same_weights, interrupted_and_resumed, read_metrics,
                      reviews, tiny_config, weights, write_config)
from test_user_files import assert_bad_input, cli_run
from graft import Adapter, GraftError, load_run
from graft import load_config
from graft import train
from graft.testing import check_adapter, registry_with


def text_conf(bert, tmp_path, adapter, **tables):
    return tiny_config(backbone={"plugin": "hf", "weights": str(bert)}, adapter=adapter,
                       data={"plugin": "text", "path": str(reviews(tmp_path / "r.jsonl")), "max_length": 16},
                       **tables)


def lora_run(tmp_path, bert, **adapter):
    conf = text_conf(bert, tmp_path, {"plugin": "lora", "r": 4, **adapter},
                     train={"max_steps": 6, "lr": 1e-2})
    summary = train(load_config(conf, where="lora.toml"), tmp_path / "run", echo=lambda m: None)
    return summary, tmp_path / "run"


def test_lora_trains_only_the_adapter_and_the_head(tmp_path, tiny_bert):
    summary, run = lora_run(tmp_path, tiny_bert)
    p = summary["parameters"]
    assert 0 < p["trainable"] < 0.1 * p["total"]
    assert summary["adapter"]["plugin"] == "lora" and summary["adapter"]["size_bytes"] > 0
    assert summary["peak_memory_bytes"] > 0
    original = load_file(str(tiny_bert / "model.safetensors"))
    final = weights(run)
    base = {k: v for k, v in final.items() if "lora_" not in k and k.startswith("backbone.")}
    for k, v in base.items():  # every pretrained weight is as it was
        name = k.removeprefix("backbone.model.").replace(".base_layer", "")
        assert torch.equal(v, original[name]), k
    lora = [k for k in final if "lora_B" in k]
    assert lora and any(final[k].abs().sum() > 0 for k in lora)  # B starts at zero: it trained
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def hf_logits_by_hand(model, bert, run, texts):
    """Mean-pooled features of a plain transformers (+ peft) ``model``, through the run's saved head."""
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(str(bert))(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        features = (h * m).sum(1) / m.sum(1)
        head = load_file(str(run / "head.safetensors"))
        return features @ head["1.weight"].T + head["1.bias"]


def graft_logits(run, texts):
    r = load_run(run, for_prediction=True)
    with torch.no_grad():
        return r.model(r.data.encode(r.backbone, texts)).float()


def test_saved_adapter_in_plain_peft_and_merged_export_give_the_run_logits(tmp_path, tiny_bert):
    from peft import PeftModel
    from transformers import AutoModel

    _, run = lora_run(tmp_path, tiny_bert)
    texts = ["good film was very nice", "the movie is bad", "awful"]
    ours = graft_logits(run, texts)
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(tiny_bert)), str(run / "adapter")).eval()
    assert (hf_logits_by_hand(peft_model, tiny_bert, run, texts) - ours).abs().max() < 1e-5
    plain = AutoModel.from_pretrained(str(tiny_bert)).eval()  # the comparison can fail: no adapter, other logits
    assert (hf_logits_by_hand(plain, tiny_bert, run, texts) - ours).abs().max() > 1e-4

    code, out = cli_run("export", run, "--merge", "--out", tmp_path / "merged")
    assert code == 0, out
    merged = AutoModel.from_pretrained(str(tmp_path / "merged" / "backbone")).eval()  # no peft needed
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (hf_logits_by_hand(merged, tiny_bert, tmp_path / "merged", texts) - ours).abs().max() < 1e-5
    assert (graft_logits(run, texts) - ours).abs().max() == 0  # exporting left the run as it was
    assert_bad_input(*cli_run("export", run), "--merge")
    code, out = cli_run("predict", run, "good film", "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["label"] in ("pos", "neg"), out
    code, out = cli_run("eval", run, "--json")
    assert code == 0 and "accuracy" in json.loads(out)["test"], out


def test_sigterm_then_resume_with_an_adapter_reproduces_the_run(tmp_path):
    tables = dict(adapter={"plugin": "lora", "r": 4, "lora_dropout": 0.1},  # dropout: the RNG must resume too
                  train={"epochs": 3, "batch_size": 16, "scheduler": "cosine"})
    interrupted_and_resumed(write_config(tmp_path / "c.toml", tiny_config(**tables)), tmp_path)
    assert_same_records(read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut"))
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"), atol=1e-6)
    assert load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))


def test_bad_target_module_names_the_candidates(tmp_path, tiny_bert):
    cfg = write_config(tmp_path / "c.toml", text_conf(tiny_bert, tmp_path, {"plugin": "lora",
                                                                            "target_modules": ["qurey"]}))
    assert_bad_input(*cli_run("train", cfg, "--out", tmp_path / "r"), "BertModel has no module 'qurey'",
                     'Did you mean "query"', "value")


def test_adapter_conflicts_and_strategies_that_cannot_use_one(tmp_path):
    from graft import Strategy

    class Probe(Strategy):
        """A strategy that never trains its backbone."""

    reg = registry_with(Probe, "strategy", "probe")
    with pytest.raises(GraftError, match="does not train its backbone"):
        from graft.run import Run

        Run(load_config(tiny_config(strategy={"plugin": "probe"}, loss=None, adapter={"plugin": "lora"}),
                        registry=reg, where="x"))
    with pytest.raises(GraftError, match="freeze = \"backbone\" would freeze the \\[adapter\\]"):
        train(load_config(tiny_config(strategy={"freeze": "backbone"}, adapter={"plugin": "lora"}), where="x"),
              tmp_path / "r", echo=lambda m: None)


@pytest.mark.parametrize("adapter, only", [({"plugin": "ia3"}, "ia3_l"), ({"plugin": "bitfit"}, "bias"),
                                           ({"plugin": "lora", "use_dora": True}, "lora_")])
def test_ia3_bitfit_and_dora_train_only_their_parameters(tmp_path, tiny_bert, adapter, only):
    conf = text_conf(tiny_bert, tmp_path, adapter, train={"max_steps": 3, "lr": 1e-2})
    r = train(load_config(conf, where="x"), tmp_path / "run", echo=lambda m: None)
    from graft.run import Run

    run = Run(load_config(conf, where="x"))
    names = [n for n, p in run.model.named_parameters() if p.requires_grad and n.startswith("backbone.")]
    assert names and all(only in n for n in names), names
    assert r["parameters"]["trainable"] < r["parameters"]["total"]


@pytest.mark.parametrize("backbone", ["timm_vit", "timm_cnn", "hf_vit"])
def test_lora_on_image_backbones(tmp_path, backbone):
    table = {"timm_vit": TINY_VIT, "timm_cnn": {"plugin": "timm", "model": "test_resnet"},
             "hf_vit": {"plugin": "hf", "config": {"model_type": "vit", "image_size": 8, "patch_size": 4,
                                                   "hidden_size": 32, "num_hidden_layers": 2,
                                                   "num_attention_heads": 2, "intermediate_size": 64}}}[backbone]
    # bf16 autocast on the transformers; test_resnet at 16 px overflows in bf16 with or without an adapter
    precision = "fp32" if backbone == "timm_cnn" else "bf16"
    conf = tiny_config(backbone=table, adapter={"plugin": "lora"}, train={"max_steps": 3, "precision": precision},
                       data={"image_size": 8 if backbone != "timm_cnn" else 16})
    summary = train(load_config(conf, where="x"), tmp_path / "run", echo=lambda m: None)
    assert 0 < summary["parameters"]["trainable"] < summary["parameters"]["total"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_lora_with_masked_lm_and_on_a_distill_student(tmp_path, tiny_bert):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"the film {i % 7} was good and the movie {i % 5} was bad\n" for i in range(200)))
    mlm = {"backbone": {"plugin": "hf", "weights": str(tiny_bert)}, "strategy": {"plugin": "mlm"},
           "adapter": {"plugin": "lora"}, "data": {"plugin": "corpus", "path": str(corpus), "block_size": 16},
           "train": {"max_steps": 3, "batch_size": 8, "progress": False, "plot": False}}
    s = train(load_config(mlm, where="m"), tmp_path / "mlm", echo=lambda m: None)
    assert s["parameters"]["trainable"] < s["parameters"]["total"] and (tmp_path / "mlm" / "adapter").is_dir()
    teacher = train(load_config(text_conf(tiny_bert, tmp_path, None, train={"max_steps": 3}), where="t"),
                    tmp_path / "t",
                    echo=lambda m: None)
    assert teacher["steps"] == 3
    student = text_conf(tiny_bert, tmp_path, {"plugin": "lora"}, loss={"plugin": "kd"},
                        strategy={"plugin": "distill", "teacher": str(tmp_path / "t"),
                                  "cache_dir": str(tmp_path / "cache")}, train={"max_steps": 3})
    s = train(load_config(student, where="s"), tmp_path / "s", echo=lambda m: None)
    assert s["parameters"]["trainable"] < s["parameters"]["total"] / 5  # the student's adapter and head only


class NormsOnly(Adapter):
    """A third-party adapter: only the normalisation layers' parameters train."""

    def apply(self, backbone):
        frozen = set()
        for name, p in backbone.native_model().named_parameters():
            keep = "norm" in name.lower()
            p.requires_grad_(keep)
            if not keep:
                frozen.add(id(p))
        return frozen

    def save(self, directory, backbone):
        from pathlib import Path

        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in backbone.native_model().named_parameters()
                   if "norm" in n.lower()}, f"{directory}/norms.safetensors")
        return Path(f"{directory}/norms.safetensors").stat().st_size


def test_third_party_adapter_plugin_passes_the_conformance_check(tmp_path):
    summary = check_adapter(NormsOnly, tmp_path)
    assert summary["adapter"]["plugin"] == "under_test"
    check_adapter(type(graft_lora()), tmp_path / "lora", options={"r": 2})


def graft_lora():
    from graft import create

    return create("adapter", {"plugin": "lora"})


def test_the_conformance_check_can_fail(tmp_path):
    class Leaky(NormsOnly):
        """Says it froze parameters that still train."""

        def apply(self, backbone):
            super().apply(backbone)
            for p in backbone.native_model().parameters():
                p.requires_grad_(True)
            return set()

    with pytest.raises(AssertionError, match="trains every backbone parameter"):
        check_adapter(Leaky, tmp_path)
