"""graft compare (issue 34): per-example predictions, bootstrap intervals, paired tests, seed rows, refusals, the
report page (its structure, and in a real headless browser), method matrices resumed after a kill."""

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config, wait_for_lines, write_config
from test_user_files import assert_bad_input, cli_run


def train(path: Path, **train):
    import graft

    conf = write_config(path.with_suffix(".toml"), tiny_config(train=train))
    graft.train(graft.load_config(conf), path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two configs (2 epochs, 1 epoch) x seeds 0 and 1 of the tiny ViT on digits."""
    d = tmp_path_factory.mktemp("compare")
    return {f"{name}{seed}": train(d / f"{name}{seed}", epochs=epochs, seed=seed)
            for name, epochs in (("a", 2), ("b", 1)) for seed in (0, 1)}


def records(run, split="test"):
    return [json.loads(x) for x in (run / "predictions" / f"{split}.jsonl").read_text().splitlines()]


def compare_json(*args):
    code, out = cli_run("compare", *args, "--json", "--resamples", "500")
    assert code == 0, out
    return json.loads(out[out.index("{"):])


def test_every_run_keeps_per_example_predictions_that_add_up_to_its_test_metrics(runs):
    for run in runs.values():
        summary = json.loads((run / "summary.json").read_text())
        for split in ("test", "val"):
            recs = records(run, split)
            assert len(recs) == summary["predictions"][split]["examples"] == len({r["id"] for r in recs})
            assert np.mean([r["correct"] for r in recs]) == pytest.approx(summary[split]["accuracy"])
            assert all(r["prediction"] in [str(i) for i in range(10)] and 0 < r["score"] <= 1 for r in recs)
        confusion = np.zeros(100)
        for r in recs:  # the val records: one cell of count 1 each, the split's confusion matrix in all
            s = r["sums"]["confusion"]
            assert r["sums"]["count"] == 1.0 and s["value"] == [1.0]
            np.add.at(confusion, s["index"], s["value"])
        assert confusion.reshape(10, 10).tolist() == summary["val"]["confusion_matrix"]
        assert sum(r["sums"]["loss_sum"] for r in recs) / len(recs) == pytest.approx(summary["val"]["loss"], rel=1e-4)
    # the same data and seed: the same ids and targets in another config's run; another seed, other examples
    a0, b0, a1 = (records(runs[k]) for k in ("a0", "b0", "a1"))
    assert [(r["id"], r["target"]) for r in a0] == [(r["id"], r["target"]) for r in b0]
    assert a0[0]["id"].startswith("uci:") and {r["id"] for r in a0} != {r["id"] for r in a1}


def test_text_examples_are_named_by_file_and_line(tmp_path, tiny_bert):
    import graft
    from conftest import reviews

    conf = tiny_config(backbone={"plugin": "hf", "weights": str(tiny_bert)},
                       data={"plugin": "text", "path": str(reviews(tmp_path / "r.jsonl", n=60))})
    summary = graft.train(graft.load_config(conf), tmp_path / "run")
    recs = records(tmp_path / "run")
    assert summary["predictions"]["test"]["ids"] == "source"
    assert all(r["id"].startswith(f"{tmp_path / 'r.jsonl'}, line ") for r in recs)
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    for r in recs:  # the line the id names holds the example's label
        assert json.loads(lines[int(r["id"].rsplit(" ", 1)[1]) - 1])["label"] == r["target"]


def test_the_bootstrap_interval_of_a_known_accuracy_matches_the_binomial_interval():
    from scipy.stats import binomtest

    from graft import compare
    from graft.supervised import confusion_metrics

    n, right = 2000, 1600
    recs = [{"sums": {"count": 1.0, "confusion": [[float(i < right), 0.0], [0.0, float(i >= right)]]}}
            for i in range(n)]
    # a wrong answer is an off-diagonal cell
    for r in recs[right:]:
        r["sums"]["confusion"] = [[0.0, 1.0], [0.0, 0.0]]
    stacked = compare.stack(recs, "synthetic")
    values = compare.metric_values(stacked, compare.resample_weights(n, 2000, 0),
                                   lambda s: confusion_metrics(s, None)["accuracy"])
    lo, hi = compare.interval(values)
    p = right / n
    wald = 1.96 * (p * (1 - p) / n) ** 0.5
    assert lo == pytest.approx(p - wald, abs=0.004) and hi == pytest.approx(p + wald, abs=0.004)
    exact = binomtest(right, n).proportion_ci(0.95)
    assert lo == pytest.approx(exact.low, abs=0.005) and hi == pytest.approx(exact.high, abs=0.005)
    assert float(np.mean(values)) == pytest.approx(p, abs=0.002)


def test_mcnemar_p_value_equals_binomtest_on_the_discordant_pairs(runs, tmp_path):
    from scipy.stats import binomtest

    report = compare_json(runs["a0"], runs["b0"], "--out", tmp_path / "rep")
    base, other = report["rows"]
    assert base["baseline"] and report["metric"] == "accuracy"
    a, b = records(runs["a0"]), records(runs["b0"])
    only_b = sum(y["correct"] and not x["correct"] for x, y in zip(a, b))
    only_a = sum(x["correct"] and not y["correct"] for x, y in zip(a, b))
    vs = other["vs_baseline"]
    assert (vs["only_this_right"], vs["only_baseline_right"]) == (only_b, only_a) and only_a + only_b > 0
    assert vs["test"] == "McNemar exact" and vs["p_value"] == pytest.approx(binomtest(only_b, only_a + only_b).pvalue)
    summaries = [json.loads((runs[k] / "summary.json").read_text())["test"]["accuracy"] for k in ("a0", "b0")]
    assert vs["difference"] == pytest.approx(summaries[1] - summaries[0])
    assert vs["ci"][0] <= vs["difference"] <= vs["ci"][1]
    assert base["pooled"]["value"] == pytest.approx(summaries[0])


def test_two_identical_runs_differ_by_zero_with_p_one(runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(runs["a0"], copy)
    for metric, test in (("accuracy", "McNemar exact"), ("macro_f1", "paired bootstrap")):
        report = compare_json(runs["a0"], copy, "--metric", metric, "--out", tmp_path / metric)
        vs = report["rows"][1]["vs_baseline"]
        assert vs["test"] == test and vs["difference"] == 0 and vs["p_value"] == 1 and vs["ci"] == [0, 0]
        assert not vs["significant"]


def test_graft_eval_writes_the_predictions_of_a_run_trained_before_they_were_kept(runs, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(runs["a0"], old)
    shutil.rmtree(old / "predictions")
    summary = json.loads((old / "summary.json").read_text())
    del summary["predictions"]
    (old / "summary.json").write_text(json.dumps(summary))
    assert_bad_input(*cli_run("compare", runs["a0"], old, "--out", tmp_path / "r"), "no per-example predictions",
                     f"graft eval {old} --predictions")
    assert_bad_input(*cli_run("eval", old, "--predictions", "--data", "test_fraction=0.3"), "drop --set / --data")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(old, unfinished)
    (unfinished / "summary.json").unlink()
    assert_bad_input(*cli_run("eval", unfinished, "--predictions"), "not a finished run", "--resume")
    assert not (unfinished / "summary.json").exists()
    code, out = cli_run("eval", old, "--predictions")
    assert code == 0, out
    for split in ("test", "val"):
        assert records(old, split) == records(runs["a0"], split)
    assert json.loads((old / "summary.json").read_text())["predictions"] == \
        json.loads((runs["a0"] / "summary.json").read_text())["predictions"]
    vs = compare_json(runs["a0"], old, "--out", tmp_path / "r")["rows"][1]["vs_baseline"]
    assert vs["difference"] == 0 and vs["p_value"] == 1


def test_runs_on_other_examples_are_refused_with_the_reason(runs, tmp_path):
    assert_bad_input(*cli_run("compare", runs["a0"], runs["b1"], "--out", tmp_path / "r"), str(runs["b1"]),
                     "different examples", "train.seed")
    other = tmp_path / "other"
    import graft

    conf = tiny_config(data={"test_fraction": 0.3})
    graft.train(graft.load_config(conf), other)
    assert_bad_input(*cli_run("compare", runs["a0"], other, "--out", tmp_path / "r"), "different examples")
    assert_bad_input(*cli_run("compare", runs["a0"], tmp_path, "--out", tmp_path / "r"), "not a finished graft run")
    assert_bad_input(*cli_run("compare", runs["a0"], runs["b0"], "--metric", "bleu", "--out", tmp_path / "r"),
                     "'bleu'", "macro_f1")
    (other / "predictions" / "test.jsonl").unlink()
    assert_bad_input(*cli_run("compare", runs["a0"], other, "--out", tmp_path / "r"), "no per-example predictions")


def test_seeds_of_one_config_make_one_row_paired_seed_by_seed(runs, tmp_path):
    report = compare_json(runs["a0"], runs["b0"], runs["a1"], runs["b1"], "--out", tmp_path / "rep")
    assert [len(r["runs"]) for r in report["rows"]] == [2, 2]
    a, b = report["rows"]
    assert [r["seed"] for r in b["runs"]] == [0, 1]
    accs = [json.loads((runs[k] / "summary.json").read_text())["test"]["accuracy"] for k in ("b0", "b1")]
    assert b["mean"] == pytest.approx(np.mean(accs)) and b["std"] == pytest.approx(np.std(accs, ddof=1))
    pairs = [(records(runs[f"a{s}"]), records(runs[f"b{s}"])) for s in (0, 1)]
    assert b["pooled"]["examples"] == sum(len(y) for _, y in pairs)
    assert b["vs_baseline"]["only_this_right"] == sum(y["correct"] and not x["correct"]
                                                      for xs, ys in pairs for x, y in zip(xs, ys))
    assert b["vs_baseline"]["baseline_runs"] == [str(runs["a0"]), str(runs["a1"])]
    base_accs = [json.loads((runs[k] / "summary.json").read_text())["test"]["accuracy"] for k in ("a0", "a1")]
    assert b["vs_baseline"]["seed_differences"] == pytest.approx([x - y for x, y in zip(accs, base_accs)])
    lo, hi = b["seed_ci"]
    assert lo < b["mean"] < hi and hi - lo > 2 * b["std"]  # t with 1 degree of freedom: 12.7 standard errors
    for r in b["runs"]:
        assert r["ci"][0] <= r["value"] <= r["ci"][1]


class _Page(HTMLParser):
    """Rows of each table's body (by table id), images, scripts and links to anything outside the page."""

    def __init__(self):
        super().__init__()
        self.rows, self.images, self.links, self.scripts, self._table, self._in_body = {}, [], [], 0, None, False

    def handle_endtag(self, tag):
        self._in_body &= tag != "tbody"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id")
        self._in_body |= tag == "tbody"
        if tag == "tr" and self._in_body:
            self.rows[self._table] = self.rows.get(self._table, 0) + 1
        self.scripts += tag == "script"
        if tag == "img":
            self.images.append(attrs["src"])
        self.links += [v for k, v in attrs.items() if k in ("href", "src") and v and not v.startswith("data:")]


def test_the_page_is_one_self_contained_file_with_every_row_and_plot(runs, tmp_path):
    out = tmp_path / "rep"
    report = compare_json(runs["a0"], runs["b0"], runs["a1"], runs["b1"], "--out", out)
    page = _Page()
    page.feed((out / "index.html").read_text())
    assert page.rows == {"comparison": 2, "costs": 2} and len(report["rows"]) == 2
    assert not page.links and not page.scripts
    assert len(page.images) == 2
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "compare.json").read_text())["rows"][1]["label"] == report["rows"][1]["label"]


