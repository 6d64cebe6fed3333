"""The trainer's data path: formats, fields, chat masks, EOS, max_seq_len, errors, batching."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import fmt, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from posttrain.data.batching import (
    collate,
    epoch_padding_fractions,
    padding_fraction,
    plan_batches,
    rank_micro_batches,
)
from posttrain.data.records import Record, load_records
from posttrain.data.tokenized import (
    encode_records,
    end_of_turn_token_ids,
    load_dataset_for_training,
    tokenize_records,
)
from posttrain.models.tiny import train_bpe_tokenizer
from posttrain.primitives import pad_token_id_of, tokenize_prompt_and_output

# A small corpus for tokenizers built inside a test (to set their EOS or template).
CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog. Be brief.",
    "Question: What is 12 + 30? Answer: 42",
] * 10
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_512.jsonl"

PAIRS = [
    {"prompt": "Question: What is 12 + 30?", "response": " Answer: 42"},
    {"prompt": "Hello,", "response": " world!"},
    {"prompt": "Reverse the word:", "response": ""},
]

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "And the quick brown fox?"},
    {"role": "assistant", "content": "It jumps over the lazy dog."},
]


# Qwen2.5's chat template without its tool-calling branches (default system prompt
# included), and Llama 3's.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


@pytest.fixture(scope="module")
def chat_tokenizers(qwen_tokenizer: PreTrainedTokenizerFast) -> dict[str, PreTrainedTokenizerFast]:
    """(end-of-turn token, tokenizer) by name: Qwen2.5 base (EOS <|endoftext|>) and
    Instruct (EOS <|im_end|>) with Qwen2.5's template, and a Llama 3 base lookalike
    (EOS <|end_of_text|>, turns ending with <|eot_id|>)."""
    base = copy.deepcopy(qwen_tokenizer)  # the session fixture stays as it is
    base.chat_template = QWEN25_TEMPLATE
    instruct = copy.deepcopy(base)
    instruct.eos_token = "<|im_end|>"
    llama3 = train_bpe_tokenizer(CORPUS, vocab_size=384, add_bos=False)
    llama3.add_tokens(LLAMA3_SPECIALS, special_tokens=True)
    llama3.bos_token, llama3.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
    llama3.chat_template = LLAMA3_TEMPLATE
    return {"qwen_base": base, "qwen_instruct": instruct, "llama3": llama3}


def trained_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive trained token ids."""
    runs: list[list[int]] = []
    for i, (tok, m) in enumerate(zip(ids, mask, strict=True)):
        if m:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(tok)
    return runs


# --------------------------------------------------------------------------- formats


def test_every_format_gives_the_same_records(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = [(r["prompt"], r["response"]) for r in PAIRS]
    jsonl = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    as_list = tmp_path / "d.json"
    as_list.write_text(json.dumps(PAIRS, indent=2))
    lines_json = write_jsonl(tmp_path / "lines.json", PAIRS)
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(PAIRS), parquet)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(saved))
    saved_dict = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS)}).save_to_disk(str(saved_dict))
    for path in (jsonl, as_list, lines_json, parquet, saved, saved_dict):
        records = load_records(path, fmt())
        assert [(r.prompt, r.response) for r in records] == expected, path
        assert all(r.messages is None for r in records)
    assert load_records(jsonl, fmt())[1].source == f"{jsonl}:2"
    assert load_records(parquet, fmt())[1].source == f"{parquet}:row 1"


def test_completion_field_is_recognised_and_field_names_are_configurable(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "completion": "b"}]
    records = load_records(write_jsonl(tmp_path / "c.jsonl", rows), fmt())
    assert (records[0].prompt, records[0].response) == ("a", "b")
    custom = write_jsonl(tmp_path / "q.jsonl", [{"question": "q?", "answer": "yes", "x": 1}])
    records = load_records(custom, fmt(prompt_field="question", response_field="answer"))
    assert (records[0].prompt, records[0].response) == ("q?", "yes")
    # An explicitly chosen response field is never silently replaced by "completion".
    with pytest.raises(ValueError, match="missing field 'answer'"):
        load_records(
            write_jsonl(tmp_path / "c2.jsonl", [{"prompt": "a", "completion": "b"}]),
            fmt(response_field="answer"),
        )
    rows = [{"conv": CHAT}]
    records = load_records(write_jsonl(tmp_path / "m.jsonl", rows), fmt(messages_field="conv"))
    assert records[0].messages == CHAT


