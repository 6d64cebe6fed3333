"""SIGINT and SIGTERM stop a run after the current step, with a checkpoint to resume from
that leads to the same final weights as an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
import torch
from helpers import SUBPROCESS_ENV, make_config, resume, sft_command, start_until
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


# Sends SIGTERM to its own process while metrics.jsonl is being created, then runs the CLI.
_SIGTERM_AS_METRICS_OPEN = """
import os, signal, sys
from posttrain.engine.metrics import MetricsLogger
opened = MetricsLogger.__init__
def init(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    opened(self, *args, **kwargs)
MetricsLogger.__init__ = init
from posttrain.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_as_metrics_appear_still_checkpoints(workdir, tmp_path) -> None:
    """A watcher that signals as soon as metrics.jsonl exists (as schedulers and the RL
    tests do) must never catch the run before its handlers are in: exit 143 after step 1
    with its checkpoint, not a bare kill."""
    out = tmp_path / "early"
    cmd = sft_command(make_config(workdir, out, **{**SETTINGS, "max_steps": 4}), tmp_path)
    script = [cmd[0], "-c", _SIGTERM_AS_METRICS_OPEN, *cmd[3:]]
    done = subprocess.run(script, capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert done.returncode == 143, done.stderr[-2000:]
    assert "stopped by SIGTERM after step 1" in done.stderr
    assert (out / "checkpoints" / "step-000001" / "COMPLETE").is_file()
