"""Distillation: the KD loss against the textbook formula, teacher cache reuse, cross-family teachers, features."""

import json
import math

import pytest
import torch

from conftest import TINY_VIT, graft, tiny_config, write_config
from graft import load_config
from graft import train
from graft.run import Run
from graft.plugins.losses import KD, kd_loss


def textbook(student, teacher, labels, alpha, T):
    """Sum over examples of T^2 * sum_c p_t,c (log p_t,c - log p_s,c), averaged; plus (1-alpha) CE; by hand."""
    total = 0.0
    for s_row, t_row, y in zip(student, teacher, labels):
        zs = [math.exp(v / T) for v in s_row]
        zt = [math.exp(v / T) for v in t_row]
        ps = [v / sum(zs) for v in zs]
        pt = [v / sum(zt) for v in zt]
        kl = sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps))
        e = [math.exp(v) for v in s_row]
        ce = -math.log(e[y] / sum(e))
        total += alpha * T * T * kl + (1 - alpha) * ce
    return total / len(labels)


@pytest.mark.parametrize("alpha,T", [(1.0, 1.0), (0.5, 2.0), (0.9, 4.0), (0.0, 3.0)])
def test_kd_matches_textbook(alpha, T):
    student = [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]
    teacher = [[1.5, 1.0, -0.5], [3.0, 0.0, -1.0]]  # second example: teacher and student disagree
    labels = [0, 2]
    got = kd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), alpha, T)
    assert got.item() == pytest.approx(textbook(student, teacher, labels, alpha, T), rel=1e-6)


def test_kd_gradient_scale_is_kept_by_t_squared():
    """For large T the soft-target gradient tends to (z_s - z_t) / (N * C) (Hinton et al.): T^2 keeps it O(1)."""
    torch.manual_seed(0)
    s = torch.randn(4, 5)
    t = torch.randn(4, 5)
    s, t = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    norms = []
    for T in (5.0, 20.0, 80.0):
        x = s.clone().requires_grad_(True)
        kd_loss(x, t, None, 1.0, T).backward()
        norms.append(x.grad.norm().item())
        limit = (s - t) / (4 * 5)
        if T == 80.0:
            assert torch.allclose(x.grad, limit, atol=2e-3)
    assert max(norms) / min(norms) < 1.3  # without T^2 it would shrink 256-fold from T=5 to T=80


