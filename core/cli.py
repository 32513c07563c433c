"""The ``graft`` command. It turns commands into config + registry + loop calls, and bad input into exit code 2
with one clear paragraph. torch is imported only by the commands that run models."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import click

from .errors import GraftError, GraftWarning


#: optional libraries -> the graftkit extra that installs them
EXTRAS = {"timm": "timm", "torchvision": "timm", "transformers": "hf", "tokenizers": "hf", "sklearn": "data",
          "PIL": "data", "matplotlib": "plots", "peft": "peft", "torch": "all", "numpy": "all", "safetensors": "all",
          "onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx", "tensorboard": "tensorboard",
          "mlflow": "mlflow", "datasets": "datasets", "optuna": "optuna", "seqeval": "seqeval"}


def _debug() -> bool:
    return os.environ.get("GRAFT_DEBUG", "") not in ("", "0")


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GraftError as e:
            if _debug():
                traceback.print_exc()
            click.echo(f"Error: {e}", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except ModuleNotFoundError as e:
            if _debug():
                raise
            top = (e.name or "").split(".")[0]
            extra = EXTRAS.get(top)
            hint = f"pip install 'graftkit[{extra}]'" if extra else f"pip install {top}"
            click.echo(f"Error: this needs the Python package {top!r}, which is not installed. Install it: {hint}.",
                       err=True)
            sys.exit(2)
        except Exception as e:  # noqa: BLE001 - a bug, not bad input: short message unless --debug
            if _debug():
                raise
            click.echo(f"Error: {type(e).__name__}: {e}\n(This looks like a bug; run `graft --debug ...` for the "
                       f"traceback and report it.)", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="graftkit")
def cli(debug):
    """graftkit: transfer learning with any backbone, any strategy, one training loop."""
    if debug:
        os.environ["GRAFT_DEBUG"] = "1"
    warnings.showwarning = _show_warning


_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """GraftWarnings are the user's business: one line, from the main process only. Others as Python shows them."""
    if issubclass(category, GraftWarning):
        if int(os.environ.get("RANK", "0")) == 0:
            click.echo(f"Warning: {message}", err=True)
        return
    _python_showwarning(message, category, filename, lineno, file, line)


def _registry():
    from .registry import get_registry

    return get_registry()


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


@cli.command("list")
@click.argument("kind", required=False)
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(kind, pattern, as_json):
    """List registered plugins: all, one KIND (backbone, strategy, loss, data, adapter, logger, task), optionally
    names matching PATTERN."""
    reg = _registry()
    entries = reg.list(kind, pattern)
    if as_json:
        click.echo(json.dumps([{"name": e.name, "kind": e.kind, "plugin": e.plugin, "summary": e.summary}
                               for e in entries], indent=2))
        return
    click.echo(_table([[e.name, e.kind, e.plugin, e.summary] for e in entries], ["NAME", "KIND", "PLUGIN", "SUMMARY"]))
    for (k, name), clash in sorted(reg.conflicts.items()):
        click.echo(f"! {k} {name!r} is registered by several plugins ({', '.join(e.plugin for e in clash)}); "
                   f"it cannot be used until one is removed.", err=True)
    broken = [p.name for p in reg.plugins.values() if p.status == "broken"]
    if broken:
        click.echo(f"! broken plugins not listed: {', '.join(broken)} (see `graft plugins`)", err=True)


