"""The trainer's data path: load records, tokenize them, plan batches, collate.

Stages, each a plain function so that `posttrain sft` and `posttrain inspect` run the
very same code:

1. `load_records(path, config)`: JSONL, JSON, Parquet or a `datasets.save_to_disk`
   directory -> `Record`s (a prompt/response pair or a chat), every user error a
   `ValueError` naming the file and line (or row), raised before any training.
2. `encode_records(records, tokenizer, config)`: token ids and a loss mask per record,
   at full length. Prompt/response pairs go through the primitives'
   `encode_prompts_and_outputs` (one batched call), so the trainer trains on exactly
   what `tokenize_prompt_and_output` produces, plus the EOS id. Chats are rendered with
   the tokenizer's chat template, the loss covering assistant turns only.
3. `apply_max_seq_len(...)`: truncate (response tail) or drop over-long examples.
   `tokenize_records` = 2 + 3 with a `DataReport` of what happened.
4. `plan_batches(...)`: which examples form each optimizer step (length-grouped and
   shuffled), then `rank_micro_batches(...)`: one rank's micro-batches of a step.
5. `collate(examples, pad_token_id)`: padded, shifted tensors via `pad_and_shift`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from posttrain.config import SFTConfig
from posttrain.primitives import encode_prompts_and_outputs, pad_and_shift

# Length grouping sorts windows of this many global batches by length: large enough
# that batches hold examples of similar length, small enough that a step's examples
# still come from a random part of the data set (so steps are not ordered by length).
GROUPING_WINDOW_BATCHES = 50

# The response field recognised when the configured one is absent and left at default.
_DEFAULT_RESPONSE_FIELD = "response"
_ALT_RESPONSE_FIELD = "completion"

SUPPORTED_FORMATS = ".jsonl, .json, .parquet, or a directory written by datasets' save_to_disk"


# --------------------------------------------------------------------------- records


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


@dataclass
class TokenizedExample:
    """One training sequence.

    `input_ids`: prompt tokens (with the tokenizer's special tokens, e.g. a BOS) followed
    by response tokens and, by default, the EOS id. `loss_mask`: one 0/1 per token, 1 on
    the trained targets (response tokens, EOS; for chats the assistant turns).
    `prompt_len`: tokens before the first trained token. `source`: "file:line".
    """

    input_ids: list[int]
    loss_mask: list[int]
    prompt_len: int
    source: str
    truncated: bool = False
    empty_response: bool = False
    is_chat: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataReport:
    """What loading and tokenizing a data set did; `summary()` is logged at start."""

    path: str
    num_records: int
    num_examples: int
    num_chat: int
    num_over_max_len: int
    num_truncated: int
    num_dropped: int
    num_empty_responses: int
    num_without_eos: int
    num_tokens: int
    num_trained_tokens: int
    max_seq_len: int
    truncation: str
    dropped_sources: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the log: counts, and what max_seq_len did."""
        lines = [
            f"{self.path}: {self.num_examples} examples kept of {self.num_records} records "
            f"({self.num_chat} chats), {self.num_tokens} tokens, "
            f"{self.num_trained_tokens} trained"
        ]
        if self.num_over_max_len:
            action = (
                f"{self.num_truncated} truncated (response tail), {self.num_dropped} dropped"
                if self.truncation == "truncate"
                else f"{self.num_dropped} dropped"
            )
            lines.append(
                f"  {self.num_over_max_len} longer than max_seq_len={self.max_seq_len}: {action}"
            )
            if self.truncation == "truncate" and self.num_dropped:
                lines.append("  (dropped: the prompt alone fills max_seq_len)")
        if self.num_empty_responses:
            lines.append(f"  {self.num_empty_responses} empty responses")
        if self.num_without_eos:
            lines.append(f"  {self.num_without_eos} examples end without EOS")
        return "\n".join(lines)


def _response_key(row: dict[str, Any], config: SFTConfig) -> str:
    name = config.response_field
    if name not in row and name == _DEFAULT_RESPONSE_FIELD and _ALT_RESPONSE_FIELD in row:
        return _ALT_RESPONSE_FIELD
    return name


def _check_messages(messages: Any, source: str, name: str) -> list[dict[str, str]]:
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


def record_from_row(row: Any, source: str, config: SFTConfig) -> Record:
    """Validate one row (a mapping from field name to value) and make a `Record`."""
    if not isinstance(row, dict):
        raise ValueError(f"{source}: expected an object (one example), got {type(row).__name__}")
    messages = row.get(config.messages_field)
    if messages is not None:
        return Record(None, None, _check_messages(messages, source, config.messages_field), source)
    response_key = _response_key(row, config)
    for key in (config.prompt_field, response_key):
        if key not in row:
            also = f" (nor {_ALT_RESPONSE_FIELD!r})" if key == _DEFAULT_RESPONSE_FIELD else ""
            fields = ", ".join(map(repr, row)) or "none"
            raise ValueError(
                f"{source}: missing field {key!r}{also}; fields present: {fields}. "
                "Set --prompt-field/--response-field to the right names, or give a "
                f"{config.messages_field!r} list of chat messages"
            )
    values = []
    for key in (config.prompt_field, response_key):
        value = row[key]
        if not isinstance(value, str):
            got = "null" if value is None else type(value).__name__
            raise ValueError(f"{source}: field {key!r} must be a string, got {got}")
        values.append(value)
    return Record(values[0], values[1], None, source)


def _read_jsonl(path: Path, config: SFTConfig) -> list[Record]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            source = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}: malformed JSON line: {exc.msg}") from None
            records.append(record_from_row(row, source, config))
    return records


