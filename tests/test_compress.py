"""Issue 18: ONNX / TorchScript export checked against PyTorch, served back for eval and predict; int8 quantization
(onnxruntime, dynamic and static) and global magnitude pruning with a recovery fine-tune; bad inputs exit 2."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import graft, reviews, tiny_config, write_config
from graft import load_config
from graft import train

pytest.importorskip("onnxruntime")

QUIET = lambda m: None  # noqa: E731


def _train(conf: dict, out: Path) -> Path:
    train(load_config(conf, where="c.toml"), out, echo=QUIET)
    return out


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    return _train(tiny_config(), tmp_path_factory.mktemp("vit") / "run")


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, tiny_bert):
    d = tmp_path_factory.mktemp("bert")
    conf = tiny_config(backbone={"plugin": "hf", "weights": str(tiny_bert)},
                       data={"plugin": "text", "path": str(reviews(d / "r.jsonl")), "max_length": 16})
    conf["train"].update(epochs=3, batch_size=16, lr=3e-3)
    return _train(conf, d / "run")


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    conf = tiny_config(backbone={"plugin": "timm", "model": "test_resnet"}, data={"image_size": 16})
    conf["train"].update(epochs=2, lr=3e-3)
    return _train(conf, tmp_path_factory.mktemp("cnn") / "run")


def _export(run_dir, fmt, out):
    from graft.export import export_run
    from graft import load_run

    run = load_run(run_dir, overrides=["train.precision=fp32"], device="cpu")
    return export_run(run, Path(run_dir), fmt, Path(out))


@pytest.mark.parametrize("which", ["vit_run", "bert_run"])
def test_onnx_export_matches_pytorch_and_serves_eval_and_predict(which, request, tmp_path):
    """timm and hf: parity below 1e-4 on real examples (batch 4 and batch 1), and the export, loaded back as a run
    from its own folder (preprocessing saved beside it), scores and predicts exactly like the run."""
    from graft.run import predict
    from graft import load_run

    run_dir = request.getfixturevalue(which)
    info = _export(run_dir, "onnx", tmp_path / "onnx")
    assert info["max_abs_difference"] < 1e-4
    saved = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert saved["max_abs_difference"] == info["max_abs_difference"] and saved["file"] == "model.onnx"

    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    dims = [i.shape for i in session.get_inputs()]
    assert all(isinstance(d[0], str) for d in dims)  # a dynamic batch axis
    if which == "bert_run":
        assert all(isinstance(d[1], str) for d in dims)  # and a dynamic sequence axis

    torch_run, onnx_run = load_run(run_dir), load_run(tmp_path / "onnx")
    assert type(onnx_run).__name__ == "ExportedRun"
    a, b = torch_run.evaluate(torch_run.model, "test"), onnx_run.evaluate(onnx_run.model, "test")
    assert a["confusion_matrix"] == b["confusion_matrix"]
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    if which == "bert_run":
        items = ["good film", "awful movie was very", "the film was poor", "nice"]
    else:
        items = [str(p) for p in _digit_pngs(tmp_path, 4)]
    ours = predict(load_run(run_dir, for_prediction=True), items)
    theirs = predict(load_run(tmp_path / "onnx", for_prediction=True), items)
    assert [x["label"] for x in ours] == [x["label"] for x in theirs]
    assert [x["probability"] for x in theirs] == pytest.approx([x["probability"] for x in ours], abs=1e-5)


def _digit_pngs(tmp_path, n):
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    paths = []
    for i in range(n):
        p = tmp_path / f"d{i}.png"
        Image.fromarray((255 - d.images[i] * 16).clip(0, 255).astype("uint8")).resize((32, 32)).save(p)
        paths.append(p)
    return paths


def test_cli_export_onnx_and_predict_give_the_same_labels(bert_run, tmp_path):
    out = tmp_path / "served"
    proc = graft("export", bert_run, "--format", "onnx", "--out", out, check=True)
    assert "max abs difference" in proc.stdout and (out / "preprocessing" / "tokenizer.json").is_file()
    from graft.run import predict
    from graft import load_run

    texts = ["good film", "awful movie", "the movie was sad", "very nice film"]
    ours = predict(load_run(bert_run, for_prediction=True), texts)
    theirs = graft("predict", out, *texts, "--json", check=True).stdout.splitlines()
    assert [x["label"] for x in ours] == [json.loads(x)["label"] for x in theirs]


def test_an_adapter_run_exports_merged(tmp_path, tiny_bert):
    """LoRA (peft) on the tiny BERT: the ONNX file holds the merged weights (no LoRA matrices) and matches."""
    import onnx

    conf = tiny_config(backbone={"plugin": "hf", "weights": str(tiny_bert)}, adapter={"plugin": "lora", "r": 4},
                       data={"plugin": "text", "path": str(reviews(tmp_path / "r.jsonl")), "max_length": 16},
                       train={"max_steps": 8, "batch_size": 16, "lr": 1e-2})
    run_dir = _train(conf, tmp_path / "lora")
    info = _export(run_dir, "onnx", tmp_path / "onnx")
    assert info["max_abs_difference"] < 1e-4
    names = [i.name for i in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.initializer]
    assert names and not any("lora" in n for n in names)


def test_torchscript_export_matches_pytorch(vit_run, tmp_path):
    info = _export(vit_run, "torchscript", tmp_path / "ts")
    assert info["max_abs_difference"] < 1e-5 and (tmp_path / "ts" / "model.pt").is_file()


def test_dynamic_int8_quantizes_the_linear_layers_and_is_served(bert_run, tmp_path):
    import onnx

    from graft.compress import compress_run
    from graft import load_run

    s = compress_run(bert_run, tmp_path / "q", quantize_mode="dynamic-int8", echo=QUIET)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    assert s["compressed"]["size_bytes"] < s["onnx_fp32"]["size_bytes"]
    for r in (s["source"], s["onnx_fp32"], s["compressed"]):
        assert r["latency"]["p95_ms"] >= r["latency"]["p50_ms"] > 0 and r["size_bytes"] > 0
    assert s["onnx_fp32"]["metrics"]["accuracy"] == s["source"]["metrics"]["accuracy"]
    assert s["change"]["accuracy"] == pytest.approx(s["test"]["accuracy"] - s["source"]["metrics"]["accuracy"])
    served = load_run(tmp_path / "q")  # the summary's figure is what graft eval gives on the folder
    assert served.evaluate(served.model, "test")["accuracy"] == s["test"]["accuracy"]


def test_static_int8_calibrates_on_training_examples(cnn_run, tmp_path):
    import onnx

    from graft.compress import compress_run
    from graft import load_run

    s = compress_run(cnn_run, tmp_path / "q", quantize_mode="static-int8", calibration=40, echo=QUIET)
    assert s["compression"]["calibration_examples"] == 32  # batches of 16 of one shape: the histograms stack them
    model = onnx.load(str(tmp_path / "q" / "model.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 10
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) > 10  # weights stored as int8
    assert s["compressed"]["size_bytes"] < 0.5 * s["onnx_fp32"]["size_bytes"]
    src, q = load_run(cnn_run), load_run(tmp_path / "q")
    batch = src.data.collate([src.data.dataset("test")[i] for i in range(64)])["inputs"]
    agree = (src.model(batch).argmax(1) == q.model(batch).argmax(1)).float().mean()
    assert agree >= 0.95, agree


def test_static_int8_of_a_text_model_pads_the_calibration_batches(bert_run, tmp_path):
    import onnx

    from graft.compress import compress_run

    s = compress_run(bert_run, tmp_path / "q", quantize_mode="static-int8", calibration=48, echo=QUIET)
    assert s["compression"]["calibration_examples"] == 48
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node)
    assert abs(s["change"]["accuracy"]) <= 0.1


def test_global_magnitude_pruning_zeroes_the_smallest_weights():
    from graft.compress import apply_masks, magnitude_masks, prunable, sparsity

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 8), torch.nn.Conv1d(8, 3, 2))
    before = {n: m.weight.detach().clone() for n, m in prunable(model)}
    assert set(before) == {"1", "2"}  # the embedding table is not pruned
    masks = magnitude_masks(model, 0.5)
    assert torch.equal(model[1].weight, before["1"])  # computed on a copy
    apply_masks(model, masks)
    kept = torch.cat([before[n][masks[n]].abs() for n in before])
    dropped = torch.cat([before[n][~masks[n]].abs() for n in before])
    assert dropped.numel() == (32 + 48) // 2 and kept.min() >= dropped.max()  # global, not per layer
    assert sparsity(model)["sparsity"] == pytest.approx(0.5)
    assert torch.equal(model[0].weight != 0, torch.ones_like(model[0].weight, dtype=torch.bool))


def test_pruning_with_recovery_keeps_the_zeros_and_is_a_run(vit_run, tmp_path):
    from graft.compress import compress_run
    from graft import load_run

    s = compress_run(vit_run, tmp_path / "p", prune="magnitude:0.6", finetune_steps=6, echo=QUIET)
    assert s["compression"]["sparsity"] == pytest.approx(0.6, abs=0.01)
    records = [json.loads(x) for x in (tmp_path / "p" / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and records[0]["split"] == "val"  # the pruned model before recovery
    assert max(r["step"] for r in records) == 6
    pruned = load_run(tmp_path / "p")  # a PyTorch run folder: config, model.safetensors, backbone/ export
    from graft.compress import sparsity

    assert sparsity(pruned.model)["sparsity"] == pytest.approx(s["compression"]["sparsity"])
    assert pruned.evaluate(pruned.model, "test")["accuracy"] == pytest.approx(s["test"]["accuracy"])
    assert (tmp_path / "p" / "backbone" / "model.safetensors").is_file()


def test_pruned_and_quantized_in_a_pipeline_stage(vit_run, tmp_path):
    """A compress stage after a training stage, skipped when nothing changed."""
    conf = tiny_config()
    pipe = tmp_path / "p.toml"
    pipe.write_text(f'[pipeline]\nout = "{tmp_path / "runs"}"\n\n[[stage]]\nname = "base"\nconfig = "c.toml"\n\n'
                    f'[[stage]]\nname = "small"\ncompress = "@base"\nprune = "magnitude:0.3"\n'
                    f'quantize = "dynamic-int8"\n')
    write_config(tmp_path / "c.toml", conf)
    first = graft("pipeline", pipe, check=True)
    assert "compressing" in first.stdout
    summary = json.loads((tmp_path / "runs" / "small" / "summary.json").read_text())
    assert summary["compression"]["sparsity"] == pytest.approx(0.3, abs=0.01)
    report = json.loads((tmp_path / "runs" / "pipeline.json").read_text())
    assert report["stages"][1]["weights_bytes"] == summary["size_bytes"]
    again = graft("pipeline", pipe, check=True)
    assert "[small] up to date" in again.stdout


def test_bad_inputs_exit_2_with_the_reason(vit_run, tmp_path, tiny_bert):
    broken = tmp_path / "broken"
    shutil.copytree(vit_run, broken)
    (broken / "model.safetensors").unlink()
    for args in (["export", broken, "--format", "onnx"], ["compress", broken, "--quantize", "dynamic-int8"]):
        proc = graft(*args)
        assert proc.returncode == 2 and "not a finished graft run" in proc.stderr and "Traceback" not in proc.stderr
    from graft import GraftError
    from graft.compress import compress_run

    for kwargs, match in (({"prune": "random:0.5"}, "magnitude:FRACTION"), ({}, "Nothing to do"),
                          ({"finetune_steps": 3, "quantize_mode": "dynamic-int8"}, "give --prune")):
        with pytest.raises(GraftError, match=match):
            compress_run(vit_run, tmp_path / "c", **kwargs)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join("the film was very good and the movie was very bad" for _ in range(40)))
    mlm = _train(tiny_config(backbone={"plugin": "hf", "weights": str(tiny_bert)}, strategy={"plugin": "mlm"},
                             loss=None, data={"plugin": "corpus", "path": str(corpus), "block_size": 8},
                             train={"max_steps": 2, "batch_size": 8}), tmp_path / "mlm")
    proc = graft("export", mlm, "--format", "onnx")
    assert proc.returncode == 2 and "not a classifier" in proc.stderr and "--format native" in proc.stderr


def test_a_layer_without_an_onnx_form_is_named(tmp_path):
    """A third-party backbone whose forward uses an eigenvalue decomposition (no ONNX operator): exit 2 naming it."""
    from graft import GraftError
    from graft.export import to_onnx

    class Spectral(torch.nn.Module):
        def forward(self, x):
            g = x.flatten(2) @ x.flatten(2).transpose(1, 2)
            return torch.linalg.eigvalsh(g).flatten(1)

    with pytest.raises(GraftError, match="torch.onnx.export cannot convert this model: .*eig") as e:
        to_onnx(Spectral(), torch.randn(2, 3, 4, 4), tmp_path / "m.onnx")
    assert "another --format" in str(e.value)