@cli.command()
@click.argument("kind")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def describe(kind, name, as_json):
    """Show a plugin's options (KIND NAME), or the loop's [train] options (`graft describe train`)."""
    from . import options
    from .registry import canonical_kind, summary_of

    if kind == "train":
        from .config import TrainOptions

        cls, entry_plugin, summary, name = TrainOptions, "graft", summary_of(TrainOptions), "train"
    else:
        kind = canonical_kind(kind)
        if not name:
            raise GraftError(f"Which {kind}? `graft describe {kind} NAME`; `graft list {kind}` shows the names.")
        cls = _registry().get(kind, name)
        entry = _registry().entries[kind][name]
        entry_plugin, summary = entry.plugin, entry.summary
    rows = options.describe(cls.Options if kind != "train" else cls)
    facts = _task_facts(cls) if kind == "task" else {}
    if as_json:
        click.echo(json.dumps({"kind": kind, "name": name, "plugin": entry_plugin, "summary": summary,
                               "options": rows, **facts}, indent=2, default=str))
        return
    title = "[train] (the loop)" if kind == "train" else f"{kind} {name!r} (plugin {entry_plugin})"
    click.echo(f"{title}\n  {summary}\n")
    if facts:
        click.echo(f"Named by a data source's task = {name!r}; it has no table of its own.")
        click.echo("\n".join(f"  {k}: {v}" for k, v in facts["task"].items()))
        if not rows:
            return
    if not rows:
        click.echo("  (no options)")
        return
    click.echo(f"Options for the [{f'loggers.{name}' if kind == 'logger' else kind}] table:")
    table = _table([[r["name"], r["type"], json.dumps(r["default"], default=str), r["help"]] for r in rows],
                   ["KEY", "TYPE", "DEFAULT", "HELP"])
    click.echo("\n".join("  " + line for line in table.splitlines()))


def _task_facts(cls) -> dict:
    """What ``graft describe task NAME`` says of a task besides its (absent) options."""
    return {"task": {"features": cls.features, "losses": ", ".join(cls.losses) or "(any)",
                     "metric": cls.primary_metric or "(the strategy's)",
                     "metrics": ", ".join(f"{m} ({d})" for m, d in cls.metric_modes.items()),
                     "distillable": cls.distillable, "export outputs": f"{', '.join(cls.output_names)} "
                                                                       f"{cls.output_shape}"}}


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json):
    """Show every plugin module: source (built-in or entry point), version, status."""
    reg = _registry()
    rows = []
    for p in reg.plugins.values():
        provides = [f"{e.kind}:{e.name}" for es in reg.entries.values() for e in es.values() if e.plugin == p.name]
        provides += [f"{k}:{n} (clash)" for (k, n), clash in reg.conflicts.items()
                     for e in clash if e.plugin == p.name]
        rows.append({"name": p.name, "module": p.module, "source": p.source, "version": p.version,
                     "status": p.status, "error": p.error, "provides": provides})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(_table([[r["name"], r["source"], r["version"], r["status"],
                        r["error"] if r["error"] else ", ".join(r["provides"])] for r in rows],
                      ["PLUGIN", "SOURCE", "VERSION", "STATUS", "PROVIDES / ERROR"]))


def _default_run_dir(config_path: str) -> Path:
    stem = Path(config_path).stem
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")  # the same in every process of one torchrun launch
    if run_id and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return Path("runs") / f"{stem}-{run_id[:8]}"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


@cli.command("train")
@click.argument("config_path", metavar="CONFIG")
@click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE",
              help="Override a config value (a TOML literal, e.g. --set train.lr=3e-4). Repeatable.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (default runs/<config>-<time>).")
@click.option("--resume", type=click.Path(file_okay=False), metavar="RUN_DIR",
              help="Continue the run in RUN_DIR from its latest checkpoint.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes to launch on this machine (distributed data parallel).")
