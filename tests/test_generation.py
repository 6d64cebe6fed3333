"""The batched generation engine: batching, sampling, stopping, entropy, input checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from posttrain.generation.decode import Sample, generate, greedy_generate
from posttrain.generation.sampling import inverse_cdf_sample, logits_entropy, sample_next_tokens
from posttrain.models.tiny import tiny_causal_lm

# Mixed lengths, so every batch of more than one prompt is left-padded.
PROMPTS = [
    "Hello",
    "Hello, world! The quick brown fox",
    "Hi",
    "Question: What is 12 + 30? Answer:",
    "Reverse the word: posttrain ->",
    "unicode: héllo wörld",
]


@pytest.fixture(scope="module")
def peaky_llama(llama_tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """Large initial weights: next-token entropies near 3 nats rather than log(vocab), so
    entropies and sampled texts differ visibly from step to step."""
    return tiny_causal_lm(
        "llama", vocab_size=len(llama_tokenizer), hidden_size=32, seed=2, initializer_range=0.5
    )


@pytest.fixture(scope="module")
def peaky_qwen2(nobos_tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    return tiny_causal_lm(
        "qwen2",
        vocab_size=len(nobos_tokenizer),
        hidden_size=32,
        tie_word_embeddings=True,
        seed=3,
        initializer_range=0.5,
    )


def argmax_loop(model: PreTrainedModel, ids: list[int], steps: int) -> list[int]:
    """Greedy continuation by full forward passes: no cache, no padding, no `generate`."""
    new_ids: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids + new_ids])).logits
            new_ids.append(int(logits[0, -1].argmax()))
    return new_ids


def first_new_token_at(ids: list[int], start: int) -> int:
    """The first index >= `start` whose token did not occur earlier in `ids`."""
    return next(k for k in range(start, len(ids)) if ids[k] not in ids[:k])


# --------------------------------------------------------------------------- greedy


@pytest.mark.parametrize(
    ("model_name", "tokenizer_name"),
    [
        ("tiny_llama", "llama_tokenizer"),  # BOS, no pad token
        ("tiny_qwen2", "nobos_tokenizer"),  # no BOS, a pad token
        ("peaky_llama", "llama_tokenizer"),
        ("peaky_qwen2", "nobos_tokenizer"),
    ],
)
def test_batched_greedy_equals_one_prompt_at_a_time(
    model_name: str, tokenizer_name: str, request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue(model_name)
    tokenizer = request.getfixturevalue(tokenizer_name)
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=4)
    # The first batch (the four longest prompts) needs padding.
    lengths = sorted((len(tokenizer(p)["input_ids"]) for p in PROMPTS), reverse=True)
    assert len(set(lengths[:4])) > 1
    for prompt, samples in zip(PROMPTS, batched, strict=True):
        (alone,) = generate(model, tokenizer, [prompt], max_new_tokens=10, batch_size=1)[0]
        (sample,) = samples
        assert sample.token_ids == alone.token_ids
        assert sample.text == alone.text
        assert sample.finish_reason == alone.finish_reason
        assert sample.mean_entropy == pytest.approx(alone.mean_entropy, abs=1e-4)


def test_greedy_generate_is_the_argmax_loop_cut_at_eos(
    tiny_llama: PreTrainedModel, llama_tokenizer: PreTrainedTokenizerFast
) -> None:
    """Moved from test_demo.py: batched `greedy_generate` against a plain argmax loop."""
    batched = greedy_generate(tiny_llama, llama_tokenizer, PROMPTS, max_new_tokens=6, batch_size=2)
    for prompt, completion in zip(PROMPTS, batched, strict=True):
        new_ids = argmax_loop(tiny_llama, llama_tokenizer(prompt)["input_ids"], 6)
        eos = llama_tokenizer.eos_token_id
        cut = new_ids.index(eos) if eos in new_ids else len(new_ids)
        assert completion == llama_tokenizer.decode(new_ids[:cut], skip_special_tokens=True)


def test_token_id_prompts_are_used_as_given(
    peaky_qwen2: PreTrainedModel, nobos_tokenizer: PreTrainedTokenizerFast
) -> None:
    ids = [nobos_tokenizer(p)["input_ids"] for p in PROMPTS]
    from_text = generate(peaky_qwen2, nobos_tokenizer, PROMPTS, max_new_tokens=5)
    from_ids = generate(peaky_qwen2, nobos_tokenizer, ids, max_new_tokens=5)
    assert [s[0].token_ids for s in from_ids] == [s[0].token_ids for s in from_text]


def test_progress_counts_prompts_and_training_mode_is_restored(
    llama_tokenizer: PreTrainedTokenizerFast,
) -> None:
    model = tiny_causal_lm("llama", vocab_size=len(llama_tokenizer), hidden_size=32, seed=0)
    model.train()
    done: list[int] = []
    generate(model, llama_tokenizer, PROMPTS, max_new_tokens=2, batch_size=4, progress=done.append)
    assert done == [4, 2] and model.training


# --------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_from_the_seed_alone(
    peaky_llama: PreTrainedModel, llama_tokenizer: PreTrainedTokenizerFast
) -> None:
    def texts(seed: int) -> list[list[str]]:
        samples = generate(
            peaky_llama, llama_tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, n=3,
            seed=seed, batch_size=4,
        )  # fmt: skip
        assert [len(s) for s in samples] == [3] * len(PROMPTS)
        return [[x.text for x in s] for s in samples]

    state = torch.get_rng_state()
    first = texts(seed=5)
    assert torch.equal(torch.get_rng_state(), state), "the caller's RNG state moved"
    torch.rand(100)  # other users of the global generator change nothing
    assert texts(seed=5) == first
    assert texts(seed=6) != first
    # Samples of one prompt differ from each other.
    assert any(len(set(s)) > 1 for s in first)


def test_samples_come_back_per_prompt_in_input_order(
    peaky_qwen2: PreTrainedModel, nobos_tokenizer: PreTrainedTokenizerFast
) -> None:
    """A nucleus this small keeps only the top token: every sample is its prompt's greedy
    continuation, whatever order the batches ran in."""
    greedy = generate(peaky_qwen2, nobos_tokenizer, PROMPTS, max_new_tokens=6)
    sampled = generate(
        peaky_qwen2, nobos_tokenizer, PROMPTS, max_new_tokens=6, temperature=1.0, top_p=1e-9,
        n=2, batch_size=4,
    )  # fmt: skip
    for g, s in zip(greedy, sampled, strict=True):
        assert [x.token_ids for x in s] == [g[0].token_ids] * 2


def test_inverse_cdf_sample_draws_in_proportion_to_the_weights() -> None:
    """300 entries: two full blocks and a partial one; zero weights inside and at the ends."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(300, generator=generator) ** 4
    weights[[0, 5, 127, 128, 200, 299]] = 0.0
    weights[255:] = 0.0
    weights[140] = 3.0  # one entry with a large share
    rows = 40_000
    uniform = torch.rand(rows, dtype=torch.float64, generator=generator)
    drawn = inverse_cdf_sample(weights.expand(rows, -1).contiguous(), uniform)
    assert drawn.dtype == torch.int64 and drawn.shape == (rows,)
    counts = torch.bincount(drawn, minlength=300).double()
    assert counts[weights == 0].sum() == 0
    expected = rows * weights.double() / weights.double().sum()
    # Binomial counts: every entry within 5 standard deviations (+1 for tiny expectations).
    assert ((counts - expected).abs() <= 5 * expected.sqrt() + 1).all()


