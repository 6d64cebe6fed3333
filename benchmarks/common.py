"""What the benchmark scripts share: the vocabulary-heavy benchmark model, the load
average they report, and the kernel's resident-memory counters they measure with.

Each script runs as `python benchmarks/NAME.py`, so this directory is on `sys.path`
and `import common` finds this file.
"""

from __future__ import annotations

import os
from typing import Any


def vocab_case_model(max_position_embeddings: int = 2048, seed: int = 0) -> Any:
    """The "vocab" benchmark model: Qwen2, hidden 256, 4 layers, the real 151,936-entry
    Qwen2.5 vocabulary, tied embeddings (as in Qwen2.5-0.5B), random float32 weights.
    Its tokenizer is `posttrain.models.tiny.build_qwen_tokenizer()`."""
    from posttrain.models.tiny import QWEN25_VOCAB_SIZE, tiny_causal_lm

    return tiny_causal_lm(
        "qwen2",
        vocab_size=QWEN25_VOCAB_SIZE,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        tie_word_embeddings=True,
        max_position_embeddings=max_position_embeddings,
        seed=seed,
    )


def load_average() -> str:
    """The 1- and 5-minute load averages, as `uptime` shows them."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} {five:.2f}"


def read_status_kb(field: str) -> int | None:
    """A kB field of /proc/self/status (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); Linux >= 4.0 only."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True