def train_cmd(config_path, overrides, out, resume, nproc):
    """Train with the config file CONFIG; writes a run directory."""
    from . import config as cfg

    conf = cfg.load_config(config_path, overrides)  # validate before starting anything heavy
    if resume and out and Path(out).resolve() != Path(resume).resolve():
        raise GraftError("Give either --resume RUN_DIR or --out DIR, not two different directories.")
    run_dir = Path(resume or out or _default_run_dir(config_path))
    if resume:
        if not Path(resume).is_dir():
            raise GraftError(f"--resume {resume}: no such run directory.")
    elif int(os.environ.get("RANK", "0")) == 0 and (run_dir / "checkpoints").exists():
        raise GraftError(f"Run directory {run_dir} already holds a run. Continue it with --resume {run_dir}, or "
                         f"choose another --out.")
    if nproc > 1:
        if "WORLD_SIZE" in os.environ:
            raise GraftError("--nproc starts its own processes; under torchrun, leave it out.")
        from .distributed import launch

        argv = ["train", config_path, "--out", str(run_dir)] + [a for o in overrides for a in ("--set", o)]
        if resume:
            argv += ["--resume", str(run_dir)]
        sys.exit(launch(nproc, argv))
    from .loop import train as run_training

    summary = run_training(conf, run_dir, resume=bool(resume), echo=lambda m: click.echo(m, err=True))
    if int(os.environ.get("RANK", "0")) == 0 and not summary.get("interrupted"):
        click.echo(f"Run written to {run_dir}")
        _show_metrics({k: summary[k] for k in ("val", "test") if k in summary})
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is written and fsynced and the process group is gone. Skipping the interpreter's teardown
        # avoids a rare abort there ("terminate called without an active exception", seen with gloo on CPU) that
        # would make torchrun report a finished run as failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _show_metrics(results: dict) -> None:
    for split, metrics in results.items():
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        click.echo(f"  {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in numbers.items()))


@cli.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE",
              help="Change the saved config, e.g. --set data.test_path=new.csv. Repeatable.")
@click.option("--data", "data_overrides", multiple=True, metavar="KEY=VALUE",
              help="Shorthand for --set data.KEY=VALUE, e.g. --data test_path=new.jsonl. Repeatable.")
@click.option("--split", "splits", default="val,test", show_default=True, help="Comma-separated splits.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with per-class reports).")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code shipped with the run's model to run.")
@click.option("--predictions", "keep", is_flag=True,
              help="Write the run's per-example predictions (RUN/predictions/SPLIT.jsonl, what graft compare pairs) "
                   "of the evaluated splits: for runs trained before graftkit kept them. Not with --set / --data.")
def eval_cmd(run_dir, overrides, data_overrides, splits, as_json, trust_remote_code, keep):
    """Evaluate a finished run's best weights again, on its data or on other data (--data / --set)."""
    from . import predictions, rundir
    from .export import load_run

    if keep and (overrides or data_overrides):
        raise GraftError("graft eval --predictions writes the run's own per-example predictions into the run "
                         "directory, of the data it was trained on: drop --set / --data (evaluate other data "
                         "without --predictions).")
    summary = rundir.read_summary(Path(run_dir))
    if keep and summary is None:
        raise GraftError(f"{run_dir} has no {rundir.SUMMARY}: it is not a finished run. Finish it first (graft train "
                         f"CONFIG --resume {run_dir}), then write its predictions.")
    run = load_run(run_dir, list(overrides) + [f"data.{d}" for d in data_overrides],
                   trust_remote_code=trust_remote_code)
    if keep and not getattr(run.strategy, "per_example", False):
        raise GraftError(f"{run_dir}: strategy {run.strategy.name!r} keeps no per-example predictions (its metrics "
                         f"are not sums over examples); graft compare takes runs of finetune, distill, adapt, clm "
                         f"and seq2seq.")
    results, examples = {}, {}
    for split in [s.strip() for s in splits.split(",") if s.strip()]:
        examples[split] = [] if keep else None
        metrics = run.evaluate(run.model, split, records=examples[split])
        if metrics is None and keep and split in ("val", "test"):  # as training's final evaluation: skipped
            continue
        if metrics is None:
            raise GraftError(f"The data has no {split!r} split (splits are train, val, test).")
        results[split] = metrics
    if keep:
        summary["predictions"] = {**summary.get("predictions", {}),
                                  **predictions.write_all(Path(run_dir), examples, run.data)}
        rundir.write_summary(Path(run_dir), summary)
        written = ", ".join(str(Path(run_dir, predictions.FOLDER, f"{split}.jsonl")) for split in results)
        click.echo(f"Per-example predictions: {written}", err=True)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    _show_metrics(results)
    for split, metrics in results.items():
        if metrics.get("per_class"):  # each task's own columns: precision ... support, or detection's ap ... boxes
            keys = list(next(iter(metrics["per_class"].values())))
            rows = [[name, *(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys)]
                    for name, r in metrics["per_class"].items()]
            click.echo(f"\n{split} per class:")
            click.echo(_table(rows, ["LABEL", *(k.upper() for k in keys)]))