def _read_json(path: Path, config: SFTConfig) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            # Several JSON values, one per line: JSON Lines with a .json name.
            return _read_jsonl(path, config)
        line = text.count("\n", 0, exc.pos) + 1
        raise ValueError(f"{path}:{line}: malformed JSON: {exc.msg}") from None
    if isinstance(data, dict):
        return [record_from_row(data, f"{path}:row 0", config)]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of objects, got {type(data).__name__}")
    return [record_from_row(row, f"{path}:row {i}", config) for i, row in enumerate(data)]


def _read_parquet(path: Path, config: SFTConfig) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise ValueError(f"{path}: cannot read Parquet file: {exc}") from None
    return [record_from_row(row, f"{path}:row {i}", config) for i, row in enumerate(rows)]


def _read_saved_dataset(path: Path, config: SFTConfig) -> list[Record]:
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
    return [record_from_row(row, f"{path}:row {i}", config) for i, row in enumerate(data.to_list())]


def load_records(path: str | os.PathLike[str], config: SFTConfig) -> list[Record]:
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
    if not path.exists():
        raise ValueError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if path.is_dir():
        records = _read_saved_dataset(path, config)
    elif suffix == ".jsonl":
        records = _read_jsonl(path, config)
    elif suffix == ".json":
        records = _read_json(path, config)
    elif suffix == ".parquet":
        records = _read_parquet(path, config)
    else:
        raise ValueError(f"{path}: unsupported data format {suffix!r}; use {SUPPORTED_FORMATS}")
    if not records:
        raise ValueError(f"data set {path} is empty: it has no examples")
    return records


# --------------------------------------------------------------------------- tokenization


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"append_eos is on but tokenizer {type(tokenizer).__name__} has no EOS token; "
            "set one on the tokenizer or pass --no-append-eos"
        )
    return int(tokenizer.eos_token_id)


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    source: str,
    add_generation_prompt: bool,
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja errors (raise_exception in templates) and others
        raise ValueError(f"{source}: the chat template failed on this row: {exc}") from None
    return text


def chat_segments(record: Record, tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """Split a chat's rendered text into (text, trained) pieces, in order.

    Each assistant turn is found by rendering prefixes: the turn's trained text starts
    after `messages[:i]` rendered with the generation prompt (so `<|im_start|>assistant\\n`
    is context, as it is at inference) and ends where `messages[:i+1]` ends, less trailing
    whitespace (the newline after ChatML's `<|im_end|>` is never generated). Tokenizing the
    pieces separately makes the boundary the one seen at inference, when the prompt is
    tokenized on its own and the model generates from there.
    """
    if record.messages is None:
        raise ValueError(f"{record.source}: not a chat record")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{record.source}: chat rows need a chat template, but the tokenizer has none"
        )
    messages = record.messages
    full = _render(tokenizer, messages, record.source, add_generation_prompt=False)
    bounds: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], record.source, add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], record.source, add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(
                f"{record.source}: the tokenizer's chat template does not render this chat "
                "prefix by prefix (a later turn changes earlier text), so the assistant turns "
                "cannot be located for the loss mask"
            )
        end = max(len(through.rstrip()), len(before))
        bounds.append((len(before), end))
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for start, end in bounds:
        pieces.append((full[pos:start], False))
        pieces.append((full[start:end], True))
        pos = end
    pieces.append((full[pos:], False))
    return pieces


