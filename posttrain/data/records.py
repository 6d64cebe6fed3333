"""Data files -> validated `Record`s: prompt/response pairs or chats.

Formats: JSON Lines, JSON, Parquet, or a directory written by `datasets.save_to_disk`.
`read_rows` reads any of them as plain rows (for callers that need other fields, such as
`posttrain eval`); `load_records` validates those rows as training examples. Every user
error is a `ValueError` naming the file and line (or row).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.common.jsonl import read_jsonl

# The response field recognised when the configured one is absent and left at default.
_DEFAULT_RESPONSE_FIELD = "response"
_ALT_RESPONSE_FIELD = "completion"

SUPPORTED_FORMATS = ".jsonl, .json, .parquet, or a directory written by datasets' save_to_disk"


@dataclass(frozen=True)
class DataFormat:
    """How records are read and tokenized: the data settings of a run, as plain values.

    prompt_field / response_field / messages_field: record fields; max_seq_len and
    truncation ("truncate" or "drop"): the length limit; append_eos: train an EOS after
    each response.
    """

    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    max_seq_len: int = 2048
    truncation: str = "truncate"
    append_eos: bool = True


@dataclass
class Record:
    """One example as read from the file: a prompt/response pair or a chat.

    Exactly one of (`prompt` and `response`) or `messages` is set. `source` is
    "file:line" for JSONL, "file:row N" (0-based) for JSON lists, Parquet and datasets.
    """

    prompt: str | None
    response: str | None
    messages: list[dict[str, str]] | None
    source: str


def _response_key(row: dict[str, Any], fmt: DataFormat) -> str:
    name = fmt.response_field
    if name not in row and name == _DEFAULT_RESPONSE_FIELD and _ALT_RESPONSE_FIELD in row:
        return _ALT_RESPONSE_FIELD
    return name


def check_messages(messages: Any, source: str, name: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"{source}: field {name!r} must be a non-empty list of messages, "
            f"got {type(messages).__name__}"
        )
    for j, message in enumerate(messages):
        ok = (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        )
        if not ok:
            raise ValueError(
                f"{source}: {name}[{j}] must be an object with string 'role' and 'content', "
                f"got {message!r:.200}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(
            f"{source}: {name} has no 'assistant' message, so nothing would be trained "
            f"(roles: {', '.join(m['role'] for m in messages)})"
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def record_from_row(row: Any, source: str, fmt: DataFormat) -> Record:
    """Validate one row (a mapping from field name to value) and make a `Record`."""
    if not isinstance(row, dict):
        raise ValueError(f"{source}: expected an object (one example), got {type(row).__name__}")
    messages = row.get(fmt.messages_field)
    if messages is not None:
        return Record(None, None, check_messages(messages, source, fmt.messages_field), source)
    response_key = _response_key(row, fmt)
    for key in (fmt.prompt_field, response_key):
        if key not in row:
            also = f" (nor {_ALT_RESPONSE_FIELD!r})" if key == _DEFAULT_RESPONSE_FIELD else ""
            fields = ", ".join(map(repr, row)) or "none"
            raise ValueError(
                f"{source}: missing field {key!r}{also}; fields present: {fields}. "
                "Set --prompt-field/--response-field to the right names, or give a "
                f"{fmt.messages_field!r} list of chat messages"
            )
    values = []
    for key in (fmt.prompt_field, response_key):
        value = row[key]
        if not isinstance(value, str):
            got = "null" if value is None else type(value).__name__
            raise ValueError(f"{source}: field {key!r} must be a string, got {got}")
        values.append(value)
    return Record(values[0], values[1], None, source)


Row = tuple[Any, str]  # (the row as read, its source: "file:line" or "file:row N")


def _read_jsonl(path: Path) -> list[Row]:
    return [(row, f"{path}:{lineno}") for lineno, row in read_jsonl(path)]


def _read_json(path: Path) -> list[Row]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            # Several JSON values, one per line: JSON Lines with a .json name.
            return _read_jsonl(path)
        line = text.count("\n", 0, exc.pos) + 1
        raise ValueError(f"{path}:{line}: malformed JSON: {exc.msg}") from None
    if isinstance(data, dict):
        return [(data, f"{path}:row 0")]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of objects, got {type(data).__name__}")
    return [(row, f"{path}:row {i}") for i, row in enumerate(data)]


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise ValueError(f"{path}: cannot read Parquet file: {exc}") from None
    return [(row, f"{path}:row {i}") for i, row in enumerate(rows)]


def _read_saved_dataset(path: Path) -> list[Row]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError and others
        raise ValueError(
            f"{path}: not a data set directory written by datasets' save_to_disk: {exc}"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        if len(data) != 1:
            splits = ", ".join(data)
            raise ValueError(
                f"{path} holds several splits ({splits}); point at one split's directory, "
                f"e.g. {path / next(iter(data))}"
            )
        data = next(iter(data.values()))
    return [(row, f"{path}:row {i}") for i, row in enumerate(data.to_list())]


def read_rows(path: str | os.PathLike[str]) -> list[Row]:
    """Every row of a data file as read, unvalidated, with its source, in file order.

    Formats as for `load_records`. A row is whatever the file holds (normally a dict of
    field -> value); the source is "file:line" for JSON Lines, "file:row N" (0-based)
    for JSON lists, Parquet and datasets. An empty file gives [].

    Raises:
        ValueError: a missing file, an unsupported format, malformed JSON (file and line).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_saved_dataset(path)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise ValueError(f"{path}: unsupported data format {suffix!r}; use {SUPPORTED_FORMATS}")


def load_records(path: str | os.PathLike[str], fmt: DataFormat) -> list[Record]:
    """Read every example of a data file, validated, as `Record`s.

    Formats: JSON Lines (`.jsonl`), JSON (`.json`: a list of objects, or JSON Lines),
    Parquet (`.parquet`), or a directory written by `datasets.save_to_disk`. A row with
    the config's `messages_field` is a chat; otherwise it needs `prompt_field` and
    `response_field` (`completion` is recognised when `response_field` is left at
    "response" and the row has no "response").

    Raises:
        ValueError: a missing file, an unsupported format, a malformed JSON line (file
            and line), a missing field (listing those present), a non-string prompt or
            response, a badly structured messages list, or no examples at all.
    """
    path = Path(path)
    records = [record_from_row(row, source, fmt) for row, source in read_rows(path)]
    if not records:
        raise ValueError(f"data set {path} is empty: it has no examples")
    return records