@cli.command("predict")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("inputs", nargs=-1)
@click.option("--file", "input_file", metavar="FILE", help="Read inputs from a UTF-8 text file, one per line ('-': "
              "stdin).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--out-dir", "--mask-dir", "mask_dir", type=click.Path(file_okay=False), default=".",
              show_default=True, help="Where predictions that are files go (segmentation: INPUT_NAME.mask.png, "
              "class indices; detection: INPUT_NAME.boxes.png, the image with its boxes drawn).")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code shipped with the run's model to run.")
def predict_cmd(run_dir, inputs, input_file, as_json, mask_dir, trust_remote_code):
    """Predict with a finished run: INPUTS are image paths or texts (or lines of --file)."""
    from .files import read_text
    from .export import load_run
    from .run import predict as run_predict
    from .task import Task

    lines = []
    if input_file == "-":
        lines = sys.stdin.read().splitlines()
    elif input_file:
        if not Path(input_file).is_file():
            raise GraftError(f"--file {input_file}: no such file.")
        lines = read_text(input_file, "utf-8", "--file", fix="Save it as UTF-8.").splitlines()
    items = list(inputs) + [line for line in lines if line.strip()]
    if not items:
        raise GraftError("Nothing to predict: give inputs as arguments or with --file.")
    run = load_run(run_dir, for_prediction=True, trust_remote_code=trust_remote_code)
    task = getattr(run.strategy, "task", None)
    show = task.show if isinstance(task, Task) else Task().show  # strategies without a task: the plain forms
    for item, result in zip(items, run_predict(run, items)):
        record, line = show(result, item, mask_dir)
        click.echo(json.dumps({"input": item, **record}) if as_json else line)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("inputs", nargs=-1)
@click.option("--method", default="", help="images: integrated_gradients (default), gradcam or occlusion; text: "
              "integrated_gradients.")
@click.option("--layer", default="", help="gradcam: the module to take the feature map from (a name as "
              "model.named_modules() gives it, e.g. backbone.model.blocks.4); default: the last map of at least 2x2.")