def _browser():
    """Debian's chromium and Playwright, or None (CI installs both: a missing one fails there)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None and os.environ.get("CI"):
        pytest.fail("CI needs chromium and playwright for the page test (.ci/run installs them).")
    return path


def test_the_page_in_a_real_headless_browser(runs, tmp_path):
    chromium = _browser()
    if chromium is None:
        pytest.skip("no chromium / playwright here (CI installs them)")
    from playwright.sync_api import sync_playwright

    out = tmp_path / "rep"
    report = compare_json(runs["a0"], runs["b0"], runs["a1"], runs["b1"], "--out", out)
    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
        page.goto((out / "index.html").as_uri())
        cells = page.locator("#comparison tbody tr").evaluate_all("rows => rows.map(r => r.cells[0].innerText)")
        loaded = page.locator("img").evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
        visible = page.locator("#comparison").is_visible()
        browser.close()
    assert cells == [r["label"] for r in report["rows"]] and visible
    assert loaded == [True, True]
    assert not errors and not requests, (errors, requests)


MATRIX = """
[matrix]
seeds = [0, 1]
baseline = "ft"
out = "{out}"

[backbone]
plugin = "timm"
model = "vit_tiny_patch16_224"
model_kwargs = {{ img_size = 8, patch_size = 4, embed_dim = 32, depth = 2, num_heads = 2 }}

