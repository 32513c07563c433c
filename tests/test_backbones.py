"""Backbones: swapped by changing only [backbone]; local weights; export readable by timm / transformers."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_VIT, graft, reviews, tiny_config, write_config
from test_user_files import cli_run
from graft import GraftError
from graft import load_config
from graft import train
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
    summary = train(load_config(conf, where=f"{name}.toml"), tmp_path / name, echo=lambda m: None)
    assert summary["steps"] == 3 and 0 <= summary["test"]["accuracy"] <= 1
    assert (tmp_path / name / "backbone").is_dir()


def test_timm_layer_groups_ordered_and_complete():
    r = Run(load_config(tiny_config(backbone={"plugin": "timm", "model": "test_resnet"}), where="x"))
    groups = r.backbone.layer_groups()
    assert groups[0][0].startswith("model.conv1") or "stem" in groups[0][0] or "conv1" in groups[0][0]
    assert sum(len(g) for g in groups) == len(list(r.backbone.module.parameters()))


def test_timm_weights_file_and_export_round_trip(tmp_path):
    import timm

    src = timm.create_model("test_resnet", num_classes=7)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    r = Run(load_config(tiny_config(backbone={"plugin": "timm", "model": "test_resnet",
                                              "weights": str(tmp_path / "w.safetensors")}), where="x"))
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
    r = Run(load_config(tiny_config(backbone={"plugin": "timm", "model": "test_resnet",
                                              "weights": str(tmp_path / "w.pth")}), where="x"))
    assert torch.equal(r.backbone.timm_model.state_dict()["conv1.0.weight"], src.state_dict()["conv1.0.weight"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(GraftError, match="weights_only"):
        Run(load_config(tiny_config(backbone={"plugin": "timm", "model": "test_resnet",
                                              "weights": str(tmp_path / "evil.pth")}), where="x"))


def test_timm_foreign_checkpoint_remapped_by_order_with_shapes_checked(tmp_path):
    import timm

    src = timm.create_model("test_resnet")
    # other names, same order, no BatchNorm counters: like torchvision weights for a timm architecture
    foreign = {f"net.{i}": v for i, v in enumerate(v for v in src.state_dict().values() if v.ndim)}
    torch.save(foreign, tmp_path / "f.pth")
    r = Run(load_config(tiny_config(backbone={"plugin": "timm", "model": "test_resnet",
                                              "weights": str(tmp_path / "f.pth")}), where="x"))
    assert torch.equal(r.backbone.timm_model.state_dict()["conv1.0.weight"], src.state_dict()["conv1.0.weight"])
    foreign["net.0"] = torch.zeros(1, 2, 3)
    torch.save(foreign, tmp_path / "bad.pth")
    with pytest.raises(GraftError, match="does not fit"):
        Run(load_config(tiny_config(backbone={"plugin": "timm", "model": "test_resnet",
                                              "weights": str(tmp_path / "bad.pth")}), where="x"))


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
    summary = train(load_config(conf, where="bert.toml"), tmp_path / "run", echo=lambda m: None)
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
    spec = load_config(conf, where="x").plugins["backbone"]
    b = spec.cls(spec.options)
    b.build()
    groups = b.layer_groups()
    assert all("embeddings" in n for n in groups[0])
    assert all(".layer.0." in n for n in groups[1]) and all(".layer.1." in n for n in groups[2])
    assert sum(map(len, groups)) == len(list(b.module.parameters()))


def test_run_directory_hands_off_as_weights(tmp_path):
    conf = tiny_config(train={"max_steps": 2})
    train(load_config(conf, where="a.toml"), tmp_path / "a", echo=lambda m: None)
    conf["backbone"] = {**TINY_VIT, "weights": str(tmp_path / "a")}
    r = Run(load_config(conf, where="b.toml"))
    trained = load_file(str(tmp_path / "a" / "model.safetensors"))
    key = "patch_embed.proj.weight"
    assert torch.equal(r.backbone.timm_model.state_dict()[key], trained[f"backbone.model.{key}"])


def test_wrong_modality_names_both_plugins(tmp_path, tiny_bert):
    conf = tiny_config(backbone={"plugin": "hf", "weights": str(tiny_bert)})  # text model, image data
    proc = graft("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "r")
    assert proc.returncode == 2
    assert 'plugin = "digits" needs an image backbone; [backbone] plugin = "hf" takes text' in proc.stderr


# -- issue 25, item 9: checkpoints saved by other frameworks (Lightning, DDP, torch.compile) ---------------------
def _finetuned(classes=3):
    """A test_resnet fine-tuned elsewhere: its state dict with a head of ``classes`` outputs (timm's is 1000)."""
    import timm

    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=classes).state_dict().items()}


def _save(obj, path):
    save_file(obj, str(path)) if path.suffix == ".safetensors" else torch.save(obj, path)
    return path


def _timm_run(path, backbone=None):
    """(the built Run, the one GraftWarning line it printed on what it loaded, renamed and skipped)."""
    import warnings

    from graft import GraftWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = Run(load_config(tiny_config(backbone=backbone or {"plugin": "timm", "model": "test_resnet",
                                                                "weights": str(path)}), where="x"))
    notes = [str(w.message) for w in caught if issubclass(w.category, GraftWarning)]
    assert len(notes) <= 1, notes
    return run, notes[0] if notes else ""