@click.option("--split", default="", help="Explain a seeded sample of --limit examples of this split (val, test) for "
              "their true labels instead, and write a report: report.json and report.png (images) or report.html "
              "(text).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1), help="With --split: examples.")
@click.option("--target", default="", help="Explain this label's probability (default: the predicted label).")
@click.option("--token", default=0, show_default=True, type=click.IntRange(min=0), help="A language-model run: "
              "explain the K-th token of the greedy answer (0 = its first).")
@click.option("--out", type=click.Path(file_okay=False), help="Folder for heatmaps (PNG) and the text page (HTML); "
              "default RUN_DIR/explanations.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=2), help="Integrated Gradients' "
              "steps.")
@click.option("--sanity", is_flag=True, help="Also the model-randomisation check: Spearman's rho against the same "
              "explanation of a re-initialised model (near 1 = the method ignores what the model learned).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines (attributions, curves, AUCs).")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code shipped with the run's model to run.")
def explain(run_dir, inputs, method, layer, split, limit, target, token, out, steps, sanity, as_json,
            trust_remote_code):
    """Explain a finished classifier's prediction for INPUTS (image paths or texts) with Captum: a heatmap per image,
    words coloured by attribution for text, and deletion / insertion AUCs against random order; a language-model
    run: one token of its answer to each prompt, attributed to the prompt's words. With --split, a report over a
    split's examples in RUN_DIR/explanations."""
    from .explain import colour_words, explain as run_explain, explain_split, write_report, write_split_report
    from .export import load_run

    if bool(inputs) == bool(split):
        raise GraftError("graft explain takes INPUTS (image paths or texts) or --split NAME, one of the two.")
    folder = Path(out) if out else Path(run_dir) / "explanations"
    run = load_run(run_dir, for_prediction=not split, trust_remote_code=trust_remote_code)
    if split:
        report = write_split_report(explain_split(run, split, limit, method, steps, layer=layer), folder)
        if as_json:
            click.echo(json.dumps({k: v for k, v in report.items() if k != "records"}))
            return
        m = report["mean"]
        click.echo(f"{report['examples']} {split} examples, {report['method']}: mean deletion AUC "
                   f"{m['deletion_auc']:.3f} (random {m['deletion_auc_random']:.3f}), insertion AUC "
                   f"{m['insertion_auc']:.3f} (random {m['insertion_auc_random']:.3f}); report in {folder}")
        for name, c in report["classes"].items():
            top = ", ".join(w["word"] for w in c.get("top_words", [])[:8])
            click.echo(f"  {name}: {top}" if top else f"  {name}: most confident {c['most_confident']}, least "
                       f"{c['least_confident']}")
        return
    records = write_report(run_explain(run, list(inputs), method, target, steps, sanity, token=token, layer=layer),
                           folder)
    for r in records:
        if as_json:
            click.echo(json.dumps(r))
            continue
        what = colour_words(r["words"]) if "words" in r else r["heatmap"]
        click.echo(f"{r['input'] if 'heatmap' in r else ''}{': ' if 'heatmap' in r else ''}{what}")
        faith = (f"  deletion AUC {r['deletion_auc']:.3f} (random {r['deletion_auc_random']:.3f}), insertion AUC "
                 f"{r['insertion_auc']:.3f} (random {r['insertion_auc_random']:.3f})") if "deletion_auc" in r else ""
        sane = f", sanity rho {r['sanity_spearman']:.2f}" if "sanity_spearman" in r else ""
        said = (f"answer {r['answer']!r}: token {r['token']} {r['explained']!r} ({r['probability']:.2f})"
                if "answer" in r else f"predicted {r['predicted']} ({r['probability']:.2f}), target {r['target']} "
                                      f"({r['target_probability']:.2f})")
        click.echo(f"  {said} -- {r['method']}{faith}{sane}")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("prompt", required=False)
@click.option("--file", "prompt_file", metavar="FILE", help="Answer every prompt of FILE instead (JSONL rows with a "
              "prompt -- text or messages --, or lines of text), in batches; JSON lines out.")
@click.option("--out", "out_file", metavar="OUT", help="With --file: write the JSONL answers here (each row with "
              "\"answer\" added) instead of printing them.")
@click.option("--field", default="prompt", show_default=True, help="With --file: the rows' prompt field.")
@click.option("--chosen", default="", metavar="FIELD", help="With --file: write preference pairs instead -- chosen = "
              "the row's FIELD (e.g. response), rejected = the model's answer (SPIN) -- for the preferences source.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="With --file: prompts "
              "per batch.")
@click.option("--seed", default=0, show_default=True, type=int, help="With --file: sampling seed (batch k: seed + k).")
@click.option("--max-new-tokens", default=50, show_default=True, type=click.IntRange(min=1), help="Tokens to add.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="0 = greedy; above 0 samples, softer as it grows.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0), help="Nucleus sampling.")
@click.option("--raw", is_flag=True, help="Give the prompt as it is, not wrapped in the run's instruction template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code shipped with the run's model to run.")
def generate(run_dir, prompt, prompt_file, out_file, field, chosen, batch_size, seed, max_new_tokens, temperature,
             top_p, raw, as_json, trust_remote_code):
    """Continue PROMPT with a finished language-model run (strategy clm), streaming the text. A run tuned on
    instructions answers PROMPT as the user's message in its chat template (--raw: continue the text itself).
    With --file, answer a file of prompts in batches (seeded sampling), e.g. to make preference pairs."""
    from .capabilities import TextGeneration, require
    from .export import load_run

    if prompt_file:
        return _generate_file(run_dir, prompt, prompt_file, out_file, field, chosen, batch_size, seed, max_new_tokens,
                              temperature, top_p, raw, trust_remote_code)
    if out_file or chosen:
        raise GraftError("--out and --chosen go with --file (a file of prompts).")
    if prompt is None or not prompt.strip():
        raise GraftError("The prompt is empty: give the text to continue, e.g. graft generate RUN \"Once upon a time\".")
    run = load_run(run_dir, for_prediction=True, trust_remote_code=trust_remote_code)
    stream = None if as_json else (lambda text: click.echo(text, nl=False))
    strategy = require(run.strategy, TextGeneration, "graft generate",
                       "graft generate needs a run of a language model strategy (clm).")
    text = strategy.generate(run.model, prompt, max_new_tokens, temperature, top_p, stream=stream, raw=raw)
    if as_json:
        click.echo(json.dumps({"prompt": prompt, "text": text}))
    else:
        click.echo()