[strategy]
plugin = "finetune"

[data]
plugin = "digits"
image_size = 8

[train]
epochs = {epochs}
batch_size = 32
lr = 3e-3
progress = false
plot = false
log_every = 1

[[method]]
name = "ft"

[[method]]
name = "probe"
[method.strategy]
freeze = "backbone"

[[method]]
name = "int8"
compress = "ft"
quantize = "dynamic-int8"
"""


def test_a_matrix_killed_mid_run_resumes_where_it_stopped_and_ends_with_the_report(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(MATRIX.format(out=tmp_path / "runs", epochs=4))
    proc = subprocess.Popen([sys.executable, "-m", "graft.cli", "compare", "--matrix", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_lines(tmp_path / "runs" / "probe-s0", 70, proc, timeout=180)  # past its first epoch's checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = (tmp_path / "runs" / "ft-s0" / "summary.json").stat().st_mtime_ns
    assert not (tmp_path / "runs" / "probe-s0" / "summary.json").exists()
    code, out = cli_run("compare", "--matrix", path, "--resamples", "200")
    assert code == 0, out
    assert "[ft-s0] up to date" in out and "[probe-s0] resuming" in out and "[int8-s1] compressing" in out
    assert (tmp_path / "runs" / "ft-s0" / "summary.json").stat().st_mtime_ns == done
    report = json.loads((tmp_path / "runs" / "report" / "compare.json").read_text())
    assert [(r["label"], len(r["runs"])) for r in report["rows"]] == [("ft", 2), ("probe", 2), ("int8", 2)]
    int8 = report["rows"][2]
    assert int8["cost"]["latency_p50_ms"] > 0 and int8["cost"]["size_mib"] < report["rows"][0]["cost"]["size_mib"]
    # a second call only reports
    code, out = cli_run("compare", "--matrix", path, "--resamples", "200")
    assert code == 0 and "training" not in out and "[probe-s1] up to date" in out


@pytest.mark.parametrize("change, needles", [
    (('compress = "ft"', 'compress = "fft"'), ["names no method", 'Did you mean "ft"']),
    (("seeds = [0, 1]", "seeds = [0, 0]"), ["seeds", "different integers"]),
    (('baseline = "ft"', 'baseline = "full"'), ["baseline", "is no method"]),
    (("seeds = [0, 1]", "seeds = [0, 1]\nseed = 3"), ["[matrix] seed", 'Did you mean "seeds"']),
    (('name = "probe"', 'name = "ft"'), ["[[method]] 2", "its own name"]),
    (("freeze = \"backbone\"", "freeze = \"everything\""), ["freeze", "probe-s0"]),
])
def test_bad_matrix_files_stop_before_anything_runs(tmp_path, change, needles):
    path = tmp_path / "m.toml"
    path.write_text(MATRIX.format(out=tmp_path / "runs", epochs=1).replace(*change))
    assert_bad_input(*cli_run("compare", "--matrix", path), str(path), *needles)
    assert not (tmp_path / "runs").exists()


def test_a_methods_settings_stay_in_its_own_runs(tmp_path):
    """The reported input: a method's `set` (the student's epochs and lr) and tables reached the later seeds' runs of
    every other method, because the stages shared the matrix's tables and overrides changed them in place."""
    from graft import pipeline as pl
    from graft.matrix import expand

    path = tmp_path / "m.toml"
    path.write_text(MATRIX.format(out=tmp_path / "runs", epochs=1).replace(
        'name = "probe"', 'name = "probe"\nset = ["train.lr=0.5", "train.epochs=7"]\n[method.data]\nimage_size = 16'))
    tables, _ = expand(path)
    stages = {s.name: s.config for s in pl.read_pipeline(path, None, None, ["train.batch_size=16"], data=tables)
              if s.config is not None}
    for seed in (0, 1):
        ft, probe = stages[f"ft-s{seed}"], stages[f"probe-s{seed}"]
        assert (ft.train.lr, ft.train.epochs, ft.plugins["data"].options.image_size) == (3e-3, 1, 8)
        assert (probe.train.lr, probe.train.epochs, probe.plugins["data"].options.image_size) == (0.5, 7, 16)
        assert ft.train.seed == probe.train.seed == seed and ft.train.batch_size == 16


