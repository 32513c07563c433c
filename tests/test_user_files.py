"""Real users' files (issue 12): text encodings, missing labels, CSV/JSONL edge cases, model limits, unreadable and
unusual images. Each test is named after the kind of report it covers; bad input must end in exit code 2 with the
file (and line or key) and the fix, never in "looks like a bug" or a traceback."""

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import reviews, tiny_config, write_config
from graft import UNLABELLED, GraftError
from graft.cli import cli
from graft import load_config


def cli_run(*args):
    """`graft ARGS` in this process (no new interpreter to import torch): (exit code, everything it printed)."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def assert_bad_input(code, out, *needles):
    assert code == 2, out
    assert "looks like a bug" not in out and "Traceback" not in out, out
    for needle in needles:
        assert needle in out, (needle, out)


def build(conf: dict):
    """(backbone, data source) of a config, the source set up as a run would."""
    conf = load_config(conf, where="t.toml")
    b, d = conf.plugins["backbone"], conf.plugins["data"]
    backbone, data = b.cls(b.options), d.cls(d.options)
    backbone.name, data.name = b.name, d.name
    backbone.build()
    data.setup(backbone, 0)
    return backbone, data


def text_source(bert, **data):
    return build(tiny_config(backbone={"plugin": "hf", "weights": str(bert)},
                             data={"plugin": "text", "max_length": 16, **data}))[1]


def text_config(tmp_path, bert, name="c.toml", **data):
    return write_config(tmp_path / name, tiny_config(backbone={"plugin": "hf", "weights": str(bert)},
                                                     data={"plugin": "text", "max_length": 16, **data},
                                                     train={"max_steps": 2, "batch_size": 8}))


def rows(n=40):
    return [("good film" if i % 2 else "bad movie", "pos" if i % 2 else "neg") for i in range(n)]


def write_csv(path, records, header=("text", "label"), newline="\n"):
    path.write_text(newline.join([",".join(header)] + [f"{t},{y}" for t, y in records]) + newline,
                    encoding="utf-8", newline="")
    return path


# -- text that is not plain UTF-8 ----------------------------------------------------------------------
@pytest.mark.parametrize("bom, encoding", [(b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"),
                                           (b"\xfe\xff", "utf-16-be")])
def test_encoding_csv_with_byte_order_mark_is_read(tmp_path, tiny_bert, bom, encoding):
    text = "text,label\n" + "".join(f"{t},{y}\n" for t, y in rows())
    (tmp_path / "x.csv").write_bytes(bom + text.encode(encoding))
    data = text_source(tiny_bert, path=str(tmp_path / "x.csv"))
    assert data.label_names == ["neg", "pos"]


def test_encoding_latin1_csv_is_bad_input_naming_file_line_and_option(tmp_path, tiny_bert):
    lines = ["text,label", "good film,pos", "café au lait,pos"] + [f"{t},{y}" for t, y in rows()]
    (tmp_path / "x.csv").write_bytes("\n".join(lines).encode("latin-1"))
    code, out = cli_run("train", text_config(tmp_path, tiny_bert, path=str(tmp_path / "x.csv")),
                        "--out", tmp_path / "r")
    assert_bad_input(code, out, "x.csv", "line 3", "encoding = \"latin-1\"", "0xe9")
    data = text_source(tiny_bert, path=str(tmp_path / "x.csv"), encoding="latin-1")
    assert sum(len(data.splits[s]) for s in ("train", "val", "test")) == len(lines) - 1


@pytest.mark.parametrize("kind", ["jsonl", "folders"])
def test_encoding_jsonl_and_label_folders_follow_the_encoding_option(tmp_path, tiny_bert, kind):
    if kind == "jsonl":
        path = tmp_path / "x.jsonl"
        path.write_bytes(b"".join(json.dumps({"text": t, "label": y}, ensure_ascii=False).encode("latin-1") + b"\n"
                                  for t, y in rows() + [("caf\u00e9", "pos")]))
        bad = "x.jsonl, line 41"
    else:
        path = tmp_path / "folders"
        for i, (t, y) in enumerate(rows() + [("caf\u00e9", "pos")]):
            (path / y).mkdir(parents=True, exist_ok=True)
            (path / y / f"{i:03d}.txt").write_bytes(t.encode("latin-1"))
        bad = "040.txt, line 1"
    with pytest.raises(GraftError, match=bad):  # undecodable bytes are never replaced silently
        text_source(tiny_bert, path=str(path))
    data = text_source(tiny_bert, path=str(path), encoding="latin-1", val_fraction=0.0, test_fraction=0.0)
    assert len(data.splits["train"]) == 41


def test_encoding_unknown_name_is_a_config_error(tmp_path, tiny_bert):
    write_csv(tmp_path / "x.csv", rows())
    code, out = cli_run("train", text_config(tmp_path, tiny_bert, path=str(tmp_path / "x.csv"), encoding="latin9x"),
                        "--out", tmp_path / "r")
    assert_bad_input(code, out, "[data]", "encoding", "latin9x")


def test_encoding_corpus_follows_the_encoding_option(tmp_path):
    from graft.plugins.corpus import CorpusOptions, read_documents

    (tmp_path / "c.txt").write_bytes("first line\nna\u00efve second line\n".encode("latin-1"))
    with pytest.raises(GraftError, match=r"c.txt, line 2, column 3.*encoding"):
        read_documents(CorpusOptions(path=str(tmp_path / "c.txt")), "[data]")
    docs = read_documents(CorpusOptions(path=str(tmp_path / "c.txt"), encoding="latin-1"), "[data]")
    assert docs == ["first line", "na\u00efve second line"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "d" / ".hidden.txt").write_bytes(b"\xff\xfe junk")  # hidden files are never documents
    assert read_documents(CorpusOptions(path=str(tmp_path / "d")), "[data]") == ["one", "two"]


# -- missing labels ---------------------------------------------------------------------------------------
def test_missing_label_in_csv_is_bad_input_with_line(tmp_path, tiny_bert):
    lines = ["text,label", "good film,pos", "bad movie,", "good movie,pos"] + [f"{t},{y}" for t, y in rows()]
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    code, out = cli_run("train", text_config(tmp_path, tiny_bert, path=str(tmp_path / "x.csv")),
                        "--out", tmp_path / "r")
    assert_bad_input(code, out, "x.csv, line 3", "no label", "missing_labels")
    data = text_source(tiny_bert, path=str(tmp_path / "x.csv"), missing_labels="drop")
    assert "" not in data.label_names and data.label_names == ["neg", "pos"]
    assert sum(len(data.splits[s]) for s in ("train", "val", "test")) == len(lines) - 2
    kept = text_source(tiny_bert, path=str(tmp_path / "x.csv"), missing_labels="unlabelled")
    assert kept.label_names == ["neg", "pos"]
    assert sum(y == UNLABELLED for _, y in kept.splits["train"]) == 1
    assert all(y != UNLABELLED for s in ("val", "test") for _, y in kept.splits[s])


def test_missing_label_key_in_jsonl_and_missing_regression_target(tmp_path, tiny_bert):
    path = tmp_path / "x.jsonl"
    recs = [{"text": t, "label": y} for t, y in rows()]
    recs[5] = {"text": "good film"}
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    code, out = cli_run("train", text_config(tmp_path, tiny_bert, path=str(path)), "--out", tmp_path / "r")
    assert_bad_input(code, out, "x.jsonl, line 6", "no label")

    reg = [{"text": t, "label": float(i)} for i, (t, _) in enumerate(rows())]
    reg[7]["label"] = None
    path.write_text("".join(json.dumps(r) + "\n" for r in reg))
    code, out = cli_run("train", text_config(tmp_path, tiny_bert, "r.toml", path=str(path), task="regression"),
                        "--out", tmp_path / "r2")
    assert_bad_input(code, out, "x.jsonl, line 8")
    reg[7]["label"] = "n/a"
    path.write_text("".join(json.dumps(r) + "\n" for r in reg))
    with pytest.raises(GraftError, match="x.jsonl, line 8: regression target 'n/a' is not a finite number"):
        text_source(tiny_bert, path=str(path), task="regression")
    with pytest.raises(GraftError, match="needs task = \"classification\""):
        text_source(tiny_bert, path=str(path), task="regression", missing_labels="unlabelled")


def test_a_line_separator_inside_a_jsonl_string_is_no_line_break(tmp_path, tiny_bert):
    """JSON written with ensure_ascii=False keeps U+2028 raw; only \\n ends a line (str.splitlines also splits
    there, and the record would not parse), and later errors keep their line numbers."""
    recs = [{"text": t, "label": y} for t, y in rows()]
    recs[2]["text"] = "good\u2028film"
    recs[5] = {"text": "good film"}
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    with pytest.raises(GraftError, match="x.jsonl, line 6 has no label"):
        text_source(tiny_bert, path=str(path))


def test_wrong_label_column_lists_the_columns(tmp_path, tiny_bert):
    write_csv(tmp_path / "x.csv", rows(), header=("text", "labels"))
    with pytest.raises(GraftError, match=r"no column 'label'; columns: text, labels. Did you mean \"labels\""):
        text_source(tiny_bert, path=str(tmp_path / "x.csv"))
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"txt": t, "label": y}) + "\n" for t, y in rows()))
    with pytest.raises(GraftError, match="no field 'text' in any record; fields: txt, label"):
        text_source(tiny_bert, path=str(tmp_path / "x.jsonl"))


# -- CSV and JSONL edge cases ----------------------------------------------------------------------------
def test_csv_edge_cases_crlf_quoted_newlines_stray_spaces_empty_text(tmp_path, tiny_bert):
    lines = ['text,label', '"good, very good\r\nfilm",pos ', ',neg', '"bad ""movie""",neg']
    lines += [f"{t},{y}" for t, y in rows()]
    (tmp_path / "x.csv").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    data = text_source(tiny_bert, path=str(tmp_path / "x.csv"), val_fraction=0.0, test_fraction=0.0)
    assert data.label_names == ["neg", "pos"]  # 'pos ' is 'pos'
    assert len(data.splits["train"]) == len(lines) - 1  # the quoted newline is one record; the empty text stays
    assert data.splits["train"][0][0] == data_tokenizer(tiny_bert)("good, very good\r\nfilm")["input_ids"]