def _generate_file(run_dir, prompt, prompt_file, out_file, field, chosen, batch_size, seed, max_new_tokens,
                   temperature, top_p, raw, trust_remote_code):
    import tempfile

    from .export import load_run
    from .generate import answer_file

    if prompt is not None:
        raise GraftError("Give a PROMPT or --file, not both.")
    run = load_run(run_dir, for_prediction=True, trust_remote_code=trust_remote_code)
    target = Path(out_file) if out_file else Path(tempfile.mkdtemp()) / "answers.jsonl"
    n = answer_file(run, prompt_file, target, field, chosen, batch_size, max_new_tokens, temperature, top_p, seed, raw,
                    echo=lambda m: click.echo(m, err=True))
    if n["left_out"]:
        click.echo(f"{n['left_out']} pair(s) left out: the answer was empty or the chosen one itself.", err=True)
    if out_file:
        click.echo(f"{n['rows']} {'pairs' if chosen else 'answers'} written to {out_file}")
    else:
        click.echo(target.read_text(encoding="utf-8"), nl=False)


@cli.command("pipeline")
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Folder of the stages' run directories (default: "
              "[pipeline] out, else runs/<file name>).")
@click.option("--from", "start", metavar="NAME", help="Run stage NAME again and every stage after it.")
@click.option("--only", metavar="NAME", help="Run stage NAME alone (again); the stages it uses must be finished.")
@click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE",
              help="Change every stage's config, e.g. --set train.seed=1 (a stage's own set wins). Repeatable.")
@click.option("--dry-run", is_flag=True, help="Print the resolved stages and what would run; run nothing.")
def pipeline_cmd(pipeline_file, out, start, only, overrides, dry_run):
    """Run the [[stage]] tables of PIPELINE_FILE in order: each a graft config that may use an earlier stage's run
    ("@NAME"). Finished stages with unchanged configs are skipped, an interrupted one resumes; then a report
    (pipeline.json, pipeline.png and a table) compares the stages."""
    from . import pipeline as pl

    if start and only:
        raise GraftError("--from and --only exclude each other: give one.")
    stages = pl.read_pipeline(pipeline_file, out, _registry(), list(overrides))
    if dry_run:
        for s in stages:
            uses = f" (uses {', '.join(s.uses)})" if s.uses else ""
            body = s.config.to_toml() if s.config is not None else json.dumps(s.compress)
            click.echo(f"# stage {s.name}: {s.status} -> {s.run_dir}{uses}\n{body}")
        return
    rep = pl.run_stages(stages, start, only, echo=click.echo)
    if rep is None:
        sys.exit(0)
    root = stages[0].run_dir.parent
    (root / "pipeline.json").write_text(json.dumps(rep, indent=2))
    pl.plot(rep, root / "pipeline.png")
    click.echo(_table(pl.table(rep), ["STAGE", "STRATEGY", "METRIC", "VAL", "TEST", "PARAMS", "SIZE", "SAMPLES/S"]))
    click.echo(f"Report: {root / 'pipeline.json'}")


@cli.command("sweep")
@click.argument("config_path", metavar="CONFIG")
@click.option("--space", "space_path", required=True, metavar="SPACE.toml", help="The searched keys and their "
              "distributions ([train.lr] distribution = \"log-uniform\", low = 1e-4, high = 1e-2), and [sweep].")
@click.option("--trials", type=click.IntRange(min=1), required=True, help="Finished trials to reach (a rerun "
              "continues the study).")
