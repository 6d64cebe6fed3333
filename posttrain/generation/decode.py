"""Batched generation from a causal LM: `generate` (the engine), greedy helpers for the
`posttrain generate` command and the demo's scoring.

`generate` sorts prompts by token length, left-pads each batch and runs Hugging Face
`model.generate` with the KV cache. Besides the text it reports why each sample ended
(EOS / stop token, stop string or the token limit) and the mean entropy of the model's
next-token distributions over the generated tokens, recorded step by step so that no
(steps, batch, vocab) score tensor is ever kept. Sampled tokens are drawn by the engine's
own logits processor (one uniform per row, `inverse_cdf_sample`), sharing its exp pass
with the entropy; `model.generate` then only takes each row's argmax.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from posttrain.generation.sampling import (
    EntropyRecorder,
    Sampler,
)
from posttrain.models.loading import load_pretrained

FINISH_REASONS = ("eos", "stop", "length")


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when it is available, else the CPU; anything else is used as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available here")
    return target


def load_model_and_tokenizer(
    model_dir: str | Path, device: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Hugging Face model directory (model + tokenizer) for inference on `device`."""
    target = resolve_device(device)
    model, tokenizer = load_pretrained(model_dir)
    model.to(target).eval()
    return model, tokenizer


@dataclass
class Sample:
    """One generated continuation of one prompt.

    `text` is the decoded response with special tokens skipped: for finish reason "eos"
    it ends before the stop token, for "stop" it ends with the stop string (anything the
    last token decoded to after it is dropped). `token_ids` are the generated ids up to
    and including the stop token or the token that completed the stop string, without
    padding; `num_tokens == len(token_ids)`. `mean_entropy` is the mean, over those
    tokens, of the entropy in nats of the model's next-token distribution at temperature
    1 (the raw logits) at the step that produced each token; NaN when `generate` was
    called with `record_entropy=False`.
    """

    text: str
    token_ids: list[int]
    num_tokens: int
    finish_reason: str
    truncated: bool
    mean_entropy: float


