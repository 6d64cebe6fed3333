"""Small data sets shared by the trainer tests (imported as `helpers`: tests/ is on sys.path
under pytest and when a test file runs as a torchrun worker script)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from posttrain.config import SFTConfig
from posttrain.data.records import DataFormat


def reverse_task(n: int, seed: int) -> list[dict[str, str]]:
    """`n` word-reversal prompt/response pairs, reproducible from `seed`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 7)))
        rows.append({"prompt": f"Reverse: {word} ->", "response": " " + word[::-1]})
    return rows


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def fmt(**kw: object) -> DataFormat:
    """The data settings of a run, for data-only tests."""
    return DataFormat(**kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- LM-head references


def reference_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """softcap(scale * (hidden @ weight.T + bias)), written out."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full logits, log_softmax, gather; entropy = -sum p log p."""
    logp = torch.log_softmax(reference_logits(hidden, weight, bias, scale, softcap), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def make(n: int, h: int, v: int, dtype: torch.dtype, bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.5).to(dtype)
    b = (torch.randn(v, generator=gen, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, b, labels


def leaf(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Fresh leaves that require grad (integer tensors pass through)."""
    return [
        t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t
        for t in tensors
    ]


def grads_of(loss: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    wanted = [t for t in tensors if t is not None]
    got = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
    return [None if t is None else next(got) for t in tensors]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def make_config(workdir: Path, out: Path, **overrides) -> SFTConfig:
    values = {
        "model": str(workdir / "model"),
        "train_file": str(workdir / "train.jsonl"),
        "output_dir": str(out),
        "micro_batch_size": 4,
        "grad_accum_steps": 2,
        "max_steps": 6,
        "lr": 3e-3,
        "warmup_steps": 1,
        "seed": 0,
        "num_threads": 1,
        "progress": False,
        "precision": "fp32",
    }
    values.update(overrides)
    return SFTConfig(**values)


# --------------------------------------------------------------------------- sft in a subprocess

SUBPROCESS_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def sft_command(config: SFTConfig, tmp_path: Path) -> list[str]:
    """The command line that runs `config` through `posttrain sft` in a fresh process."""
    return command_for("sft", config, tmp_path)


def command_for(subcommand: str, config: object, tmp_path: Path) -> list[str]:
    """The command line that runs a config dataclass through `posttrain SUBCOMMAND` in a
    fresh process (the config written as YAML)."""
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(json.dumps(config.__dict__), encoding="utf-8")  # JSON is YAML
    return [sys.executable, "-m", "posttrain", subcommand, "--config", str(cfg_file)]


def metrics(out: Path) -> list[dict]:
    """Every line of a run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_final_weights(want: Path, got: Path, atol: float) -> None:
    """The final models of two runs (OUTPUT_DIR/final) agree to `atol`, tensor by tensor."""
    from safetensors.torch import load_file

    a = load_file(want / "final" / "model.safetensors")
    b = load_file(got / "final" / "model.safetensors")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=atol, rtol=0, msg=name)


def start_until(
    cmd: list[str], ready: Callable[[], bool], timeout: float = 120
) -> subprocess.Popen:
    """Start `cmd` and return once `ready()` holds, failing if the process ends first."""
    proc = subprocess.Popen(
        cmd, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return proc


def resume(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run `cmd --resume` to the end, capturing its output as text."""
    return subprocess.run([*cmd, "--resume"], env=SUBPROCESS_ENV, capture_output=True, text=True)


def past_checkpoint(out: Path, name: str) -> bool:
    """Whether the run in `out` has a complete checkpoint at or after `name` (step-NNNNNN)."""
    from posttrain.engine.checkpoints import latest_checkpoint

    latest = latest_checkpoint(out)
    return latest is not None and latest.name >= name
