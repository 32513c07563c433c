"""Serving formats of a finished classifier run: ONNX (checked against PyTorch in onnxruntime) and TorchScript, the
preprocessing saved beside them, and ONNX exports loaded back as runs for ``graft eval`` / ``predict``: whether a run
directory is served from ONNX or PyTorch is decided here, in ``load_run`` (``graft.load_run``).

ONNX comes from ``torch.onnx.export`` (the torch.export-based exporter) with dynamic batch -- and, for text,
sequence -- axes, and runs in onnxruntime; TorchScript from ``torch.jit.trace`` (which torch deprecates in favour of
torch.export; kept for servers that still load it). Classifiers serve: runs of strategies built on
``graft.supervised.Supervised`` (finetune, distill, plugins subclassing it). An exported or compressed model is
scored by ``Supervised`` itself with the task's plain loss (``serving_strategy``), so a distilled student is scored
like its source, without its teacher.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import torch

from . import rundir
from .config import Config, create
from .errors import GraftError
from .interfaces import Backbone, SoftTargetLoss
from .run import Run, load_trained
from .supervised import Supervised

FORMATS = ("native", "onnx", "torchscript")
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
IMAGE_INPUT = "pixel_values"
PREPROCESSING = "preprocessing"  # folder of an export: save_preprocessing's files
EXPORT_INFO = "export.json"
#: above this many bytes of weights an ONNX file keeps them in model.onnx.data (protobuf's 2 GiB limit)
EXTERNAL_DATA_BYTES = 1 << 30


def serving_strategy(strategy, where: str = "") -> Supervised:
    """A plain ``Supervised`` on ``strategy``'s data, head options and loss -- the task's own loss (cross-entropy,
    BCE, MSE) in place of a soft-target one -- to score and predict with an exported model. Raises GraftError when
    ``strategy`` is not a classifier built on ``Supervised`` (mlm, clm, other plugins)."""
    if not isinstance(strategy, Supervised):
        raise GraftError(f"{where}strategy {strategy.name!r} is not a classifier built on graft.supervised.Supervised "
                         f"(finetune, distill), so it has no one network from inputs to outputs to export or "
                         f"compress. Export it with --format native.")
    task = strategy.task
    loss = strategy.loss
    if loss is None or isinstance(loss, SoftTargetLoss):
        if not task.losses:
            raise GraftError(f"{where}the {task.name} task names no loss of its own (Task.losses) to score the "
                             f"exported model with.")
        loss = create("loss", {"plugin": task.losses[0]}, where="serving loss")
    plain = Supervised(strategy.options, backbone=strategy.backbone, loss=loss, data=strategy.data)
    plain.name = strategy.name
    plain.primary_metric = plain.task_metric()
    return plain


def sample_inputs(run: Run, count: int = 4):
    """Encoded inputs of up to ``count`` examples (at least 2, repeated if need be) of the run's test split (else
    val, else train), on the CPU: export traces and parity checks run on real examples."""
    from .batches import move

    split = next((s for s in ("test", "val", "train") if run.data.dataset(s)), None)
    if split is None:
        raise GraftError("The run's data has no examples to trace the export with.")
    data = run.data.dataset(split)
    idx = [i % len(data) for i in range(max(2, min(count, len(data))))]
    return move(run.data.collate([data[i] for i in idx])["inputs"], torch.device("cpu"))


def flatten(inputs) -> tuple[list[str], list[torch.Tensor]]:
    if isinstance(inputs, torch.Tensor):
        return [IMAGE_INPUT], [inputs]
    return list(inputs), [inputs[k] for k in inputs]


def take(inputs, index):
    """Examples ``index`` (a slice) of an input batch."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    return {k: v[index] for k, v in inputs.items()}


class _Flat(torch.nn.Module):
    """The classifier with positional tensor inputs: exporters take tuples, the classifier a tensor or a dict."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        return self.model(tensors[0] if self.names == [IMAGE_INPUT] else dict(zip(self.names, tensors)))


def _first_line(e: BaseException) -> str:
    """The cause in an exporter's error: its summary line when it has one (torch.onnx wraps the real error)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.strip().startswith(("Traceback", "File"))]
    return (lines[0] if lines else type(e).__name__)[:400]