def encode_records(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, config: SFTConfig
) -> list[TokenizedExample]:
    """Tokenize every record at full length (no max_seq_len applied), in order.

    Pairs: `encode_prompts_and_outputs` on all pairs at once (prompt with special tokens,
    response without), then the EOS id when `config.append_eos` (not when the response
    already ends with it). Chats: `chat_segments`, all pieces tokenized in one batched call
    without special tokens (templates write their own, as `apply_chat_template` does);
    the EOS id follows an assistant turn that does not already end with it, and tokens
    after the last trained one are left out.
    """
    eos = _eos_id(tokenizer) if config.append_eos else None
    out: list[TokenizedExample | None] = [None] * len(records)

    pair_idx = [i for i, r in enumerate(records) if r.messages is None]
    if pair_idx:
        prompt_ids, response_ids = encode_prompts_and_outputs(
            [records[i].prompt for i in pair_idx],  # type: ignore[misc]
            [records[i].response for i in pair_idx],  # type: ignore[misc]
            tokenizer,
        )
        for i, p, r in zip(pair_idx, prompt_ids, response_ids, strict=True):
            empty = len(r) == 0
            if eos is not None and (empty or r[-1] != eos):
                r = [*r, eos]
            out[i] = TokenizedExample(
                input_ids=list(p) + list(r),
                loss_mask=[0] * len(p) + [1] * len(r),
                prompt_len=len(p),
                source=records[i].source,
                empty_response=empty,
            )

    chat_idx = [i for i, r in enumerate(records) if r.messages is not None]
    if chat_idx:
        all_pieces = [chat_segments(records[i], tokenizer) for i in chat_idx]
        flat = [text for pieces in all_pieces for text, _ in pieces]
        flat_ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"])
        for i, pieces in zip(chat_idx, all_pieces, strict=True):
            ids: list[int] = []
            mask: list[int] = []
            for _, trained in pieces:
                piece = list(next(flat_ids))
                if trained and eos is not None and (not piece or piece[-1] != eos):
                    piece.append(eos)
                ids += piece
                mask += [int(trained)] * len(piece)
            # Tokens after the last trained one (the template's closing newline, a final
            # user turn) cannot change any trained prediction: cut them, so the
            # sequence ends at the last turn's end token (and EOS).
            while mask and not mask[-1] and 1 in mask:
                ids.pop()
                mask.pop()
            assistant = [m for m in records[i].messages or () if m["role"] == "assistant"]
            out[i] = TokenizedExample(
                input_ids=ids,
                loss_mask=mask,
                prompt_len=mask.index(1) if 1 in mask else len(mask),
                source=records[i].source,
                empty_response=all(m["content"] == "" for m in assistant),
                is_chat=True,
            )
    return [e for e in out if e is not None]


def apply_max_seq_len(
    examples: Sequence[TokenizedExample], max_seq_len: int, truncation: str
) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """Apply the length limit: returns (kept, dropped).

    "truncate" cuts the sequence to its first `max_seq_len` tokens (so the response loses
    its tail, and its EOS: the model is not taught to stop mid-answer); an example whose
    prompt alone fills `max_seq_len` would keep no trained token and is dropped. "drop"
    drops every example longer than `max_seq_len`. Kept truncated examples have
    `truncated=True`.
    """
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    kept: list[TokenizedExample] = []
    dropped: list[TokenizedExample] = []
    for ex in examples:
        if len(ex.input_ids) <= max_seq_len:
            kept.append(ex)
        elif truncation == "drop" or ex.prompt_len >= max_seq_len:
            dropped.append(ex)
        else:
            kept.append(
                TokenizedExample(
                    input_ids=ex.input_ids[:max_seq_len],
                    loss_mask=ex.loss_mask[:max_seq_len],
                    prompt_len=ex.prompt_len,
                    source=ex.source,
                    truncated=True,
                    empty_response=ex.empty_response,
                    is_chat=ex.is_chat,
                )
            )
    return kept, dropped