def data_tokenizer(bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bert))


def test_integer_and_string_labels_are_one_class(tmp_path, tiny_bert):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": (1 if i % 3 else "1") if y == "pos" else 0}) + "\n"
                            for i, (t, y) in enumerate(rows())) + "\n\n")  # and blank last lines
    data = text_source(tiny_bert, path=str(path))
    assert data.label_names == ["0", "1"]


def test_single_example_class_and_label_only_in_test_file(tmp_path, tiny_bert):
    write_csv(tmp_path / "x.csv", rows() + [("very sad", "rare")])
    data = text_source(tiny_bert, path=str(tmp_path / "x.csv"))
    rare = data.label_names.index("rare")
    assert [y for _, y in data.splits["train"]].count(rare) == 1  # the stratified split keeps it for training
    write_csv(tmp_path / "test.csv", [("good film", "pos"), ("awful film", "unseen")])
    with pytest.warns(UserWarning, match="the test split has label 'unseen' that the training split never has"):
        data = text_source(tiny_bert, path=str(tmp_path / "x.csv"), test_path=str(tmp_path / "test.csv"))
    assert "unseen" in data.label_names


# -- limits between data and model ------------------------------------------------------------------------
def test_model_limit_roberta_positions_checked_at_setup(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"the film number {i} was good and the movie was bad\n" for i in range(200)))
    roberta = {"plugin": "hf", "config": {"model_type": "roberta", "vocab_size": 300, "hidden_size": 32,
                                          "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                                          "max_position_embeddings": 32, "pad_token_id": 1}}
    conf = tiny_config(backbone=roberta, strategy={"plugin": "mlm"}, loss=None,
                       data={"plugin": "corpus", "path": str(corpus), "block_size": 32},
                       train={"max_steps": 2, "batch_size": 4})
    code, out = cli_run("train", write_config(tmp_path / "c.toml", conf), "--out", tmp_path / "r")
    assert_bad_input(code, out, "block_size = 32", "at most 30 tokens", "max_position_embeddings = 32",
                     "Set block_size to 30 or less")
    code, out = cli_run("train", tmp_path / "c.toml", "--set", "data.block_size=30", "--out", tmp_path / "ok")
    assert code == 0, out


def test_model_limit_text_length_and_vocabulary(tmp_path, tiny_bert):
    write_csv(tmp_path / "x.csv", rows())
    code, out = cli_run("train", text_config(tmp_path, tiny_bert, path=str(tmp_path / "x.csv"), max_length=100),
                        "--out", tmp_path / "r")
    assert_bad_input(code, out, "max_length = 100", "at most 64 tokens")
    small = {"plugin": "hf", "tokenizer": str(tiny_bert),
             "config": {"model_type": "bert", "vocab_size": 10, "hidden_size": 32, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "intermediate_size": 64}}
    with pytest.raises(GraftError, match="tokenizer has 20 tokens, but backbone 'hf'.s embedding table has 10 rows"):
        build(tiny_config(backbone=small, data={"plugin": "text", "path": str(tmp_path / "x.csv")}))
    # max_length = 0: the model's limit (64 here), at most 256
    data = build(tiny_config(backbone={"plugin": "hf", "weights": str(tiny_bert)},
                             data={"plugin": "text", "path": str(tmp_path / "x.csv")}))[1]
    assert data.splits["train"]


def test_model_limit_fixed_size_image_model(tmp_path):
    code, out = cli_run("train", write_config(tmp_path / "c.toml", tiny_config(data={"image_size": 16})),
                        "--out", tmp_path / "r")
    assert_bad_input(code, out, "image_size = 16", "takes only 8x8", "Set image_size = 8")
    backbone, data = build(tiny_config(data={"image_size": 0}))  # 0: the model's own size, from its patch embedding
    assert tuple(data.dataset("train")[0][0].shape[-2:]) == (8, 8)


# -- the run: outputs that go on -----------------------------------------------------------------------------
def test_missing_labels_drop_trains_and_warns_in_one_line(tmp_path, tiny_bert):
    lines = ["text,label", "bad movie,"] + [f"{t},{y}" for t, y in rows()]
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    code, out = cli_run("train", text_config(tmp_path, tiny_bert, path=str(tmp_path / "x.csv"),
                                             missing_labels="drop"), "--out", tmp_path / "r")
    assert code == 0, out
    warning = [line for line in out.splitlines() if line.startswith("Warning:")]
    assert len(warning) == 1 and "1 row without a label (first: " in warning[0] and "x.csv, line 2" in warning[0]


def test_text_given_to_prediction_checks_inputs(tmp_path, tiny_bert):
    reviews(tmp_path / "r.jsonl")
    cfg = write_config(tmp_path / "c.toml", tiny_config(backbone={"plugin": "hf", "weights": str(tiny_bert)},
                                                        data={"plugin": "text", "path": str(tmp_path / "r.jsonl")},
                                                        train={"max_steps": 2}))
    code, out = cli_run("train", cfg, "--out", tmp_path / "run")
    assert code == 0, out
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert_bad_input(*cli_run("predict", tmp_path / "run", tmp_path / "x.png"), "x.png", "takes text")
    code, out = cli_run("predict", tmp_path / "run", "good film", "--json")
    assert code == 0 and json.loads(out.splitlines()[0])["label"] in ("pos", "neg")


def test_options_reject_nan_negative_and_absurd_values(tmp_path):
    for table, key, value in (("train", "lr", "nan"), ("train", "lr", "0"), ("train", "epochs", "0"),
                              ("train", "batch_size", "-4"), ("loss", "label_smoothing", "nan"),
                              ("data", "image_size", "100000"), ("data", "image_size", "-1"),
                              ("data", "val_fraction", "inf")):
        code, out = cli_run("train", write_config(tmp_path / "c.toml", tiny_config()), "--set",
                            f"{table}.{key}={value}", "--out", tmp_path / "r")
        assert_bad_input(code, out, f"[{table}]", key)


def test_config_edges_that_run(tmp_path):
    # a batch larger than the data set is one smaller batch; max_steps < grad_accum runs that many whole steps
    conf = tiny_config(data={"test_fraction": 0.9, "val_fraction": 0.05}, train={"batch_size": 1024, "epochs": 1})
    code, out = cli_run("train", write_config(tmp_path / "a.toml", conf), "--out", tmp_path / "a")
    assert code == 0, out
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["steps"] == 1
    conf = tiny_config(train={"max_steps": 1, "grad_accum": 4, "batch_size": 8})
    code, out = cli_run("train", write_config(tmp_path / "b.toml", conf), "--out", tmp_path / "b")
    assert code == 0, out
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["steps"] == 1



def test_multilabel_empty_cell_is_no_label_applies_but_absent_key_is_missing(tmp_path, tiny_bert):
    lines = ["text,label", "good film,", "bad movie,\"neg,sad\""] + [f"{t},{y}" for t, y in rows()]
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    data = text_source(tiny_bert, path=str(tmp_path / "x.csv"), task="multilabel", val_fraction=0.0,
                       test_fraction=0.0)
    assert data.label_names == ["neg", "pos", "sad"]
    assert data.splits["train"][0][1] == [0.0, 0.0, 0.0] and data.splits["train"][1][1] == [1.0, 0.0, 1.0]
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "good film", "label": []}) + "\n"
                                      + json.dumps({"text": "bad film"}) + "\n")
    with pytest.raises(GraftError, match="x.jsonl, line 2 has no label"):
        text_source(tiny_bert, path=str(tmp_path / "x.jsonl"), task="multilabel")


