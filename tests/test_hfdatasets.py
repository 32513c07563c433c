"""Issue 19, the ``hfdatasets`` source: save_to_disk folders and local Parquet through the datasets library, their
own splits when they have them, column mapping, few labels; a missing column exits 2 naming the columns."""

import json

import pytest

from conftest import graft, reviews, tiny_config, write_config
from graft import GraftError
from graft import load_config
from graft import train
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
    summary = train(load_config(tiny_config(data=data, train={"epochs": 2}), where="c.toml"), tmp_path / "run",
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
    whole = Run(load_config(conf, where="c.toml"))
    few = Run(load_config(tiny_config(**{**conf, "data": {**data, "train_fraction": 0.25}}), where="c.toml"))
    sizes = {s: len(whole.data.dataset(s)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 120 and sizes["test"] == 24  # no own splits: the seeded stratified 70/10/20
    assert abs(len(few.data.dataset("train")) - sizes["train"] / 4) <= 2 and whole.data.label_names == ["neg", "pos"]
    assert [len(few.data.dataset(s)) for s in ("val", "test")] == [sizes["val"], sizes["test"]]
    conf["train"].update(epochs=4, batch_size=16, lr=3e-3)
    summary = train(load_config(conf, where="c.toml"), tmp_path / "run", echo=lambda m: None)
    assert summary["test"]["accuracy"] >= 0.75


def test_a_missing_column_exits_2_naming_the_columns(digits_disk, tmp_path):
    data = {"plugin": "hfdatasets", "path": str(digits_disk), "label_column": "digit", "image_size": 8}
    proc = graft("train", write_config(tmp_path / "c.toml", tiny_config(data=data)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no column 'image'" in proc.stderr and "picture, digit" in proc.stderr and "image_column" in proc.stderr


# -- issue 25, item 3: labels matched by name across splits, ids checked, the training split named ------------
def _digits_dict(tmp_path, name, encode):
    """scikit-learn's digits as train / validation / test of strings "d0".."d9", their label column made a
    ClassLabel by ``encode(split name, Dataset)``; validation lacks d9, test lacks d0 and d9."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = [(Image.fromarray((x * 16).clip(0, 255).astype("uint8")), f"d{y}") for x, y in zip(d.images, d.target)]
    keep = {"train": lambda i, y: i % 5 > 1, "validation": lambda i, y: i % 5 == 1 and y != "d9",
            "test": lambda i, y: i % 5 == 0 and y not in ("d0", "d9")}
    features = datasets.Features({"picture": datasets.Image(), "digit": datasets.Value("string")})
    dd = datasets.DatasetDict({s: encode(s, datasets.Dataset.from_dict(
        {"picture": [x for i, (x, y) in enumerate(rows) if k(i, y)],
         "digit": [y for i, (x, y) in enumerate(rows) if k(i, y)]}, features=features)) for s, k in keep.items()})
    dd.save_to_disk(str(tmp_path / name))
    return tmp_path / name


def test_splits_class_encoded_one_by_one_are_scored_by_name(tmp_path):
    """The reported input (datasets#8494): each split class-encoded on its own (``class_encode_column``), so
    validation's and test's ids mean other names than the training split's. Old code read every split's ids
    with the training split's names: the same model scored 0.018 on test against 0.712 with one shared encoding
    (test lacks d0, so its id 0 is d1)."""
    shared = datasets.ClassLabel(names=[f"d{i}" for i in range(10)])
    one_by_one = _digits_dict(tmp_path, "own", lambda s, ds: ds.class_encode_column("digit"))
    together = _digits_dict(tmp_path, "shared", lambda s, ds: ds.cast_column("digit", shared))
    assert datasets.load_from_disk(str(one_by_one))["test"].features["digit"].names[0] == "d1"
    scores = []
    for path in (one_by_one, together):
        data = {"plugin": "hfdatasets", "path": str(path), "image_column": "picture", "label_column": "digit",
                "image_size": 8}
        summary = train(load_config(tiny_config(data=data, train={"epochs": 2}), where="c.toml"), tmp_path / path.name,
                        echo=lambda m: None)
        scores.append(summary["test"]["accuracy"])
    run = Run(load_config(tiny_config(data={**data, "path": str(one_by_one)}), where="c.toml"))
    names = run.data.label_names
    assert names == [f"d{i}" for i in range(10)]
    test = datasets.load_from_disk(str(one_by_one))["test"]
    assert [names[y] for _, _, y in run.data.items["test"]] == [test.features["digit"].int2str(v)
                                                                 for v in test["digit"]]
    assert scores[0] == scores[1] > 0.5


def _text_dict(tmp_path, splits, name="d"):
    """A DatasetDict of review texts: {split: (labels, ClassLabel names or None for plain values)}."""
    texts = [json.loads(x)["text"] for x in reviews(tmp_path / "r.jsonl", n=40).read_text().splitlines()]
    dd = {}
    for split, (labels, names) in splits.items():
        kind = "string" if any(isinstance(v, str) for v in labels) else "int64"
        plain = datasets.Dataset.from_dict({"text": texts[:len(labels)], "label": labels}, features=datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.Value(kind)}))
        # cast_column checks no ids against the names: how out-of-range ids reach a saved dataset
        dd[split] = plain.cast_column("label", datasets.ClassLabel(names=names)) if names else plain
    datasets.DatasetDict(dd).save_to_disk(str(tmp_path / name))
    return tmp_path / name


def _setup(path, tiny_bert, **data):
    from test_user_files import build

    return build(tiny_config(backbone={"plugin": "hf", "weights": str(tiny_bert)},
                             data={"plugin": "hfdatasets", "path": str(path), "max_length": 16, **data}))[1]


def _names(data, split):
    return [data.label_names[y] if y >= 0 else None for _, _, y in data.items[split]]


def test_labels_are_matched_by_name_whatever_each_split_holds(tmp_path, tiny_bert):
    """ClassLabels in another order per split, a plain string split, -1 and None as "unlabelled", and a class
    only the test split has (kept, warned about, counted as errors). Old code read validation's ids with the
    training split's names (neg and pos swapped) and crashed on the test split's strings (ValueError from
    ``int("pos")``, exit 1)."""
    path = _text_dict(tmp_path, {"train": ([0, 1, 0, 1, 0, 1], ["neg", "pos"]),
                                 "validation": ([0, 1, -1, 1], ["pos", "neg"]),
                                 "test": (["neg", "pos", "meh", None], None)})
    with pytest.warns(UserWarning, match="the test split has label 'meh' that the training split never has"):
        data = _setup(path, tiny_bert)
    assert data.label_names == ["neg", "pos", "meh"]  # the training split's ClassLabel order, then the others
    assert _names(data, "val") == ["pos", "neg", None, "neg"]
    assert _names(data, "test") == ["neg", "pos", "meh", None]
    strings = _text_dict(tmp_path, {"train": (["b", "a", "b", "a"], None), "test": ([1, 0], ["a", "b"])}, "s")
    data = _setup(strings, tiny_bert, val_fraction=0.25)
    assert data.label_names == ["a", "b"] and _names(data, "test") == ["b", "a"]


@pytest.mark.parametrize("split,labels", [("train", [0, 1, 5, 1]), ("validation", [0, 1, -2]),
                                          ("test", [0, 1, 2])])
def test_a_label_id_outside_the_classlabel_is_bad_input(tmp_path, tiny_bert, split, labels):
    """A ClassLabel column holding an id it has no name for (``cast_column`` does not check; fabricator#51).
    Old code: the id became a target past the head (IndexError in the loss, exit 1), or a negative id other than
    -1 was silently taken as "unlabelled"."""
    splits = {"train": ([0, 1, 0, 1, 0, 1], ["neg", "pos"]), "validation": ([0, 1], ["neg", "pos"]),
              "test": ([1, 0], ["neg", "pos"])}
    splits[split] = (labels, ["neg", "pos"])
    with pytest.raises(GraftError, match=rf"split {split!r} .* label {labels[2]} in 'label' .*outside its "
                                         rf"ClassLabel's 2 classes \(0 to 1; -1 means unlabelled\)"):
        _setup(_text_dict(tmp_path, splits), tiny_bert)


def test_a_label_id_outside_the_classlabel_exits_2(tmp_path, tiny_bert):
    """The reported input through the command line. Old code: ``IndexError: Target 5 is out of bounds``, exit 1."""
    from test_user_files import assert_bad_input, cli_run

    path = _text_dict(tmp_path, {"train": ([0, 1, 0, 1, 5, 1, 0, 1], ["neg", "pos"])})
    conf = tiny_config(backbone={"plugin": "hf", "weights": str(tiny_bert)},
                       data={"plugin": "hfdatasets", "path": str(path), "max_length": 16}, train={"max_steps": 1})
    code, out = cli_run("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "run")
    assert_bad_input(code, out, "label 5 in 'label'", "outside its ClassLabel's 2 classes")


@pytest.mark.parametrize("names,chosen", [
    (("test",), None),
    (("validation", "test"), None),
    (("validation", "training"), {"train": "training", "val": "validation"}),
    (("training", "dev", "test"), {"train": "training", "val": "dev", "test": "test"}),
    (("train", "valid", "testing"), {"train": "train", "val": "valid", "test": "testing"}),
    (("train", "training"), None),
    (("all",), None),
])
def test_the_training_split_is_named_never_guessed(tmp_path, tiny_bert, names, chosen):
    """Split sets that name no training split stop (exit 2 listing the splits and ``train_split``); "training"
    counts as one. Old code: a dataset with only ``test`` trained and tested on it; ``validation`` + ``training``
    trained on validation and ignored training -- no warning."""
    path = _text_dict(tmp_path, {n: ([i % 2 for i in range(20)], ["neg", "pos"]) for n in names})
    if chosen is None:
        with pytest.raises(GraftError, match=r"has the splits .*train_split") as e:
            _setup(path, tiny_bert)
        assert all(repr(n) in str(e.value) for n in names)
        return
    data = _setup(path, tiny_bert)
    sources = data.report()["split_sources"]
    for role, split in chosen.items():
        assert f"own {split!r} split" in sources[role]
    assert "split off" in sources["test"] or "test" in chosen


def test_split_options_choose_and_are_checked(tmp_path, tiny_bert):
    """``train_split`` / ``val_split`` / ``test_split`` choose the splits: training on a test split is then the
    user's explicit choice (its val and test are split off it, never the same rows); unknown names and one split
    in two roles stop. Old code had no such options (exit 2: unknown key)."""
    path = _text_dict(tmp_path, {"test": ([i % 2 for i in range(20)], ["neg", "pos"]),
                                 "extra": ([1, 0], ["neg", "pos"])})
    with pytest.warns(UserWarning, match=r"split 'extra' .* not used"):
        data = _setup(path, tiny_bert, train_split="test")
    assert sum(len(data.items[s]) for s in ("train", "val", "test")) == 20
    assert all("split off" in data.report()["split_sources"][s] for s in ("val", "test"))
    data = _setup(path, tiny_bert, train_split="test", test_split="extra")
    assert len(data.items["test"]) == 2 and "own 'extra' split" in data.report()["split_sources"]["test"]
    with pytest.raises(GraftError, match=r"test_split = 'tst'.*'test', 'extra'.*Did you mean \"test\""):
        _setup(path, tiny_bert, train_split="extra", test_split="tst")
    with pytest.raises(GraftError, match=r"'test' is both train_split and test_split"):
        _setup(path, tiny_bert, train_split="test", test_split="test")