def test_inverse_cdf_sample_at_the_ends_of_the_unit_interval() -> None:
    """u = 0 and the largest u below 1 pick the first and last entries with weight, never a
    zero-weight entry, whatever the float rounding of the block sums."""
    weights = torch.zeros(3, 400)
    weights[0, [3, 390]] = 1.0
    weights[1, 256] = 1e-30
    weights[2, [0, 399]] = torch.tensor([1e-3, 1e3])
    largest = torch.tensor(1.0, dtype=torch.float64).nextafter(
        torch.tensor(0.0, dtype=torch.float64)
    )
    for u, expected in ((0.0, [3, 256, 0]), (float(largest), [390, 256, 399])):
        drawn = inverse_cdf_sample(weights, torch.full((3,), u, dtype=torch.float64))
        assert drawn.tolist() == expected


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sample_next_tokens_follows_softmax_at_the_temperature(temperature: float) -> None:
    generator = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(1, 50, generator=generator)
    logits[0, 7] = float("-inf")  # a masked token is never drawn
    rows = 30_000
    scores = logits.expand(rows, -1).contiguous()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokens, entropy = sample_next_tokens(scores.clone(), temperature, 1.0, True)
    counts = torch.bincount(tokens, minlength=50).double()
    expected = rows * (logits[0].double() / temperature).softmax(-1)
    assert counts[7] == 0
    assert ((counts - expected).abs() <= 5 * expected.sqrt() + 1).all()
    # The entropy is the raw logits' (temperature 1), whatever the sampling temperature.
    assert entropy is not None
    torch.testing.assert_close(entropy, logits_entropy(scores))