def to_onnx(model, inputs, path: Path, max_tokens: int | None = None, outputs=("logits",)) -> list[str]:
    """Write ``model`` (classifier: inputs -> the task's outputs, e.g. logits ``[B, classes]``) as ONNX to ``path``
    with a dynamic batch axis (and sequence axis for text, up to ``max_tokens``); ``outputs`` names its outputs.
    Returns the graph's input names. Raises GraftError naming the layer or operator the exporter could not
    convert."""
    from torch.export import Dim

    names, tensors = flatten(inputs)
    batch = Dim("batch", min=1, max=1 << 16)
    if names == [IMAGE_INPUT]:
        dynamic = {"tensors": ({0: batch},)}
    else:
        seq = Dim("sequence", min=1, max=max_tokens or 1 << 16)
        dynamic = {"tensors": tuple({0: batch, 1: seq} for _ in tensors)}
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    flat = _Flat(model, names).eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(flat, tuple(tensors), str(path), input_names=names, output_names=list(outputs),
                              dynamic_shapes=dynamic, dynamo=True, external_data=size > EXTERNAL_DATA_BYTES,
                              verbose=False, optimize=True)
    except Exception as e:  # the exporter raises many types (export guards, unsupported operators, ONNX checks)
        raise GraftError(f"--format onnx: torch.onnx.export cannot convert this model: {_first_line(e)}. A layer "
                         f"without an ONNX form needs another --format (torchscript, native).") from None
    _strip_metadata(path)
    return names


