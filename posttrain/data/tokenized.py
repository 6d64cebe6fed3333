"""Records -> `TokenizedExample`s: token ids and a loss mask, at most `max_seq_len` long.

Prompt/response pairs go through the primitives' `encode_prompts_and_outputs` (one
batched call), so the trainer trains on exactly what `tokenize_prompt_and_output`
produces, plus the EOS id. Chats are trained token for token as the tokenizer's chat
template renders them, the loss covering assistant turns only (content and the
template's end-of-turn token, the stop token); posttrain adds no token to a chat.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from posttrain.data.records import DataFormat, Record, load_records
from posttrain.primitives import encode_prompts_and_outputs

logger = logging.getLogger("posttrain")


@dataclass
class TokenizedExample:
    """One training sequence.

    `input_ids`: prompt tokens (with the tokenizer's special tokens, e.g. a BOS) followed
    by response tokens and, by default, the EOS id; for chats the template's rendering
    up to the last assistant turn's end-of-turn token. `loss_mask`: one 0/1 per token, 1
    on the trained targets (response tokens, EOS; for chats each assistant turn's content
    and end-of-turn token). `prompt_len`: tokens before the first trained token (for a
    multi-turn chat, later user turns are untrained too: the untrained count is
    `len(input_ids) - sum(loss_mask)`). `source`: "file:line".
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
            lines.append(
                f"  {self.num_without_eos} examples end without EOS "
                "(chats: without an end-of-turn token)"
            )
        return "\n".join(lines)


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


def end_of_turn_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids that end an assistant turn, for use as stop tokens: a list of ints.

    First the chat template's end-of-turn token, found by rendering [user "x", assistant
    "y"] and taking the first added (special) token after the content "y" (`<|im_end|>`
    for ChatML, `<|eot_id|>` for Llama 3), then the EOS id; no duplicates. Just [EOS]
    when the tokenizer has no chat template, or the template renders no special token
    after the content (or fails on this chat); [] when there is no EOS either.
    """
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if getattr(tokenizer, "chat_template", None) is None:
        return eos
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    try:
        before = _render(tokenizer, messages[:1], "end_of_turn_token_ids", True)
        through = _render(tokenizer, messages, "end_of_turn_token_ids", False)
    except ValueError:
        return eos
    # The content sits after the generation prompt; a template that does not render
    # prefix by prefix still ends with the last turn, so take the last "y" there.
    at = through.find("y", len(before)) if through.startswith(before) else through.rfind("y")
    if at < 0:
        return eos
    special = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    tail = tokenizer(through[at + 1 :], add_special_tokens=False)["input_ids"]
    end = next((int(t) for t in tail if t in special), None)
    return eos if end is None or end in eos else [end, *eos]


def chat_segments(record: Record, tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """Split a chat's rendered text into (text, trained) pieces, in order.

    The pieces join to exactly the template's rendering (`apply_chat_template(messages,
    tokenize=False)`). Each assistant turn is found by rendering prefixes: the turn's
    trained text starts after `messages[:i]` rendered with the generation prompt (so
    `<|im_start|>assistant\\n` is context, as it is at inference) and ends where
    `messages[:i+1]` ends, less trailing whitespace: it runs through the turn's
    end-of-turn token (`<|im_end|>`, `<|eot_id|>`), the stop token the model learns, but
    not the newline after it, which is never generated. Tokenizing the pieces separately
    makes the boundary the one seen at inference, when the prompt is tokenized on its
    own and the model generates from there.
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


def _encode_pairs(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, eos: int | None
) -> list[TokenizedExample]:
    prompt_ids, response_ids = encode_prompts_and_outputs(
        [r.prompt or "" for r in records], [r.response or "" for r in records], tokenizer
    )
    out = []
    for record, p, r in zip(records, prompt_ids, response_ids, strict=True):
        empty = len(r) == 0
        if eos is not None and (empty or r[-1] != eos):
            r = [*r, eos]
        out.append(
            TokenizedExample(
                input_ids=list(p) + list(r),
                loss_mask=[0] * len(p) + [1] * len(r),
                prompt_len=len(p),
                source=record.source,
                empty_response=empty,
            )
        )
    return out


def _encode_chats(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase
) -> list[TokenizedExample]:
    all_pieces = [chat_segments(r, tokenizer) for r in records]
    flat = [text for pieces in all_pieces for text, _ in pieces]
    flat_ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"])
    out = []
    for record, pieces in zip(records, all_pieces, strict=True):
        ids: list[int] = []
        mask: list[int] = []
        for _, trained in pieces:
            piece = list(next(flat_ids))
            ids += piece
            mask += [int(trained)] * len(piece)
        # Tokens after the last trained one (the template's closing newline, a final
        # user turn) cannot change any trained prediction: cut them, so the sequence
        # ends at the last assistant turn's end-of-turn token.
        while mask and not mask[-1] and 1 in mask:
            ids.pop()
            mask.pop()
        assistant = [m for m in record.messages or () if m["role"] == "assistant"]
        out.append(
            TokenizedExample(
                input_ids=ids,
                loss_mask=mask,
                prompt_len=mask.index(1) if 1 in mask else len(mask),
                source=record.source,
                empty_response=all(m["content"] == "" for m in assistant),
                is_chat=True,
            )
        )
    return out


def encode_records(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, fmt: DataFormat
) -> list[TokenizedExample]:
    """Tokenize every record at full length (no max_seq_len applied), in order.

    Pairs: `encode_prompts_and_outputs` on all pairs at once (prompt with special tokens,
    response without), then the EOS id when `fmt.append_eos` (not when the response
    already ends with it). Chats: `chat_segments`, all pieces tokenized in one batched call
    without special tokens (templates write their own, as `apply_chat_template` does),
    and tokens after the last trained one left out. No token is added to a chat, whatever
    `fmt.append_eos`: a template that ends a turn with `<|im_end|>` and a base tokenizer
    whose EOS is `<|endoftext|>` would otherwise train `<|im_end|><|endoftext|>`, which
    the template never renders.
    """
    pair_idx = [i for i, r in enumerate(records) if r.messages is None]
    chat_idx = [i for i, r in enumerate(records) if r.messages is not None]
    out: list[TokenizedExample | None] = [None] * len(records)
    if pair_idx:
        eos = _eos_id(tokenizer) if fmt.append_eos else None
        pairs = _encode_pairs([records[i] for i in pair_idx], tokenizer, eos)
        for i, example in zip(pair_idx, pairs, strict=True):
            out[i] = example
    if chat_idx:
        chats = _encode_chats([records[i] for i in chat_idx], tokenizer)
        for i, example in zip(chat_idx, chats, strict=True):
            out[i] = example
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


def stop_token_ids(
    example: TokenizedExample, eos_token_id: int | None, end_of_turn_ids: Collection[int] = ()
) -> set[int]:
    """The ids that end `example` properly: {EOS} for a pair; for a chat the template's
    end-of-turn ids (`end_of_turn_token_ids`, EOS included) and EOS."""
    stops = set(end_of_turn_ids) if example.is_chat else set()
    if eos_token_id is not None:
        stops.add(int(eos_token_id))
    return stops


def ends_with_eos(
    example: TokenizedExample, eos_token_id: int | None, end_of_turn_ids: Collection[int] = ()
) -> bool:
    """Whether the last trained token is a stop token (what teaches the model to stop).

    A pair: the trained EOS id. A chat: an id in `end_of_turn_ids` (pass
    `end_of_turn_token_ids(tokenizer)`: `<|im_end|>` ends a ChatML chat properly) or EOS.
    """
    last = max((j for j, m in enumerate(example.loss_mask) if m), default=None)
    if last is None:
        return False
    return example.input_ids[last] in stop_token_ids(example, eos_token_id, end_of_turn_ids)


def build_data_report(
    encoded: Sequence[TokenizedExample],
    kept: Sequence[TokenizedExample],
    dropped: Sequence[TokenizedExample],
    tokenizer: PreTrainedTokenizerBase,
    fmt: DataFormat,
    path: str | os.PathLike[str] = "",
) -> DataReport:
    """Count what `apply_max_seq_len` did to `encoded` (full length) -> (`kept`, `dropped`)."""
    eos = tokenizer.eos_token_id
    end_of_turn = end_of_turn_token_ids(tokenizer) if any(e.is_chat for e in kept) else []
    return DataReport(
        path=str(path),
        num_records=len(encoded),
        num_examples=len(kept),
        num_chat=sum(e.is_chat for e in encoded),
        num_over_max_len=sum(len(e) > fmt.max_seq_len for e in encoded),
        num_truncated=sum(e.truncated for e in kept),
        num_dropped=len(dropped),
        num_empty_responses=sum(e.empty_response for e in encoded),
        num_without_eos=sum(not ends_with_eos(e, eos, end_of_turn) for e in kept),
        num_tokens=sum(len(e) for e in kept),
        num_trained_tokens=sum(sum(e.loss_mask) for e in kept),
        max_seq_len=fmt.max_seq_len,
        truncation=fmt.truncation,
        dropped_sources=[e.source for e in dropped[:5]],
    )


def tokenize_records(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    fmt: DataFormat,
    path: str | os.PathLike[str] = "",
) -> tuple[list[TokenizedExample], DataReport]:
    """`encode_records` then `apply_max_seq_len`, with a `DataReport` of the counts."""
    encoded = encode_records(records, tokenizer, fmt)
    kept, dropped = apply_max_seq_len(encoded, fmt.max_seq_len, fmt.truncation)
    return kept, build_data_report(encoded, kept, dropped, tokenizer, fmt, path)


def tokenize_for_training(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    fmt: DataFormat,
    path: str | os.PathLike[str],
) -> tuple[list[TokenizedExample], DataReport]:
    """`tokenize_records`, less the examples that train nothing, refusing a data set left
    empty.

    An example trains nothing when its only trained tokens stand at position 0, where no
    token precedes them to predict them from: an empty prompt and response without a BOS
    is just [EOS]. Such examples are dropped with a warning naming the first one (a
    micro-batch of them alone would be zero tokens wide).

    Raises:
        ValueError: no example left (naming `path` and why).
    """
    examples, report = tokenize_records(records, tokenizer, fmt, path)
    if not examples:
        raise ValueError(
            f"{path}: all {report.num_records} examples were dropped: longer than "
            f"max_seq_len={fmt.max_seq_len} (truncation={fmt.truncation!r})"
        )
    trainable = [e for e in examples if any(e.loss_mask[1:])]
    if len(trainable) < len(examples):
        first = next(e for e in examples if not any(e.loss_mask[1:]))
        message = (
            f"{len(examples) - len(trainable)} example(s) have no token to train (nothing "
            f"before their only trained token; e.g. an empty prompt and response), first "
            f"{first.source}"
        )
        if not trainable:
            raise ValueError(f"{path}: no example left to train: {message}")
        logger.warning("%s: dropped %s", path, message)
    return trainable, report


def load_dataset_for_training(
    path: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase, fmt: DataFormat
) -> tuple[list[TokenizedExample], DataReport]:
    """Load, validate and tokenize a data file for training or evaluation.

    Raises:
        ValueError: any error of `load_records`, or no example left after max_seq_len.
    """
    return tokenize_for_training(load_records(path, fmt), tokenizer, fmt, path)