@click.option("--out", type=click.Path(file_okay=False), help="Folder of the study and its trials (default "
              "runs/sweep-<config>).")
@click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE", help="Change the config for every "
              "trial. Repeatable.")
def sweep_cmd(config_path, space_path, trials, out, overrides):
    """Search hyper-parameters of CONFIG with Optuna (TPE, median pruning on the validations): each trial a normal
    run directory, the study in OUT/study.db so that a rerun continues it; then a table, sweep.json (the best trial
    and its config) and Optuna's plots as PNG."""
    from . import sweep as sw

    result = sw.sweep(config_path, space_path, trials, out, list(overrides), echo=click.echo)
    click.echo(_table(sw.table(result), ["TRIAL", "STATE", result["metric"].upper(), "VALUES"]))
    best = result["best"]
    if best:
        click.echo(f"Best: trial {best['number']}, {result['metric']} {best['value']:.4g}; config {best['config']}")


@cli.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["native", "onnx", "torchscript"]), default="native",
              show_default=True, help="native: the family's own format; onnx / torchscript: the whole classifier, "
              "checked against PyTorch.")
@click.option("--merge", is_flag=True, help="native: merge the run's adapter into the backbone's weights (onnx and "
              "torchscript always merge).")
@click.option("--out", type=click.Path(file_okay=False), help="Folder to write (default RUN_DIR/merged for native, "
              "RUN_DIR/onnx or RUN_DIR/torchscript).")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code shipped with the run's model to run.")
def export_cmd(run_dir, fmt, merge, out, trust_remote_code):
    """Write a finished run's model for serving. native: backbone/ (HF save_pretrained folder or timm safetensors)
    and the strategy's head; an adapter run needs --merge, which folds the adapter's update into the weights so plain
    transformers / timm load the result (the adapter alone is in RUN_DIR/adapter). onnx / torchscript: the whole
    classifier (dynamic batch and sequence axes) with its preprocessing, config and labels beside it, checked
    against the PyTorch model on real examples (max abs difference printed and kept in export.json); graft eval and
    predict take an ONNX export like a run."""
    import contextlib

    from .export import load_run

    if fmt != "native":
        from .export import export_run

        run = load_run(run_dir, device="cpu", overrides=["train.precision=fp32"],
                       trust_remote_code=trust_remote_code)
        info = export_run(run, Path(run_dir), fmt, Path(out or Path(run_dir) / fmt))
        click.echo(f"Wrote {Path(out or Path(run_dir) / fmt) / info['file']} ({info['size_bytes'] / 2**20:.1f} MiB); "
                   f"max abs difference from PyTorch on {info['checked_examples']} examples: "
                   f"{info['max_abs_difference']:.2e}")
        return
    run = load_run(run_dir, for_prediction=True, trust_remote_code=trust_remote_code)
    if run.adapter is None and merge:
        raise GraftError(f"--merge: run {run_dir} has no [adapter]; its backbone/ export is already a plain model.")
    if run.adapter is not None and not merge:
        raise GraftError(f"Run {run_dir} trained an adapter ({run.adapter.name}); pass --merge to write merged "
                         f"weights (the adapter alone, in its library's format, is {Path(run_dir) / 'adapter'}).")
    target = Path(out or Path(run_dir) / "merged")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GraftError(f"Cannot write {target}: {e.strerror or e}. Choose another --out.") from None
    with run.adapter.merged(run.backbone) if run.adapter is not None else contextlib.nullcontext():
        run.strategy.export(run.model, str(target))
    click.echo(f"Wrote {target}")


@cli.command("compress")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--quantize", type=click.Choice(["dynamic-int8", "static-int8"]), help="int8 ONNX with onnxruntime: "
              "dynamic (linear layers, embeddings; text models) or static (calibrated on the training split; CNNs).")
@click.option("--prune", metavar="magnitude:FRACTION", help="Global magnitude pruning of linear and convolution "
              "weights, made permanent, e.g. magnitude:0.5.")