def _strip_metadata(path: Path) -> None:
    """Drop the exporter's per-node debugging metadata (source lines, FX names): most of a small model's file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, str(path))


def to_torchscript(model, inputs, path: Path) -> list[str]:
    """Write ``model`` traced with ``torch.jit.trace`` to ``path``; returns its input names in order. Raises
    GraftError when tracing fails."""
    names, tensors = flatten(inputs)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(_Flat(model, names).eval(), tuple(tensors), strict=False, check_trace=False)
            traced.save(str(path))
    except Exception as e:  # tracer errors come as RuntimeError, TypeError, ...
        raise GraftError(f"--format torchscript: torch.jit.trace cannot trace this model: {_first_line(e)}. Use "
                         f"--format onnx or native.") from None
    return names


class OnnxModel:
    """An onnxruntime session called like the classifier it was exported from: ``inputs`` (a ``[B, C, H, W]``
    tensor, or a dict of ``[B, T]`` tensors) -> logits ``[B, outputs]`` as a CPU float tensor. It runs on the CPU
    execution provider with torch's thread count, so timings compare with PyTorch's."""

    training = False

    def __init__(self, path: str | Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise GraftError("Running an ONNX model needs onnxruntime: pip install 'graftkit[onnx]'.") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def feed(self, inputs) -> dict:
        if isinstance(inputs, torch.Tensor):
            return {self.names[0]: inputs.detach().cpu().float().numpy()}
        return {n: inputs[n].detach().cpu().numpy() for n in self.names}

    def __call__(self, inputs):
        return torch.from_numpy(self.session.run(None, self.feed(inputs))[0])

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def parameters(self):
        return iter(())


class TorchScriptModel(OnnxModel):
    """A TorchScript file this process wrote, called like the classifier (for the export's parity check)."""

    def __init__(self, path: str | Path, names: list[str]):
        self.path, self.names = Path(path), names
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = torch.jit.load(str(path), map_location="cpu")

    @torch.no_grad()
    def __call__(self, inputs):
        _, tensors = flatten(inputs)
        return self.module(*tensors)


@torch.no_grad()
def max_abs_difference(reference, candidate, inputs) -> float:
    """Largest absolute difference between the logits of ``reference`` and ``candidate`` on ``inputs``, and on its
    first example alone (batch 1 walks other kernel paths and would show a baked-in batch size)."""
    worst = 0.0
    for part in (inputs, take(inputs, slice(0, 1))):
        a, b = reference(part).float(), candidate(part).float()
        if a.shape != b.shape:
            raise GraftError(f"The export returns shape {tuple(b.shape)} where PyTorch returns {tuple(a.shape)}.")
        worst = max(worst, float((a - b).abs().max()))
    return worst


@torch.no_grad()
def latency(model, inputs, threads: int = 1, seconds: float = 2.0, warmup: int = 5, max_repeats: int = 200) -> dict:
    """Warm CPU latency of one call on ``inputs`` (batch 1 for the reports) with ``threads`` intra-op threads (torch
    and onnxruntime alike): p50 and p95 over repeats, in ms. One thread by default: the usual setup of a serving
    worker, and the one figure that OpenMP's wait policy does not change (graft's PASSIVE default made PyTorch's
    many small kernels at batch 1 about 3x slower with 2 threads on a quiet 2-core machine)."""
    import os

    own = torch.get_num_threads()
    torch.set_num_threads(threads)
    if isinstance(model, OnnxModel) and not isinstance(model, TorchScriptModel):
        model = OnnxModel(model.path, threads)
    try:
        for _ in range(warmup):
            model(inputs)
        times, start = [], time.perf_counter()
        while len(times) < max_repeats and (len(times) < 20 or time.perf_counter() - start < seconds):
            t0 = time.perf_counter()
            model(inputs)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(own)
    times.sort()
    return {"p50_ms": times[len(times) // 2], "p95_ms": times[min(len(times) - 1, int(len(times) * 0.95))],
            "repeats": len(times), "threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def files_size(directory: Path, names: list[str]) -> int:
    """Bytes on disk of ``names`` in ``directory`` and their ONNX external-data files."""
    total = 0
    for n in names:
        for p in (directory / n, directory / f"{n}.data"):
            if p.is_file():
                total += p.stat().st_size
    return total


def copy_run_files(run_dir: Path, out: Path, run: Run) -> None:
    """The source run's config and labels, and the preprocessing the network needs, into ``out``."""
    for name in (rundir.CONFIG, rundir.LABELS):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / name)
    (out / PREPROCESSING).mkdir(exist_ok=True)
    save_preprocessing(run.backbone, out / PREPROCESSING)


def export_run(run: Run, run_dir: Path, fmt: str, out: Path) -> dict:
    """Write ``run`` (loaded with its data) in ``fmt`` ("onnx" or "torchscript") into ``out`` with its preprocessing,
    config and labels, check the file against the PyTorch model on real examples, and return (and write as
    export.json) the facts: format, files, inputs, parity (max abs difference of logits), sizes."""
    import contextlib

    from .capabilities import ServingModel

    if isinstance(run.strategy, ServingModel):  # e.g. an embedding model: inputs -> embeddings, no task
        model, output_names, output_shape = run.strategy.serving_model(run.model.eval())
    else:
        task = serving_strategy(run.strategy, "--format " + fmt + ": ").task
        model, output_names, output_shape = run.model.eval(), task.output_names, task.output_shape
    out.mkdir(parents=True, exist_ok=True)
    inputs = sample_inputs(run)
    file = MODEL_FILES[fmt]
    merged = run.adapter.merged(run.backbone) if run.adapter is not None else contextlib.nullcontext()
    with merged:
        if fmt == "onnx":
            names = to_onnx(model, inputs, out / file, run.backbone.limits().get("max_tokens"), output_names)
            loaded = OnnxModel(out / file)
        else:
            names = to_torchscript(model, inputs, out / file)
            loaded = TorchScriptModel(out / file, names)
        diff = max_abs_difference(model, loaded, inputs)
    copy_run_files(run_dir, out, run)
    info = {"format": fmt, "source": str(run_dir), "file": file, "inputs": names, "outputs": list(output_names),
            "output_shape": output_shape, "max_abs_difference": diff, "checked_examples": len(flatten(inputs)[1][0]),
            "size_bytes": files_size(out, [file]), "torch": torch.__version__}
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2))
    return info


def save_preprocessing(backbone: Backbone, directory: Path) -> None:
    """Write what encoding raw inputs for ``backbone`` takes into the (existing) ``directory``: ``preprocessing.json``
    (modality, ``limits()``, and ``image_config()`` for image models) and, for text models, the tokenizer's own files
    (its ``save_pretrained``). An exported network (ONNX) is served from these without the network itself
    (``SavedPreprocessing``). Raises GraftError when a text model has no tokenizer."""
    info = {"backbone": backbone.name, "modality": backbone.modality, "limits": backbone.limits()}
    if backbone.modality == "image":
        info["image_config"] = backbone.image_config()
    else:
        tokenizer = backbone.tokenizer()
        if tokenizer is None:
            raise GraftError(f"backbone {backbone.name!r} has no tokenizer to save beside its export.")
        tokenizer.save_pretrained(str(directory))
    Path(directory, "preprocessing.json").write_text(json.dumps(info, indent=2))