class _StopStrings(StoppingCriteria):
    """Stops a row once its decoded generated text contains one of `stops`.

    Unlike transformers' `StopStringCriteria`, it looks at the generated tokens only, so a
    prompt that ends with the start of a stop string can't end generation early, and it
    matches the decoded text (special tokens skipped), exactly as the result is cut.
    `hit_at[row]` is the number of generated tokens when the row first matched.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stops: Sequence[str],
        stop_ids: Sequence[int],
        prompt_width: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.stop_ids = set(stop_ids)
        self.prompt_width = prompt_width
        # A new occurrence ends in the newest token and every token but a special one adds
        # at least a byte, so it lies within this many last tokens; the margin covers a
        # few special tokens in between. Decoding only these keeps each step's cost flat.
        self.window = 2 * max(len(stop.encode("utf-8")) for stop in stops) + 16
        self.hit_at: dict[int, int] = {}
        self.ended: set[int] = set()

    def _found(self, rows: list[list[int]]) -> list[bool]:
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [any(stop in text for stop in self.stops) for text in texts]

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs: object
    ) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_width :].tolist()
        width = len(generated[0])
        # Rows that stopped are padded from here on: decoding them again would be waste.
        self.ended.update(r for r, row in enumerate(generated) if row[-1] in self.stop_ids)
        live = [r for r in range(len(generated)) if r not in self.hit_at and r not in self.ended]
        tails = self._found([generated[r][-self.window :] for r in live])
        candidates = [r for r, found in zip(live, tails, strict=True) if found]
        # A window that starts mid-character decodes differently: the whole text decides.
        if width > self.window and candidates:
            confirmed = self._found([generated[r] for r in candidates])
            candidates = [r for r, found in zip(candidates, confirmed, strict=True) if found]
        for row in candidates:
            self.hit_at[row] = width
        done = [r in self.hit_at for r in range(len(generated))]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class _Settings:
    max_new_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    stop_ids: tuple[int, ...]
    pad_id: int
    record_entropy: bool = True


def _stop_token_ids(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, extra: Sequence[int] | None
) -> tuple[int, ...]:
    """The tokenizer's EOS (the model's generation-config EOS where the tokenizer has none),
    together with `extra`: sorted, without repeats."""
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = model.generation_config.eos_token_id
    ids = set() if eos is None else set(eos if isinstance(eos, list) else [eos])
    for token in extra or ():
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"stop_token_ids must be non-negative ints, got {token!r}")
        ids.add(token)
    if not ids:
        raise ValueError(
            "the tokenizer and the model define no EOS token and no stop_token_ids were "
            "given, so generation can't stop"
        )
    return tuple(sorted(ids))


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    add_special_tokens: bool,
    vocab_size: int,
) -> list[list[int]]:
    """Token ids of every prompt: strings are tokenized, id lists checked and used as is."""
    texts = [(i, p) for i, p in enumerate(prompts) if isinstance(p, str)]
    encoded: list[list[int] | None] = [None] * len(prompts)
    if texts:
        ids = tokenizer([p for _, p in texts], add_special_tokens=add_special_tokens)["input_ids"]
        for (i, _), row in zip(texts, ids, strict=True):
            encoded[i] = list(row)
    for i, prompt in enumerate(prompts):
        if encoded[i] is None:
            if not isinstance(prompt, Sequence) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt
            ):
                raise ValueError(f"prompt {i} is neither a string nor a list of token ids")
            if any(not 0 <= t < vocab_size for t in prompt):
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size})")
            encoded[i] = list(prompt)
        if not encoded[i]:
            raise ValueError(f"prompt {i} encodes to no tokens: {prompt!r}")
    return encoded  # type: ignore[return-value]


def batch_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Prompt indices by batch, as `generate` runs them: longest first (similar lengths
    share a batch, so less padding, and an out-of-memory error comes at once), a stable
    sort (equal lengths keep input order), `batch_size` at a time. Batch b is sampled with
    seed `seed + b`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _validate(
    max_new_tokens: int, temperature: float, top_p: float, n: int, batch_size: int
) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if n > 1 and temperature == 0:
        raise ValueError("n > 1 needs temperature > 0: greedy samples would all be identical")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


@contextmanager
def _plain_generation_config(model: PreTrainedModel) -> Iterator[None]:
    """Hide the model's generation config for the duration of a call.

    `generate` fills every unset option from it, so a checkpoint's repetition penalty,
    top-k or suppressed tokens would silently change sampling and run logits processors
    ahead of the entropy recorder; every option the engine needs is passed explicitly.
    """
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@contextmanager
def _private_rng(device: torch.device) -> Iterator[Callable[[int], None]]:
    """Fork the CPU random generator, and `device`'s on CUDA, for the duration of a call;
    yield a function that seeds them (only them: `torch.manual_seed` would also seed, or
    queue a seed for, every other CUDA device)."""
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):

        def reseed(seed: int) -> None:
            torch.random.default_generator.manual_seed(seed)
            for index in cuda:
                torch.cuda.default_generators[index].manual_seed(seed)

        yield reseed


def _finish(
    row: list[int],
    entropies: list[float],
    hit_at: int | None,
    tokenizer: PreTrainedTokenizerBase,
    cfg: _Settings,
) -> Sample:
    """Cut one generated row (padding included) at its first stop and describe it."""
    stop_ids = set(cfg.stop_ids)
    eos_at = next((k + 1 for k, t in enumerate(row) if t in stop_ids), None)
    if eos_at is not None and (hit_at is None or eos_at <= hit_at):
        ids, reason = row[:eos_at], "eos"
        text = tokenizer.decode(ids[:-1], skip_special_tokens=True)
    elif hit_at is not None:
        ids, reason = row[:hit_at], "stop"
        text = tokenizer.decode(ids, skip_special_tokens=True)
        ends = [text.find(s) + len(s) for s in cfg.stop if s in text]
        text = text[: min(ends)] if ends else text
    else:
        ids, reason = row[: cfg.max_new_tokens], "length"
        text = tokenizer.decode(ids, skip_special_tokens=True)
    used = entropies[: len(ids)]
    return Sample(
        text=text,
        token_ids=ids,
        num_tokens=len(ids),
        finish_reason=reason,
        truncated=reason == "length",
        # Not recorded (record_entropy=False): NaN, which no mean can mistake for a value.
        mean_entropy=sum(used) / len(used) if used else math.nan,
    )


def _generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    cfg: _Settings,
) -> list[list[Sample]]:
    """`cfg.n` samples for each of `prompts` from one left-padded `model.generate` call.

    The call sees (len(prompts), width) int64 ids and attention mask, width the longest
    prompt, and returns (len(prompts) * cfg.n, width + generated) ids, each prompt's `n`
    rows adjacent; finished rows are padded with `cfg.pad_id`.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), cfg.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, ids in enumerate(prompts):
        input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, width - len(ids) :] = 1
    # Each prompt's n rows adjacent, as generate's num_return_sequences would lay them out
    # (it refuses n > 1 when decoding greedily, which is how the sampler below runs).
    input_ids = input_ids.repeat_interleave(cfg.n, dim=0)
    attention_mask = attention_mask.repeat_interleave(cfg.n, dim=0)
    recorder: EntropyRecorder | None
    if cfg.temperature > 0:
        recorder = Sampler(cfg.temperature, cfg.top_p, cfg.record_entropy)
    else:
        recorder = EntropyRecorder() if cfg.record_entropy else None
    strings = _StopStrings(tokenizer, cfg.stop, cfg.stop_ids, width) if cfg.stop else None
    generation_config = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        # Sampling happens in `_Sampler`; generate itself only takes each row's argmax.
        do_sample=False,
        eos_token_id=list(cfg.stop_ids),
        pad_token_id=cfg.pad_id,
        use_cache=True,
    )
    with _plain_generation_config(model):
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([] if recorder is None else [recorder]),
            stopping_criteria=StoppingCriteriaList([] if strings is None else [strings]),
        )
    rows = output[:, width:].tolist()
    entropies = recorder.table(len(rows)) if recorder is not None else [[] for _ in rows]
    hits = strings.hit_at if strings is not None else {}
    samples = [
        _finish(row, ent, hits.get(r), tokenizer, cfg)
        for r, (row, ent) in enumerate(zip(rows, entropies, strict=True))
    ]
    return [samples[i * cfg.n : (i + 1) * cfg.n] for i in range(len(prompts))]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    n: int = 1,
    seed: int = 0,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] | None = None,
    batch_size: int = 64,
    add_special_tokens: bool = True,
    progress: Callable[[int], None] | None = None,
    record_entropy: bool = True,
) -> list[list[Sample]]:
    """`n` samples for each prompt, as a list per prompt in input order.

    Prompts are strings (tokenized with `add_special_tokens`) or lists of token ids used
    as given, e.g. a rendered chat template. Temperature 0 is greedy decoding (then `n`
    must be 1); otherwise sampling at `temperature` with nucleus `top_p`, reproducible
    from `seed` for the same prompts and `batch_size`, without touching the caller's
    random state. Generation stops at the tokenizer's EOS (the model's generation-config
    EOS where the tokenizer has none) or any of `stop_token_ids`, at any of the `stop`
    strings, or after `max_new_tokens` tokens.

    Prompts are sorted by token length and run `batch_size` at a time (times `n` rows),
    left-padded, with the KV cache, on the model's device and in its dtype. `progress`,
    if given, is called after each batch with the number of prompts it finished.
    With `record_entropy=False` no entropy is computed (a full-vocabulary pass per
    greedy step) and every `Sample.mean_entropy` is NaN.
    """
    _validate(max_new_tokens, temperature, top_p, n, batch_size)
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of prompts, not one string")
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
    stop_ids = _stop_token_ids(model, tokenizer, stop_token_ids)
    vocab_size = model.get_input_embeddings().num_embeddings
    encoded = encode_prompts(tokenizer, prompts, add_special_tokens, vocab_size)
    pad_id = tokenizer.pad_token_id
    cfg = _Settings(
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        n=n,
        stop=stops,
        stop_ids=stop_ids,
        # Padding is masked out, so any id serves where the tokenizer has no pad token.
        pad_id=stop_ids[0] if pad_id is None else pad_id,
        record_entropy=record_entropy,
    )
    results: list[list[Sample]] = [[] for _ in encoded]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _private_rng(next(model.parameters()).device) as reseed:
            for b, chunk in enumerate(batch_order([len(ids) for ids in encoded], batch_size)):
                # One seed per batch: sampling depends on nothing drawn before it.
                reseed(seed + b)
                batch = _generate_batch(model, tokenizer, [encoded[i] for i in chunk], cfg)
                for i, samples in zip(chunk, batch, strict=True):
                    results[i] = samples
                if progress is not None:
                    progress(len(chunk))
    finally:
        model.train(was_training)
    return results


def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions of `prompts`, each cut at the first EOS (which is not included).

    Batching changes nothing: each completion is what generating its prompt alone gives.
    """
    samples = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return [s[0].text for s in samples]
