"""Reading users' text files: byte-order marks, a chosen encoding, and undecodable bytes reported as bad input;
and writing graft's own files atomically.

Every data source that reads text goes through ``read_text``, so a file saved by Excel ("CSV UTF-8" starts with a
byte-order mark), a Latin-1 export or a UTF-16 file behaves the same in all of them.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path

from .errors import GraftError

#: byte-order marks and the encodings they announce; a BOM outranks the configured encoding
BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
        (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))

ENCODING_HELP = ("Text encoding of the files (any Python codec name: utf-8, latin-1, cp1252, utf-16, ...). A "
                 "byte-order mark (UTF-8, UTF-16, UTF-32) is recognised and wins; undecodable bytes stop the run "
                 "with the file and line.")


def check_encoding(encoding: str) -> None:
    """Raise ValueError (a config error) when Python has no codec of that name."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"encoding = {encoding!r} is not an encoding Python knows; use e.g. \"utf-8\", "
                         f"\"latin-1\", \"cp1252\" or \"utf-16\".") from None


def text_lines(text: str) -> list[str]:
    """``text`` split into lines as ``wc -l`` counts them: at \\n only, a \\r before it dropped. ``str.splitlines``
    also splits at U+2028, \\x0b, \\x0c, \\x1c-\\x1e and \\x85, which a sentence or a JSON string may hold: line
    numbers in errors and the pairing of line-aligned files would drift."""
    out = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    return out[:-1] if out and out[-1] == "" else out


def read_text(path: str | Path, encoding: str = "utf-8", where: str = "", fix: str = "") -> str:
    """The whole text of ``path``, decoded with its byte-order mark's encoding if it has one, else ``encoding``.

    Newlines are returned as they are in the file (``\\r\\n`` stays), so a CSV reader sees quoted line breaks.
    Raises GraftError, naming ``where`` (e.g. ``[data] plugin = "text"``), the file, the line and the column, when
    the bytes do not decode (ending with ``fix``, by default: set the ``encoding`` option) or the file cannot be read.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GraftError(f"{where}: cannot read {path}: {e.strerror or e}.") from None
    offset = 0
    for bom, enc in BOMS:
        if data.startswith(bom):
            encoding, offset = enc, len(bom)
            break
    try:
        return data[offset:].decode(encoding)
    except UnicodeDecodeError as e:
        start = offset + e.start
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        fix = fix or ("The file is in another encoding: set encoding = \"latin-1\" (or \"cp1252\", \"utf-16\", ...) "
                      "in that table, or save the file as UTF-8.")
        raise GraftError(f"{where}: {path}, line {line}, column {column}: byte 0x{data[start]:02x} is not valid "
                         f"{encoding}. {fix}") from None


# -- atomic writes: a kill at any moment leaves the old file or the new one, never half of one ----------------
def fsync_file(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path):
    try:
        fsync_file(path)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass


def atomic_write_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