def test_sample_next_tokens_keeps_hugging_faces_nucleus() -> None:
    """top_p draws only from the tokens `TopPLogitsWarper` keeps, and from all of them."""
    from transformers import TopPLogitsWarper

    generator = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(4, 40, generator=generator)
    rows = 4_000
    for top_p in (0.3, 0.8):
        kept = TopPLogitsWarper(top_p)(None, logits.clone()).isfinite()
        scores = logits.repeat_interleave(rows, dim=0)
        tokens, entropy = sample_next_tokens(scores, 1.0, top_p, False)
        assert entropy is None
        for r in range(4):
            drawn = set(tokens[r * rows : (r + 1) * rows].tolist())
            assert drawn == set(kept[r].nonzero()[:, 0].tolist())


def test_entropy_recording_is_optional_and_changes_no_sample(
    peaky_llama: PreTrainedModel, llama_tokenizer: PreTrainedTokenizerFast
) -> None:
    for temperature in (0.0, 1.0):
        kwargs = {"max_new_tokens": 6, "temperature": temperature, "n": 1 + (temperature > 0)}
        kept = generate(peaky_llama, llama_tokenizer, PROMPTS, **kwargs, seed=3)
        lean = generate(
            peaky_llama, llama_tokenizer, PROMPTS, **kwargs, seed=3, record_entropy=False
        )
        assert [[x.token_ids for x in s] for s in lean] == [[x.token_ids for x in s] for s in kept]
        assert all(math.isnan(x.mean_entropy) for s in lean for x in s)
        assert all(0.5 < x.mean_entropy < 5.0 for s in kept for x in s)


# --------------------------------------------------------------------------- stopping


def test_a_stop_string_ends_the_text_and_is_kept(
    peaky_llama: PreTrainedModel, llama_tokenizer: PreTrainedTokenizerFast
) -> None:
    prompt = PROMPTS[1]
    (free,) = generate(peaky_llama, llama_tokenizer, [prompt], max_new_tokens=12)[0]
    assert free.finish_reason == "length" and free.truncated and free.num_tokens == 12
    ids = free.token_ids
    pieces = [llama_tokenizer.decode([t]) for t in ids]
    # A stop string across a token boundary: the last character of one ASCII token and
    # the first of the next.
    k = next(
        k
        for k in range(2, len(ids))
        if all(p.isascii() and p.isprintable() and p for p in pieces[k - 1 : k + 1])
    )
    stop = pieces[k - 1][-1] + pieces[k][0]
    full = llama_tokenizer.decode(ids[: k + 1])
    expected = full[: full.find(stop) + len(stop)]
    (cut,) = generate(
        peaky_llama, llama_tokenizer, [prompt], max_new_tokens=12, stop=["#never#", stop]
    )[0]
    assert cut.finish_reason == "stop" and not cut.truncated
    assert cut.text == expected and cut.text.endswith(stop)
    assert cut.token_ids == ids[: cut.num_tokens] and cut.num_tokens <= k + 1
    # The last token completed the stop string.
    assert stop in llama_tokenizer.decode(cut.token_ids)
    assert stop not in llama_tokenizer.decode(cut.token_ids[:-1])

    # Several stop strings: the occurrence that ends first wins.
    stops = [p for p in pieces if p.isascii() and p.isprintable() and p] + [stop]
    end = min(free.text.find(x) + len(x) for x in stops if x in free.text)
    (first,) = generate(peaky_llama, llama_tokenizer, [prompt], max_new_tokens=12, stop=stops)[0]
    assert first.finish_reason == "stop" and first.text == free.text[:end]


