"""Reading and writing JSON Lines files: data sets, metrics logs, generations."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_jsonl(
    path: str | os.PathLike[str], *, skip_malformed: bool = False
) -> list[tuple[int, Any]]:
    """(line number, value) for every non-empty line of a JSON Lines file, 1-based.

    A malformed line is a ValueError naming the file and line, unless `skip_malformed`
    (a metrics log whose last line was torn by a kill). A line that is not UTF-8 text (a
    binary file with a .jsonl name) is a ValueError naming the file and line, or is skipped
    with `skip_malformed` (a line torn inside a multi-byte character).
    """
    path = Path(path)
    rows: list[tuple[int, Any]] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if skip_malformed:
                    continue  # a line torn inside a multi-byte character
                raise ValueError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                    f"{exc.start + 1}); is this a JSON Lines file?"
                ) from None
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                if skip_malformed:
                    continue
                raise ValueError(f"{path}:{lineno}: malformed JSON line: {exc.msg}") from None
    return rows


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Any]) -> Path:
    """Write one JSON value per line (UTF-8, non-ASCII kept as is); returns the path."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