def ends_with_eos(example: TokenizedExample, eos_token_id: int | None) -> bool:
    """Whether the last token is a trained EOS (what teaches the model to stop)."""
    return (
        eos_token_id is not None
        and bool(example.input_ids)
        and example.input_ids[-1] == eos_token_id
        and example.loss_mask[-1] == 1
    )


def build_data_report(
    encoded: Sequence[TokenizedExample],
    kept: Sequence[TokenizedExample],
    dropped: Sequence[TokenizedExample],
    tokenizer: PreTrainedTokenizerBase,
    config: SFTConfig,
    path: str | os.PathLike[str] = "",
) -> DataReport:
    """Count what `apply_max_seq_len` did to `encoded` (full length) -> (`kept`, `dropped`)."""
    eos = tokenizer.eos_token_id
    return DataReport(
        path=str(path),
        num_records=len(encoded),
        num_examples=len(kept),
        num_chat=sum(e.is_chat for e in encoded),
        num_over_max_len=sum(len(e) > config.max_seq_len for e in encoded),
        num_truncated=sum(e.truncated for e in kept),
        num_dropped=len(dropped),
        num_empty_responses=sum(e.empty_response for e in encoded),
        num_without_eos=sum(not ends_with_eos(e, eos) for e in kept),
        num_tokens=sum(len(e) for e in kept),
        num_trained_tokens=sum(sum(e.loss_mask) for e in kept),
        max_seq_len=config.max_seq_len,
        truncation=config.truncation,
        dropped_sources=[e.source for e in dropped[:5]],
    )


def tokenize_records(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    config: SFTConfig,
    path: str | os.PathLike[str] = "",
) -> tuple[list[TokenizedExample], DataReport]:
    """`encode_records` then `apply_max_seq_len`, with a `DataReport` of the counts."""
    encoded = encode_records(records, tokenizer, config)
    kept, dropped = apply_max_seq_len(encoded, config.max_seq_len, config.truncation)
    return kept, build_data_report(encoded, kept, dropped, tokenizer, config, path)


def load_dataset_for_training(
    path: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase, config: SFTConfig
) -> tuple[list[TokenizedExample], DataReport]:
    """Load, validate and tokenize a data file for training or evaluation.

    Raises:
        ValueError: any error of `load_records`, or no example left after max_seq_len.
    """
    records = load_records(path, config)
    examples, report = tokenize_records(records, tokenizer, config, path)
    if not examples:
        raise ValueError(
            f"{path}: all {report.num_records} examples were dropped: longer than "
            f"max_seq_len={config.max_seq_len} (truncation={config.truncation!r})"
        )
    return examples, report


