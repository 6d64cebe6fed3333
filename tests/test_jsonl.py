"""JSON Lines reading: errors name the file and line, torn lines are skipped when asked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from posttrain.common.jsonl import read_jsonl, write_jsonl
from posttrain.data.records import DataFormat, load_records

# The start of a gzip file: what a compressed data set renamed to .jsonl looks like.
BINARY = b"\x1f\x8b\x08\x00\xd1\x9c\xffe\x02\xff\xd1\x00\x00"


def test_binary_file_named_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(BINARY)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:1: not UTF-8 text") as info:
        read_jsonl(path)
    assert "codec can't decode" not in str(info.value)
    # A good first line: the error points at the second.
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n' + BINARY)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: not UTF-8 text"):
        load_records(path, DataFormat())


def test_json_file_with_invalid_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_bytes(b'[{"prompt": "caf\xe9", "response": "b"}]')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not UTF-8 text"):
        load_records(path, DataFormat())


def test_malformed_lines_are_errors_unless_skipped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2, oops}\n{"step": 3}\n{"step": 4, "lo', "utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: malformed JSON line"):
        read_jsonl(path)
    # A log whose last line a kill tore: the complete lines, with their line numbers.
    assert read_jsonl(path, skip_malformed=True) == [(1, {"step": 1}), (4, {"step": 3})]


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    rows = [{"text": "naïve café 日本語 🤗"}, [1, 2.5, None], "plain"]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert "naïve" in path.read_text(encoding="utf-8")  # written as is, not \\u-escaped
    assert read_jsonl(path) == list(enumerate(rows, start=1))


def test_a_line_torn_inside_a_multibyte_character_is_skipped(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n' + '{"step": 2, "note": "caf\u00e9"}'.encode()[:-3] + b"\xc3")
    assert [row for _, row in read_jsonl(path, skip_malformed=True)] == [{"step": 1}]
