"""What `posttrain inspect` shows: data set statistics and a token-level view of examples.

Everything here runs the trainer's own data path (`posttrain.data`): the same loading,
the same tokenization, the same max_seq_len policy, the same batch planner and the same
`collate`, so what is shown is what `posttrain sft` would train on. The silent data bugs
this is meant to catch: a loss mask that covers the prompt, an EOS (or a chat's
end-of-turn token) that is never a label, examples truncated away, a chat template that
renders something unexpected, and prompt/response pairs whose separate tokenization
differs from that of their concatenated text (`boundary_warning` says so at the start of
`posttrain sft`).
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from posttrain.common.plotting import quiet_font_cache
from posttrain.data.batching import collate, epoch_padding_fractions
from posttrain.data.records import DataFormat, Record
from posttrain.data.tokenized import (
    DataReport,
    TokenizedExample,
    apply_max_seq_len,
    build_data_report,
    encode_records,
    end_of_turn_token_ids,
    stop_token_ids,
)
from posttrain.primitives import encode_prompts_and_outputs

PERCENTILES = (50, 90, 95, 99)
MAX_BOUNDARY_EXAMPLES = 5

# Token roles in the view, in the order of the legend.
ROLES = ("prompt", "response", "eos", "pad")
# Two shades per role, alternating token by token, so that token boundaries show.
RICH_STYLES = {
    "prompt": ("grey70 on grey19", "grey82 on grey27"),
    "response": ("black on green3", "black on dark_sea_green2"),
    "eos": ("bold white on magenta", "bold white on dark_magenta"),
    "pad": ("grey42", "grey42"),
}
HTML_COLOURS = {
    "prompt": ("#e4e4e4", "#d0d0d0"),
    "response": ("#a6e3a1", "#c8f0c4"),
    "eos": ("#d670d6", "#e7a0e7"),
    "pad": ("#f6f6f6", "#f6f6f6"),
}


# --------------------------------------------------------------------------- statistics


def length_percentiles(lengths: Sequence[int]) -> dict[str, int]:
    """min, p50, p90, p95, p99 and max of `lengths`; pN is the "lower" percentile, i.e.
    sorted(lengths)[floor(N / 100 * (n - 1))], an actual length. All 0 when empty."""
    keys = ["min", *(f"p{p}" for p in PERCENTILES), "max"]
    if not lengths:
        return dict.fromkeys(keys, 0)
    values = np.percentile(np.asarray(lengths), [0, *PERCENTILES, 100], method="lower")
    return {k: int(v) for k, v in zip(keys, values, strict=True)}


@dataclass
class BoundaryMismatch:
    """A pair whose prompt and response, tokenized separately (as trained), differ from
    the tokenization of `prompt + response` (as the text reads).

    `position`: index of the first differing token. `separate` and `joint`: the
    differing tokens' texts in each (the common prefix and suffix left out).
    """

    source: str
    position: int
    prompt_len: int
    separate: list[str]
    joint: list[str]


@dataclass(kw_only=True)
class DataStats(DataReport):
    """Statistics of one data set as `posttrain sft` would train on it: the trainer's
    `DataReport` plus what only `inspect` computes.

    Length percentiles are in tokens, before max_seq_len is applied (the data as it is),
    and add up example by example: response = trained tokens (response and EOS; for chats
    every assistant turn's content and end-of-turn token), prompt = total - response (for
    chats every untrained token: template markup, system and user turns, however many).
    Counts of EOS and padding are after max_seq_len (as trained).
    """

    prompt_length_percentiles: dict[str, int]
    response_length_percentiles: dict[str, int]
    total_length_percentiles: dict[str, int]
    num_duplicate_prompts: int
    micro_batch_size: int
    padding_fraction_in_order: float
    padding_fraction_grouped: float
    num_boundary_checked: int
    num_boundary_mismatches: int
    boundary_mismatches: list[BoundaryMismatch] = field(default_factory=list)
    # Full-length total of every example, for the histogram (not in the JSON).
    total_lengths: list[int] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        """Everything but the per-example lengths, JSON-serialisable."""
        out = asdict(self)
        del out["total_lengths"]
        return out


def _prompt_key(record: Record) -> str:
    if record.messages is None:
        return "p:" + (record.prompt or "")
    first = next(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
    return "m:" + json.dumps(record.messages[:first], sort_keys=True)


def _token_texts(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str]:
    return tokenizer.batch_decode([[i] for i in ids])


def boundary_mismatches(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase
) -> tuple[int, list[BoundaryMismatch]]:
    """Compare, for every prompt/response pair, the trained tokens (prompt and response
    tokenized separately by `encode_prompts_and_outputs`) with the tokens of the
    concatenated text. Returns (number of pairs checked, every mismatch)."""
    pairs = [r for r in records if r.messages is None]
    if not pairs:
        return 0, []
    prompts = [r.prompt or "" for r in pairs]
    responses = [r.response or "" for r in pairs]
    prompt_ids, response_ids = encode_prompts_and_outputs(prompts, responses, tokenizer)
    joint_ids = tokenizer(
        [p + r for p, r in zip(prompts, responses, strict=True)], add_special_tokens=True
    )["input_ids"]
    found = []
    for record, p, r, joint in zip(pairs, prompt_ids, response_ids, joint_ids, strict=True):
        separate = list(p) + list(r)
        if separate == list(joint):
            continue
        start = 0
        while start < min(len(separate), len(joint)) and separate[start] == joint[start]:
            start += 1
        end = 0  # common suffix, not reaching into the common prefix
        while (
            end < min(len(separate), len(joint)) - start and separate[-1 - end] == joint[-1 - end]
        ):
            end += 1
        found.append(
            BoundaryMismatch(
                source=record.source,
                position=start,
                prompt_len=len(p),
                separate=_token_texts(tokenizer, separate[start : len(separate) - end]),
                joint=_token_texts(tokenizer, joint[start : len(joint) - end]),
            )
        )
    return len(pairs), found


def boundary_warning(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, threshold: float = 0.01
) -> str | None:
    """A one-paragraph warning for the start of `posttrain sft` when more than `threshold`
    (a fraction, 0 to 1) of the prompt/response pairs tokenize differently apart (as
    trained) than joined (as the text reads); None otherwise, and when there are no pairs.

    The default is low because a separated data set has no mismatch at all, while a glued
    one shows only some: raw GSM8K (question straight into answer) has 62 in 1,319 (4.7%)
    with Qwen2.5's tokenizer, only where a "." meets a letter. Tokenizes every pair once
    more (`boundary_mismatches`: three batched calls, about 1 s per 1,000 pairs on 2 cores).
    """
    checked, mismatches = boundary_mismatches(records, tokenizer)
    if not checked or len(mismatches) / checked <= threshold:
        return None
    first = mismatches[0]
    return (
        f"{len(mismatches)} of {checked} prompt/response pairs "
        f"({len(mismatches) / checked:.1%}) tokenize differently apart than joined, e.g. "
        f"{first.source}: trained {first.separate!r} where the joined text has "
        f"{first.joint!r}. Prompt and response are tokenized separately, so the model "
        "learns token boundaries that the text read as one never has (typically a prompt "
        "running straight into its answer, as in raw GSM8K). Put a separator between "
        "them: end every prompt with a newline or start every response with a space (a "
        "prompt ending in a space mismatches too: most tokenizers attach the space to the "
        "next word), or apply a prompt template; `posttrain inspect` lists the pairs."
    )


def compute_stats(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    fmt: DataFormat,
    path: str | os.PathLike[str] = "",
    *,
    micro_batch_size: int,
    grad_accum_steps: int = 1,
    seed: int = 0,
) -> tuple[DataStats, list[TokenizedExample]]:
    """Statistics of `records` under `fmt`, and the examples as trained.

    Runs `encode_records` and `apply_max_seq_len` (what `tokenize_records` runs) once,
    and the batch planner for the padding fractions (one rank, `seed`, epoch 0).
    """
    encoded = encode_records(records, tokenizer, fmt)
    kept, dropped = apply_max_seq_len(encoded, fmt.max_seq_len, fmt.truncation)
    report = build_data_report(encoded, kept, dropped, tokenizer, fmt, path)
    in_order, grouped = epoch_padding_fractions(
        [len(e) for e in kept], micro_batch_size, grad_accum_steps, 1, seed
    )
    checked, mismatches = boundary_mismatches(records, tokenizer)
    prompt_keys = [_prompt_key(r) for r in records]
    stats = DataStats(
        **{f.name: getattr(report, f.name) for f in fields(DataReport)},
        prompt_length_percentiles=length_percentiles([len(e) - sum(e.loss_mask) for e in encoded]),
        response_length_percentiles=length_percentiles([sum(e.loss_mask) for e in encoded]),
        total_length_percentiles=length_percentiles([len(e) for e in encoded]),
        num_duplicate_prompts=len(prompt_keys) - len(set(prompt_keys)),
        micro_batch_size=micro_batch_size,
        padding_fraction_in_order=in_order,
        padding_fraction_grouped=grouped,
        num_boundary_checked=checked,
        num_boundary_mismatches=len(mismatches),
        boundary_mismatches=mismatches[:MAX_BOUNDARY_EXAMPLES],
        total_lengths=[len(e) for e in encoded],
    )
    return stats, kept


def format_stats(stats: DataStats) -> list[str]:
    """The statistics as plain text lines."""

    def pct(p: dict[str, int]) -> str:
        return "  ".join(f"{k} {v}" for k, v in p.items())

    lines = [
        f"data set: {stats.path}",
        f"  examples: {stats.num_examples} trained of {stats.num_records} records"
        f" ({stats.num_chat} chats)",
        "  lengths in tokens (before max_seq_len):",
        f"    prompt    {pct(stats.prompt_length_percentiles)}",
        f"    response  {pct(stats.response_length_percentiles)}",
        f"    total     {pct(stats.total_length_percentiles)}",
    ]
    over = f"  longer than max_seq_len={stats.max_seq_len}: {stats.num_over_max_len}"
    if stats.num_over_max_len:
        if stats.truncation == "truncate":
            over += f" -> {stats.num_truncated} truncated (response tail cut, no EOS)"
            if stats.num_dropped:
                over += f", {stats.num_dropped} dropped (prompt alone fills max_seq_len)"
        else:
            over += f" -> {stats.num_dropped} dropped (truncation=drop)"
    lines += [
        over,
        f"  empty responses: {stats.num_empty_responses}",
        f"  trained examples ending without EOS (chats: end-of-turn): {stats.num_without_eos}",
        f"  duplicate prompts: {stats.num_duplicate_prompts}",
        f"  padding per epoch (micro-batch {stats.micro_batch_size}): "
        f"{stats.padding_fraction_in_order:.1%} in file order, "
        f"{stats.padding_fraction_grouped:.1%} length-grouped (what posttrain does)",
        f"  boundary check: {stats.num_boundary_mismatches} of {stats.num_boundary_checked} "
        "prompt/response pairs tokenize differently apart than joined",
    ]
    for m in stats.boundary_mismatches:
        lines.append(
            f"    {m.source}: token {m.position} (prompt has {m.prompt_len}): "
            f"trained {m.separate!r} vs joined {m.joint!r}"
        )
    return lines


# --------------------------------------------------------------------------- token view


@dataclass
class TokenCell:
    """One position of a padded sequence: its id, its text and its role."""

    id: int
    text: str
    role: str  # one of ROLES


@dataclass
class ExampleView:
    """One example as collated: every position of its padded row, with roles."""

    source: str
    length: int
    truncated: bool
    tokens: list[TokenCell]


def example_views(
    examples: Sequence[TokenizedExample],
    tokenizer: PreTrainedTokenizerBase,
    pad_token_id: int,
) -> list[ExampleView]:
    """Collate `examples` as one batch and label each position of each padded row.

    The row's tokens are `input_ids[:, 0]` followed by `labels` (the padded sequence,
    max_len long). A token is "response" (or "eos", when it is a stop token: the EOS id,
    or for a chat its end-of-turn token, e.g. `<|im_end|>`) exactly where `collate`'s
    `response_mask` is 1 on its label; the first token is never a label.
    Positions past the example's length are "pad"; the rest are "prompt" (context, not
    trained: the prompt, and for chats the template markup and other turns).
    """
    if not examples:
        return []
    batch = collate(examples, pad_token_id)
    tokens = torch.cat([batch["input_ids"][:, :1], batch["labels"]], dim=1)
    trained = torch.cat(
        [torch.zeros_like(batch["response_mask"][:, :1]), batch["response_mask"]], dim=1
    )
    eos = tokenizer.eos_token_id
    end_of_turn = end_of_turn_token_ids(tokenizer) if any(e.is_chat for e in examples) else []
    views = []
    for row, example in enumerate(examples):
        stops = stop_token_ids(example, eos, end_of_turn)
        ids = tokens[row].tolist()
        texts = _token_texts(tokenizer, ids)
        cells = []
        for j, (tok, text) in enumerate(zip(ids, texts, strict=True)):
            if trained[row, j] != 0:
                role = "eos" if tok in stops else "response"
            elif j >= len(example):
                role = "pad"
            else:
                role = "prompt"
            cells.append(TokenCell(tok, text, role))
        views.append(ExampleView(example.source, len(example), example.truncated, cells))
    return views


def _runs(view: ExampleView) -> list[tuple[str, list[TokenCell]]]:
    runs: list[tuple[str, list[TokenCell]]] = []
    for cell in view.tokens:
        if runs and runs[-1][0] == cell.role:
            runs[-1][1].append(cell)
        else:
            runs.append((cell.role, [cell]))
    return runs


def _header(view: ExampleView) -> str:
    trained = sum(c.role in ("response", "eos") for c in view.tokens)
    note = ", truncated" if view.truncated else ""
    return f"{view.source}: {view.length} tokens, {trained} trained{note}"


def render_plain(view: ExampleView) -> str:
    """Text without colour: each run of one role in `[role: tok|tok|...]`, newlines as
    `↵`, padding as `[pad x N]`."""
    parts = []
    for role, cells in _runs(view):
        if role == "pad":
            parts.append(f"[pad x {len(cells)}]")
        else:
            parts.append(f"[{role}: " + "|".join(c.text.replace("\n", "↵") for c in cells) + "]")
    return _header(view) + "\n" + " ".join(parts)


def render_rich(view: ExampleView) -> Text:
    """The view for a terminal: each token coloured by role, shades alternating from
    token to token; newlines shown as `↵` and kept; padding collapsed to `<pad> x N`."""
    text = Text()
    text.append(_header(view) + "\n", style="bold")
    for k, cell in enumerate(view.tokens):
        style = RICH_STYLES[cell.role][k % 2]
        if cell.role == "pad":
            n = sum(c.role == "pad" for c in view.tokens)
            text.append(f"<pad> x {n}", style=style)
            break  # padding only ever ends a row
        text.append(cell.text.replace("\n", "↵\n"), style=style)
    return text


def legend_rich() -> Text:
    text = Text("legend: ")
    for role in ROLES:
        text.append(f" {role} ", style=RICH_STYLES[role][0])
        text.append(" ")
    return text


# --------------------------------------------------------------------------- files


def write_length_histogram(
    total_lengths: Sequence[int], max_seq_len: int, path: str | os.PathLike[str]
) -> Path:
    """A PNG histogram of example lengths in tokens, with the max_seq_len line."""
    # The object API, not pyplot: no global figure state and no GUI backend.
    with quiet_font_cache():
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if total_lengths:
        ax.hist(total_lengths, bins=min(60, max(5, len(set(total_lengths)))), color="#4c72b0")
    ax.axvline(max_seq_len, color="#c44e52", linestyle="--", label=f"max_seq_len = {max_seq_len}")
    over = sum(n > max_seq_len for n in total_lengths)
    ax.set_title(f"{len(total_lengths)} examples, {over} longer than max_seq_len")
    ax.set_xlabel("tokens per example (prompt + response + EOS)")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
pre.tokens { white-space: pre-wrap; word-break: break-all; font-size: 13px; line-height: 1.7;
             border: 1px solid #ccc; padding: .6em; }
pre.tokens span { border-radius: 2px; }
table { border-collapse: collapse; } td { padding: 2px 10px; vertical-align: top; }
.stats { font-family: monospace; white-space: pre; }
"""