class SavedPreprocessing(Backbone):
    """The preprocessing of an exported network, read from the files ``save_preprocessing`` wrote:
    modality, image config, input limits, tokenizer (loaded by the backbone family's ``load_tokenizer``). Data
    sources encode inputs with it as with the backbone; it has no network."""

    def __init__(self, directory: Path, family: type[Backbone]):
        super().__init__()
        path = directory / "preprocessing.json"
        if not path.is_file():
            raise GraftError(f"{directory.parent} has no {PREPROCESSING}/preprocessing.json; export the run again.")
        self.info = json.loads(path.read_text())
        self.directory, self.family = directory, family
        self.name, self.modality = self.info["backbone"], self.info["modality"]
        self._tokenizer = None

    def image_config(self) -> dict:
        if self.modality != "image":
            return super().image_config()
        c = self.info["image_config"]
        return {**c, "size": tuple(c["size"]), "mean": tuple(c["mean"]), "std": tuple(c["std"])}

    def limits(self) -> dict:
        limits = dict(self.info["limits"])
        if "image_size" in limits:
            limits["image_size"] = tuple(limits["image_size"])
        return limits

    def tokenizer(self):
        if self.modality != "text":
            return super().tokenizer()
        if self._tokenizer is None:
            from .capabilities import SavedTokenizer, require

            family = require(self.family, SavedTokenizer, f"serving the export in {self.directory.parent}")
            self._tokenizer = family.load_tokenizer(str(self.directory))
        return self._tokenizer


class ExportedRun(Run):
    """A run served from an ONNX file (an export or a compression), assembled by ``Run`` in mode ``serve``: the
    config's data source reads and encodes data through the saved preprocessing, ``model`` is an onnxruntime session,
    and ``strategy`` is the serving ``Supervised``. ``evaluate`` and ``graft.predict`` work as on a trained run."""

    def __init__(self, config: Config, directory: Path, data_info: dict | None = None):
        self.directory = Path(directory)
        super().__init__(config.replace(train={"precision": "fp32"}), mode="serve", data_info=data_info)

    def _backbone(self):
        return SavedPreprocessing(self.directory / PREPROCESSING, self.config.plugins["backbone"].cls)

    def _strategy(self, strategy):
        from .capabilities import ServingModel

        if isinstance(strategy, ServingModel):
            raise GraftError(f"{self.directory} holds an exported {strategy.name!r} network (export.json names its "
                             f"inputs and outputs): run it with onnxruntime itself. graft eval / predict take the run "
                             f"directory it was exported from.")
        serving = serving_strategy(strategy)
        self.loss = serving.loss
        return serving

    def _model(self):
        return OnnxModel(self.directory / MODEL_FILES["onnx"])


def holds_onnx(run_dir: Path) -> bool:
    """Whether ``run_dir`` is served from ONNX (an export, or a quantized compression) rather than PyTorch weights."""
    return (run_dir / rundir.CONFIG).is_file() and (run_dir / MODEL_FILES["onnx"]).is_file()


def load_run(run_dir: str | Path, overrides=(), for_prediction: bool = False, device: str | None = None,
             registry=None, trust_remote_code: bool = False) -> Run:
    """A finished run loaded back to evaluate or predict (``graft.load_run``): an ONNX export or compression as an
    ``ExportedRun`` (on the CPU), else the PyTorch run with its best weights (``graft.run.load_trained``).
    ``for_prediction``: no data is read (labels.json says the task and labels). Global RNG state is left as it was.
    Raises GraftError when ``run_dir`` is neither."""
    run_dir = Path(run_dir)
    if not holds_onnx(run_dir):
        return load_trained(run_dir, overrides, for_prediction, device, registry, trust_remote_code)
    conf = rundir.read_config(run_dir, overrides, registry)
    return ExportedRun(conf, run_dir, rundir.read_labels(run_dir) if for_prediction else None)
