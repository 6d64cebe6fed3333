"""The engine's logits processors: the entropy of each step's next-token distribution
(`EntropyRecorder`), and sampling by one uniform per row over the tempered, nucleus-cut
weights (`Sampler`, `inverse_cdf_sample`), sharing its exp pass with the entropy, so that
`model.generate` only takes each row's argmax."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

# Rows of logits per entropy chunk on the CPU: ~8 MB of float32, so that the chunk and its
# temporaries stay in cache (about 3x faster than whole (rows, 151936) tensors).
_CPU_CHUNK_ELEMENTS = 2**21


def logits_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(`logits`) along the last dim: (rows, vocab) -> (rows,) float32.

    Computed in float32; entries at -inf (masked tokens) contribute 0, not NaN.
    """
    logits = logits.float()
    if logits.device.type != "cpu" or logits.dim() != 2:
        return _entropy(logits)
    rows = max(1, _CPU_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    return torch.cat([_entropy(chunk) for chunk in logits.split(rows)])


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    return _entropy_of_shifted(shifted, shifted.exp())


def _entropy_of_shifted(shifted: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Entropy (rows,) float32 from `shifted` = logits - row max and `weights` = exp(shifted),
    both (rows, vocab) float32; `shifted` is overwritten, `weights` kept."""
    # H = log(s) - sum(e * z) / s with z = x - max(x), e = exp(z), s = sum(e): one exp pass,
    # and both terms are >= 0, so nothing cancels however large the logits are.
    total = weights.sum(dim=-1)
    weighted = shifted.mul_(weights)
    if shifted.device.type == "cpu":
        # Checking the row sums is cheaper than a pass over the chunk; on a GPU the check
        # would make the host wait for the device.
        dot = weighted.sum(dim=-1)
        if not dot.isnan().any():
            return total.log() - dot / total
    # 0 * -inf is NaN where a token has probability 0; it contributes nothing.
    return total.log() - weighted.nan_to_num_(nan=0.0).sum(dim=-1) / total


class EntropyRecorder(LogitsProcessor):
    """Records the entropy of the (rows, vocab) float32 scores it is given at each step,
    as a (rows,) float32 tensor; changes nothing."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.steps.append(logits_entropy(scores))
        return scores

    def table(self, rows: int) -> list[list[float]]:
        """Entropies as `rows` lists of one float per step (the (rows, steps) table)."""
        if not self.steps:
            return [[] for _ in range(rows)]
        return torch.stack(self.steps, dim=1).cpu().tolist()


# Tokens per block of the two-level inverse-CDF sampler: each row's block sums are one
# cheap reduction over the weights, and only the chosen block is searched token by token.
_SAMPLE_BLOCK = 128


def _last_positive(weights: torch.Tensor) -> torch.Tensor:
    """Index of the last entry > 0 in each row of (rows, k) `weights`: (rows,) int64."""
    positions = torch.arange(weights.shape[-1], device=weights.device)
    return torch.where(weights > 0, positions, 0).amax(dim=-1)


def inverse_cdf_sample(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One index per row, drawn with probability proportional to `weights`.

    `weights` is (rows, vocab) float32, >= 0, each row with a positive entry (unnormalised
    probabilities); `uniform` is (rows,) float64 in [0, 1), one random number per row.
    Returns (rows,) int64. An entry of weight 0 is never drawn.

    `torch.multinomial` draws one exponential variate per vocabulary entry (~200 ms for
    64 x 151,936 on two CPU cores); this needs one uniform per row: the row's target
    `u * total` picks a block of `_SAMPLE_BLOCK` entries on the float64 cumulative sum of
    the block sums, then an entry on the float64 cumulative sum inside that block.
    """
    rows, vocab = weights.shape
    full = vocab // _SAMPLE_BLOCK * _SAMPLE_BLOCK
    sums = weights[:, :full].view(rows, -1, _SAMPLE_BLOCK).sum(dim=-1)
    if full < vocab:
        sums = torch.cat([sums, weights[:, full:].sum(dim=-1, keepdim=True)], dim=1)
    cdf = sums.double().cumsum(dim=-1)  # (rows, blocks)
    target = uniform * cdf[:, -1]
    block = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    # u * total can round up to total; the last block with weight takes that target.
    block = torch.minimum(block, _last_positive(sums))
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    # The target's position inside its block, as a fraction of the block's (float32) sum,
    # so that float32 rounding of that sum can't move the target out of the block.
    in_block = sums.gather(1, block[:, None])[:, 0].double()
    fraction = ((target - before) / in_block).clamp(0.0, 1.0)
    start = block * _SAMPLE_BLOCK
    index = start[:, None] + torch.arange(_SAMPLE_BLOCK, device=weights.device)
    inside = weights.gather(1, index.clamp(max=vocab - 1)) * (index < vocab)  # (rows, block)
    inner = inside.double().cumsum(dim=-1)
    offset = torch.searchsorted(inner, (fraction * inner[:, -1])[:, None], right=True)[:, 0]
    return start + torch.minimum(offset, _last_positive(inside))


def sample_next_tokens(
    scores: torch.Tensor, temperature: float, top_p: float, record_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample one token per row of (rows, vocab) float32 logits `scores` at `temperature`
    (> 0) with nucleus `top_p`, from the global random generator (one float64 uniform per
    row). Returns the (rows,) int64 tokens and, if `record_entropy`, the (rows,) float32
    entropy of softmax(scores) at temperature 1, else None.

    `scores` is overwritten with the row's sampling weights exp((x - max) / temperature),
    in [0, 1] with the row's maximum at 1. The nucleus is the smallest set of most likely
    tokens whose probability reaches `top_p` (Hugging Face's `TopPLogitsWarper`).
    """
    rows, vocab = scores.shape
    # On the CPU, chunks of rows keep each pass in cache; a GPU takes the whole tensor.
    step = max(1, _CPU_CHUNK_ELEMENTS // max(1, vocab)) if scores.device.type == "cpu" else rows
    entropies = []
    for lo in range(0, rows, step):
        chunk = scores[lo : lo + step]
        shifted = chunk - chunk.amax(dim=-1, keepdim=True)
        if temperature == 1.0:
            # One exp pass serves both the sampling weights and the entropy.
            torch.exp(shifted, out=chunk)
            if record_entropy:
                entropies.append(_entropy_of_shifted(shifted, chunk))
        else:
            torch.exp(shifted / temperature, out=chunk)
            if record_entropy:
                entropies.append(_entropy_of_shifted(shifted, shifted.exp()))
    uniform = torch.rand(rows, dtype=torch.float64, device=scores.device)
    if top_p >= 1.0:
        tokens = inverse_cdf_sample(scores, uniform)
    else:
        ordered, order = scores.sort(dim=-1, descending=True, stable=True)
        mass = ordered.double().cumsum(dim=-1)
        # Keep a token while the mass of the tokens ranked above it is below top_p.
        outside = (mass - ordered) >= top_p * mass[:, -1:]
        tokens = order.gather(
            1, inverse_cdf_sample(ordered.masked_fill_(outside, 0.0), uniform)[:, None]
        )[:, 0]
    return tokens, torch.cat(entropies) if record_entropy else None


class Sampler(EntropyRecorder):
    """Samples each step's tokens itself (`sample_next_tokens`) and records their entropies
    if asked; `generate` then runs greedily, and the sampled token is the only one left at
    the row's maximum. Hugging Face's own sampling draws an exponential variate for every
    vocabulary entry, which took most of a rollout step's time on the CPU."""

    def __init__(self, temperature: float, top_p: float, record_entropy: bool) -> None:
        super().__init__()
        self.temperature = temperature
        self.top_p = top_p
        self.record_entropy = record_entropy

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # `generate` hands each step a float32 copy of the last position's logits, used for
        # nothing else: overwriting it in place saves a (rows, vocab) allocation per step.
        tokens, entropy = sample_next_tokens(
            scores, self.temperature, self.top_p, self.record_entropy
        )
        if entropy is not None:
            self.steps.append(entropy)
        # Weights are <= 1, so 2 makes the sampled token the unique maximum for the argmax.
        rows = torch.arange(scores.shape[0], device=scores.device)
        scores[rows, tokens] = 2.0
        return scores
