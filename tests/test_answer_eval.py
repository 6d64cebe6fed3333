"""Generation-based evaluation: summary math, sample rows, batching and seeds, data files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerFast

import posttrain.evaluation.answers as answer_eval
from posttrain.evaluation.answers import (
    SAMPLE_FIELDS,
    evaluate_answers,
    format_summary_table,
    load_eval_data,
    summarize_samples,
    write_generations,
)
from posttrain.generation.decode import Sample, generate
from posttrain.generation.prompts import chat_prompt_ids
from posttrain.rewards import RewardError, exact_reward, get_reward_fn, gsm8k_reward

PROMPTS = [
    "Hello",
    "Hello, world! The quick brown fox",
    "Hi",
    "Question: What is 12 + 30? Answer:",
    "Reverse the word: posttrain ->",
]


def row(index, sample, reward, answer, fmt, tokens, truncated, entropy) -> dict:
    return {
        "index": index,
        "sample": sample,
        "reward": reward,
        "answer_reward": answer,
        "format_reward": fmt,
        "num_tokens": tokens,
        "truncated": truncated,
        "mean_entropy": entropy,
    }


def test_summary_math_by_hand() -> None:
    samples = [
        row(0, 0, 1.0, 1.0, 1.0, 10, False, 1.0),
        row(0, 1, 0.0, 0.0, 1.0, 20, True, 2.0),
        # A shaped reward: 0.2 counts towards accuracy, but the answer is wrong.
        row(1, 0, 0.0, 0.0, 0.0, 30, False, 3.0),
        row(1, 1, 0.2, 0.0, 1.0, 40, False, 4.0),
        row(2, 0, 1.0, 1.0, 1.0, 50, False, 5.0),
        row(2, 1, 1.0, 1.0, 1.0, 60, False, 6.0),
    ]
    summary = summarize_samples(samples, n=2, seconds=2.0)
    assert summary == pytest.approx(
        {
            "accuracy": 3.2 / 6,
            "format_rate": 5 / 6,
            "answer_accuracy": 3 / 6,
            "pass@2": 2 / 3,  # prompts 0 and 2 have a right answer
            "mean@2": (0.5 + 0.1 + 1.0) / 3,
            "mean_response_length": 210 / 6,
            "mean_response_length_correct": (10 + 50 + 60) / 3,
            "mean_response_length_incorrect": (20 + 30 + 40) / 3,
            "truncated_fraction": 1 / 6,
            "mean_entropy": 3.5,
            "num_prompts": 3,
            "num_samples": 6,
            "n": 2,
            "generated_tokens": 210,
            "seconds": 2.0,
            "generated_tokens_per_s": 105.0,
        }
    )
    assert list(summary)[:5] == ["accuracy", "format_rate", "answer_accuracy", "pass@2", "mean@2"]
    # n = 1: no pass@k / mean@k; lengths by correctness only where such samples exist.
    single = summarize_samples([row(0, 0, 0.0, 0.0, 0.0, 7, True, 1.0)], n=1, seconds=1.0)
    assert "pass@1" not in single and "mean_response_length_correct" not in single
    assert single["mean_response_length_incorrect"] == 7
    table = format_summary_table(summary)
    assert "pass@2                          0.6667" in table
    assert "num_samples                     6" in table


class StubGenerate:
    """Stands in for `generate`: answer k of each prompt is `ANSWERS[prompt][k]`; records
    each call's prompts (as text) and seed."""

    ANSWERS: ClassVar[dict[str, list[str]]] = {
        "Hello": ["a", "b"],
        "Hello, world! The quick brown fox": ["fox", "fox"],
        "Hi": ["x", "Hi"],
        "Question: What is 12 + 30? Answer:": ["41", "42"],
        "Reverse the word: posttrain ->": ["?", "?"],
    }

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.calls: list[tuple[list[str], int]] = []

    def __call__(self, model, tokenizer, prompts, *, seed, n, max_new_tokens, **kw):
        texts = [self.tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        self.calls.append((texts, seed))
        return [
            [
                Sample(a, [1] * (len(a) + k), len(a) + k, "eos", k == 1, 0.5 + k)
                for k, a in enumerate(self.ANSWERS[t][:n])
            ]
            for t in texts
        ]


def test_evaluate_scores_orders_and_summarises(tiny_llama, llama_tokenizer, monkeypatch) -> None:
    stub = StubGenerate(llama_tokenizer)
    monkeypatch.setattr(answer_eval, "generate", stub)
    golds = ["b", "fox", "Hi", "42", "!"]
    result = evaluate_answers(
        tiny_llama, llama_tokenizer, PROMPTS, golds, exact_reward, n=2, temperature=1.0,
        seed=7, batch_size=2,
    )  # fmt: skip
    # Batches of 2 prompts, longest first, seeded seed + batch number as `generate` does.
    lengths = [len(llama_tokenizer(p)["input_ids"]) for p in PROMPTS]
    order = sorted(range(5), key=lambda i: -lengths[i])
    expected = [([PROMPTS[i] for i in order[b * 2 : b * 2 + 2]], 7 + b) for b in range(3)]
    assert stub.calls == expected
    rows = result.samples
    assert [(r["index"], r["sample"]) for r in rows] == [(i, k) for i in range(5) for k in (0, 1)]
    assert all(tuple(r) == SAMPLE_FIELDS for r in rows)
    assert rows[1] == {
        "index": 0, "sample": 1, "prompt": "Hello", "response": "b", "gold": "b",
        "reward": 1.0, "format_reward": 1.0, "answer_reward": 1.0, "num_tokens": 2,
        "truncated": True, "finish_reason": "eos", "mean_entropy": 1.5,
    }  # fmt: skip
    s = result.summary
    assert s["accuracy"] == s["answer_accuracy"] == s["mean@2"] == pytest.approx(5 / 10)
    assert s["pass@2"] == pytest.approx(4 / 5)  # every prompt but the last has a right sample
    assert s["format_rate"] == 1.0 and s["truncated_fraction"] == 0.5
    # Sample k is k tokens longer than its text: "b" + 1, "fox", "fox" + 1, "Hi" + 1, "42" + 1.
    lengths_right = [2, 3, 4, 3, 3]
    assert s["mean_response_length_correct"] == pytest.approx(sum(lengths_right) / 5)
    assert s["num_prompts"] == 5 and s["num_samples"] == 10
    assert s["generated_tokens"] == sum(r["num_tokens"] for r in rows)


def test_a_failing_reward_stops_the_run_naming_the_prompt(
    tiny_llama, llama_tokenizer, monkeypatch
) -> None:
    monkeypatch.setattr(answer_eval, "generate", StubGenerate(llama_tokenizer))

    def picky(response: str, gold: str) -> dict[str, float]:
        if gold == "boom":
            raise KeyError("no such answer")
        return exact_reward(response, gold)

    golds = ["b", "fox", "boom", "42", "!"]
    with pytest.raises(RewardError, match=r"prompt 2: reward function .*picky failed on example"):
        evaluate_answers(tiny_llama, llama_tokenizer, PROMPTS, golds, picky)


def test_greedy_and_sampled_eval_equal_generate(
    tiny_llama: PreTrainedModel, llama_tokenizer: PreTrainedTokenizerFast
) -> None:
    golds = ["x"] * len(PROMPTS)
    for settings in ({}, {"n": 2, "temperature": 1.0, "seed": 3}):
        result = evaluate_answers(
            tiny_llama, llama_tokenizer, PROMPTS, golds, exact_reward, max_new_tokens=6,
            batch_size=2, stop=["e"], **settings,
        )  # fmt: skip
        direct = generate(
            tiny_llama, llama_tokenizer, PROMPTS, max_new_tokens=6, batch_size=2, stop=["e"],
            **settings,
        )  # fmt: skip
        flat = [s for samples in direct for s in samples]
        assert len(result.samples) == len(flat)
        for got, want in zip(result.samples, flat, strict=True):
            assert got["response"] == want.text
            assert got["num_tokens"] == want.num_tokens
            assert got["finish_reason"] == want.finish_reason
            assert got["mean_entropy"] == want.mean_entropy


def test_token_id_prompts_are_decoded_in_the_rows(
    tiny_qwen2: PreTrainedModel, nobos_tokenizer: PreTrainedTokenizerFast
) -> None:
    ids = chat_prompt_ids(nobos_tokenizer, ["Hi"])
    result = evaluate_answers(
        tiny_qwen2, nobos_tokenizer, ids, ["x"], exact_reward, max_new_tokens=2
    )
    assert result.samples[0]["prompt"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"golds": ["a"]}, "5 prompts but 1 gold answers"),
        ({"n": 2}, "n = 2 needs temperature > 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
        ({"top_p": 0.0, "temperature": 1.0}, "top_p must be in"),
        ({"golds": [1, 2, 3, 4, 5]}, "gold answer 0 is a int"),
        ({"prompts": [], "golds": []}, "no prompts to evaluate"),
        ({"prompts": [""] * 5}, "prompt 0 encodes to no tokens"),
    ],
)
def test_bad_arguments_are_value_errors(tiny_qwen2, nobos_tokenizer, kwargs, message) -> None:
    args = {"prompts": PROMPTS, "golds": ["a"] * 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        evaluate_answers(
            tiny_qwen2, nobos_tokenizer, args.pop("prompts"), args.pop("golds"), exact_reward,
            **args,
        )  # fmt: skip


# --------------------------------------------------------------------------- data


def test_eval_data_fields_fallbacks_and_limit(tmp_path) -> None:
    path = tmp_path / "gsm.jsonl"
    rows = [
        {"question": "q0", "answer": "work\n#### 18"},
        {"question": "q1", "answer": 7},
        {"question": "q2", "answer": "3"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = load_eval_data(path, limit=2)  # 'prompt' left at default: 'question' is used
    assert data.questions == ["q0", "q1"]
    assert data.golds == ["work\n#### 18", "7"]
    assert data.sources == [f"{path}:1", f"{path}:2"]
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps([{"prompt": "p", "response": "r"}]), encoding="utf-8")
    assert load_eval_data(sft).golds == ["r"]  # 'answer' left at default: 'response'


def test_eval_data_errors_name_the_file_line_and_fields(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{"question": "q", "solution": "2"}\n')
    with pytest.raises(
        ValueError, match=r"bad.jsonl:2: missing field 'answer' \(nor 'response', 'completion'\)"
    ):
        load_eval_data(path)
    with pytest.raises(ValueError, match="fields present: 'question', 'solution'"):
        load_eval_data(path)
    with pytest.raises(ValueError, match="Set --eval-answer-field"):
        load_eval_data(path, flags=("--eval-prompt-field", "--eval-answer-field"))
    path.write_text('{"question": null, "answer": "1"}\n')
    with pytest.raises(
        ValueError, match=r"bad.jsonl:1: field 'question' must be a string, got null"
    ):
        load_eval_data(path)
    path.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_eval_data(path)


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_one_field_rule_reads_the_shared_gsm8k_files_as_they_are() -> None:
    """GSM8K's test set (question / answer) and the training file (prompt / completion)
    both work without naming a field: the README says so for eval and for sft."""
    test = load_eval_data(SHARED / "gsm8k_test.jsonl", limit=3)
    first = json.loads((SHARED / "gsm8k_test.jsonl").read_text().splitlines()[0])
    assert (test.questions[0], test.golds[0]) == (first["question"], first["answer"])
    train = load_eval_data(SHARED / "gsm8k_512.jsonl", limit=3)
    first = json.loads((SHARED / "gsm8k_512.jsonl").read_text().splitlines()[0])
    assert (train.questions[0], train.golds[0]) == (first["prompt"], first["completion"])
    # Scorable by gsm8k: every gold of both files ends in '#### <number>'.
    assert len(load_eval_data(SHARED / "gsm8k_test.jsonl", reward_fn=gsm8k_reward).golds) > 1000
    load_eval_data(SHARED / "gsm8k_512.jsonl", reward_fn=gsm8k_reward)


def test_field_rule_order_and_explicit_fields_win(tmp_path) -> None:
    row = {"prompt": "p", "question": "q", "answer": "a", "response": "r", "completion": "c"}
    path = tmp_path / "all.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    data = load_eval_data(path)
    assert (data.questions, data.golds) == (["p"], ["a"])
    path.write_text(json.dumps({"question": "q", "response": "r", "completion": "c"}) + "\n")
    assert (load_eval_data(path).questions, load_eval_data(path).golds) == (["q"], ["r"])
    # A field that is named is used, or missing: no fallback behind an explicit flag.
    assert load_eval_data(path, "question", "completion").golds == ["c"]
    with pytest.raises(ValueError, match=r"all.jsonl:1: missing field 'prompt'; fields present"):
        load_eval_data(path, prompt_field="prompt")


def test_gold_answers_are_checked_against_the_reward_before_generating(tmp_path) -> None:
    path = tmp_path / "mmlu.jsonl"
    rows = [{"question": "q1", "answer": "A"}, {"question": "q2", "answer": "Paris"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(
        ValueError,
        match=rf"{path}:2: gold answer 'Paris' is not a valid gold for reward 'mmlu': it must "
        "be one option letter, A to D",
    ):
        load_eval_data(path, reward_fn=get_reward_fn("mmlu"))
    assert load_eval_data(path, reward_fn=get_reward_fn("exact")).golds == ["A", "Paris"]


def test_evaluate_answers_checks_golds_before_generating(monkeypatch) -> None:
    def no_generation(*args, **kwargs):
        raise AssertionError("generated before the golds were checked")

    monkeypatch.setattr(answer_eval, "generate", no_generation)
    with pytest.raises(ValueError, match="gold answer 1 'Paris' is not a valid gold for reward"):
        evaluate_answers(None, None, ["q1", "q2"], ["B", "Paris"], get_reward_fn("mmlu"))


def test_eval_data_reads_parquet(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", "2"]}), path)
    data = load_eval_data(path, answer_field="answer")
    assert (data.questions, data.golds) == (["a", "b"], ["1", "2"])
    assert data.sources[1] == f"{path}:row 1"


def test_write_generations_is_jsonl(tmp_path) -> None:
    rows = [{"index": 0, "response": "é"}, {"index": 1, "response": "x"}]
    path = write_generations(tmp_path / "g.jsonl", rows)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows


def test_generation_eval_during_sft_takes_the_field_rule_and_checks_golds(
    tmp_path, nobos_tokenizer
) -> None:
    """`posttrain sft --eval-generate-file gsm8k_test.jsonl --reward gsm8k` stopped at
    "missing field 'response'": no field given now means the one rule."""
    from posttrain.evaluation.hooks import prepare_generation_eval

    kwargs = dict(limit=3, template=None, max_new_tokens=8, out_dir=tmp_path)
    test_file = SHARED / "gsm8k_test.jsonl"
    first = json.loads(test_file.read_text(encoding="utf-8").splitlines()[0])
    spec = prepare_generation_eval(
        str(test_file),
        nobos_tokenizer,
        prompt_field=None,
        answer_field=None,
        reward="gsm8k",
        **kwargs,
    )
    assert spec.prompts[0] == first["question"] and spec.golds[0] == first["answer"]
    with pytest.raises(ValueError, match=r"gsm8k_test.jsonl:1: gold answer .* reward 'mmlu'"):
        prepare_generation_eval(
            str(test_file),
            nobos_tokenizer,
            prompt_field=None,
            answer_field=None,
            reward="mmlu",
            **kwargs,
        )
