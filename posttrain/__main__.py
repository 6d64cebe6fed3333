"""`python -m posttrain ...` (and `torchrun -m posttrain ...`) runs the CLI."""

from posttrain.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