def _assert_trunk(run, state):
    got = run.backbone.timm_model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in got), "the trunk was not loaded"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_lightning_checkpoint_with_another_head_loads_its_trunk(tmp_path, suffix):
    """The reported input: a timm fine-tune saved by Lightning (keys under ``model.``, in a ``state_dict`` entry
    of a .pth), its head 3 classes wide. Old code: GraftError ``cannot remap by order: model.fc.weight (3, 96) does
    not fit fc.weight (1000, 96)`` (.pth) / ``the weights' names do not match test_resnet and a safetensors file
    keeps no tensor order`` (.safetensors) -- the names were never matched without their prefix."""
    state = _finetuned()
    lightning = {f"model.{k}": v for k, v in state.items()}
    path = _save({"epoch": 4, "global_step": 40, "state_dict": lightning} if suffix == ".pth" else lightning,
                 tmp_path / f"fine{suffix}")
    run, note = _timm_run(path)
    _assert_trunk(run, state)
    assert (f"fine{suffix}: loaded 90 tensors, 90 of them renamed (prefix 'model.' dropped); skipped 2, the file's "
            f"classifier (3 classes): model.fc.") in note
    conf = tiny_config(backbone={"plugin": "timm", "model": "test_resnet", "weights": str(path)},
                       train={"max_steps": 1})
    code, out = cli_run("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "run")
    assert code == 0, out
    assert sum("loaded 90 tensors" in line for line in out.splitlines()) == 1  # one summary line


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "backbone.", "model._orig_mod.", "module.model.",
                                    "_orig_mod.module.backbone."])
@pytest.mark.parametrize("wrap", ["safetensors", "flat", "state_dict", "model", "model_state_dict", "module",
                                  "model/state_dict"])
def test_framework_prefixes_and_wrappers_are_recognised(tmp_path, prefix, wrap):
    """Prefixes of DDP, torch.compile and wrapping models, nested, in every wrapper a training script saves in.
    Old code: ``backbone.`` and nested prefixes fell to remapping by order and failed on the head (``does not
    fit``), a ``module`` wrapper or one inside another crashed with AttributeError (exit 1)."""
    state = _finetuned()
    keyed = {prefix + k: v for k, v in state.items()}
    if wrap == "safetensors":
        path = _save(keyed, tmp_path / "w.safetensors")
    else:
        obj = keyed
        for key in reversed(wrap.split("/")) if wrap != "flat" else ():
            obj = {key: obj, "epoch": 2}
        path = _save(obj, tmp_path / "w.pth")
    run, note = _timm_run(path)
    _assert_trunk(run, state)
    assert "skipped 2, the file's classifier (3 classes)" in note


def test_keys_that_fit_nowhere_are_reported_and_a_missing_trunk_names_them(tmp_path):
    """Tensors of the training framework beside the model (a loss's weights, an EMA copy) are left out and named;
    a prefix graftkit does not know leaves the trunk missing, and the error shows the names that fit nowhere.
    Old code: the extra keys were dropped silently; the unknown prefix ended in ``cannot remap by order``."""
    state = _finetuned()
    extra = {"model.criterion.pos_weight": torch.ones(3), "ema.conv1.0.weight": state["conv1.0.weight"]}
    run, note = _timm_run(_save({"state_dict": {**{f"model.{k}": v for k, v in state.items()}, **extra}},
                                tmp_path / "w.pth"))
    _assert_trunk(run, state)
    assert "2 fit no tensor of the model and were left out: model.criterion.pos_weight, ema.conv1.0.weight" in note
    partial = {**{f"net.{k}": v for k, v in state.items() if k.startswith("layer")},
               **{k: v for k, v in state.items() if not k.startswith("layer")}}
    with pytest.raises(GraftError, match=r"lacks \d+ tensors of the model, e\.g\. layer1.*net\.layer1.*prefix"):
        _timm_run(_save(partial, tmp_path / "partial.safetensors"))
    with pytest.raises(GraftError, match=r"holds no state dict \(its entries: epoch, optimizer\)"):
        _timm_run(_save({"epoch": 1, "optimizer": {"lr": 0.1}}, tmp_path / "none.pth"))


def test_remap_by_order_skips_a_head_of_another_size(tmp_path):
    """Foreign names (torchvision-style) mapped by order, the fine-tuned head 3 classes wide. Old code:
    ``cannot remap by order: net.N (3, 96) does not fit fc.weight (1000, 96)``."""
    state = _finetuned()
    run, note = _timm_run(_save({f"net.{i}": v for i, v in enumerate(v for v in state.values() if v.ndim)},
                                tmp_path / "f.pth"))
    got = run.backbone.timm_model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in got if got[k].ndim)
    assert ("loaded 75 tensors, 75 of them renamed (e.g. net.0 -> conv1.0.weight, ...); skipped 2, the file's "
            "classifier (3 classes): net.75, net.76") in note


def test_vit_checkpoint_under_a_prefix_with_another_head(tmp_path):
    """Another architecture's head name (ViT's ``head``) from the model's own config, not ``fc``. Old code:
    ``cannot remap by order`` on the head."""
    import timm

    torch.manual_seed(0)
    src = timm.create_model(TINY_VIT["model"], num_classes=5, **TINY_VIT["model_kwargs"])
    state = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    run, note = _timm_run(None, {**TINY_VIT, "weights": str(_save({"model": state}, tmp_path / "vit.pth"))})
    got = run.backbone.timm_model.state_dict()
    assert all(torch.equal(got[k], src.state_dict()[k]) for k in got)
    assert "prefix 'module._orig_mod.' dropped); skipped 2, the file's classifier (5 classes)" in note
