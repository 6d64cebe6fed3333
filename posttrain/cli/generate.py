"""`posttrain generate`: greedy completion of one prompt by a saved model."""

from __future__ import annotations

import argparse

from posttrain.cli.common import check_model_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Print the model's greedy completion of PROMPT, stopping at the EOS token (or the chat "
        "template's end-of-turn token). The "
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
    # Flags and paths first: torch takes seconds to import.
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    check_model_dir(args.model)
    from posttrain.data.tokenized import end_of_turn_token_ids
    from posttrain.generation.decode import generate, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, args.device)
    # A chat model ends its turn with its template's end-of-turn token (<|im_end|>), which
    # may not be the tokenizer's EOS: stop at either.
    ((sample,),) = generate(
        model,
        tokenizer,
        [args.prompt],
        max_new_tokens=args.max_new_tokens,
        stop_token_ids=end_of_turn_token_ids(tokenizer),
    )
    print(sample.text)
    return 0
