"""The finetune strategy: freezing modes and schedules, layer-wise LR, task heads, eval/predict, a reference loop."""

import csv
import json
import signal

import pytest
import torch

from conftest import (TINY_VIT, assert_same_records, assert_same_weights, graft, read_metrics, reviews, start_train,
                      tiny_config, wait_for_lines, weights, write_config)
from graft import load_config
from graft import train
from graft.optim import build_optimizer
from graft.run import Run


def build(**strategy):
    r = Run(load_config(tiny_config(strategy=strategy), where="x.toml"))
    return r, r.strategy


def trainable(strategy):
    return {n for n, p in strategy.model.named_parameters() if p.requires_grad}


def frozen_after_training(tmp_path, name, strategy, epochs=2):
    """Train, then return the names whose weights did not change from initialisation."""
    conf = load_config(tiny_config(strategy=strategy, train={"epochs": epochs, "batch_size": 64}), where=f"{name}.toml")
    init = {k: v.clone() for k, v in Run(conf).model.state_dict().items()}  # same seed -> same init
    train(conf, tmp_path / name, echo=lambda m: None)
    after = weights(tmp_path / name)
    return {k for k in init if torch.equal(init[k], after[k])}


def test_freeze_none_trains_everything():
    _, s = build(freeze="none")
    s.on_epoch_start(0, s.model)
    assert trainable(s) == {n for n, _ in s.model.named_parameters()}


def test_freeze_backbone_is_a_linear_probe(tmp_path):
    _, s = build(freeze="backbone")
    s.on_epoch_start(0, s.model)
    assert trainable(s) == {"head.1.weight", "head.1.bias"}
    unchanged = frozen_after_training(tmp_path, "probe", {"freeze": "backbone"})
    params = {n for n, _ in s.model.named_parameters()}
    assert unchanged & params == params - {"head.1.weight", "head.1.bias"}


def test_a_frozen_batchnorm_keeps_its_statistics_until_unfrozen(tmp_path):
    """A linear probe of a CNN leaves BatchNorm's running statistics as pretrained (eval mode, even after the loop's
    evaluations put the model back in train mode); LP-FT's fine-tuning epoch updates them again."""
    resnet = {"plugin": "timm", "model": "test_resnet"}

    def stats(name, strategy):
        conf = load_config(tiny_config(backbone=resnet, strategy=strategy,
                                       train={"epochs": 2, "batch_size": 64, "eval_every": 10}), where=f"{name}.toml")
        init = Run(conf).model.state_dict()
        train(conf, tmp_path / name, echo=lambda m: None)
        after = weights(tmp_path / name)
        running = [k for k in init if k.startswith("backbone.") and k.endswith(("running_mean", "running_var"))]
        assert running
        return {k for k in running if torch.equal(init[k], after[k])}, running

    unchanged, running = stats("probe", {"freeze": "backbone"})
    assert unchanged == set(running)
    unchanged, running = stats("lpft", {"lp_epochs": 1})
    assert not unchanged


def test_freeze_first_groups(tmp_path):
    _, s = build(freeze="groups", freeze_groups=2)
    s.on_epoch_start(0, s.model)
    frozen = set(s.groups[0]) | set(s.groups[1])
    assert trainable(s) == {n for n, _ in s.model.named_parameters()} - frozen
    unchanged = frozen_after_training(tmp_path, "groups", {"freeze": "groups", "freeze_groups": 2})
    assert frozen <= unchanged
    assert not (set(s.groups[-1]) & unchanged)


def test_freeze_patterns(tmp_path):
    pattern = "backbone.model.blocks.0.*"
    _, s = build(freeze_patterns=[pattern])
    s.on_epoch_start(0, s.model)
    frozen = {n for n, _ in s.model.named_parameters() if n.startswith("backbone.model.blocks.0.")}
    assert frozen and trainable(s) == {n for n, _ in s.model.named_parameters()} - frozen
    assert frozen <= frozen_after_training(tmp_path, "pat", {"freeze_patterns": [pattern]})


