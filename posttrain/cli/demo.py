"""`posttrain demo`: a complete fine-tuning run on a CPU in a few minutes, no download."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from dataclasses import replace
from pathlib import Path
from types import FrameType

from posttrain.demo.task import (
    DEFAULT_MAX_STEPS,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_RL_OUTPUT_DIR,
    RL_DIR,
    DemoError,
    RLDemoSettings,
)

RL_DEFAULTS = RLDemoSettings()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Teach a tiny randomly initialised Llama to reverse words: writes a synthetic "
        "task as JSONL, trains a tokenizer, fine-tunes with the `posttrain sft` trainer "
        "and reports held-out exact-match accuracy before and after. Runs on a CPU in "
        "about two minutes and downloads nothing. With --rl: a shorter fine-tuning, then "
        "GRPO from that model with the exact-match reward, held-out accuracy before and "
        "after RL, in under five minutes."
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        metavar="DIR",
        help=f"run directory: data, model, metrics, plot, summary.json (default: "
        f"{DEFAULT_OUTPUT_DIR}; {DEFAULT_RL_OUTPUT_DIR} with --rl)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed for data and model (default: 0)"
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help=f"fine-tuning optimizer steps (default: {DEFAULT_MAX_STEPS}; "
        f"{RL_DEFAULTS.sft_steps} with --rl)",
    )
    parser.add_argument(
        "--rl",
        action="store_true",
        help="after a short fine-tuning, improve the model with GRPO (posttrain grpo, "
        "reward exact) into DIR/rl; report greedy accuracy and mean@8 before and after RL",
    )
    parser.add_argument(
        "--rl-steps",
        type=int,
        default=None,
        metavar="N",
        help=f"with --rl: GRPO steps of {RL_DEFAULTS.questions_per_step} words x "
        f"{RL_DEFAULTS.group_size} samples (default: {RL_DEFAULTS.rl_steps})",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier demo run in DIR",
    )
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar",
    )


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on --rl (output directory and step counts)."""
    if args.rl_steps is not None and not args.rl:
        raise DemoError("--rl-steps needs --rl")
    if args.output_dir is None:
        args.output_dir = DEFAULT_RL_OUTPUT_DIR if args.rl else DEFAULT_OUTPUT_DIR
    if args.max_steps is None:
        args.max_steps = RL_DEFAULTS.sft_steps if args.rl else DEFAULT_MAX_STEPS
    if args.rl and args.rl_steps is None:
        args.rl_steps = RL_DEFAULTS.rl_steps


def check_before_torch(args: argparse.Namespace) -> None:
    """The flags, and an output directory the demo may write into, checked before torch
    is imported (the full check of what DIR holds follows, before anything is written)."""
    resolve_defaults(args)
    if args.max_steps < 1:
        raise DemoError(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.rl and args.rl_steps < 1:
        raise DemoError(f"--rl-steps must be at least 1, got {args.rl_steps}")
    if not 0 <= args.seed < 2**32:
        raise DemoError(f"--seed must be in [0, 2**32), got {args.seed}")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise DemoError(f"{str(out)!r} exists and is not a directory")
    if not args.overwrite and out.is_dir() and any(out.iterdir()):
        raise DemoError(
            f"output_dir {out} is not empty: pass --overwrite to replace an earlier demo run "
            "there, or choose another --output-dir"
        )


def rerun_command(args: argparse.Namespace) -> str:
    """The command that runs this demo again from the start (it does not resume)."""
    argv = ["posttrain", "demo", *(["--rl"] if args.rl else [])]
    argv += ["--output-dir", str(args.output_dir), "--overwrite"]
    if args.seed != 0:
        argv += ["--seed", str(args.seed)]
    if args.max_steps != (RL_DEFAULTS.sft_steps if args.rl else DEFAULT_MAX_STEPS):
        argv += ["--max-steps", str(args.max_steps)]
    if args.rl and args.rl_steps != RL_DEFAULTS.rl_steps:
        argv += ["--rl-steps", str(args.rl_steps)]
    return shlex.join(argv + ([] if args.progress else ["--no-progress"]))


class _Terminated(BaseException):
    """SIGTERM outside the training loop (whose own handler stops it after a step). Not
    an Exception, as KeyboardInterrupt is not, so that no `except Exception` holds it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(signum)


def _stage(args: argparse.Namespace) -> str:
    """What a training loop stopped by a signal was running: DIR/rl exists once GRPO has
    started (a rerun's --overwrite deletes it before the SFT stage)."""
    if not args.rl:
        return "training"
    return "RL" if (Path(args.output_dir) / RL_DIR).exists() else "SFT"


def run(args: argparse.Namespace) -> int:
    check_before_torch(args)
    from posttrain.demo.rl import format_rl_summary, run_rl_demo
    from posttrain.demo.run import format_summary, run_demo
    from posttrain.sft.train import TrainingInterrupted

    # SIGTERM ends the demo as Ctrl-C does: one line and 143, not a silent kill. The
    # training loop installs its own handlers while it runs and restores this one.
    previous = signal.signal(signal.SIGTERM, _terminate)
    signum, during = 0, ""
    try:
        if args.rl:
            settings = replace(
                RL_DEFAULTS, seed=args.seed, sft_steps=args.max_steps, rl_steps=args.rl_steps
            )
            summary = run_rl_demo(
                output_dir=args.output_dir,
                settings=settings,
                overwrite=args.overwrite,
                progress=args.progress,
            )
        else:
            summary = run_demo(
                output_dir=args.output_dir,
                seed=args.seed,
                max_steps=args.max_steps,
                overwrite=args.overwrite,
                progress=args.progress,
            )
    except TrainingInterrupted as stop:
        signum, during = stop.signum, f" after {_stage(args)} step {stop.step}"
    except KeyboardInterrupt:
        signum = signal.SIGINT
    except _Terminated as stop:
        signum = stop.signum
    finally:
        signal.signal(signal.SIGTERM, previous)
    if signum:
        print(
            f"posttrain demo: stopped by {signal.Signals(signum).name}{during}; a demo does "
            f"not resume, run it again with: {rerun_command(args)}",
            file=sys.stderr,
        )
        return 128 + signum
    report = format_rl_summary if args.rl else format_summary
    print(report(summary, args.output_dir))
    return 0