def test_stop_strings_far_into_a_long_generation(
    peaky_qwen2: PreTrainedModel, nobos_tokenizer: PreTrainedTokenizerFast
) -> None:
    """Past the criterion's window of last tokens, the cut is still the first prefix whose
    text contains the stop string."""
    prompt = PROMPTS[3]
    (free,) = generate(peaky_qwen2, nobos_tokenizer, [prompt], max_new_tokens=48)[0]
    ids = free.token_ids
    prefixes = [nobos_tokenizer.decode(ids[:t], skip_special_tokens=True) for t in range(49)]
    candidates = {
        text[i : i + 2]
        for text in prefixes[30:]
        for i in range(len(text) - 1)
        if text[i : i + 2].isascii() and text[i : i + 2].isprintable()
    }
    late = sorted(c for c in candidates if c not in prefixes[24])[:5]
    assert late, "no stop string candidate beyond the window"
    for stop in late:
        t = next(t for t, text in enumerate(prefixes) if stop in text)
        (cut,) = generate(peaky_qwen2, nobos_tokenizer, [prompt], max_new_tokens=48, stop=[stop])[0]
        assert cut.finish_reason == "stop" and cut.token_ids == ids[:t]
        assert cut.text == prefixes[t][: prefixes[t].find(stop) + len(stop)]


def test_a_prompt_ending_in_half_a_stop_string_does_not_stop_it(
    peaky_llama: PreTrainedModel, llama_tokenizer: PreTrainedTokenizerFast
) -> None:
    """The stop string spans the prompt's last character and the response's first: only
    generated text counts (transformers' `stop_strings` would stop after one token)."""
    free = generate(peaky_llama, llama_tokenizer, PROMPTS, max_new_tokens=6)
    prompt, stop = next(
        (p, p[-1] + s.text[0])
        for p, (s,) in zip(PROMPTS, free, strict=True)
        if s.text[:1].isascii() and s.text[:1].isprintable() and p[-1] + s.text[0] not in s.text
    )
    (sample,) = generate(peaky_llama, llama_tokenizer, [prompt], max_new_tokens=6, stop=[stop])[0]
    assert sample.finish_reason == "length" and sample.num_tokens == 6


def test_eos_and_extra_stop_tokens_end_generation(
    peaky_llama: PreTrainedModel, llama_tokenizer: PreTrainedTokenizerFast
) -> None:
    prompt = PROMPTS[3]
    (free,) = generate(peaky_llama, llama_tokenizer, [prompt], max_new_tokens=12)[0]
    eos = llama_tokenizer.eos_token_id
    assert eos not in free.token_ids
    k = first_new_token_at(free.token_ids, 2)
    token = free.token_ids[k]
    (extra,) = generate(
        peaky_llama, llama_tokenizer, [prompt], max_new_tokens=12, stop_token_ids=[token]
    )[0]
    assert extra.finish_reason == "eos" and extra.token_ids == free.token_ids[: k + 1]
    assert extra.text == llama_tokenizer.decode(free.token_ids[:k], skip_special_tokens=True)

    # The model's own EOS: make its output row a scaled copy of the token's row.
    model = copy.deepcopy(peaky_llama)
    with torch.no_grad():
        model.lm_head.weight[eos] = 1.5 * model.lm_head.weight[token]
    (sample,) = generate(model, llama_tokenizer, [prompt], max_new_tokens=12)[0]
    assert sample.finish_reason == "eos" and sample.token_ids[-1] == eos
    assert (
        sample.token_ids
        == argmax_loop(model, llama_tokenizer(prompt)["input_ids"], 12)[: sample.num_tokens]
    )
    assert "</s>" not in sample.text
    assert sample.text == llama_tokenizer.decode(sample.token_ids[:-1])