def _css_roles() -> str:
    rules = []
    for role, (a, b) in HTML_COLOURS.items():
        rules.append(f".{role}0 {{ background: {a}; }} .{role}1 {{ background: {b}; }}")
    rules.append(".pad0, .pad1 { color: #999; }")
    return "\n".join(rules)


def render_html(
    views: Sequence[ExampleView], stats: DataStats, histogram: str | os.PathLike[str] | None
) -> str:
    """A self-contained HTML page: statistics, the histogram inlined, and every view."""
    esc = html.escape
    body = [f"<h1>posttrain inspect: {esc(stats.path)}</h1>"]
    body.append('<div class="stats">' + esc("\n".join(format_stats(stats))) + "</div>")
    if histogram is not None and Path(histogram).exists():
        data = base64.b64encode(Path(histogram).read_bytes()).decode("ascii")
        body.append(f'<p><img alt="length histogram" src="data:image/png;base64,{data}"></p>')
    legend = " ".join(f'<span class="{r}0">&nbsp;{r}&nbsp;</span>' for r in ROLES)
    body.append(f"<h2>First {len(views)} examples</h2><p>legend: {legend}</p>")
    for view in views:
        body.append(f"<h3>{esc(_header(view))}</h3>")
        spans = []
        pads = 0
        for k, cell in enumerate(view.tokens):
            if cell.role == "pad":
                pads += 1
                continue
            title = esc(f"id {cell.id}, {cell.role}", quote=True)
            text = esc(cell.text).replace("\n", "↵\n")
            spans.append(f'<span class="{cell.role}{k % 2}" title="{title}">{text}</span>')
        if pads:
            spans.append(f'<span class="pad0">&lt;pad&gt; x {pads}</span>')
        body.append('<pre class="tokens">' + "".join(spans) + "</pre>")
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>posttrain inspect: {esc(stats.path)}</title>"
        f"<style>{_CSS}\n{_css_roles()}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_html(
    path: str | os.PathLike[str],
    views: Sequence[ExampleView],
    stats: DataStats,
    histogram: str | os.PathLike[str] | None = None,
) -> Path:
    """Write `render_html(...)` to `path` (UTF-8)."""
    path = Path(path)
    path.write_text(render_html(views, stats, histogram), encoding="utf-8")
    return path
