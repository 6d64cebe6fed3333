"""Small data sets shared by the trainer tests (imported as `helpers`: tests/ is on sys.path
under pytest and when a test file runs as a torchrun worker script)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from posttrain.config import SFTConfig


def reverse_task(n: int, seed: int) -> list[dict[str, str]]:
    """`n` word-reversal prompt/response pairs, reproducible from `seed`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 7)))
        rows.append({"prompt": f"Reverse: {word} ->", "response": " " + word[::-1]})
    return rows


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg(**kw: object) -> SFTConfig:
    """A config for data-only tests: the model and train file are never opened."""
    return SFTConfig(model="unused", train_file="unused", **kw)  # type: ignore[arg-type]