# --------------------------------------------------------------------------- tokenization


@pytest.mark.parametrize("tok_name", ["llama_tokenizer", "nobos_tokenizer"])
def test_pairs_train_on_exactly_what_tokenize_prompt_and_output_gives(
    tok_name: str, request: pytest.FixtureRequest
) -> None:
    tok = request.getfixturevalue(tok_name)
    records = [Record(r["prompt"], r["response"], None, f"f:{i}") for i, r in enumerate(PAIRS)]
    prompts, responses = [r["prompt"] for r in PAIRS], [r["response"] for r in PAIRS]
    reference = tokenize_prompt_and_output(prompts, responses, tok)
    pad = pad_token_id_of(tok)

    plain, _ = tokenize_records(records, tok, fmt(append_eos=False))
    batch = collate(plain, pad)
    for key in ("input_ids", "labels", "response_mask"):
        torch.testing.assert_close(batch[key], reference[key], rtol=0, atol=0)

    with_eos, report = tokenize_records(records, tok, fmt())
    eos = tok.eos_token_id
    for plain_ex, ex in zip(plain, with_eos, strict=True):
        assert ex.input_ids == [*plain_ex.input_ids, eos]  # an id, not the text "</s>"
        assert ex.loss_mask == [*plain_ex.loss_mask, 1]
        assert ex.prompt_len == plain_ex.prompt_len
    assert report.num_without_eos == 0 and report.num_empty_responses == 1
    # The empty response still trains its EOS: the model learns to stop at once.
    assert with_eos[2].loss_mask[-1] == 1 and sum(with_eos[2].loss_mask) == 1


def test_collate_masks_match_the_examples(llama_tokenizer: PreTrainedTokenizerFast) -> None:
    records = [Record(r["prompt"], r["response"], None, "f") for r in PAIRS]
    examples, _ = tokenize_records(records, llama_tokenizer, fmt())
    batch = collate(examples, pad_token_id_of(llama_tokenizer))
    width = max(len(e) for e in examples) - 1
    for i, ex in enumerate(examples):
        n = len(ex)
        real = min(n, width)  # the longest example's last token is only a label
        assert batch["attention_mask"][i].tolist() == [1] * real + [0] * (width - real)
        assert batch["response_mask"][i, : n - 1].tolist() == ex.loss_mask[1:]
        assert batch["labels"][i, : n - 1].tolist() == ex.input_ids[1:]
        assert batch["response_mask"][i, n - 1 :].sum() == 0


def test_chat_loss_covers_assistant_content_and_end_token_only(
    qwen_tokenizer: PreTrainedTokenizerFast,
) -> None:
    record = Record(None, None, CHAT, "chat:1")
    assistant = [m["content"] for m in CHAT if m["role"] == "assistant"]
    # Qwen base: EOS is <|endoftext|>, the turn ends with <|im_end|>: the turn is trained
    # as the template renders it, through <|im_end|>, and no EOS is added.
    (ex,) = encode_records([record], qwen_tokenizer, fmt())
    runs = trained_runs(ex.input_ids, ex.loss_mask)
    assert [qwen_tokenizer.decode(r) for r in runs] == [f"{c}<|im_end|>" for c in assistant]
    context = qwen_tokenizer.decode(ex.input_ids[: ex.prompt_len])
    assert context.endswith("<|im_start|>assistant\n")
    # Untrained plus trained tokens rebuild the rendering, less its final newline
    # (nothing is trained after it); the sequence ends with the trained <|im_end|>.
    rendered = qwen_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert qwen_tokenizer.decode(ex.input_ids) + "\n" == rendered
    assert qwen_tokenizer.eos_token_id not in ex.input_ids
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ex.input_ids[-1] == im_end and ex.loss_mask[-1] == 1

    # A tokenizer whose EOS is the template's end token: the same turns.
    tok = train_bpe_tokenizer(CORPUS, vocab_size=384, add_bos=True)
    tok.eos_token = "<|im_end|>"
    (ex,) = encode_records([record], tok, fmt())
    assert [tok.decode(r) for r in trained_runs(ex.input_ids, ex.loss_mask)] == [
        f"{c}<|im_end|>" for c in assistant
    ]
    # append_eos is for prompt/response pairs: a chat is the same with it off.
    (ex_on,) = encode_records([record], qwen_tokenizer, fmt())
    (ex_off,) = encode_records([record], qwen_tokenizer, fmt(append_eos=False))
    assert (ex_off.input_ids, ex_off.loss_mask) == (ex_on.input_ids, ex_on.loss_mask)


