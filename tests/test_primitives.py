"""The five primitives against straightforward references, property-tested with hypothesis."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain import (
    build_rollout_batch,
    compute_entropy,
    get_response_log_probs,
    masked_mean,
    masked_normalize,
    sft_microbatch_train_step,
    tokenize_prompt_and_output,
)
from posttrain.ops import full_logits

FIXTURE_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
texts = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=40
)


# --------------------------------------------------------------------------- references


def reference_tokenize(prompts: list[str], outputs: list[str], tokenizer) -> dict[str, list]:
    """The rule written out per example: concatenate, pad with pad (else EOS), shift."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for prompt, output in zip(prompts, outputs, strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        output_ids = tokenizer(output, add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids + output_ids, len(prompt_ids)))
    max_len = max(len(ids) for ids, _ in rows)
    out: dict[str, list] = {"input_ids": [], "labels": [], "response_mask": []}
    for ids, prompt_len in rows:
        full = ids + [pad] * (max_len - len(ids))
        out["input_ids"].append(full[:-1])
        out["labels"].append(full[1:])
        # label j is token j + 1 of the sequence
        out["response_mask"].append(
            [1.0 if prompt_len <= j + 1 < len(ids) else 0.0 for j in range(max_len - 1)]
        )
    return out


def reference_entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(logits.double(), dim=-1)
    p = log_p.exp()
    return -(torch.where(p > 0, p * log_p, 0.0)).sum(-1)


# --------------------------------------------------------------------------- tokenize


