"""`posttrain inspect`: exact statistics, the token view, HTML, JSON and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import fmt, write_jsonl
from rich.text import Text
from transformers import PreTrainedTokenizerFast

from posttrain.cli.main import main
from posttrain.data.batching import collate, padding_fraction, plan_batches, rank_micro_batches
from posttrain.data.records import Record, load_records
from posttrain.data.report import (
    RICH_STYLES,
    boundary_warning,
    compute_stats,
    example_views,
    length_percentiles,
    render_html,
    render_plain,
    render_rich,
)
from posttrain.data.tokenized import encode_records
from posttrain.primitives import pad_token_id_of

GSM8K_RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"
LONG = " the quick brown fox jumps over the lazy dog" * 3
ROWS = [
    {"prompt": "Question: What is 12 + 30? Answer:", "response": " 42"},
    {"prompt": "Hello,", "response": " world!"},
    {"prompt": "Hello,", "response": ""},  # empty response, and a duplicate prompt
    {"prompt": "Answer: ", "response": "42"},  # the space ends up in a different token
    {"prompt": "Reverse the word:", "response": LONG},  # longer than max_seq_len
]
CHAT = [
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "Hello?"},
    {"role": "assistant", "content": "Hello, world!"},
]


def n_tokens(tok: PreTrainedTokenizerFast, text: str, special: bool) -> int:
    return len(tok(text, add_special_tokens=special)["input_ids"])


def lower_percentile(values: list[int], p: int) -> int:
    s = sorted(values)
    return s[math.floor(p / 100 * (len(s) - 1))]


def text_header_is_bold(text: Text) -> bool:
    first = text.spans[0]
    return first.style == "bold" and " trained" in text.plain[: first.end].splitlines()[0]


def test_statistics_are_exact(tmp_path: Path, nobos_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = nobos_tokenizer
    prompt_lens = [n_tokens(tok, r["prompt"], True) for r in ROWS]
    response_lens = [n_tokens(tok, r["response"], False) + 1 for r in ROWS]  # + EOS
    totals = [p + r for p, r in zip(prompt_lens, response_lens, strict=True)]
    max_len = max(totals[:-1]) + 2
    assert totals[-1] > max_len  # the crafted over-long example

    config = fmt(max_seq_len=max_len)
    records = load_records(write_jsonl(tmp_path / "d.jsonl", ROWS), config)
    stats, kept = compute_stats(records, tok, config, "d.jsonl", micro_batch_size=2)

    assert (stats.num_records, stats.num_examples, stats.num_chat) == (5, 5, 0)
    assert (stats.num_over_max_len, stats.num_truncated, stats.num_dropped) == (1, 1, 0)
    assert stats.num_empty_responses == 1
    assert stats.num_without_eos == 1  # the truncated one: its EOS was cut off
    assert stats.num_duplicate_prompts == 1
    for got, lengths in [
        (stats.prompt_length_percentiles, prompt_lens),
        (stats.response_length_percentiles, response_lens),
        (stats.total_length_percentiles, totals),
    ]:
        assert got == {
            "min": min(lengths),
            **{f"p{p}": lower_percentile(lengths, p) for p in (50, 90, 95, 99)},
            "max": max(lengths),
        }
    trained = [*totals[:-1], max_len]
    assert [len(e) for e in kept] == trained
    slots = 2 * max(trained[0:2]) + 2 * max(trained[2:4]) + trained[4]
    assert stats.padding_fraction_in_order == pytest.approx(1 - sum(trained) / slots)
    grouped = [
        [trained[i] for i in mb]
        for step in plan_batches(trained, 2, 1, 1, 0)
        for mb in rank_micro_batches(step, 2, 1, 0)
    ]
    assert stats.padding_fraction_grouped == pytest.approx(padding_fraction(grouped))

    assert (stats.num_boundary_checked, stats.num_boundary_mismatches) == (5, 1)
    (mismatch,) = stats.boundary_mismatches
    assert mismatch.source == f"{tmp_path / 'd.jsonl'}:4"
    # "Answer: " + "42": trained as ' ' then '4', while the text reads ' 4'.
    assert (mismatch.position, mismatch.separate, mismatch.joint) == (4, [" ", "4"], [" 4"])
    assert mismatch.prompt_len == prompt_lens[3]


def test_drop_policy_and_chats_are_counted(
    tmp_path: Path, nobos_tokenizer: PreTrainedTokenizerFast
) -> None:
    rows = [*ROWS, {"messages": CHAT}, {"messages": CHAT}]
    records = load_records(write_jsonl(tmp_path / "d.jsonl", rows), fmt())
    lengths = [len(e) for e in encode_records(records, nobos_tokenizer, fmt())]
    config = fmt(max_seq_len=max(lengths[:4] + lengths[5:]), truncation="drop")
    assert lengths[4] > config.max_seq_len
    stats, kept = compute_stats(records, nobos_tokenizer, config, micro_batch_size=4)
    assert stats.num_chat == 2 and stats.num_over_max_len == 1
    assert (stats.num_truncated, stats.num_dropped, stats.num_examples) == (0, 1, 6)
    assert stats.num_without_eos == 0
    assert stats.num_duplicate_prompts == 2  # "Hello," twice, the same chat twice
    assert stats.num_boundary_checked == 5  # pairs only
    assert len(kept) == 6


def test_view_marks_exactly_the_collated_response_mask(
    llama_tokenizer: PreTrainedTokenizerFast,
) -> None:
    # Llama style: no pad token, so padding is the EOS id; padding must not read as EOS.
    tok = llama_tokenizer
    records = [Record(r["prompt"], r["response"], None, f"f:{i}") for i, r in enumerate(ROWS)]
    records.append(Record(None, None, CHAT, "f:chat"))
    lengths = [len(e) for e in encode_records(records, tok, fmt())]
    config = fmt(max_seq_len=lengths[-1])  # the chat fits, the long pair does not
    assert lengths[4] > config.max_seq_len
    _, examples = compute_stats(records, tok, config, micro_batch_size=4)
    pad = pad_token_id_of(tok)
    assert pad == tok.eos_token_id
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    views = example_views(examples, tok, pad)
    batch = collate(examples, pad)
    mask = batch["response_mask"]
    assert any(e.truncated for e in examples) and any(e.is_chat for e in examples)
    for row, (view, example) in enumerate(zip(views, examples, strict=True)):
        assert view.source == example.source
        assert len(view.tokens) == mask.shape[1] + 1
        roles = [c.role for c in view.tokens]
        assert roles[0] == "prompt"  # the first token is never a label
        # The stop tokens: EOS for a pair; a chat's end-of-turn token (or EOS).
        stops = {pad, im_end} if example.is_chat else {pad}
        for j in range(1, len(roles)):
            assert (roles[j] in ("response", "eos")) == (mask[row, j - 1] == 1)
            assert (roles[j] == "pad") == (j >= len(example))
            assert (roles[j] == "eos") == (mask[row, j - 1] == 1 and view.tokens[j].id in stops)
        assert [c.id for c in view.tokens[: len(example)]] == example.input_ids

        # The terminal view: a header, then one styled span per shown token, styled by role.
        assert text_header_is_bold(render_rich(view))
        style_role = {s: r for r, styles in RICH_STYLES.items() for s in styles}
        text = render_rich(view)
        assert isinstance(text, Text)
        spans = [(style_role[s.style], text.plain[s.start : s.end]) for s in text.spans[1:]]
        shown = [(c.role, c.text.replace("\n", "↵\n")) for c in view.tokens if c.role != "pad"]
        n_pad = roles.count("pad")
        assert spans == shown + ([("pad", f"<pad> x {n_pad}")] if n_pad else [])

        plain = render_plain(view)
        runs = [r for i, r in enumerate(roles) if i == 0 or roles[i - 1] != r]
        assert plain.count("[response: ") == runs.count("response")
        assert plain.count("[eos: ") == runs.count("eos")
        assert ("[pad x" in plain) == bool(n_pad)
    # The chat trains its assistant turns as the template renders them (content and
    # <|im_end|>, the stop token, shown as such; no EOS added) and nothing else.
    chat = views[-1]
    trained = "".join(c.text for c in chat.tokens if c.role in ("response", "eos"))
    assert trained == "42<|im_end|>Hello, world!<|im_end|>"
    assert [c.text for c in chat.tokens if c.role == "eos"] == ["<|im_end|>"] * 2
    assert render_plain(chat).count("[eos: <|im_end|>]") == 2


def test_chat_lengths_add_up(nobos_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = nobos_tokenizer
    long_chat = [
        *CHAT,
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye."},
    ]
    chats = [CHAT[:2], CHAT, long_chat]  # 1, 2 and 3 assistant turns
    records = [Record(None, None, c, f"c:{i}") for i, c in enumerate(chats)]
    stats, _ = compute_stats(records, tok, fmt(), micro_batch_size=2)
    responses, totals = [], []
    for chat in chats:
        # Trained: each assistant content and its <|im_end|>; the sequence: the template's
        # rendering less its final newline.
        contents = [m["content"] for m in chat if m["role"] == "assistant"]
        responses.append(sum(n_tokens(tok, c, False) + 1 for c in contents))
        totals.append(n_tokens(tok, tok.apply_chat_template(chat, tokenize=False)[:-1], False))
    prompts = [t - r for t, r in zip(totals, responses, strict=True)]
    # Every user turn and all template markup counts as prompt: more than the tokens
    # before the first trained one, for the multi-turn chats.
    (first,) = encode_records(records[1:2], tok, fmt())
    assert prompts[1] > first.prompt_len
    assert sorted(prompts) == prompts and sorted(responses) == responses
    for name, p, r, t in zip(("min", "p50", "max"), prompts, responses, totals, strict=True):
        assert stats.prompt_length_percentiles[name] == p
        assert stats.response_length_percentiles[name] == r
        assert stats.total_length_percentiles[name] == t == p + r


def test_boundary_warning(tmp_path: Path, nobos_tokenizer: PreTrainedTokenizerFast) -> None:
    clean = {"prompt": "Hello,", "response": " world!"}
    glued = {"prompt": "Answer: ", "response": "42"}  # ' ' then '4' apart, ' 4' joined
    chat = {"messages": CHAT}

    def warning(rows: list[dict[str, object]], **kw: float) -> str | None:
        records = load_records(write_jsonl(tmp_path / "d.jsonl", rows), fmt())
        return boundary_warning(records, nobos_tokenizer, **kw)

    assert warning([clean] * 20) is None
    assert warning([clean] * 19 + [glued], threshold=0.05) is None  # 5%: not more
    assert warning([clean] * 19 + [glued]) is not None  # the default threshold is 1%
    rows = [chat, *[clean] * 17, glued, glued]  # 2 of 19 pairs, the first on line 19
    message = warning(rows)
    assert message is not None and "\n" not in message
    assert message.startswith("2 of 19 prompt/response pairs (10.5%) tokenize differently")
    assert f"{tmp_path / 'd.jsonl'}:19: trained [' ', '4'] where the joined text has [' 4']" in (
        message
    )
    assert "newline" in message and "prompt template" in message
    assert warning(rows, threshold=0.2) is None
    assert warning([chat]) is None  # no pairs to check
    assert warning([glued], threshold=0.0) is not None


def test_html_shows_every_example(tmp_path: Path, nobos_tokenizer: PreTrainedTokenizerFast) -> None:
    config = fmt(max_seq_len=30)
    records = load_records(write_jsonl(tmp_path / "d.jsonl", [*ROWS, {"messages": CHAT}]), config)
    stats, examples = compute_stats(records, nobos_tokenizer, config, micro_batch_size=4)
    views = example_views(examples, nobos_tokenizer, pad_token_id_of(nobos_tokenizer))
    page = render_html(views, stats, None)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for view in views:
        assert view.source in page
        for cell in view.tokens:
            if cell.role != "pad":
                assert f'title="id {cell.id}, {cell.role}"' in page
    assert "&lt;|im_start|&gt;" in page  # token text is escaped


def test_cli_json_html_and_plot(tmp_path: Path, nobos_tokenizer, capsys) -> None:
    model_dir = tmp_path / "tok"
    nobos_tokenizer.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    base = ["inspect", "--model", str(model_dir), "--train-file", str(data), "--max-seq-len", "24"]

    png = tmp_path / "lengths.png"
    assert main([*base, "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    config = fmt(max_seq_len=24)
    expected, _ = compute_stats(
        load_records(data, config), nobos_tokenizer, config, str(data), micro_batch_size=4
    )
    for key in (
        "num_examples",
        "num_over_max_len",
        "num_empty_responses",
        "num_without_eos",
        "padding_fraction_in_order",
        "padding_fraction_grouped",
        "num_boundary_mismatches",
        "total_length_percentiles",
    ):
        assert out[key] == expected.to_json()[key], key
    assert out["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    html = tmp_path / "view.html"
    assert main([*base, "--num-examples", "2", "--html", str(html)]) == 0
    text = capsys.readouterr().out
    assert "[prompt: " in text and "[response: " in text  # not a terminal: plain markers
    assert "boundary check: 1 of 5" in text
    page = html.read_text()
    assert f"{data}:1" in page and f"{data}:2" in page and f"{data}:3" not in page
    assert (tmp_path / "view_lengths.png").exists()  # the plot goes next to the report
    assert "data:image/png;base64," in page  # self-contained

    assert main([*base, "--eval"]) == 2
    assert "no eval_file" in capsys.readouterr().err


def test_inspect_writes_no_plot_where_it_was_not_asked_for(
    tmp_path: Path, nobos_tokenizer, capsys, monkeypatch
) -> None:
    """The PNG went into the current directory under a name the README did not show."""
    model_dir = tmp_path / "tok"
    nobos_tokenizer.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["inspect", "--model", str(model_dir), "--train-file", str(data)]) == 0
    assert "plot:" not in capsys.readouterr().out
    assert list(cwd.iterdir()) == []
    report = tmp_path / "reports" / "gsm8k.html"
    report.parent.mkdir()
    argv = ["inspect", "--model", str(model_dir), "--train-file", str(data), "--html", str(report)]
    assert main(argv) == 0
    assert f"  plot: {tmp_path / 'reports' / 'gsm8k_lengths.png'}" in capsys.readouterr().out
    assert list(cwd.iterdir()) == []


def test_length_percentiles_of_nothing() -> None:
    assert set(length_percentiles([]).values()) == {0}
    assert length_percentiles([5]) == dict.fromkeys(["min", "p50", "p90", "p95", "p99", "max"], 5)


def test_boundary_warning_on_raw_gsm8k(qwen_tokenizer: PreTrainedTokenizerFast) -> None:
    # Raw GSM8K: the question runs straight into the answer ("...each day.The...").
    config = fmt(prompt_field="question", response_field="answer")
    records = load_records(GSM8K_RAW, config)
    message = boundary_warning(records, qwen_tokenizer)
    assert message is not None and message.startswith("62 of 1319 prompt/response pairs (4.7%)")
    assert f"{GSM8K_RAW}:31: trained ['.', 'The'] where the joined text has ['.The']" in message
