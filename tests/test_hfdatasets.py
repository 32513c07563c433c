"""Issue 19, the ``hfdatasets`` source: save_to_disk folders and local Parquet through the datasets library, their
own splits when they have them, column mapping, few labels; a missing column exits 2 naming the columns."""

import json

import pytest

from conftest import graft, reviews, tiny_config, write_config
from graft.config import resolve
from graft.loop import train
from graft.run import Run

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def digits_disk(tmp_path_factory):
    """scikit-learn's digits as a DatasetDict (train / test) of datasets.Image pictures and ClassLabel labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [Image.fromarray((x * 16).clip(0, 255).astype("uint8")) for x in d.images]
    features = datasets.Features({"picture": datasets.Image(),
                                  "digit": datasets.ClassLabel(names=[f"d{i}" for i in range(10)])})
    ds = datasets.Dataset.from_dict({"picture": images, "digit": d.target.tolist()}, features=features)
    path = tmp_path_factory.mktemp("hfd") / "digits"
    ds.train_test_split(test_size=0.2, seed=0, stratify_by_column="digit").save_to_disk(str(path))
    return path


def test_save_to_disk_folder_with_its_own_test_split(digits_disk, tmp_path):
    data = {"plugin": "hfdatasets", "path": str(digits_disk), "image_column": "picture", "label_column": "digit",
            "image_size": 8, "val_fraction": 0.1}
    summary = train(resolve(tiny_config(data=data, train={"epochs": 2}), "c.toml"), tmp_path / "run",
                    echo=lambda m: None)
    report = json.loads((tmp_path / "run" / "data.json").read_text())
    own = datasets.load_from_disk(str(digits_disk))
    assert report["splits"]["test"] == len(own["test"]) == 360  # its own test split, whole
    assert report["splits"]["train"] + report["splits"]["val"] == len(own["train"])
    assert "own 'test' split" in report["split_sources"]["test"] and "split off" in report["split_sources"]["val"]
    assert summary["test"]["accuracy"] > 0.5  # ten classes: chance is 0.1
    labels = json.loads((tmp_path / "run" / "labels.json").read_text())["label_names"]
    assert labels == [f"d{i}" for i in range(10)]  # the ClassLabel's names, in its order


def test_local_parquet_text_with_few_labels(tmp_path, tiny_bert):
    rows = [json.loads(x) for x in reviews(tmp_path / "r.jsonl").read_text().splitlines()]
    datasets.Dataset.from_list([{"review": r["text"], "sentiment": r["label"]} for r in rows]).to_parquet(
        str(tmp_path / "r.parquet"))
    data = {"plugin": "hfdatasets", "path": str(tmp_path / "r.parquet"), "text_column": "review",
            "label_column": "sentiment", "max_length": 16}
    conf = tiny_config(backbone={"plugin": "hf", "weights": str(tiny_bert)}, data=data)
    whole, few = Run(resolve(conf, "c.toml")), Run(resolve(tiny_config(**{**conf, "data": {**data, "train_fraction":
                                                                                           0.25}}), "c.toml"))
    sizes = {s: len(whole.data.dataset(s)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 120 and sizes["test"] == 24  # no own splits: the seeded stratified 70/10/20
    assert abs(len(few.data.dataset("train")) - sizes["train"] / 4) <= 2 and whole.data.label_names == ["neg", "pos"]
    assert [len(few.data.dataset(s)) for s in ("val", "test")] == [sizes["val"], sizes["test"]]
    conf["train"].update(epochs=4, batch_size=16, lr=3e-3)
    summary = train(resolve(conf, "c.toml"), tmp_path / "run", echo=lambda m: None)
    assert summary["test"]["accuracy"] >= 0.75


def test_a_missing_column_exits_2_naming_the_columns(digits_disk, tmp_path):
    data = {"plugin": "hfdatasets", "path": str(digits_disk), "label_column": "digit", "image_size": 8}
    proc = graft("train", write_config(tmp_path / "c.toml", tiny_config(data=data)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no column 'image'" in proc.stderr and "picture, digit" in proc.stderr and "image_column" in proc.stderr
