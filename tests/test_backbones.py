"""Backbones: swapped by changing only [backbone]; local weights; export readable by timm / transformers."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_VIT, graft, reviews, tiny_config, write_config
from graft import GraftError
from graft.config import resolve
from graft.loop import train
from graft.run import Run

BACKBONES = {
    "timm-vit": TINY_VIT,
    "timm-resnet": {"plugin": "timm", "model": "test_resnet"},
    # a pre-logits conv after pooling: features are head_hidden_size (1024) wide, not num_features (288)
    "timm-mobilenetv3": {"plugin": "timm", "model": "mobilenetv3_small_050"},
    "hf-vit": {"plugin": "hf", "config": {"model_type": "vit", "image_size": 8, "patch_size": 4, "hidden_size": 32,
                                          "num_hidden_layers": 2, "num_attention_heads": 2,
                                          "intermediate_size": 64}},
    "hf-convnext": {"plugin": "hf", "config": {"model_type": "convnext", "hidden_sizes": [16, 32],
                                               "depths": [1, 1], "num_stages": 2}, "pooling": "mean"},
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_same_finetune_config_runs_with_each_backbone(tmp_path, name):
    conf = tiny_config(train={"max_steps": 3, "eval_every": 3})
    conf["backbone"] = BACKBONES[name]  # the only line that changes
    summary = train(resolve(conf, f"{name}.toml"), tmp_path / name, echo=lambda m: None)
    assert summary["steps"] == 3 and 0 <= summary["test"]["accuracy"] <= 1
    assert (tmp_path / name / "backbone").is_dir()


def test_timm_layer_groups_ordered_and_complete():
    r = Run(resolve(tiny_config(backbone={"plugin": "timm", "model": "test_resnet"}), "x"))
    groups = r.backbone.layer_groups()
    assert groups[0][0].startswith("model.conv1") or "stem" in groups[0][0] or "conv1" in groups[0][0]
    assert sum(len(g) for g in groups) == len(list(r.backbone.module.parameters()))


def test_timm_weights_file_and_export_round_trip(tmp_path):
    import timm

    src = timm.create_model("test_resnet", num_classes=7)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    r = Run(resolve(tiny_config(backbone={"plugin": "timm", "model": "test_resnet",
                                          "weights": str(tmp_path / "w.safetensors")}), "x"))
    got = r.backbone.timm_model.state_dict()
    assert torch.equal(got["conv1.0.weight"], src.state_dict()["conv1.0.weight"])
    (tmp_path / "exp").mkdir()
    r.backbone.export(str(tmp_path / "exp"))
    # timm's own loader takes the export
    m = timm.create_model("test_resnet", pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "exp" / "model.safetensors")))
    assert torch.equal(m.state_dict()["conv1.0.weight"], src.state_dict()["conv1.0.weight"])


def test_timm_weights_torch_file_loaded_weights_only(tmp_path):
    import timm

    src = timm.create_model("test_resnet")
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    r = Run(resolve(tiny_config(backbone={"plugin": "timm", "model": "test_resnet",
                                          "weights": str(tmp_path / "w.pth")}), "x"))
    assert torch.equal(r.backbone.timm_model.state_dict()["conv1.0.weight"], src.state_dict()["conv1.0.weight"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(GraftError, match="weights_only"):
        Run(resolve(tiny_config(backbone={"plugin": "timm", "model": "test_resnet",
                                          "weights": str(tmp_path / "evil.pth")}), "x"))


def test_timm_foreign_checkpoint_remapped_by_order_with_shapes_checked(tmp_path):
    import timm

    src = timm.create_model("test_resnet")
    # other names, same order, no BatchNorm counters: like torchvision weights for a timm architecture
    foreign = {f"net.{i}": v for i, v in enumerate(v for v in src.state_dict().values() if v.ndim)}
    torch.save(foreign, tmp_path / "f.pth")
    r = Run(resolve(tiny_config(backbone={"plugin": "timm", "model": "test_resnet",
                                          "weights": str(tmp_path / "f.pth")}), "x"))
    assert torch.equal(r.backbone.timm_model.state_dict()["conv1.0.weight"], src.state_dict()["conv1.0.weight"])
    foreign["net.0"] = torch.zeros(1, 2, 3)
    torch.save(foreign, tmp_path / "bad.pth")
    with pytest.raises(GraftError, match="does not fit"):
        Run(resolve(tiny_config(backbone={"plugin": "timm", "model": "test_resnet",
                                          "weights": str(tmp_path / "bad.pth")}), "x"))


@pytest.mark.parametrize("table,match", [
    ({"plugin": "timm", "model": "resnet18", "pretrained": True}, "pass weights"),
    ({"plugin": "timm", "model": "resnet181"}, 'Did you mean "resnet18"'),
    ({"plugin": "hf", "weights": "sentence-transformers/all-MiniLM-L6-v2"}, "never downloads"),
    ({"plugin": "hf"}, "exactly one of weights"),
])
def test_offline_and_name_errors_are_clear(tmp_path, table, match):
    cfg = write_config(tmp_path / "c.toml", tiny_config(backbone=None) | {"backbone": table})
    proc = graft("train", cfg, "--out", tmp_path / "run", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and match in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_hf_text_backbone_finetunes_and_exports(tmp_path, tiny_bert):
    conf = tiny_config(backbone=None, data=None) | {
        "backbone": {"plugin": "hf", "weights": str(tiny_bert), "pooling": "cls"},
        "data": {"plugin": "text", "path": str(reviews(tmp_path / "r.jsonl")), "max_length": 16},
    }
    conf["train"].update(epochs=6, batch_size=16, lr=3e-3)
    summary = train(resolve(conf, "bert.toml"), tmp_path / "run", echo=lambda m: None)
    assert summary["test"]["accuracy"] >= 0.9  # the toy task is separable by one word
    from transformers import AutoModel, AutoTokenizer

    exported = AutoModel.from_pretrained(tmp_path / "run" / "backbone")
    AutoTokenizer.from_pretrained(tmp_path / "run" / "backbone")
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    key = "embeddings.word_embeddings.weight"
    assert torch.equal(exported.state_dict()[key], trained[f"backbone.model.{key}"])
    labels = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert labels["label_names"] == ["neg", "pos"]


def test_hf_layer_groups(tiny_bert):
    conf = tiny_config(backbone=None) | {"backbone": {"plugin": "hf", "weights": str(tiny_bert)}}
    conf["data"] = {"plugin": "text", "path": "unused"}
    spec = resolve(conf, "x").plugins["backbone"]
    b = spec.cls(spec.options)
    b.build()
    groups = b.layer_groups()
    assert all("embeddings" in n for n in groups[0])
    assert all(".layer.0." in n for n in groups[1]) and all(".layer.1." in n for n in groups[2])
    assert sum(map(len, groups)) == len(list(b.module.parameters()))


def test_run_directory_hands_off_as_weights(tmp_path):
    conf = tiny_config(train={"max_steps": 2})
    train(resolve(conf, "a.toml"), tmp_path / "a", echo=lambda m: None)
    conf["backbone"] = {**TINY_VIT, "weights": str(tmp_path / "a")}
    r = Run(resolve(conf, "b.toml"))
    trained = load_file(str(tmp_path / "a" / "model.safetensors"))
    key = "patch_embed.proj.weight"
    assert torch.equal(r.backbone.timm_model.state_dict()[key], trained[f"backbone.model.{key}"])


def test_wrong_modality_names_both_plugins(tmp_path, tiny_bert):
    conf = tiny_config(backbone={"plugin": "hf", "weights": str(tiny_bert)})  # text model, image data
    proc = graft("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "r")
    assert proc.returncode == 2
    assert 'plugin = "digits" needs an image backbone; [backbone] plugin = "hf" takes text' in proc.stderr
