"""Compression of a finished classifier run: global magnitude pruning (torch.nn.utils.prune) with an optional recovery
fine-tune through the normal loop, and int8 quantization of its ONNX export with onnxruntime's quantization tools
-- dynamic (weights int8, activations quantized on the fly: linear layers, embeddings) or static (QDQ, per-channel
weights, activation ranges calibrated on the training split: CNNs).

Each compression writes a run-like directory: the source's config.toml and labels.json, the preprocessing, the
compressed model (model.onnx when quantized, else model.safetensors and a native backbone/ export) and summary.json
with test metrics, size on disk and warm CPU latency at batch 1 (p50, p95; one thread unless asked) beside the
source run's, all measured in this process with the same serving metrics, data and thread count. ``graft eval`` /
``predict`` take it like a run.

torch's own int8 tensors (torch.ao.quantization) are deprecated in torch 2.14, so quantized models are ONNX
models. Unstructured pruning leaves dense tensors of the same size: it shrinks files only when compressed
(``zipped_bytes`` in the summary) and speeds up nothing on dense kernels; the summary says how sparse the model is.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

from . import export as ex
from . import predictions, rundir
from .checkpoint import atomic_save_file, clean_state_dict, load_weights
from .errors import GraftError
from .run import Run, scalars

QUANTIZE = ("dynamic-int8", "static-int8")


def parse_prune(spec: str | None) -> float | None:
    """``"magnitude:0.5"`` -> 0.5 (the fraction of weights set to zero). Raises GraftError for other forms."""
    if not spec:
        return None
    method, _, amount = spec.partition(":")
    try:
        value = float(amount)
    except ValueError:
        value = -1.0
    if method != "magnitude" or not 0.0 < value < 1.0:
        raise GraftError(f"--prune {spec!r}: give magnitude:FRACTION with FRACTION between 0 and 1, e.g. "
                         f"magnitude:0.5 (global magnitude pruning of half the weights).")
    return value


def prunable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Modules whose ``weight`` is a matrix or kernel (linear layers, convolutions, GPT-2's Conv1D): every weight of
    ndim >= 2 except embedding tables, which are lookups rather than multiplications."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.nn.Parameter) and m.weight.ndim >= 2
            and not isinstance(m, torch.nn.Embedding)]


def magnitude_masks(model: torch.nn.Module, amount: float) -> dict[str, torch.Tensor]:
    """Global magnitude pruning (``torch.nn.utils.prune.global_unstructured`` with L1Unstructured): the
    ``amount`` fraction of smallest-magnitude weights over all prunable modules, as boolean keep-masks by module
    name. Computed on a copy: ``model`` is unchanged."""
    import copy

    from torch.nn.utils import prune

    work = copy.deepcopy(model)
    modules = prunable(work)
    if not modules:
        raise GraftError("--prune: the model has no linear or convolution weights to prune.")
    prune.global_unstructured([(m, "weight") for _, m in modules], pruning_method=prune.L1Unstructured,
                              amount=amount)
    return {n: m.weight_mask.bool() for n, m in modules}


def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor], during_training: bool = False) -> None:
    """Zero the pruned weights for good; with ``during_training`` also zero their gradients, so that AdamW and SGD
    (momentum and weight decay included) keep them at exactly zero and the parameter names stay as they are."""
    modules = dict(prunable(model))
    with torch.no_grad():
        for name, mask in masks.items():
            weight = modules[name].weight
            keep = mask.to(weight.device)
            weight.mul_(keep)
            if during_training:
                weight.register_hook(lambda grad, keep=keep: grad * keep)


def sparsity(model: torch.nn.Module) -> dict:
    weights = [m.weight for _, m in prunable(model)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {"prunable_weights": total, "zero_weights": zeros, "sparsity": zeros / max(total, 1)}


def score(run: Run, model, strategy, inputs, threads: int = 1, records: list | None = None) -> dict:
    """Test (else val) metrics of ``model`` under the serving ``strategy``, and its warm batch-1 latency
    (``records``: receives the per-example records, ``graft.predictions``)."""
    split = "test" if run.data.dataset("test") else "val"
    metrics = run.evaluate(model, split, strategy, records=records)
    return {"split": split, "metrics": scalars(metrics or {}), "latency": ex.latency(model, inputs, threads)}


def recover(run_dir: Path, out: Path, masks: dict, steps: int, lr: float | None, echo) -> Path:
    """The recovery fine-tune: the source run's config for ``steps`` optimizer steps, starting from its pruned
    weights with the pruned ones held at zero, through the normal loop (resumable) into ``out``/finetune."""
    from .loop import train

    overrides = [f"train.max_steps={steps}", "train.eval_at_start=true", "train.plot=false",
                 f"train.eval_every={max(1, steps // 4)}"] + ([f"train.lr={lr}"] if lr else [])
    conf = rundir.read_config(run_dir, overrides)
    target = out / "finetune"
    state = load_weights(run_dir / rundir.WEIGHTS)

    def prepare(run):
        run.model.load_state_dict({k: v.to(run.device) for k, v in state.items()})
        apply_masks(run.model, masks, during_training=True)

    resume = (target / rundir.CHECKPOINTS / "latest").is_file() and not (target / rundir.SUMMARY).is_file()
    echo(f"Recovery fine-tune, {steps} steps: {target}" + (" (resuming)" if resume else ""))
    summary = train(conf, target, resume=resume, echo=echo, prepare=prepare)
    if summary.get("interrupted"):
        raise GraftError("The recovery fine-tune was interrupted; run the same graft compress again to resume it.")
    return target / rundir.WEIGHTS


class _Calibration:
    """onnxruntime's CalibrationDataReader over the first ``count`` examples of the training split, in order (the
    splits are seeded shuffles, so a sample of every class). Every batch has the same shape -- onnxruntime's
    histogram calibrators stack them --: equal batch sizes (``count`` rounded down to a multiple of 16 when above
    it) and, for text, every batch padded to the longest (attention mask 0 there)."""

    def __init__(self, run: Run, names: list[str], count: int, graph_inputs: set[str]):
        size = min(16, count)
        count = count - count % size
        batches, seen = [], 0
        for batch in run.loader("train", train=False, batch_size=size) or []:
            if ex.flatten(batch["inputs"])[1][0].shape[0] < size:
                break
            batches.append(ex.flatten(batch["inputs"])[1])
            seen += size
            if seen >= count:
                break
        if not batches:
            raise GraftError(f"static-int8 calibrates on the training split, which has fewer than {size} examples.")
        if run.backbone.modality == "text":
            longest = max(t[0].shape[1] for t in batches)
            pad = getattr(run.backbone.tokenizer(), "pad_token_id", None) or 0
            batches = [[torch.nn.functional.pad(t, (0, longest - t.shape[1]), value=pad if n == "input_ids" else 0)
                        for n, t in zip(names, b)] for b in batches]
        self.batches = [{n: t.float().numpy() if n == ex.IMAGE_INPUT else t.numpy() for n, t in zip(names, b)
                         if n in graph_inputs} for b in batches]
        self.examples = seen
        self.it = iter(self.batches)

    def get_next(self):
        return next(self.it, None)


CALIBRATION = ("percentile", "minmax", "entropy")


def quantize(fp32: Path, target: Path, mode: str, run: Run, names: list[str], calibration: int,
             method: str = "percentile") -> dict:
    """int8 ``target`` from the fp32 ONNX file with onnxruntime.quantization, after its pre-processing (shape
    inference, graph optimisation: BatchNorm folded into convolutions). Static ranges come from ``method``:
    percentile (99.999th of the absolute activations, outliers ignored), minmax or entropy (KL). Returns what was
    done."""
    import contextlib
    import logging

    try:
        from onnxruntime import quantization as q
    except ImportError:
        raise GraftError("--quantize needs onnxruntime: pip install 'graftkit[onnx]'.") from None
    pre = fp32.with_name("preprocessed.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the tools log every skipped tensor on the root logger
    try:
        with contextlib.redirect_stdout(None):
            q.quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=run.backbone.modality == "text")
        if mode == "dynamic-int8":
            q.quantize_dynamic(str(pre), str(target), weight_type=q.QuantType.QInt8)
            return {"method": "onnxruntime quantize_dynamic", "weights": "int8", "activations": "uint8, dynamic"}
        import onnx

        graph = {i.name for i in onnx.load(str(pre), load_external_data=False).graph.input}  # unused ones dropped
        reader = _Calibration(run, names, calibration, graph)
        reader_cls = type("Reader", (q.CalibrationDataReader,), {"get_next": lambda s: reader.get_next()})
        calibrate = {"percentile": q.CalibrationMethod.Percentile, "minmax": q.CalibrationMethod.MinMax,
                     "entropy": q.CalibrationMethod.Entropy}[method]
        q.quantize_static(str(pre), str(target), reader_cls(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=calibrate)
    finally:
        root.setLevel(level)
    return {"method": f"onnxruntime quantize_static (QDQ, {method})", "weights": "int8 per channel",
            "activations": "uint8", "calibration_examples": reader.examples, "calibration_split": "train"}


def zipped_size(path: Path) -> int:
    data = path.read_bytes()
    return len(zlib.compress(data, 6))


def compress_run(run_dir: str | Path, out: str | Path | None = None, quantize_mode: str | None = None,
             prune: str | None = None, finetune_steps: int = 0, finetune_lr: float | None = None,
             calibration: int = 256, calibration_method: str = "percentile", threads: int = 1,
             trust_remote_code: bool = False, echo=print) -> dict:
    """Compress finished run ``run_dir`` into ``out`` (default RUN_DIR/compressed-...); returns the summary.
    Raises GraftError for bad input: no weights, no classifier, options that do not fit, an unexportable layer."""
    run_dir = Path(run_dir)
    amount = parse_prune(prune)
    if quantize_mode is None and amount is None:
        raise GraftError("Nothing to do: give --quantize dynamic-int8|static-int8 and/or --prune magnitude:FRACTION.")
    if quantize_mode is not None and quantize_mode not in QUANTIZE:
        raise GraftError(f"--quantize {quantize_mode!r}: use {' or '.join(QUANTIZE)}.")
    if calibration_method not in CALIBRATION:
        raise GraftError(f"calibration method {calibration_method!r}: use {', '.join(CALIBRATION)}.")
    if finetune_steps and amount is None:
        raise GraftError("--finetune-steps recovers from pruning; give --prune too.")
    name = "-".join(x for x in (f"pruned{amount:g}" if amount else "", f"ft{finetune_steps}" if finetune_steps else "",
                                quantize_mode or "") if x)
    out = Path(out or run_dir / f"compressed-{name}")
    foreign = out.exists() and any(not p.name.startswith(".") for p in out.iterdir())  # a pipeline's state file
    if foreign and not (out / "compress.json").is_file():
        raise GraftError(f"{out} exists and was not written by graft compress; choose another --out.")
    run = ex.load_run(run_dir, overrides=["train.precision=fp32"], device="cpu", trust_remote_code=trust_remote_code)
    serving = ex.serving_strategy(run.strategy, "graft compress: ")
    if amount is not None and run.adapter is not None:
        raise GraftError(f"--prune: run {run_dir} trained an adapter ({run.adapter.name}); pruning would cut its "
                         f"low-rank factors, not the weights they update. Quantize it (the export merges the "
                         f"adapter), or prune a run without one.")
    out.mkdir(parents=True, exist_ok=True)
    request = json.dumps({"source": str(run_dir.resolve()), "prune": prune, "finetune_steps": finetune_steps,
                          "finetune_lr": finetune_lr})
    if (out / "compress.json").is_file() and (out / "compress.json").read_text() != request:
        shutil.rmtree(out / "finetune", ignore_errors=True)  # another request's recovery run: never resumed
    for stale in (rundir.SUMMARY, "model.onnx", "model.onnx.data", rundir.WEIGHTS):  # an earlier result here
        (out / stale).unlink(missing_ok=True)
    (out / "compress.json").write_text(request)
    model = run.model.eval()
    one, kept = ex.take(ex.sample_inputs(run), slice(0, 1)), []
    echo(f"Scoring the source run {run_dir} (PyTorch, CPU; latency with {threads} thread(s))...")
    source = score(run, model, serving, one, threads)
    source.update(format="pytorch", size_bytes=(run_dir / rundir.WEIGHTS).stat().st_size)
    summary = {"source": {"run": str(run_dir.resolve()), **source}, "compression": {"quantize": quantize_mode,
                                                                                    "prune": prune}}
    if amount is not None:
        masks = magnitude_masks(model, amount)
        if finetune_steps:
            model.load_state_dict(load_weights(recover(run_dir, out, masks, finetune_steps, finetune_lr, echo)))
        apply_masks(model, masks)
        summary["compression"].update(**sparsity(model), finetune_steps=finetune_steps)
    if quantize_mode is None:  # pruned only: a PyTorch run directory
        _save_pruned(run, run_dir, out)
        result = score(run, model, serving, one, threads, kept)
        result.update(format="pytorch (pruned)", size_bytes=(out / rundir.WEIGHTS).stat().st_size,
                      zipped_bytes=zipped_size(out / rundir.WEIGHTS))
        summary["source"]["zipped_bytes"] = zipped_size(run_dir / rundir.WEIGHTS)
    else:
        import contextlib

        with run.adapter.merged(run.backbone) if run.adapter is not None else contextlib.nullcontext():
            result = _quantized(run, model, serving, (one, threads, kept), out, quantize_mode,
                                (calibration, calibration_method), summary)
    summary["predictions"] = predictions.write_all(out, {result["split"]: kept}, run.data)
    return _finish(run, out, summary, result, serving)


def _save_pruned(run: Run, run_dir: Path, out: Path) -> None:
    atomic_save_file(clean_state_dict(run.model.state_dict()), out / rundir.WEIGHTS)
    ex.copy_run_files(run_dir, out, run)
    run.strategy.export(run.model, str(out))


def _quantized(run, model, serving, probe, out, mode, calibration, summary) -> dict:
    with tempfile.TemporaryDirectory(prefix="graft-onnx-") as tmp:
        fp32 = Path(tmp) / "model.onnx"
        names = ex.to_onnx(model, ex.sample_inputs(run), fp32, run.backbone.limits().get("max_tokens"),
                           serving.task.output_names)
        onnx_fp32 = ex.OnnxModel(fp32)
        summary["onnx_fp32"] = {**score(run, onnx_fp32, serving, *probe[:2]), "format": "onnx fp32",
                                "size_bytes": ex.files_size(Path(tmp), ["model.onnx"]),
                                "max_abs_difference": ex.max_abs_difference(model, onnx_fp32, ex.sample_inputs(run))}
        summary["compression"].update(quantize(fp32, out / "model.onnx", mode, run, names, *calibration))
    ex.copy_run_files(Path(summary["source"]["run"]), out, run)
    quantized = ex.OnnxModel(out / "model.onnx")
    result = score(run, quantized, serving, *probe)
    result.update(format=f"onnx {mode}", size_bytes=ex.files_size(out, ["model.onnx"]))
    return result


def _finish(run, out, summary, result, serving) -> dict:
    src = summary["source"]
    metric = serving.primary_metric
    summary.update(
        compressed=result, compressed_dir=str(out), strategy=serving.name, backbone=run.backbone.name, metric=metric,
        **{result["split"]: result["metrics"]},
        parameters={"total": sum(p.numel() for p in run.model.parameters())},
        size_bytes=result["size_bytes"],
        change={f"{metric}": result["metrics"].get(metric, float("nan")) - src["metrics"].get(metric, float("nan")),
                "size_ratio": result["size_bytes"] / src["size_bytes"],
                "latency_p50_ratio": result["latency"]["p50_ms"] / src["latency"]["p50_ms"]})
    rundir.write_summary(out, summary)
    return summary


def rows(summary: dict) -> list[list[str]]:
    """Table rows (model, metric, size, latency p50 / p95) of a compression summary."""
    metric = summary["metric"]
    out = []
    for key, label in (("source", "source (PyTorch)"), ("onnx_fp32", "ONNX fp32"), ("compressed", "compressed")):
        r = summary.get(key)
        if r is None:
            continue
        label = r["format"] if key == "compressed" else label
        out.append([label, f"{r['metrics'].get(metric, float('nan')):.4f}", f"{r['size_bytes'] / 2**20:.2f} MiB",
                    f"{r['latency']['p50_ms']:.2f} / {r['latency']['p95_ms']:.2f} ms"])
    return out
