"""`posttrain generate`: greedy completion of one prompt by a saved model."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Print the model's greedy completion of PROMPT, stopping at the EOS token. The "
        "prompt is used as written (no chat template), as `posttrain sft` trains on "
        "prompt/response pairs."
    )
    parser.add_argument(
        "--model", required=True, metavar="DIR", help="Hugging Face model directory, e.g. RUN/final"
    )
    parser.add_argument("--prompt", required=True, help="the text to complete")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        metavar="N",
        help="stop after N tokens if no EOS came (default: 64)",
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, ... (default: auto, CUDA if available)"
    )


def run(args: argparse.Namespace) -> int:
    from posttrain.generation import greedy_generate, load_model_and_tokenizer

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer = load_model_and_tokenizer(args.model, args.device)
    (completion,) = greedy_generate(model, tokenizer, [args.prompt], args.max_new_tokens)
    print(completion)
    return 0
