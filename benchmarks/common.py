"""What the benchmark scripts share: the vocabulary-heavy benchmark model, the load
average they report, the kernel's resident-memory counters they measure with, and the
separate TRL environment the comparisons with TRL run in.

Each script runs as `python benchmarks/NAME.py`, so this directory is on `sys.path`
and `import common` finds this file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# TRL runs in its own virtual environment, never a dependency of posttrain.
DEFAULT_TRL_VENV = Path(tempfile.gettempdir()) / "posttrain-bench-trl-venv"
TRL_SPEC = "trl==1.16.0"
TORCH_SPEC = "torch==2.13.0"  # the CPU build this machine's wheels hold; others pull CUDA


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


def ensure_trl_venv(venv: Path) -> Path:
    """The Python of a virtual environment with TRL; created and installed if missing."""
    import transformers

    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import trl, transformers, torch, datasets"]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"installing TRL into {venv} (a few minutes, once)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    # The same transformers as posttrain's environment: both sides load, tokenize and
    # generate with it.
    packages = [TORCH_SPEC, TRL_SPEC, f"transformers=={transformers.__version__}", "datasets"]
    subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    subprocess.run(probe, check=True)
    return python


def run_timed_child(cmd: list[str], env: dict[str, str], label: str) -> tuple[dict, float, float]:
    """Run `cmd` as a child process; return (the JSON object of its last stdout line, its
    wall seconds from launch to exit, its own peak RSS in MB). A failure prints the tail
    of its stderr and exits naming `label`."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    import time

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over
        # every child so far).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if code != 0:
        sys.stderr.write(stderr[-6000:])
        raise SystemExit(f"{label} failed with exit code {code}")
    return json.loads(stdout.strip().splitlines()[-1]), wall, usage.ru_maxrss / 1024