@pytest.mark.parametrize(
    ("name", "end_token"),
    [("qwen_base", "<|im_end|>"), ("qwen_instruct", "<|im_end|>"), ("llama3", "<|eot_id|>")],
)
@pytest.mark.parametrize("messages", [CHAT, CHAT[1:]], ids=["system", "no_system"])
def test_chats_train_token_for_token_as_the_template_renders(
    name: str,
    end_token: str,
    messages: list[dict[str, str]],
    chat_tokenizers: dict[str, PreTrainedTokenizerFast],
) -> None:
    tok = chat_tokenizers[name]
    end = tok.convert_tokens_to_ids(end_token)
    eos = tok.eos_token_id
    assert end_of_turn_token_ids(tok) == ([end] if end == eos else [end, eos])

    record = Record(None, None, messages, "chat:1")
    examples, report = tokenize_records([record], tok, fmt())
    (ex,) = examples
    assert report.num_without_eos == 0  # it ends with a trained end-of-turn token
    template_ids = list(
        tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    )
    # The template's own tokenization, up to the last trained token: no token added;
    # what is cut after it is whitespace (ChatML's final newline).
    n = len(ex.input_ids)
    assert ex.input_ids == template_ids[:n]
    assert tok.decode(template_ids[n:]).strip() == ""
    if end != eos:
        assert eos not in ex.input_ids
    # The loss covers each assistant content and its end-of-turn token, nothing else.
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    expected = [tok(c, add_special_tokens=False)["input_ids"] + [end] for c in contents]
    assert trained_runs(ex.input_ids, ex.loss_mask) == expected
    assert sum(ex.loss_mask) == sum(map(len, expected))
    # The context before each turn is the generation prompt, as at inference.
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    header = tok.apply_chat_template(messages[:first], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ex.input_ids[: ex.prompt_len]) == header
    # append_eos is for pairs only.
    (ex_off,) = encode_records([record], tok, fmt(append_eos=False))
    assert (ex_off.input_ids, ex_off.loss_mask) == (ex.input_ids, ex.loss_mask)


def test_end_of_turn_token_ids_without_a_template(llama_tokenizer) -> None:
    tok = copy.deepcopy(llama_tokenizer)
    tok.chat_template = None
    assert end_of_turn_token_ids(tok) == [tok.eos_token_id]
    # A template that renders no special token after the content: EOS only.
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_token_ids(tok) == [tok.eos_token_id]


def test_mixed_pairs_and_chats_keep_file_order(tmp_path: Path, nobos_tokenizer) -> None:
    path = write_jsonl(tmp_path / "mix.jsonl", [PAIRS[0], {"messages": CHAT}, PAIRS[1]])
    examples, report = load_dataset_for_training(path, nobos_tokenizer, fmt())
    assert [e.source for e in examples] == [f"{path}:{i}" for i in (1, 2, 3)]
    assert [e.is_chat for e in examples] == [False, True, False]
    assert report.num_chat == 1 and report.num_examples == 3