# --------------------------------------------------------------------------- batching


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _split_step(step: np.ndarray, lengths: np.ndarray, per_round: int) -> list[list[int]]:
    """Sort a step's examples by length (longest first, ties by index) and cut them into
    global micro-batches of `per_round` (micro x ranks); a smaller final step is cut into
    as few rounds as needed, of sizes that differ by at most one."""
    order = np.lexsort((step, -lengths[step]))
    ordered = step[order].tolist()
    n = len(ordered)
    rounds = math.ceil(n / per_round)
    return [ordered[r * n // rounds : (r + 1) * n // rounds] for r in range(rounds)]


def plan_batches(
    lengths: Sequence[int],
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    group_by_length: bool = True,
) -> list[list[list[int]]]:
    """The optimizer steps of one epoch: per step, its global micro-batches of indices.

    A global micro-batch holds `micro_batch_size * world_size` example indices (one
    accumulation round over all ranks, sorted longest first); a step holds
    `grad_accum_steps` of them. `rank_micro_batches` deals them to ranks.

    Which examples form each step depends only on (seed, epoch, lengths, group_by_length)
    and the global batch size G = micro x accum x world, never on how G is split:
    the indices are shuffled with the seed; with `group_by_length`, each window of
    `GROUPING_WINDOW_BATCHES` x G shuffled examples is sorted by length and cut into
    batches of G (so each batch holds examples of similar length), the batches are
    shuffled, and the one holding the longest example goes first (an out-of-memory error
    shows at step 1, not hours later). Within a step, examples are sorted by length before
    being cut into micro-batches, so each micro-batch pads little.

    The tail (fewer than G examples) is kept as a smaller last step, less the remainder
    modulo `world_size` (so every rank gets at least one example per micro-batch); its
    micro-batches may be smaller than `micro_batch_size`.

    Returns:
        steps[step][round] = list of example indices (len <= micro x world).
    """
    _check_positive(
        micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps, world_size=world_size
    )
    if epoch < 0 or seed < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    lens = np.asarray(lengths, dtype=np.int64)
    n = len(lens)
    global_batch = micro_batch_size * grad_accum_steps * world_size
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if group_by_length:
        window = global_batch * GROUPING_WINDOW_BATCHES
        order = np.concatenate(
            [
                chunk[np.argsort(-lens[chunk], kind="stable")]
                for chunk in (order[s : s + window] for s in range(0, n, window))
            ]
            or [order]
        )
    n_full = n // global_batch * global_batch
    batches = [order[s : s + global_batch] for s in range(0, n_full, global_batch)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if group_by_length and batches:
        longest = max(range(len(batches)), key=lambda i: int(lens[batches[i]].max()))
        batches[0], batches[longest] = batches[longest], batches[0]
    tail = order[n_full:]
    tail = tail[: len(tail) // world_size * world_size]
    if len(tail):
        batches.append(tail)
    per_round = micro_batch_size * world_size
    return [_split_step(b, lens, per_round) for b in batches]


def rank_micro_batches(
    step_examples: Sequence[Sequence[int]],
    micro_batch_size: int,
    world_size: int = 1,
    rank: int = 0,
) -> list[list[int]]:
    """One rank's micro-batches of a step from `plan_batches`: one per global micro-batch.

    Each global micro-batch (sorted longest first) is cut into `world_size` contiguous
    slices of equal size (differing by at most one in a smaller last step), so every rank
    runs the same number of forward/backward passes on examples of similar length.
    """
    _check_positive(micro_batch_size=micro_batch_size, world_size=world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    out = []
    for batch in step_examples:
        n = len(batch)
        if not world_size <= n <= micro_batch_size * world_size:
            raise ValueError(
                f"a global micro-batch of {n} examples cannot be split into {world_size} "
                f"micro-batches of at most {micro_batch_size}"
            )
        out.append(list(batch[rank * n // world_size : (rank + 1) * n // world_size]))
    return out


def padding_fraction(batches_of_lengths: Sequence[Sequence[int]]) -> float:
    """Fraction of the padded token slots that are padding, over all batches.

    Each batch is padded to its longest sequence: 1 - sum(lengths) / sum(len * max).
    """
    slots = sum(len(b) * max(b) for b in batches_of_lengths if len(b))
    if slots == 0:
        return 0.0
    real = sum(sum(b) for b in batches_of_lengths)
    return 1.0 - real / slots


def epoch_padding_fractions(
    lengths: Sequence[int],
    micro_batch_size: int,
    grad_accum_steps: int = 1,
    world_size: int = 1,
    seed: int = 0,
) -> tuple[float, float]:
    """(in order, length-grouped) padding fractions of one epoch's micro-batches.

    In order: consecutive examples in file order, `micro_batch_size` at a time.
    Grouped: every rank's micro-batches under `plan_batches(..., group_by_length=True)`.
    """
    in_order = [
        list(lengths[s : s + micro_batch_size]) for s in range(0, len(lengths), micro_batch_size)
    ]
    grouped = []
    for step in plan_batches(
        lengths, micro_batch_size, grad_accum_steps, world_size, seed, 0, group_by_length=True
    ):
        for rank in range(world_size):
            for mb in rank_micro_batches(step, micro_batch_size, world_size, rank):
                grouped.append([lengths[i] for i in mb])
    return padding_fraction(in_order), padding_fraction(grouped)


# --------------------------------------------------------------------------- collation


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, Tensor]:
    """Pad and shift a micro-batch with the primitives' `pad_and_shift`.

    Returns:
        `input_ids` (batch, max_len - 1) int64, `labels` (batch, max_len - 1) int64,
        `response_mask` (batch, max_len - 1) float32 (1 where `labels` is a trained target)
        and `attention_mask` (batch, max_len - 1) int64 (1 on real input tokens), where
        `max_len` is the longest example in tokens.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    batch = pad_and_shift(
        [e.input_ids for e in examples], [e.loss_mask for e in examples], pad_token_id
    )
    lengths = torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int64)
    positions = torch.arange(batch["input_ids"].shape[1], dtype=torch.int64)
    batch["attention_mask"] = (positions[None, :] < lengths[:, None]).to(torch.int64)
    return batch
