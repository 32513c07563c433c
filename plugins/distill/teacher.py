"""The teacher: a finished run (or a backbone table with a linear head's weights) and its own view of the data
(a second instance of the student's data source, set up with the teacher's backbone)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from graft import GraftError, create, warn
from graft.capabilities import Views
from graft.supervised import classifier


@dataclass
class Teacher:
    model: object  # nn.Module: inputs -> logits [batch, classes]; (inputs, hidden=True) -> (logits, hidden layers)
    backbone: object  # its Backbone (preprocessing for its view of the data)
    config: object  # the teacher run's Config, or None for a teacher given as tables
    labels: list


def load_teacher(options, data, outputs: int) -> Teacher:
    """The teacher of ``options`` (DistillOptions) for student data ``data``, on the CPU, in eval mode, frozen
    (``outputs``: the width of the task's head, for a teacher given as tables). Raises GraftError when it predicts
    other labels than the data has."""
    if options.teacher:
        from graft import load_run

        run = load_run(Path(options.teacher), for_prediction=True, device="cpu")
        teacher = Teacher(run.model, run.backbone, run.config, list(run.data.label_names or []))
    else:
        model, backbone = from_tables(options.teacher_backbone, options.teacher_head, outputs)
        teacher = Teacher(model, backbone, None, list(data.label_names or []))
    if teacher.labels != list(data.label_names or []):
        raise GraftError(f"[strategy] teacher {options.teacher!r} predicts labels {teacher.labels}, but the data has "
                         f"{list(data.label_names or [])}.")
    teacher.model.eval().requires_grad_(False)
    return teacher


def from_tables(table: dict, head_path: str, classes: int):
    """(model, backbone) of a teacher given as a backbone table and a safetensors file with a linear head."""
    import torch
    from safetensors.torch import load_file

    if not table.get("plugin"):
        raise GraftError("[strategy] teacher_backbone needs plugin = \"...\" like a [backbone] table.")
    backbone = create("backbone", table, where="[strategy] teacher_backbone")
    with torch.random.fork_rng(devices=[]):  # the student's initialisation must not depend on the teacher's
        backbone.build()
        head = torch.nn.Linear(backbone.num_features, classes)
    if not Path(head_path).is_file():
        raise GraftError(f"[strategy] teacher_head {head_path!r} does not exist.")
    head_state = load_file(head_path)
    w = next((v for k, v in head_state.items() if k.endswith("weight")), None)
    b = next((v for k, v in head_state.items() if k.endswith("bias")), None)
    if w is None or tuple(w.shape) != (classes, backbone.num_features):
        raise GraftError(f"[strategy] teacher_head must hold a linear layer's weight of shape [{classes}, "
                         f"{backbone.num_features}] (the data's classes x the teacher's features); found "
                         f"{ {k: tuple(v.shape) for k, v in head_state.items()} }.")
    head.load_state_dict({"weight": w, "bias": torch.zeros(classes) if b is None else b})
    return classifier(backbone.module, head), backbone


def teacher_view(data, teacher: Teacher, teacher_name: str):
    """The teacher's view of the student's data: which examples, labels and augmentation from the student's run;
    how they are prepared (e.g. image_size) from the teacher run's, when it used the same data plugin -- a teacher
    trained on few labels then teaches all the student's examples. Warns when the teacher run split its data
    differently (it may then have trained on the student's validation and test examples)."""
    spec = teacher.config.plugins["data"] if teacher.config is not None else None
    if spec is None or spec.name != data.name:
        return view(data, teacher.backbone)
    why = split_differences(data, spec.options, teacher.config.train.seed)
    if why:
        warn(f"[strategy] teacher {teacher_name!r} split its data differently ({'; '.join(why)}), so it may have "
             f"trained on this run's validation and test examples and flatter the student. Use the teacher run's "
             f"[train] seed and [data] split settings.")
    return view(data, teacher.backbone, prepared_like=spec.options)


def option_names(data) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The source's ``view_options`` and ``training_options`` (``graft.capabilities.Views``); none for a source
    without them: the teacher then sees the student's options, and every difference of options counts."""
    return (data.view_options, data.training_options) if isinstance(data, Views) else ((), ())


def view(data, backbone, prepared_like=None):
    """The same examples prepared for another ``backbone`` (the teacher's view): a new, set-up instance of ``data``'s
    source with its seed and options, except the view options (how examples are prepared, e.g. ``image_size``),
    taken from ``prepared_like`` -- the options of another run of this source -- when given. Example i of every
    split is then the same example in both; augmentation draws match through ``example_seed``. Raises GraftError
    when the new instance splits differently (a source whose splits depend on the backbone)."""
    import dataclasses

    options = data.options
    if prepared_like is not None:
        options = dataclasses.replace(options, **{k: getattr(prepared_like, k) for k in option_names(data)[0]})
    other = type(data)(options)
    other.name, other.seed = data.name, data.seed
    other.setup(backbone, data.seed)
    for split in ("train", "val", "test"):
        a, b = data.dataset(split), other.dataset(split)
        if (a is None) != (b is None) or (a is not None and len(a) != len(b)):
            raise GraftError(f"The view of data source {data.name!r} for backbone {backbone.name!r} splits "
                             f"differently ({split}: {len(b) if b else 0} vs {len(a) if a else 0} examples): a "
                             f"data source must split the same way whatever the backbone.")
    return other


def split_differences(data, options, seed: int) -> list[str]:
    """Why a run of ``data``'s source with ``options`` and ``seed`` could have put other examples in validation or
    test than ``data`` (one phrase per difference; empty when the splits match): another seed, or another value of
    an option that is neither a view option nor a training option."""
    import dataclasses

    ignored = sum(option_names(data), ())
    diffs = [f"seed {seed} there, {data.seed} here"] if seed != data.seed else []
    return diffs + [f"[data] {f.name} = {getattr(options, f.name, None)!r} there, "
                    f"{getattr(data.options, f.name)!r} here" for f in dataclasses.fields(data.options)
                    if f.name not in ignored and getattr(options, f.name, None) != getattr(data.options, f.name)]


def same_view(data, backbone, teacher_data, teacher_backbone) -> bool:
    """True when the teacher would get exactly the student's inputs (same data options and preprocessing): then an
    online teacher runs on the student's batch itself -- the same augmented view, no second load."""
    import torch

    if backbone.modality != teacher_backbone.modality or repr(teacher_data.options) != repr(data.options):
        return False
    if backbone.modality == "text":
        st, tt = backbone.tokenizer(), teacher_backbone.tokenizer()
        if type(st) is not type(tt) or st.get_vocab() != tt.get_vocab():
            return False
    # The prepared inputs decide, not the backbones' nominal input sizes: a data source may resize both.
    split = next(sp for sp in ("val", "test", "train") if data.dataset(sp))
    n = min(8, len(data.dataset(split)))
    a = data.collate([data.dataset(split)[i] for i in range(n)])["inputs"]
    b = teacher_data.collate([teacher_data.dataset(split)[i] for i in range(n)])["inputs"]
    a, b = (x if isinstance(x, dict) else {"": x} for x in (a, b))
    return a.keys() == b.keys() and all(
        torch.is_tensor(a[k]) and torch.is_tensor(b[k]) and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
        for k in a)