def test_max_seq_len_truncates_or_drops_with_exact_counts(
    nobos_tokenizer: PreTrainedTokenizerFast,
) -> None:
    tok = nobos_tokenizer
    short = Record("Hello,", " world!", None, "f:1")
    long_response = Record("Hello,", " the quick brown fox" * 5, None, "f:2")
    long_prompt = Record("the lazy dog " * 10, " 42", None, "f:3")
    lens = {
        r.source: len(e)
        for r, e in zip(
            [short, long_response, long_prompt],
            encode_records([short, long_response, long_prompt], tok, fmt()),
            strict=True,
        )
    }
    prompt_len = len(tok("Hello,")["input_ids"])
    max_len = 12
    assert lens["f:1"] <= max_len < lens["f:2"]
    assert len(tok("the lazy dog " * 10)["input_ids"]) >= max_len
    records = [short, long_response, long_prompt, short]

    kept, report = tokenize_records(records, tok, fmt(max_seq_len=max_len))
    assert [e.source for e in kept] == ["f:1", "f:2", "f:1"]
    assert (report.num_over_max_len, report.num_truncated, report.num_dropped) == (2, 1, 1)
    truncated = kept[1]
    assert truncated.truncated and len(truncated) == max_len
    assert truncated.loss_mask == [0] * prompt_len + [1] * (max_len - prompt_len)
    assert truncated.input_ids[-1] != tok.eos_token_id  # not taught to stop mid-answer
    assert report.num_without_eos == 1
    assert "2 longer than max_seq_len=12: 1 truncated" in report.summary()

    kept, report = tokenize_records(records, tok, fmt(max_seq_len=max_len, truncation="drop"))
    assert [e.source for e in kept] == ["f:1", "f:1"]
    assert (report.num_over_max_len, report.num_truncated, report.num_dropped) == (2, 0, 2)
    assert report.dropped_sources == ["f:2", "f:3"]


# --------------------------------------------------------------------------- errors


def test_errors_name_the_file_and_line(tmp_path: Path, nobos_tokenizer) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": \n')
    with pytest.raises(ValueError, match=rf"{bad}:3: malformed JSON"):
        load_records(bad, fmt())
    missing = write_jsonl(tmp_path / "m.jsonl", [PAIRS[0], {"question": "q", "answer": "a"}])
    with pytest.raises(
        ValueError, match=rf"{missing}:2: missing field 'prompt'.*'question', 'answer'"
    ):
        load_records(missing, fmt())
    no_resp = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "text": "a"}])
    with pytest.raises(ValueError, match=r"missing field 'response' \(nor 'completion'\)"):
        load_records(no_resp, fmt())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_records(empty, fmt())
    empty_list = tmp_path / "empty.json"
    empty_list.write_text("[]")
    with pytest.raises(ValueError, match="empty"):
        load_records(empty_list, fmt())
    with pytest.raises(ValueError, match="data file not found"):
        load_records(tmp_path / "nope.jsonl", fmt())
    nonstr = write_jsonl(tmp_path / "n.jsonl", [PAIRS[0], PAIRS[1], {"prompt": 3, "response": "x"}])
    with pytest.raises(ValueError, match=rf"{nonstr}:3: field 'prompt' must be a string, got int"):
        load_records(nonstr, fmt())
    as_list = tmp_path / "n.json"
    as_list.write_text(json.dumps([PAIRS[0], {"prompt": "p", "response": None}]))
    with pytest.raises(ValueError, match=r"row 1: field 'response' must be a string, got null"):
        load_records(as_list, fmt())
    for messages, message in [
        ("hi", "must be a non-empty list"),
        ([{"role": "user"}], r"messages\[0\] must be an object with string 'role' and 'content'"),
        ([{"role": "user", "content": "hi"}], "no 'assistant' message"),
    ]:
        path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
        with pytest.raises(ValueError, match=rf"{path}:1: .*{message}"):
            load_records(path, fmt())
    with pytest.raises(ValueError, match=r"unsupported data format '\.csv'"):
        (tmp_path / "d.csv").write_text("a,b\n")
        load_records(tmp_path / "d.csv", fmt())
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "the lazy dog " * 20, "response": "x"}])
    with pytest.raises(ValueError, match="all 1 examples were dropped"):
        load_dataset_for_training(long, nobos_tokenizer, fmt(max_seq_len=8))


def test_a_chat_template_that_is_not_prefix_stable_is_an_error(nobos_tokenizer) -> None:
    tok = train_bpe_tokenizer(CORPUS, vocab_size=384, add_bos=False)
    # Renders the message count up front, so each prefix differs from the full chat.
    tok.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match=r"chat:7: .*prefix by prefix"):
        encode_records([Record(None, None, CHAT, "chat:7")], tok, fmt())


# --------------------------------------------------------------------------- batching