def test_tokenize_reproduces_guide_example(qwen_tokenizer) -> None:
    # Row 1 makes the batch's longest sequence 10 tokens, so row 0 (8 tokens) gets 2 pads.
    batch = tokenize_prompt_and_output(
        ["Hello, world!", "Hi there, how are you"], ["Hello, world!", "a b c d"], qwen_tokenizer
    )
    assert batch["input_ids"][0].tolist() == [9707, 11, 1879, 0, 9707, 11, 1879, 0, 151643]
    assert batch["labels"][0].tolist() == [11, 1879, 0, 9707, 11, 1879, 0, 151643, 151643]
    assert batch["response_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0]
    assert batch["input_ids"].dtype == torch.int64
    assert batch["labels"].dtype == torch.int64
    assert batch["response_mask"].dtype == torch.float32
    assert set(batch) == {"input_ids", "labels", "response_mask"}


@pytest.mark.parametrize("tokenizer_name", ["llama_tokenizer", "nobos_tokenizer", "qwen_tokenizer"])
@FIXTURE_SETTINGS
@given(pairs=st.lists(st.tuples(texts, texts), min_size=1, max_size=5))
def test_tokenize_matches_reference(request, tokenizer_name: str, pairs) -> None:
    tokenizer = request.getfixturevalue(tokenizer_name)
    prompts = [p for p, _ in pairs]
    outputs = [o for _, o in pairs]
    if tokenizer.bos_token_id is None and all(p + o == "" for p, o in pairs):
        return  # nothing at all to tokenize; covered by test_tokenize_all_empty
    got = tokenize_prompt_and_output(prompts, outputs, tokenizer)
    want = reference_tokenize(prompts, outputs, tokenizer)
    for key in ("input_ids", "labels", "response_mask"):
        assert got[key].tolist() == want[key], key


def test_tokenize_pads_with_eos_when_no_pad_token(llama_tokenizer) -> None:
    assert llama_tokenizer.pad_token_id is None
    batch = tokenize_prompt_and_output(["a", "a much longer prompt"], ["b", "c"], llama_tokenizer)
    assert batch["labels"][0, -1].item() == llama_tokenizer.eos_token_id
    assert batch["input_ids"][0, -1].item() == llama_tokenizer.eos_token_id


def test_tokenize_bos_tokenizer_starts_rows_with_bos(llama_tokenizer) -> None:
    batch = tokenize_prompt_and_output(["Hello", ""], ["world", "x"], llama_tokenizer)
    assert (batch["input_ids"][:, 0] == llama_tokenizer.bos_token_id).all()
    # An empty prompt still has its BOS, so the first output token is trained.
    out_ids = llama_tokenizer("x", add_special_tokens=False)["input_ids"]
    assert batch["labels"][1, 0].item() == out_ids[0]
    assert batch["response_mask"][1, 0].item() == 1.0


def test_tokenize_empty_prompt_without_bos(nobos_tokenizer) -> None:
    out_ids = nobos_tokenizer("world wide", add_special_tokens=False)["input_ids"]
    batch = tokenize_prompt_and_output(["", "Hello"], ["world wide", "x"], nobos_tokenizer)
    # The first output token has nothing to be predicted from: it is an input, not a label.
    assert batch["input_ids"][0, 0].item() == out_ids[0]
    assert batch["labels"][0, : len(out_ids) - 1].tolist() == out_ids[1:]
    assert batch["response_mask"][0].tolist()[: len(out_ids) - 1] == [1.0] * (len(out_ids) - 1)
    assert batch["response_mask"][0].sum().item() == len(out_ids) - 1
    # The last mask entry is not set by a -1 index (the guide's code writes there).
    assert (
        batch["response_mask"][0, -1].item() == 0.0 or len(out_ids) - 1 == batch["labels"].shape[1]
    )


def test_tokenize_empty_output_has_zero_mask(nobos_tokenizer) -> None:
    batch = tokenize_prompt_and_output(["Hello there", "Hi"], ["", "world"], nobos_tokenizer)
    assert batch["response_mask"][0].sum().item() == 0
    assert batch["response_mask"][1].sum().item() == len(
        nobos_tokenizer("world", add_special_tokens=False)["input_ids"]
    )


def test_tokenize_all_empty(nobos_tokenizer) -> None:
    batch = tokenize_prompt_and_output([""], [""], nobos_tokenizer)
    assert batch["input_ids"].shape == (1, 0)
    assert batch["response_mask"].shape == (1, 0)


def test_tokenize_batch_of_one(llama_tokenizer) -> None:
    batch = tokenize_prompt_and_output(["Question: 2+2?"], [" Answer: 4"], llama_tokenizer)
    prompt = llama_tokenizer("Question: 2+2?")["input_ids"]
    output = llama_tokenizer(" Answer: 4", add_special_tokens=False)["input_ids"]
    n = len(prompt) + len(output) - 1
    assert batch["input_ids"].shape == (1, n)
    assert batch["input_ids"][0].tolist() == (prompt + output)[:-1]
    assert batch["response_mask"][0].tolist() == [0.0] * (len(prompt) - 1) + [1.0] * len(output)


def test_tokenize_chat_template_prompt_uses_special_tokens(qwen_tokenizer) -> None:
    prompt = qwen_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    batch = tokenize_prompt_and_output([prompt], ["4<|im_end|>"], qwen_tokenizer)
    im_start = qwen_tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*batch["input_ids"][0].tolist(), batch["labels"][0, -1].item()]
    assert ids.count(im_start) == 2
    assert ids[0] == im_start
    assert ids[-1] == im_end
    assert batch["labels"][0][batch["response_mask"][0] == 1].tolist()[-1] == im_end


def test_tokenize_unicode_and_emoji(qwen_tokenizer) -> None:
    prompts, outputs = ["日本語で答えて: 🤗?"], ["はい 🚀🚀 naïve café"]
    batch = tokenize_prompt_and_output(prompts, outputs, qwen_tokenizer)
    response = batch["labels"][0][batch["response_mask"][0] == 1].tolist()
    assert qwen_tokenizer.decode(response) == outputs[0]


@pytest.mark.parametrize(
    ("prompts", "outputs", "message"),
    [
        (["a", "b"], ["c"], "differ in length"),
        ([], [], "empty batch"),
        (["a", 3], ["b", "c"], r"prompt_strs\[1\] must be a string"),
        (["a"], [None], r"output_strs\[0\] must be a string"),
        ("abc", ["x", "y", "z"], "must be a list of strings"),
    ],
)
def test_tokenize_bad_input(nobos_tokenizer, prompts, outputs, message) -> None:
    with pytest.raises(ValueError, match=message):
        tokenize_prompt_and_output(prompts, outputs, nobos_tokenizer)