def test_kd_schedules():
    loss = KD(KD.Options(alpha=0.9, alpha_end=0.1, temperature=4.0, temperature_end=1.0, schedule="linear"))
    assert loss.at(0.0) == pytest.approx((0.9, 4.0))
    assert loss.at(0.5) == pytest.approx((0.5, 2.5))
    assert loss.at(1.0) == pytest.approx((0.1, 1.0))
    assert KD(KD.Options(alpha=0.7)).at(0.8) == (0.7, 4.0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    conf = tiny_config(backbone={"plugin": "timm", "model": "test_resnet"}, data={"image_size": 16},
                       train={"epochs": 2, "batch_size": 64})
    train(load_config(conf, where="teacher.toml"), d / "run", echo=lambda m: None)
    return d / "run"


def student_conf(teacher, tmp_path, **strategy):
    conf = tiny_config(strategy={"plugin": "distill", "teacher": str(teacher), "cache_dir": str(tmp_path / "cache"),
                                 **strategy},
                       loss={"plugin": "kd", "temperature": 2.0}, train={"max_steps": 6, "eval_every": 6})
    return conf


def test_cache_is_built_once_and_reused(tmp_path, teacher):
    conf = student_conf(teacher, tmp_path)
    first = train(load_config(conf, where="s.toml"), tmp_path / "a", echo=lambda m: None)
    files = list((tmp_path / "cache" / "teacher").glob("*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    second = train(load_config(conf, where="s.toml"), tmp_path / "b", echo=lambda m: None)
    assert files[0].stat().st_mtime_ns == stamp  # reused, not rewritten
    assert second["test"]["accuracy"] == first["test"]["accuracy"]
    online = train(load_config(student_conf(teacher, tmp_path, cache="off"), where="s.toml"), tmp_path / "c",
                   echo=lambda m: None)
    assert online["test"]["accuracy"] == pytest.approx(first["test"]["accuracy"])  # same teacher outputs
    report = first["distill"]
    assert report["teacher_params"] > report["student_params"] > 0
    assert report["teacher_examples_per_s"] > 0 and first["test"]["teacher_accuracy"] > 0.5


def test_hf_student_from_timm_teacher_with_features(tmp_path, teacher):
    conf = student_conf(teacher, tmp_path, feature_layers=[[-1, -1], [1, 2]], feature_loss="feature_cosine")
    conf["backbone"] = {"plugin": "hf", "config": {"model_type": "vit", "image_size": 8, "patch_size": 4,
                                                   "hidden_size": 32, "num_hidden_layers": 2,
                                                   "num_attention_heads": 2, "intermediate_size": 64}}
    conf["train"]["log_every"] = 1
    out = tmp_path / "hf"
    from graft.optim import build_optimizer

    r = Run(load_config(conf, where="s.toml"))
    optimized = {id(p) for g in build_optimizer(r.config.train, r.strategy.param_groups(r.model)).param_groups
                 for p in g["params"]}
    assert all(id(p) in optimized for p in r.model.projections.parameters())  # the projections learn
    summary = train(load_config(conf, where="s.toml"), out, echo=lambda m: None)
    from safetensors.torch import load_file

    trained = load_file(str(out / "last.safetensors"))
    assert not torch.equal(trained["projections.0.weight"], r.model.state_dict()["projections.0.weight"])
    assert summary["distill"]["teacher"] == str(teacher)
    logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("feature_loss" in r and "kd_loss" in r for r in logs if r["split"] == "train")
    # the teacher runs on 16px images, the student on 8px: each side kept its own preprocessing
    assert 'image_size = 16' in (teacher / "config.toml").read_text()

    # Bug (issue 18): `graft predict` on a distill run failed inside the teacher's view of data it never reads.
    # The student predicts alone, without the feature projections only training used, like the full rebuild.
    from graft.run import predict
    from graft import load_run

    full, alone = load_run(out), load_run(out, for_prediction=True)
    assert not hasattr(alone.strategy, "teacher") and "projections.0.weight" not in alone.model.state_dict()
    images = full.data.collate([full.data.dataset("test")[i] for i in range(8)])["inputs"]
    assert torch.equal(full.model(images), alone.model(images))
    png = tmp_path / "digit.png"
    from PIL import Image

    Image.new("L", (16, 16), 255).save(png)
    assert predict(alone, [str(png)])[0]["label"] == predict(full, [str(png)])[0]["label"]


def test_teacher_with_other_labels_is_refused(tmp_path, teacher, tiny_bert):
    from conftest import reviews

    conf = student_conf(teacher, tmp_path)
    conf["backbone"] = {"plugin": "hf", "weights": str(tiny_bert)}
    conf["data"] = {"plugin": "text", "path": str(reviews(tmp_path / "r.jsonl"))}
    proc = graft("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "x")
    assert proc.returncode == 2 and "predicts labels" in proc.stderr


def test_missing_teacher_is_a_clear_error(tmp_path):
    conf = student_conf(tmp_path / "nope", tmp_path)
    proc = graft("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "x")
    assert proc.returncode == 2 and "not a finished graft run" in proc.stderr


def test_teacher_from_backbone_table_and_head(tmp_path, teacher):
    """The same teacher given as a backbone table + head file teaches exactly like its run directory."""
    from_run = student_conf(teacher, tmp_path)
    from_run["data"]["image_size"] = 16
    from_run["backbone"] = {"plugin": "timm", "model": "test_resnet"}
    a = train(load_config(from_run, where="a.toml"), tmp_path / "a", echo=lambda m: None)
    tables = student_conf(teacher, tmp_path)
    tables["data"]["image_size"] = 16
    tables["backbone"] = {"plugin": "timm", "model": "test_resnet"}
    del tables["strategy"]["teacher"]
    tables["strategy"]["teacher_backbone"] = {"plugin": "timm", "model": "test_resnet",
                                              "weights": str(teacher / "backbone" / "model.safetensors")}
    tables["strategy"]["teacher_head"] = str(teacher / "head.safetensors")
    b = train(load_config(tables, where="b.toml"), tmp_path / "b", echo=lambda m: None)
    assert b["test"]["teacher_accuracy"] == a["test"]["teacher_accuracy"] > 0.5
    assert b["test"]["accuracy"] == pytest.approx(a["test"]["accuracy"])
    assert len(list((tmp_path / "cache" / "teacher").glob("*.safetensors"))) == 1  # same weights: one cache


def test_online_teacher_sees_the_students_augmented_view(tmp_path, teacher):
    """Augmented data: no cache, and with the same preprocessing the teacher runs on the student's very batch."""
    from PIL import Image
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path / "img"
    for i in range(60):
        (root / str(d.target[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 16).astype(np.uint8)).save(root / str(d.target[i]) / f"{i}.png")
    labels = sorted({str(t) for t in d.target[:60]})
    assert labels == [str(i) for i in range(10)]
    conf = student_conf(teacher, tmp_path)
    conf["backbone"] = {"plugin": "timm", "model": "test_resnet"}
    conf["data"] = {"plugin": "imagefolder", "path": str(root), "image_size": 16, "augment": True}
    from graft.run import Run

    r = Run(load_config(conf, where="aug.toml"))
    s = r.strategy
    # the teacher run used other data, so its view of these folders takes the student's options: the same view
    assert not s.use_cache and s.same_view
    batch = r.data.collate([r.data.dataset("train")[i] for i in range(4)])
    import torch

    with torch.no_grad():
        direct = s.teacher(batch["inputs"])
    got, _ = s.teacher_outputs("train", torch.arange(4), batch["inputs"])
    assert torch.equal(got, direct.float())


def test_teacher_trained_with_another_seed_is_warned_about(tmp_path, teacher):
    conf = student_conf(teacher, tmp_path)
    conf["train"]["seed"] = 1  # another split: the teacher's training examples may be this run's test examples
    with pytest.warns(UserWarning, match="seed 0 there, 1 here"):
        Run(load_config(conf, where="s.toml"))
    conf = student_conf(teacher, tmp_path)
    conf["data"]["test_fraction"] = 0.3  # another test split, same seed
    with pytest.warns(UserWarning, match="test_fraction = 0.2 there, 0.3 here"):
        Run(load_config(conf, where="s.toml"))
    import warnings

    conf = student_conf(teacher, tmp_path)
    conf["data"].update(train_fraction=0.5, unlabelled="keep", augment=True)  # the training split only: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Run(load_config(conf, where="s.toml"))


def test_timm_student_from_hf_teacher(tmp_path):
    """The reverse of the test above: a Hugging Face vision teacher (a finished run) teaches a timm student."""
    hf_vit = {"plugin": "hf", "config": {"model_type": "vit", "image_size": 16, "patch_size": 4, "hidden_size": 32,
                                         "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}}
    teacher_conf = tiny_config(backbone=hf_vit, data={"image_size": 16}, train={"max_steps": 4})
    train(load_config(teacher_conf, where="t.toml"), tmp_path / "teacher", echo=lambda m: None)
    conf = student_conf(tmp_path / "teacher", tmp_path)
    conf["backbone"] = {"plugin": "timm", "model": "test_resnet"}
    summary = train(load_config(conf, where="s.toml"), tmp_path / "student", echo=lambda m: None)
    teacher_test = json.loads((tmp_path / "teacher" / "summary.json").read_text())["test"]["accuracy"]
    assert summary["test"]["teacher_accuracy"] == pytest.approx(teacher_test)  # the hf run, rebuilt, teaches
    assert summary["distill"]["teacher_params"] != summary["distill"]["student_params"]