def step_sets(steps: list[list[list[int]]]) -> list[frozenset[int]]:
    return [frozenset(i for mb in step for i in mb) for step in steps]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), max_size=250),
    split=st.sampled_from(
        [((1, 12), (12, 1)), ((2, 6), (3, 4)), ((4, 3), (6, 2)), ((1, 4), (2, 2))]
    ),
    world=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 5),
    grouped=st.booleans(),
)
def test_step_membership_depends_only_on_the_global_batch(
    lengths: list[int],
    split: tuple[tuple[int, int], tuple[int, int]],
    world: int,
    seed: int,
    epoch: int,
    grouped: bool,
) -> None:
    (m1, a1), (m2, a2) = split
    plans = [
        plan_batches(lengths, m, a, world, seed, epoch, grouped) for m, a in ((m1, a1), (m2, a2))
    ]
    assert step_sets(plans[0]) == step_sets(plans[1])
    global_batch = m1 * a1 * world
    n = len(lengths)
    for (m, a), plan in zip(((m1, a1), (m2, a2)), plans, strict=True):
        seen = [i for step in plan for mb in step for i in mb]
        assert len(seen) == len(set(seen))  # no example twice
        tail = n % global_batch
        assert len(seen) == n - tail + tail // world * world
        for step in plan[:-1] if tail >= world else plan:
            assert len(step) == a and all(len(mb) == m * world for mb in step)
        for step in plan:
            assert len(step) <= a
            for mb in step:
                per_rank = [rank_micro_batches([mb], m, world, r)[0] for r in range(world)]
                assert sorted(i for p in per_rank for i in p) == sorted(mb)
                assert all(1 <= len(p) <= m for p in per_rank)
                # Sorted longest first: micro-batches hold neighbours in length.
                assert [lengths[i] for i in mb] == sorted((lengths[i] for i in mb), reverse=True)


def test_plans_are_deterministic_and_seeded() -> None:
    lengths = [(i * 37) % 101 + 1 for i in range(500)]
    plan = plan_batches(lengths, 4, 2, 1, seed=3, epoch=0)
    assert plan == plan_batches(lengths, 4, 2, 1, seed=3, epoch=0)
    assert step_sets(plan) != step_sets(plan_batches(lengths, 4, 2, 1, seed=4, epoch=0))
    assert step_sets(plan) != step_sets(plan_batches(lengths, 4, 2, 1, seed=3, epoch=1))
    # The step holding the longest example goes first.
    assert max(lengths) in [lengths[i] for mb in plan[0] for i in mb]


def test_padding_fraction() -> None:
    assert padding_fraction([[3, 3], [1]]) == 0.0
    assert padding_fraction([[4, 2], [1, 1]]) == pytest.approx(1 - 8 / 10)
    assert padding_fraction([]) == 0.0


def test_length_grouping_cuts_padding_on_gsm8k(qwen_tokenizer: PreTrainedTokenizerFast) -> None:
    examples, report = load_dataset_for_training(GSM8K, qwen_tokenizer, fmt(max_seq_len=1024))
    assert report.num_examples == 512 and report.num_without_eos == 0
    lengths = [len(e) for e in examples]
    in_order, grouped = epoch_padding_fractions(lengths, micro_batch_size=8, grad_accum_steps=2)
    assert grouped < in_order / 3, (in_order, grouped)


def test_examples_with_nothing_to_train_are_dropped_or_refused(
    tmp_path: Path, nobos_tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    # Without a BOS, an empty prompt and response is just [EOS]: nothing precedes the
    # trained token to predict it from, and a micro-batch of such rows is 0 tokens wide.
    empty = {"prompt": "", "response": ""}
    only_empty = write_jsonl(tmp_path / "empty.jsonl", [empty])
    with pytest.raises(ValueError, match=r"no example left to train: .* first .*empty.jsonl:1"):
        load_dataset_for_training(only_empty, nobos_tokenizer, fmt())
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "Q:", "response": " 4"}, empty])
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        examples, _ = load_dataset_for_training(mixed, nobos_tokenizer, fmt())
    assert [e.source for e in examples] == [f"{mixed}:1"]
    assert any(f"{mixed}:2" in r.getMessage() for r in caplog.records)