def test_tokenize_needs_pad_or_eos(llama_tokenizer) -> None:
    tokenizer = llama_tokenizer.__class__(tokenizer_object=llama_tokenizer.backend_tokenizer)
    assert tokenizer.pad_token_id is None and tokenizer.eos_token_id is None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        tokenize_prompt_and_output(["a"], ["b"], tokenizer)


# --------------------------------------------------------------------------- entropy


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    vocab=st.integers(1, 50),
    scale=st.sampled_from([0.1, 1.0, 30.0, 1e4]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_entropy_matches_reference(shape, vocab, scale, dtype, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    got = compute_entropy(logits)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == tuple(shape)
    want = reference_entropy(logits)
    tol = 1e-4 * max(1.0, math.log(vocab))
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=1e-4)


def test_entropy_extremes_are_exact() -> None:
    vocab = 1000
    uniform = compute_entropy(torch.zeros(3, vocab))
    torch.testing.assert_close(uniform, torch.full((3,), math.log(vocab)), atol=1e-6, rtol=0)
    one_hot = torch.full((2, vocab), float("-inf"))
    one_hot[:, 7] = 0.0
    assert compute_entropy(one_hot).tolist() == [0.0, 0.0]
    assert compute_entropy(torch.tensor([[1e4, -1e4, 0.0]])).item() == 0.0


def test_entropy_with_masked_vocabulary() -> None:
    logits = torch.randn(4, 6, 32)
    logits[..., 10:] = float("-inf")
    got = compute_entropy(logits)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, compute_entropy(logits[..., :10]), atol=1e-6, rtol=1e-6)
    logits.requires_grad_(True)
    compute_entropy(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[..., 10:] == 0).all()


def test_entropy_gradcheck_float64() -> None:
    logits = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(compute_entropy, (logits,))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), vocab=st.integers(2, 40), seed=st.integers(0, 2**16))
def test_entropy_gradient_matches_reference_across_chunks(rows, vocab, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    weights = torch.randn(rows, generator=g, dtype=torch.float64)
    original = full_logits.rows_per_chunk
    full_logits.rows_per_chunk = lambda vocab: 2  # two rows a chunk: exercise chunk seams
    try:
        x = logits.clone().requires_grad_(True)
        (compute_entropy(x).double() * weights).sum().backward()
    finally:
        full_logits.rows_per_chunk = original
    y = logits.clone().requires_grad_(True)
    (reference_entropy(y) * weights).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-5)


def test_entropy_keeps_no_full_size_float32_copy() -> None:
    # bf16 logits with grad: autograd must hold the input and per-row statistics only,
    # not float32 copies of the logits (the guide's code keeps three).
    logits = torch.randn(4, 16, 512, dtype=torch.bfloat16, requires_grad=True)
    entropy = compute_entropy(logits)
    saved = entropy.grad_fn.saved_tensors
    big = [t for t in saved if t.numel() == logits.numel()]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16
    assert sum(t.numel() for t in saved if t.numel() != logits.numel()) == 2 * 4 * 16
    entropy.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_entropy_rejects_empty_vocab() -> None:
    with pytest.raises(ValueError, match="non-empty last dimension"):
        compute_entropy(torch.zeros(2, 0))


# --------------------------------------------------------------------------- log-probs


def reference_log_probs(model, input_ids, labels) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=input_ids).logits.float()
    log_p = F.log_softmax(logits, dim=-1)
    return log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1), reference_entropy(logits).float()


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen2"])
def test_log_probs_match_reference(request, model_name: str) -> None:
    model = request.getfixturevalue(model_name)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (3, 11), generator=g)
    labels = torch.randint(0, vocab, (3, 11), generator=g)
    with torch.no_grad():
        got = get_response_log_probs(model, input_ids, labels, return_token_entropy=True)
        want_lp, want_h = reference_log_probs(model, input_ids, labels)
    assert set(got) == {"log_probs", "token_entropy"}
    assert got["log_probs"].dtype == torch.float32 and got["log_probs"].shape == (3, 11)
    torch.testing.assert_close(got["log_probs"], want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["token_entropy"], want_h, atol=1e-5, rtol=1e-5)
    assert set(get_response_log_probs(model, input_ids, labels)) == {"log_probs"}