@click.option("--finetune-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Recovery fine-tune after pruning through the normal loop (pruned weights stay zero).")
@click.option("--finetune-lr", type=click.FloatRange(min=0.0, min_open=True), help="Its learning rate (default: "
              "the run's).")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="static-int8: training examples that calibrate the activation ranges.")
@click.option("--calibration-method", type=click.Choice(["percentile", "minmax", "entropy"]), default="percentile",
              show_default=True, help="static-int8: how the ranges are set from those examples.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Intra-op threads of the latency measurement (PyTorch and onnxruntime alike).")
@click.option("--out", type=click.Path(file_okay=False), help="Folder to write (default RUN_DIR/compressed-...).")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code shipped with the run's model to run.")
def compress_cmd(run_dir, quantize, prune, finetune_steps, finetune_lr, calibration_samples, calibration_method,
                 threads, out, trust_remote_code):
    """Prune and/or quantize a finished classifier run into a run-like folder that graft eval / predict take. Its
    summary.json holds test metrics, size on disk and warm CPU latency (batch 1, p50 / p95) beside the source run's,
    measured here with the same data and threads."""
    from .compress import compress_run, rows

    summary = compress_run(run_dir, out, quantize, prune, finetune_steps, finetune_lr, calibration_samples,
                           calibration_method, threads, trust_remote_code, echo=click.echo)
    metric = summary["metric"]
    click.echo(_table(rows(summary), ["MODEL", f"{metric.upper()} ({summary['compressed']['split']})", "SIZE",
                                      "LATENCY P50 / P95"]))
    c = summary["change"]
    click.echo(f"{metric} {c[metric]:+.4f}, size x{c['size_ratio']:.2f}, latency x{c['latency_p50_ratio']:.2f}. "
               f"Wrote {Path(summary['compressed_dir'])}")


@cli.command("compare")
@click.argument("run_dirs", nargs=-1, metavar="RUN...", type=click.Path(file_okay=False))
@click.option("--baseline", "baseline", multiple=True, type=click.Path(file_okay=False), metavar="RUN",
              help="The baseline row's run (repeat it for its seeds); default the first RUN's row.")
@click.option("--matrix", "matrix_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Run the methods x seeds of a matrix file through the pipeline machinery, then compare them.")
@click.option("--out", type=click.Path(file_okay=False), help="Folder of the report (default ./compare, or the "
              "matrix's out/report).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "val"]))
@click.option("--metric", help="The metric compared (default: the baseline run's metric for best weights).")
@click.option("--resamples", type=int, default=2000, show_default=True, help="Bootstrap resamples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the resampling.")
@click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE", help="--matrix: change every "
              "method's config. Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
def compare_cmd(run_dirs, baseline, matrix_file, out, split, metric, resamples, seed, overrides, as_json):
    """Compare finished runs on the same test examples: each row's metric with a 95% bootstrap interval, the paired
    difference to the baseline with its interval and p-value (McNemar's exact test for accuracy, else the paired
    bootstrap), runs differing only in seed pooled into one row, and costs (trainable parameters, training time,
    size, latency) with a Pareto plot. Writes OUT/compare.json, OUT/index.html (self-contained) and its PNGs."""
    from . import compare as cmp
    from .matrix import run_matrix

    echo = (lambda *_: None) if as_json else click.echo
    if matrix_file:
        if run_dirs or baseline:
            raise GraftError("--matrix runs and compares its own runs: give no RUN or --baseline with it.")
        run_dirs, baseline, root = run_matrix(matrix_file, _registry(), list(overrides), echo=echo)
        if run_dirs is None:
            sys.exit(0)
        out = out or root / "report"
    elif overrides:
        raise GraftError("--set changes a --matrix file's configs; finished runs are compared as they are.")
    report = cmp.compare(list(run_dirs), list(baseline), split, metric, resamples, seed, echo=echo)
    page = cmp.write_report(report, Path(out or "compare"))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(_table(cmp.table(report), cmp.HEADERS))
    click.echo(f"Test {report['metric']}; * p < {report['alpha']} against {report['baseline']} (paired). Report: "
               f"{page}")


def main():
    cli(prog_name="graft")


if __name__ == "__main__":
    main()
