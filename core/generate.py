"""Answers to a file of prompts from a finished language-model run (``graft generate RUN --file F --out O`` and a
pipeline's generate stage), and self-play preference pairs made of them (SPIN: Chen et al., "Self-Play Fine-Tuning
Converts Weak Language Models to Strong Language Models", ICML 2024 -- the reference answer of the SFT data is the
chosen one, the SFT model's own answer the rejected one)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import GraftError
from .files import read_text, text_lines


def read_prompts(path: str | Path, field: str = "prompt") -> list[dict]:
    """The rows of ``path``: a JSONL file's objects (each with ``field``: text, or a list of {role, content}
    messages), or a text file's non-empty lines as {field: line}. GraftError naming the file and line of a bad row."""
    path = Path(path)
    if not path.is_file():
        raise GraftError(f"--file {path}: no such file.")
    lines = text_lines(read_text(path, "utf-8", "--file", fix="Save it as UTF-8."))
    if path.suffix != ".jsonl":
        return [{field: line} for line in lines if line.strip()]
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GraftError(f"{path}:{i}: not valid JSON ({e}).") from None
        prompt = row.get(field) if isinstance(row, dict) else None
        if not (isinstance(prompt, str) and prompt.strip() or isinstance(prompt, list) and prompt):
            raise GraftError(f"{path}:{i}: each line needs {field!r}: the prompt, as text or a list of {{role, "
                             f"content}} messages (--field names another field).")
        rows.append(row)
    if not rows:
        raise GraftError(f"{path} holds no prompts.")
    return rows


def answer_file(run, source: str | Path, out: str | Path, field: str = "prompt", chosen: str = "",
                batch_size: int = 8, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                seed: int = 0, raw: bool = False, echo=None) -> dict:
    """Answer every prompt of ``source`` with ``run`` (a ``BatchGeneration`` strategy's) in batches of ``batch_size``
    (batch k sampled from seed + k) and write ``out`` (JSONL, whole or not at all): each row with "answer" added, or
    with ``chosen`` (a field of the rows, e.g. "response") preference pairs {"prompt", "chosen": that field,
    "rejected": the answer} for the preferences source, leaving out a pair whose answer is empty or the chosen one
    itself. Returns {"rows": written, "left_out": pairs left out}."""
    from .capabilities import BatchGeneration, require
    from .files import atomic_write_text

    strategy = require(run.strategy, BatchGeneration, "graft generate --file",
                       "Answering a file of prompts needs a language model run (clm).")
    rows = read_prompts(source, field)
    if chosen and any(chosen not in r for r in rows):
        line = next(i for i, r in enumerate(rows, 1) if chosen not in r)
        raise GraftError(f"{source}: row {line} has no {chosen!r} field, the chosen answer of its pair.")
    answers: list[str] = []
    for k in range(0, len(rows), batch_size):
        batch = [r[field] for r in rows[k:k + batch_size]]
        answers += strategy.generate_batch(run.model, batch, max_new_tokens, temperature, top_p, seed + k // batch_size,
                                           raw)
        if echo is not None:
            echo(f"{len(answers)}/{len(rows)} answered")
    if chosen:  # an empty answer, or the reference itself, prefers nothing over anything: left out, counted
        lines = [{"prompt": r[field], "chosen": r[chosen], "rejected": a} for r, a in zip(rows, answers)
                 if a.strip() and a.strip() != str(r[chosen]).strip()]
    else:
        lines = [{**r, "answer": a} for r, a in zip(rows, answers)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return {"rows": len(lines), "left_out": len(rows) - len(lines)}