def test_log_probs_with_attention_mask(tiny_llama, llama_tokenizer) -> None:
    batch = tokenize_prompt_and_output(
        ["Hello", "Question: what?"], [" world", " 42"], llama_tokenizer
    )
    mask = (batch["input_ids"] != llama_tokenizer.eos_token_id).long()
    with torch.no_grad():
        masked = get_response_log_probs(
            tiny_llama, batch["input_ids"], batch["labels"], attention_mask=mask
        )["log_probs"]
        plain = get_response_log_probs(tiny_llama, batch["input_ids"], batch["labels"])["log_probs"]
    # Right padding: real positions see the same context either way.
    real = mask.bool()
    torch.testing.assert_close(masked[real], plain[real], atol=1e-5, rtol=1e-5)


def test_log_probs_gradients_reach_parameters(tiny_qwen2) -> None:
    vocab = tiny_qwen2.config.vocab_size
    input_ids = torch.randint(0, vocab, (2, 7))
    labels = torch.randint(0, vocab, (2, 7))
    tiny_qwen2.zero_grad(set_to_none=True)
    out = get_response_log_probs(tiny_qwen2, input_ids, labels, return_token_entropy=True)
    (out["log_probs"].sum() + out["token_entropy"].sum()).backward()
    grads = [p.grad for p in tiny_qwen2.parameters()]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    assert tiny_qwen2.get_input_embeddings().weight.grad.abs().sum() > 0
    tiny_qwen2.zero_grad(set_to_none=True)
    with torch.no_grad():
        out = get_response_log_probs(tiny_qwen2, input_ids, labels, return_token_entropy=True)
    assert not out["log_probs"].requires_grad and out["log_probs"].grad_fn is None
    assert not out["token_entropy"].requires_grad


@pytest.mark.parametrize("bad", [-1, 10_000])
def test_log_probs_reject_out_of_vocab_labels(tiny_llama, bad: int) -> None:
    input_ids = torch.zeros(2, 5, dtype=torch.long)
    labels = torch.zeros(2, 5, dtype=torch.long)
    labels[1, 3] = bad
    with pytest.raises(ValueError, match=f"token id {bad}"):
        get_response_log_probs(tiny_llama, input_ids, labels)


def test_log_probs_reject_mismatched_shapes(tiny_llama) -> None:
    with pytest.raises(ValueError, match="must both be"):
        get_response_log_probs(
            tiny_llama, torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)
        )


# --------------------------------------------------------------------------- masked reductions

mask_dtypes = st.sampled_from([torch.bool, torch.int64, torch.float32])