def test_lp_ft_transition():
    _, s = build(lp_epochs=2)
    for epoch, expect_head_only in ((0, True), (1, True), (2, False), (5, False)):
        s.on_epoch_start(epoch, s.model)
        assert (trainable(s) == {"head.1.weight", "head.1.bias"}) is expect_head_only, epoch


def test_gradual_unfreezing_one_group_every_k_epochs():
    _, s = build(unfreeze_every=2)
    g = len(s.groups)
    assert g >= 3
    for epoch in range(2 * g + 2):
        s.on_epoch_start(epoch, s.model)
        open_groups = [i for i, grp in enumerate(s.groups) if all(n in trainable(s) for n in grp)]
        n_open = min(g, epoch // 2)
        assert open_groups == list(range(g - n_open, g)), epoch  # from the output side inwards
        assert {"head.1.weight", "head.1.bias"} <= trainable(s)


def test_layer_wise_lr_decay_per_group():
    r, s = build(layer_decay=0.5, head_lr_scale=3.0)
    opt = build_optimizer(r.config.train, s.param_groups(r.model))
    lr = r.config.train.lr
    g = len(s.groups)
    by_name = {grp["name"]: grp["lr"] for grp in opt.param_groups}
    for i in range(g):
        assert by_name[f"backbone.{i}"] == pytest.approx(lr * 0.5 ** (g - 1 - i))
    assert by_name["head"] == pytest.approx(3 * lr)
    assert all(grp["weight_decay"] == 0 for grp in opt.param_groups if grp["name"].endswith("no_decay"))
    names = {id(p) for grp in opt.param_groups for p in grp["params"]}
    assert len(names) == len(list(r.model.parameters()))  # every parameter exactly once


def test_unfreezing_schedule_survives_resume(tmp_path):
    tables = dict(strategy={"unfreeze_every": 1, "layer_decay": 0.7},
                  train={"epochs": 4, "batch_size": 16, "scheduler": "cosine"})
    cfg = write_config(tmp_path / "c.toml", tiny_config(**tables))
    graft("train", cfg, "--out", tmp_path / "full", check=True)
    proc = start_train(cfg, tmp_path / "cut")
    wait_for_lines(tmp_path / "cut", 150, proc)  # inside the third epoch (~90 lines each)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert "Interrupted at step" in err, err
    graft("train", cfg, "--resume", tmp_path / "cut", check=True)
    assert_same_records(read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut"))
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))


def test_mlp_head_and_label_smoothing(tmp_path):
    conf = load_config(tiny_config(strategy={"head": "mlp", "head_hidden": 16, "dropout": 0.1},
                                   loss={"label_smoothing": 0.1}, train={"max_steps": 3}), where="x")
    r = Run(conf)
    assert [type(m).__name__ for m in r.strategy.model.head] == ["Linear", "GELU", "Dropout", "Linear"]
    assert train(conf, tmp_path / "mlp", echo=lambda m: None)["steps"] == 3


def _text_conf(tiny_bert, path, **data):
    conf = tiny_config(backbone={"plugin": "hf", "weights": str(tiny_bert)},
                       data={"plugin": "text", "path": str(path), "max_length": 16, **data})
    conf["train"].update(epochs=4, batch_size=16, lr=3e-3)
    return conf


def test_multilabel_head(tmp_path, tiny_bert):
    path = tmp_path / "ml.jsonl"
    with open(path, "w") as f:
        for i in range(120):
            tags = [t for t, on in (("pos", i % 2), ("film", i % 3 == 0)) if on]
            words = ["good" if i % 2 else "bad", "film" if i % 3 == 0 else "movie", "was", "very"]
            f.write(json.dumps({"text": " ".join(words), "label": tags}) + "\n")
    conf = _text_conf(tiny_bert, path, task="multilabel")
    conf["loss"] = {"plugin": "bce"}
    # no [train] metric: the task's own (the old code took the strategy's "accuracy", which multi-label never
    # reports: "[train] metric = 'accuracy' is not among the strategy's metrics: loss, micro_f1, ...")
    summary = train(load_config(conf, where="ml.toml"), tmp_path / "ml", echo=lambda m: None)
    assert summary["metric"] == "micro_f1" and summary["best"] is not None
    assert summary["test"]["micro_f1"] > 0.8
    preds = graft("predict", tmp_path / "ml", "good film was very", "--json", check=True).stdout
    assert set(json.loads(preds)["labels"]) == {"pos", "film"}


