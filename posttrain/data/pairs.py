"""Preference pairs for DPO: a prompt with a chosen and a rejected response, tokenized as
`posttrain sft` tokenizes a pair (prompt with special tokens, response without, EOS
appended), or two chats that share their first turns, rendered by the chat template as
`sft` renders chats.

Rows: {"prompt": str, "chosen": str, "rejected": str} (field names settable), or
{"chosen": [messages], "rejected": [messages]}, optionally with "prompt": [messages]
that both continue.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from posttrain.data.records import DataFormat, Record, check_messages, read_rows
from posttrain.data.tokenized import TokenizedExample, apply_max_seq_len, encode_records

logger = logging.getLogger("posttrain")


@dataclass(frozen=True)
class PairFormat:
    """How preference rows are read and tokenized (plain values from the run's config)."""

    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    max_seq_len: int = 2048
    truncation: str = "truncate"
    append_eos: bool = True


@dataclass
class PreferencePair:
    """A tokenized pair: the chosen and the rejected sequence and where the row is."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    source: str

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def _string(row: dict[str, Any], key: str, source: str) -> str:
    if key not in row:
        fields = ", ".join(map(repr, row)) or "none"
        raise ValueError(f"{source}: missing field {key!r}; fields present: {fields}")
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"{source}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _chat_records(row: dict[str, Any], fmt: PairFormat, source: str) -> tuple[Record, Record]:
    prefix = row.get(fmt.prompt_field) or []
    if not isinstance(prefix, list):
        raise ValueError(f"{source}: field {fmt.prompt_field!r} must be a list of messages here")
    chosen = check_messages(prefix + row[fmt.chosen_field], source, fmt.chosen_field)
    if fmt.rejected_field not in row:
        raise ValueError(f"{source}: missing field {fmt.rejected_field!r}")
    rejected = check_messages(prefix + row[fmt.rejected_field], source, fmt.rejected_field)
    if chosen[:-1] != rejected[:-1]:
        raise ValueError(
            f"{source}: the chosen and rejected chats have different prompts (every turn but "
            "the last must be the same): a preference compares two answers to one prompt"
        )
    return Record(None, None, chosen, source), Record(None, None, rejected, source)


def pair_records(row: Any, source: str, fmt: PairFormat) -> tuple[Record, Record]:
    """The chosen and rejected `Record` of one row; ValueError naming the row if bad."""
    if not isinstance(row, dict):
        raise ValueError(f"{source}: expected an object (one pair), got {type(row).__name__}")
    if fmt.chosen_field not in row:
        fields = ", ".join(map(repr, row)) or "none"
        raise ValueError(f"{source}: missing field {fmt.chosen_field!r}; fields present: {fields}")
    if isinstance(row[fmt.chosen_field], list):
        return _chat_records(row, fmt, source)
    prompt = _string(row, fmt.prompt_field, source)
    chosen = _string(row, fmt.chosen_field, source)
    rejected = _string(row, fmt.rejected_field, source)
    return Record(prompt, chosen, None, source), Record(prompt, rejected, None, source)


def _report(records: list[tuple[Record, Record]], path: str) -> None:
    """Warn, before training, about pairs that teach nothing or something odd."""
    empty = [a.source for a, b in records if a.messages is None and not (a.prompt or "").strip()]
    blank = [
        a.source
        for a, b in records
        if a.messages is None and not (a.response.strip() and (b.response or "").strip())
    ]
    same = [a.source for a, b in records if (a.response, a.messages) == (b.response, b.messages)]
    for what, sources in (
        ("an empty prompt", empty),
        ("an empty response", blank),
        ("identical chosen and rejected responses (nothing to prefer)", same),
    ):
        if sources:
            logger.warning("%s: %d pair(s) with %s, first %s", path, len(sources), what, sources[0])


def load_pairs(
    path: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase, fmt: PairFormat
) -> list[PreferencePair]:
    """Read, check and tokenize every pair of `path`; a pair is dropped when either side
    is (over `max_seq_len` with truncation "drop", or a prompt that fills it)."""
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"data set {path} is empty: it has no pairs")
    records = [pair_records(row, source, fmt) for row, source in rows]
    _report(records, str(path))
    data = DataFormat(
        max_seq_len=fmt.max_seq_len, truncation=fmt.truncation, append_eos=fmt.append_eos
    )
    flat = [r for pair in records for r in pair]
    encoded = encode_records(flat, tokenizer, data)
    pairs = []
    for i in range(0, len(encoded), 2):
        kept, _ = apply_max_seq_len(encoded[i : i + 2], fmt.max_seq_len, fmt.truncation)
        if len(kept) == 2:  # a pair is kept whole or not at all
            pairs.append(PreferencePair(kept[0], kept[1], flat[i].source))
    if not pairs:
        raise ValueError(f"{path}: every pair was dropped (longer than max_seq_len)")
    if len(pairs) < len(records):
        logger.warning(
            "%s: dropped %d pair(s) longer than max_seq_len=%d",
            path,
            len(records) - len(pairs),
            fmt.max_seq_len,
        )
    return pairs