def test_encoding_config_with_bom_and_predict_file_in_latin1(tmp_path, tiny_bert):
    reviews(tmp_path / "r.jsonl")
    conf = tiny_config(backbone={"plugin": "hf", "weights": str(tiny_bert)},
                       data={"plugin": "text", "path": str(tmp_path / "r.jsonl")}, train={"max_steps": 1})
    cfg = write_config(tmp_path / "c.toml", conf)
    cfg.write_bytes(b"\xef\xbb\xbf" + cfg.read_bytes())  # Notepad's "UTF-8 with BOM"
    code, out = cli_run("train", cfg, "--out", tmp_path / "run")
    assert code == 0, out
    (tmp_path / "in.txt").write_bytes("good film\ncaf\u00e9 film\n".encode("latin-1"))
    assert_bad_input(*cli_run("predict", tmp_path / "run", "--file", tmp_path / "in.txt"), "in.txt", "line 2")
    (tmp_path / "in.txt").write_bytes(b"\xef\xbb\xbfgood film\n\nbad movie\n")
    code, out = cli_run("predict", tmp_path / "run", "--file", tmp_path / "in.txt")
    assert code == 0 and out.count("\n") == 2, out
    (tmp_path / "bad.toml").write_bytes("[train]\nlr = 1e-3 # caf\u00e9\n".encode("latin-1"))
    assert_bad_input(*cli_run("train", tmp_path / "bad.toml"), "bad.toml", "line 2")


def test_csv_unclosed_quote_is_bad_input_and_crlf_paragraphs_split(tmp_path, tiny_bert):
    lines = ["text,label"] + [f"{t},{y}" for t, y in rows(10)] + ['"good film,pos'] + [f"{t},{y}" for t, y in rows()]
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(GraftError, match="x.csv, line .*not valid CSV"):
        text_source(tiny_bert, path=str(tmp_path / "x.csv"))
    from graft.plugins.corpus import CorpusOptions, read_documents

    (tmp_path / "p.txt").write_bytes(b"first paragraph\r\nstill first\r\n\r\nsecond one\r\n")
    docs = read_documents(CorpusOptions(path=str(tmp_path / "p.txt"), documents="paragraphs"), "[data]")
    assert docs == ["first paragraph\nstill first", "second one"]