def test_regression_head(tmp_path, tiny_bert):
    path = tmp_path / "reg.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "score"])
        for i in range(120):
            w.writerow([f"{'good' if i % 2 else 'bad'} movie was very", 4.0 if i % 2 else 1.0])
    conf = _text_conf(tiny_bert, path, task="regression", label_column="score")
    conf["loss"] = {"plugin": "mse"}
    summary = train(load_config(conf, where="reg.toml"), tmp_path / "reg", echo=lambda m: None)
    assert summary["metric"] == "rmse" and summary["test"]["rmse"] < 0.7 and "mae" in summary["test"]


def test_wrong_loss_for_task_is_a_clear_error(tmp_path, tiny_bert):
    conf = _text_conf(tiny_bert, reviews(tmp_path / "r.jsonl"))
    conf["loss"] = {"plugin": "mse"}
    proc = graft("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "run")
    assert proc.returncode == 2 and "does not fit the classification task" in proc.stderr


def test_eval_and_predict_round_trip(tmp_path, tiny_bert):
    conf = _text_conf(tiny_bert, reviews(tmp_path / "r.jsonl"))
    conf["train"]["plot"] = True
    graft("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "run", check=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    again = json.loads(graft("eval", tmp_path / "run", "--json", check=True).stdout)
    assert again["test"]["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert again["test"]["confusion_matrix"] == summary["test"]["confusion_matrix"]
    assert (tmp_path / "run" / "confusion.png").is_file()
    text = graft("eval", tmp_path / "run", "--split", "test", check=True).stdout
    assert "per class" in text and "pos" in text
    # other data through --set: the whole file as the test split
    other = reviews(tmp_path / "other.jsonl", n=40, seed=5)
    res = json.loads(graft("eval", tmp_path / "run", "--split", "test", "--json", "--data",
                           f"test_path={other}", check=True).stdout)
    assert sum(r["support"] for r in res["test"]["per_class"].values()) == 40
    out = graft("predict", tmp_path / "run", "great film was very", "awful movie was very", "--json", check=True)
    preds = [json.loads(x) for x in out.stdout.splitlines()]
    assert [p["label"] for p in preds] == ["pos", "neg"] and all(0.5 < p["probability"] <= 1 for p in preds)
    (tmp_path / "lines.txt").write_text("good movie\nbad film\n")
    out = graft("predict", tmp_path / "run", "--file", tmp_path / "lines.txt", check=True).stdout.splitlines()
    assert [line.split("\t")[0] for line in out] == ["pos", "neg"]


def test_predict_images(tmp_path):
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    conf = tiny_config(train={"epochs": 6, "batch_size": 64})
    graft("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "run", check=True)
    d = load_digits()
    paths = []
    for i in range(20):  # as a person would draw them: dark ink on white, larger than 8x8
        p = tmp_path / f"d{i}.png"
        Image.fromarray((255 - d.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.NEAREST).save(p)
        paths.append(p)
    out = graft("predict", tmp_path / "run", *paths, "--json", check=True).stdout.splitlines()
    labels = [json.loads(x)["label"] for x in out]
    assert sum(lab == str(d.target[i]) for i, lab in enumerate(labels)) >= 14


def test_matches_hand_written_reference_loop(tmp_path):
    """"Load a pretrained ResNet, replace fc, Adam, cross-entropy", written plainly, step for step."""
    import timm
    from sklearn.datasets import load_digits

    torch.manual_seed(123)
    pretrained = timm.create_model("test_resnet")
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pth")
    steps, batch, lr, seed = 6, 32, 1e-3, 7
    conf = tiny_config(backbone={"plugin": "timm", "model": "test_resnet", "weights": str(tmp_path / "pretrained.pth")},
                       data={"image_size": 16},
                       train={"seed": seed, "max_steps": steps, "batch_size": batch, "lr": lr, "weight_decay": 0.0,
                              "eval_every": 1000})
    run = Run(load_config(conf, where="ref.toml"))
    train(load_config(conf, where="ref.toml"), tmp_path / "graft", echo=lambda m: None)
    ours = [r["loss"] for r in read_metrics(tmp_path / "graft") if r["split"] == "train"]

    # --- the classic recipe ---
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet")
    model.load_state_dict(torch.load(tmp_path / "pretrained.pth", weights_only=True))
    model.fc = torch.nn.Linear(model.fc.in_features, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train_set = run.data.dataset("train")  # the same preprocessed images and split
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed + 0)).tolist()
    model.train()
    losses = []
    for step in range(steps):
        idx = order[step * batch:(step + 1) * batch]
        x = torch.stack([train_set[i][0] for i in idx])
        y = torch.stack([train_set[i][1] for i in idx])
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert ours == pytest.approx(losses, rel=1e-5, abs=1e-6)
    final = weights(tmp_path / "graft")
    ref = model.state_dict()
    assert torch.allclose(final["head.1.weight"], ref["fc.weight"], atol=1e-5)
    assert torch.allclose(final["backbone.model.conv1.0.weight"], ref["conv1.0.weight"], atol=1e-5)
    assert load_digits().images.shape[0] == sum(len(run.data.dataset(s)) for s in ("train", "val", "test"))


def test_imagefolder_train_and_predict(tmp_path):
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path / "images"
    for i in range(90):
        label = int(d.target[i]) % 3
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).convert("RGB").resize((12, 12)).save(
            folder / f"{i}.png")
    conf = tiny_config(data={"plugin": "imagefolder", "path": str(root), "image_size": 8, "augment": True},
                       train={"max_steps": 4, "eval_every": 4})
    summary = train(load_config(conf, where="img.toml"), tmp_path / "run", echo=lambda m: None)
    assert summary["test"]["per_class"].keys() == {"class0", "class1", "class2"}
    assert sum(r["support"] for r in summary["test"]["per_class"].values()) == 18  # 20% of 90, stratified
    out = graft("predict", tmp_path / "run", next((root / "class1").iterdir()), "--json", check=True).stdout
    assert json.loads(out)["label"] in {"class0", "class1", "class2"}


def test_finished_run_stays_usable_when_original_weights_move(tmp_path, tiny_bert):
    import shutil

    moved = tmp_path / "bert-copy"
    shutil.copytree(tiny_bert, moved)
    conf = _text_conf(moved, reviews(tmp_path / "r.jsonl"))
    conf["train"]["epochs"] = 2
    graft("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "run", check=True)
    before = graft("predict", tmp_path / "run", "good film", "--json", check=True).stdout
    shutil.rmtree(moved)  # the pretrained folder is gone; the run's backbone/ export stands in
    assert graft("predict", tmp_path / "run", "good film", "--json", check=True).stdout == before
    assert graft("eval", tmp_path / "run", "--split", "test", check=True).returncode == 0


def test_loading_a_run_never_switches_remote_code_on_by_itself(tmp_path):
    conf = tiny_config(backbone={"plugin": "hf", "trust_remote_code": True,
                                 "config": {"model_type": "vit", "image_size": 8, "patch_size": 4, "hidden_size": 16,
                                            "num_hidden_layers": 1, "num_attention_heads": 2,
                                            "intermediate_size": 32}},
                       train={"max_steps": 2})
    graft("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "run", check=True)
    proc = graft("eval", tmp_path / "run")
    assert proc.returncode == 2 and "--trust-remote-code" in proc.stderr
    assert graft("eval", tmp_path / "run", "--trust-remote-code").returncode == 0