@settings(max_examples=80, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    mask_dtype=mask_dtypes,
    constant=st.floats(0.1, 100.0) | st.sampled_from([-2.0, 1.0, 7]),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_masked_normalize_matches_reference(shape, mask_dtype, constant, data, seed) -> None:
    dim = data.draw(st.none() | st.integers(-len(shape), len(shape) - 1))
    g = torch.Generator().manual_seed(seed)
    tensor = torch.randn(*shape, generator=g, dtype=torch.float64)
    mask = (torch.rand(*shape, generator=g) > 0.5).to(mask_dtype)
    want = (tensor * mask.double()).sum() if dim is None else (tensor * mask.double()).sum(dim)
    got = masked_normalize(tensor, mask, constant, dim)
    torch.testing.assert_close(got, want / constant)


def test_masked_normalize_guide_example() -> None:
    tensor = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_normalize(tensor, mask, 2.0).item() == 3.5
    assert masked_normalize(tensor, mask, 2.0, dim=1).tolist() == [1.5, 2.0]
    assert masked_normalize(tensor, mask, 2.0, dim=0).tolist() == [2.5, 1.0, 0.0]
    assert masked_normalize(tensor, mask.bool(), torch.tensor(2.0), dim=-1).tolist() == [1.5, 2.0]


def test_masked_normalize_ignores_inf_where_masked() -> None:
    tensor = torch.tensor([[-1.0, float("-inf")], [2.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[1, 0], [1, 0]])
    out = masked_normalize(tensor, mask)
    assert out.item() == 1.0
    out.backward()
    assert tensor.grad.tolist() == [[1.0, 0.0], [1.0, 0.0]]


@pytest.mark.parametrize("constant", [0, 0.0, float("inf"), float("nan"), torch.tensor(0.0)])
def test_masked_normalize_rejects_bad_constant(constant) -> None:
    with pytest.raises(ValueError, match="non-zero finite"):
        masked_normalize(torch.ones(2, 2), torch.ones(2, 2), constant)


@pytest.mark.parametrize("fn", [masked_normalize, masked_mean])
def test_masked_reductions_reject_shape_mismatch(fn) -> None:
    with pytest.raises(ValueError, match="differs from tensor shape"):
        fn(torch.ones(2, 3), torch.ones(2, 1))


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    mask_dtype=mask_dtypes,
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_masked_mean_matches_reference(shape, mask_dtype, data, seed) -> None:
    dim = data.draw(st.none() | st.integers(-len(shape), len(shape) - 1))
    g = torch.Generator().manual_seed(seed)
    tensor = torch.randn(*shape, generator=g, dtype=torch.float64)
    mask = (torch.rand(*shape, generator=g) > 0.4).to(mask_dtype)
    got = masked_mean(tensor, mask, dim)
    # Reference: the plain mean of the selected elements, slice by slice.
    m = mask.bool()
    if dim is None:
        want = tensor[m].mean() if m.any() else torch.tensor(0.0, dtype=torch.float64)
        torch.testing.assert_close(got, want)
        return
    moved_t, moved_m = tensor.movedim(dim, -1), m.movedim(dim, -1)
    flat_t = moved_t.reshape(-1, moved_t.shape[-1])
    flat_m = moved_m.reshape(-1, moved_m.shape[-1])
    want = torch.stack(
        [
            t[k].mean() if k.any() else torch.tensor(0.0, dtype=torch.float64)
            for t, k in zip(flat_t, flat_m, strict=True)
        ]
    ).reshape(moved_t.shape[:-1])
    torch.testing.assert_close(got, want)


def test_masked_mean_empty_mask_is_zero_with_zero_gradient() -> None:
    tensor = torch.randn(2, 3, requires_grad=True)
    out = masked_mean(tensor, torch.zeros(2, 3))
    assert out.item() == 0.0
    out.backward()
    assert (tensor.grad == 0).all()


# --------------------------------------------------------------------------- train step


@settings(max_examples=50, deadline=None)
@given(
    batch=st.integers(1, 6),
    seq=st.integers(1, 9),
    accum=st.integers(1, 8),
    constant=st.floats(0.5, 50.0),
    seed=st.integers(0, 2**16),
)
def test_train_step_matches_reference(batch, seq, accum, constant, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    base = -torch.rand(batch, seq, generator=g, dtype=torch.float64) * 5
    mask = (torch.rand(batch, seq, generator=g) > 0.3).float()
    got_lp = base.clone().requires_grad_(True)
    loss, meta = sft_microbatch_train_step(got_lp, mask, accum, constant)
    want_lp = base.clone().requires_grad_(True)
    want = ((-want_lp * mask).sum(-1) / constant).mean() / accum
    want.backward()
    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(got_lp.grad, want_lp.grad)
    torch.testing.assert_close(meta["scaled_loss"], want.detach())
    torch.testing.assert_close(meta["unscaled_loss"], want.detach() * accum)
    assert meta["num_response_tokens"].item() == int(mask.sum())
    assert not loss.requires_grad and all(not v.requires_grad for v in meta.values())


def test_train_step_does_not_grow_with_batch_size() -> None:
    lp = -torch.rand(3, 5)
    mask = torch.ones(3, 5)
    one, _ = sft_microbatch_train_step(lp.clone().requires_grad_(True), mask, 1)
    four, _ = sft_microbatch_train_step(lp.repeat(4, 1).requires_grad_(True), mask.repeat(4, 1), 1)
    torch.testing.assert_close(one, four)


@pytest.mark.parametrize("steps", [0, -1, 1.5, True])
def test_train_step_rejects_bad_accumulation(steps) -> None:
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        sft_microbatch_train_step(torch.zeros(1, 2, requires_grad=True), torch.ones(1, 2), steps)


def test_guide_training_loop_runs_unchanged(tiny_llama, llama_tokenizer) -> None:
    """The guide's loop, written against its API, trains the model."""
    model = tiny_llama
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gradient_accumulation_steps = 2
    microbatches = [
        {"prompts": ["Question: 1+1?", "Question: 2+3?"], "outputs": [" 2", " 5"]},
        {"prompts": ["Reverse: ab"], "outputs": [" ba"]},
    ]
    optimizer.zero_grad()
    total_loss = 0.0
    for microbatch in microbatches:
        batch = tokenize_prompt_and_output(
            microbatch["prompts"], microbatch["outputs"], llama_tokenizer
        )
        outputs = get_response_log_probs(
            model=model,
            input_ids=batch["input_ids"],
            labels=batch["labels"],
            return_token_entropy=True,
        )
        loss, _ = sft_microbatch_train_step(
            policy_log_probs=outputs["log_probs"],
            response_mask=batch["response_mask"],
            gradient_accumulation_steps=gradient_accumulation_steps,
            normalize_constant=1.0,
        )
        total_loss += loss.item()
    optimizer.step()
    optimizer.zero_grad()
    assert total_loss > 0
    changed = [not torch.equal(before[n], p) for n, p in model.named_parameters()]
    assert all(changed)
    # Restore the session fixture for the other tests.
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])


# --------------------------------------------------------------------------- rollout batch


def reference_rollout_batch(prompts: list[list[int]], responses: list[list[int]], pad: int):
    """The rule written out per position: concatenate, right-pad, shift; a label is a
    response token exactly when its position in the row falls in the response."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    inputs, labels, mask = [], [], []
    for p, r in zip(prompts, responses, strict=True):
        row = p + r + [pad] * (width - len(p) - len(r))
        inputs.append(row[:-1])
        labels.append(row[1:])
        mask.append([float(len(p) <= j + 1 < len(p) + len(r)) for j in range(width - 1)])
    return inputs, labels, mask


id_lists = st.lists(st.integers(0, 500), min_size=0, max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.tuples(id_lists, id_lists), min_size=1, max_size=6).filter(
        lambda rows: max(len(p) + len(r) for p, r in rows) >= 1
    ),
    pad=st.integers(0, 500),
)
def test_rollout_batch_matches_the_naive_rule(rows, pad) -> None:
    prompts, responses = [list(p) for p, _ in rows], [list(r) for _, r in rows]
    batch = build_rollout_batch(prompts, responses, pad)
    inputs, labels, mask = reference_rollout_batch(prompts, responses, pad)
    assert batch["input_ids"].tolist() == inputs and batch["input_ids"].dtype == torch.int64
    assert batch["labels"].tolist() == labels and batch["labels"].dtype == torch.int64
    assert batch["response_mask"].tolist() == mask
    assert batch["response_mask"].dtype == torch.float32
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        trained = batch["labels"][i][batch["response_mask"][i].bool()].tolist()
        # Every sampled token is a label, except a first token with nothing before it.
        assert trained == (r if p else r[1:])


def test_rollout_batch_pads_as_tokenize_prompt_and_output(nobos_tokenizer) -> None:
    prompts, outputs = ["Hello, world!", "Question: What is 12 + 30?"], [" 42", " Hi"]
    expected = tokenize_prompt_and_output(prompts, outputs, nobos_tokenizer)
    prompt_ids = nobos_tokenizer(prompts)["input_ids"]
    output_ids = nobos_tokenizer(outputs, add_special_tokens=False)["input_ids"]
    got = build_rollout_batch(prompt_ids, output_ids, nobos_tokenizer.pad_token_id)
    for key in ("input_ids", "labels", "response_mask"):
        assert torch.equal(got[key], expected[key]), key


def test_rollout_batch_trains_exactly_the_sampled_tokens(tiny_llama, llama_tokenizer) -> None:
    """The README's GRPO example re-tokenized `s.text`: the EOS that ended a response
    was never trained, and other ids could differ from those sampled."""
    from posttrain.generation import generate
    from posttrain.primitives import pad_token_id_of

    prompt_ids = llama_tokenizer(["Hello, world!", "Question: What is 12 + 30?"])["input_ids"]
    eos = llama_tokenizer.eos_token_id
    # Half the vocabulary ends a response, so that most samples stop on a stop token.
    stops = list(range(0, len(llama_tokenizer), 2))
    samples = generate(
        tiny_llama,
        llama_tokenizer,
        prompt_ids,
        max_new_tokens=12,
        temperature=1.0,
        n=4,
        seed=0,
        stop_token_ids=stops,
    )
    rows = [(p, s) for p, group in zip(prompt_ids, samples, strict=True) for s in group]
    batch = build_rollout_batch(
        [p for p, _ in rows], [s.token_ids for _, s in rows], pad_token_id_of(llama_tokenizer)
    )
    ended = [i for i, (_, s) in enumerate(rows) if s.finish_reason == "eos"]
    assert ended, "no sample ended on a stop token"
    for i, (_, s) in enumerate(rows):
        trained = batch["labels"][i][batch["response_mask"][i].bool()].tolist()
        assert trained == s.token_ids
    # Re-tokenizing the text drops the stop token that ended each of those samples.
    retokenized = tokenize_prompt_and_output(
        [llama_tokenizer.decode(p, skip_special_tokens=True) for p, _ in rows],
        [s.text for _, s in rows],
        llama_tokenizer,
    )
    i = ended[0]
    lost = retokenized["labels"][i][retokenized["response_mask"][i].bool()].tolist()
    assert lost != rows[i][1].token_ids and rows[i][1].token_ids[-1] in {*stops, eos}


def test_rollout_batch_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        build_rollout_batch([[1], [2]], [[3]], 0)
    with pytest.raises(ValueError, match="empty batch"):
        build_rollout_batch([], [], 0)
    with pytest.raises(ValueError, match=r"response_ids\[0\]\[1\] is -1, not a token id"):
        build_rollout_batch([[1]], [[2, -1]], 0)
    with pytest.raises(ValueError, match=r"prompt_ids\[0\] must be a list of token ids"):
        build_rollout_batch(["hello"], [[2]], 0)
    # 1-D tensors are rows too.
    batch = build_rollout_batch([torch.tensor([5, 6])], [torch.tensor([7, 2])], 0)
    assert batch["labels"].tolist() == [[6, 7, 2]]


def test_lean_log_probs_at_chosen_positions_equal_the_full_pass(tiny_llama) -> None:
    """`positions` sends only those rows through the head (the response, say): the same
    log-probs and gradients there, 0 elsewhere."""
    from posttrain.primitives import lean_response_log_probs

    ids = torch.randint(
        3, tiny_llama.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0)
    )
    labels = torch.roll(ids, -1, dims=1)
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[0, 4:] = positions[1, 1:3] = positions[2, 8] = True
    full = lean_response_log_probs(tiny_llama, ids, labels, return_token_entropy=True)
    some = lean_response_log_probs(
        tiny_llama, ids, labels, return_token_entropy=True, positions=positions
    )
    for key in ("log_probs", "token_entropy"):
        torch.testing.assert_close(some[key][positions], full[key][positions])
        assert (some[key][~positions] == 0).all()
    weights = torch.rand(ids.shape)
    tiny_llama.zero_grad()
    (full["log_probs"] * weights * positions).sum().backward()
    want = {n: p.grad.clone() for n, p in tiny_llama.named_parameters()}
    tiny_llama.zero_grad()
    (some["log_probs"] * weights).sum().backward()
    for name, param in tiny_llama.named_parameters():
        torch.testing.assert_close(param.grad, want[name], atol=1e-6, rtol=1e-5, msg=name)
    tiny_llama.zero_grad()
