"""SIGINT and SIGTERM stop a run after the current step, with a checkpoint to resume from
that leads to the same final weights as an uninterrupted run."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from helpers import make_config, resume, sft_command, start_until
from safetensors.torch import load_file

from posttrain.sft.train import train

SETTINGS = {"max_steps": 40, "micro_batch_size": 8, "grad_accum_steps": 1, "save_every": 0}


def logged_steps(path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_resumes_exactly(workdir, tmp_path, signum) -> None:
    straight = tmp_path / "straight"
    train(make_config(workdir, straight, **SETTINGS))

    out = tmp_path / "stopped"
    cmd = sft_command(make_config(workdir, out, **SETTINGS), tmp_path)
    proc = start_until(cmd, lambda: logged_steps(out / "metrics.jsonl") >= 3)
    proc.send_signal(signum)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    assert f"stopped by {signal.Signals(signum).name} after step" in err
    assert "resume with: posttrain sft --config" in err and err.rstrip().endswith("--resume")
    assert not (out / "final").exists()
    assert any((out / "checkpoints").iterdir())

    resumed = resume(cmd)
    assert resumed.returncode == 0, resumed.stderr
    want = load_file(straight / "final" / "model.safetensors")
    got = load_file(out / "final" / "model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