def test_no_eos_and_no_stop_ids_is_an_error(
    peaky_qwen2: PreTrainedModel, nobos_tokenizer: PreTrainedTokenizerFast
) -> None:
    tokenizer = copy.deepcopy(nobos_tokenizer)
    tokenizer.eos_token = None
    assert tokenizer.eos_token_id is None and peaky_qwen2.generation_config.eos_token_id is None
    with pytest.raises(ValueError, match="no EOS"):
        generate(peaky_qwen2, tokenizer, ["Hi"], max_new_tokens=3)
    (sample,) = generate(peaky_qwen2, tokenizer, ["Hi"], max_new_tokens=3, stop_token_ids=[7])[0]
    assert sample.num_tokens <= 3


# --------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_mean_entropy_is_that_of_the_raw_logits(
    peaky_llama: PreTrainedModel, llama_tokenizer: PreTrainedTokenizerFast, temperature: float
) -> None:
    samples = generate(
        peaky_llama, llama_tokenizer, PROMPTS, max_new_tokens=7, temperature=temperature,
        top_p=0.9 if temperature else 1.0, batch_size=3,
    )  # fmt: skip
    for prompt, (sample,) in zip(PROMPTS, samples, strict=True):
        ids = llama_tokenizer(prompt)["input_ids"]
        with torch.inference_mode():
            logits = peaky_llama(input_ids=torch.tensor([ids + sample.token_ids])).logits[0]
        at_generated = logits[len(ids) - 1 : len(ids) - 1 + sample.num_tokens].double()
        probs = at_generated.softmax(-1)
        reference = float(-(probs * probs.log()).sum(-1).mean())
        assert sample.mean_entropy == pytest.approx(reference, abs=1e-4)
        assert 0.5 < sample.mean_entropy < 5.0


def test_logits_entropy_handles_masked_entries() -> None:
    logits = torch.tensor([[0.0, 0.0, float("-inf")], [5.0, float("-inf"), float("-inf")]])
    entropy = logits_entropy(logits.to(torch.bfloat16))
    assert entropy.dtype == torch.float32
    torch.testing.assert_close(entropy, torch.tensor([torch.log(torch.tensor(2.0)), 0.0]))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("prompts", "kwargs", "match"),
    [
        (["Hi"], {"max_new_tokens": 0}, "max_new_tokens"),
        (["Hi"], {"temperature": -0.1}, "temperature"),
        (["Hi"], {"temperature": float("nan")}, "temperature"),
        (["Hi"], {"top_p": 0.0}, "top_p"),
        (["Hi"], {"top_p": 1.5}, "top_p"),
        (["Hi"], {"n": 0}, "n must"),
        (["Hi"], {"n": 2}, "temperature > 0"),
        (["Hi"], {"batch_size": 0}, "batch_size"),
        (["Hi", ""], {"add_special_tokens": False}, "prompt 1 encodes to no tokens"),
        (["Hi", []], {}, "prompt 1 encodes to no tokens"),
        ([[1, 99999]], {}, "prompt 0 has token ids outside"),
        ([[1, 2.5]], {}, "prompt 0 is neither"),
        ("Hi", {}, "not one string"),
        (["Hi"], {"stop": [""]}, "stop strings"),
        (["Hi"], {"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_bad_input_is_a_value_error(
    tiny_qwen2: PreTrainedModel,
    nobos_tokenizer: PreTrainedTokenizerFast,
    prompts: object,
    kwargs: dict,
    match: str,
) -> None:
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(tiny_qwen2, nobos_tokenizer, prompts, **kwargs)  # type: ignore[arg-type]


def test_no_prompts_give_no_samples(
    tiny_qwen2: PreTrainedModel, nobos_tokenizer: PreTrainedTokenizerFast
) -> None:
    assert generate(tiny_qwen2, nobos_tokenizer, [], max_new_tokens=2) == []
    assert isinstance(generate(tiny_qwen2, nobos_tokenizer, ["Hi"], max_new_tokens=1)[0][0], Sample)