def test_a_matrix_stopped_by_sigint_resumes_and_its_run_ends_like_an_uninterrupted_one(tmp_path):
    import graft

    path = tmp_path / "m.toml"
    text = MATRIX.format(out=tmp_path / "runs", epochs=4).replace("seeds = [0, 1]", "seeds = [0]")
    path.write_text(text[:text.index('[[method]]\nname = "int8"')])
    proc = subprocess.Popen([sys.executable, "-m", "graft.cli", "compare", "--matrix", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_lines(tmp_path / "runs" / "probe-s0", 70, proc, timeout=180)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate()
    assert proc.returncode == 0 and "[probe-s0] interrupted" in out, (out, err)
    assert not (tmp_path / "runs" / "report").exists()
    code, out = cli_run("compare", "--matrix", path, "--resamples", "200")
    assert code == 0 and "[probe-s0] resuming" in out, out
    # the same stage trained without a stop gives the same per-example answers
    conf = graft.load_config(tmp_path / "runs" / "probe-s0" / "config.toml")
    graft.train(conf, tmp_path / "whole", echo=lambda m: None)
    resumed, whole = records(tmp_path / "runs" / "probe-s0"), records(tmp_path / "whole")
    assert [(r["id"], r["prediction"]) for r in resumed] == [(r["id"], r["prediction"]) for r in whole]
    assert [r["score"] for r in resumed] == pytest.approx([r["score"] for r in whole], abs=1e-5)
