"""`posttrain inspect`: look at the training data exactly as `posttrain sft` would see it.

Takes the same config file and flags as `posttrain sft` (the model is used only for its
tokenizer) and prints data set statistics and the first examples token by token,
coloured by role (prompt, trained response, EOS, padding). Settings that only matter to
training (lr, save_every, ...) are accepted and ignored, and left out of `--help`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from posttrain.cli.common import check_data_path, check_model_dir
from posttrain.config import add_config_arguments, config_from_args

# The settings that change what inspect shows: the data, how it is tokenized, and the
# batch geometry and seed that decide the padding of an epoch.
INSPECT_SETTINGS = frozenset(
    {
        "config",
        "model",
        "train_file",
        "eval_file",
        "prompt_field",
        "response_field",
        "messages_field",
        "max_seq_len",
        "truncation",
        "append_eos",
        "micro_batch_size",
        "grad_accum_steps",
        "seed",
        "group_by_length",
    }
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, only=INSPECT_SETTINGS)
    group = parser.add_argument_group("inspect")
    group.add_argument(
        "--num-examples",
        type=int,
        default=3,
        metavar="K",
        help="show the first K examples token by token (default: 3)",
    )
    group.add_argument("--html", metavar="FILE", help="also write the view as an HTML page")
    group.add_argument(
        "--json", action="store_true", help="print only the statistics, as one JSON object"
    )
    group.add_argument(
        "--plot",
        metavar="FILE",
        default=None,
        help="also write a PNG histogram of lengths to FILE (default: with --html, "
        "next to it as <html name>_lengths.png, else none; 'none': no plot)",
    )
    group.add_argument(
        "--eval",
        action="store_true",
        help="inspect eval_file instead of train_file",
    )


def _plot_path(args: argparse.Namespace) -> Path | None:
    """Where the user asked for the histogram: `--plot FILE`, or next to `--html` (its
    name + `_lengths.png`); nothing is written into the current directory unasked."""
    if args.plot is not None:
        return None if args.plot.lower() == "none" else Path(args.plot)
    if args.html:
        html = Path(args.html)
        return html.with_name(html.stem + "_lengths.png")
    return None


def run(args: argparse.Namespace) -> int:
    # Flags and paths first: torch takes seconds to import.
    if args.num_examples < 0:
        raise ValueError(f"--num-examples must be >= 0, got {args.num_examples}")
    config = config_from_args(args, only=INSPECT_SETTINGS)
    data_path = config.eval_file if args.eval else config.train_file
    if data_path is None:
        raise ValueError("--eval given but no eval_file is set")
    check_model_dir(config.model)
    check_data_path(data_path, "--eval-file" if args.eval else "--train-file")
    from rich.console import Console

    from posttrain.data.records import load_records
    from posttrain.data.report import (
        compute_stats,
        example_views,
        format_stats,
        legend_rich,
        render_plain,
        render_rich,
        write_html,
        write_length_histogram,
    )
    from posttrain.engine.checkpoints import load_tokenizer
    from posttrain.primitives import pad_token_id_of

    tokenizer = load_tokenizer(config.model)
    fmt = config.data_format()
    records = load_records(data_path, fmt)
    stats, examples = compute_stats(
        records,
        tokenizer,
        fmt,
        data_path,
        micro_batch_size=config.micro_batch_size,
        grad_accum_steps=config.grad_accum_steps,
        seed=config.seed,
    )
    views = example_views(examples[: args.num_examples], tokenizer, pad_token_id_of(tokenizer))

    plot = _plot_path(args)
    if plot is not None:
        write_length_histogram(stats.total_lengths, config.max_seq_len, plot)
    html = write_html(args.html, views, stats, plot) if args.html else None

    if args.json:
        out = stats.to_json()
        out["plot"] = None if plot is None else str(plot)
        out["html"] = None if html is None else str(html)
        print(json.dumps(out, indent=2))
        return 0

    console = Console(highlight=False, soft_wrap=True)
    if console.is_terminal:
        console.print(legend_rich())
        for view in views:
            console.print(render_rich(view))
            console.print()
    else:
        for view in views:
            print(render_plain(view) + "\n")
    print("\n".join(format_stats(stats)))
    for name, path in (("plot", plot), ("html", html)):
        if path is not None:
            print(f"  {name}: {path}")
    sys.stdout.flush()
    return 0
