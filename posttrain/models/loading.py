"""Loading local Hugging Face model directories, adapter directories and checkpoint weights.

posttrain never downloads: every path must be a directory on this machine, and a path
that is not one is a ValueError naming it. `load_pretrained` takes a model directory
(config.json + weights + tokenizer, e.g. RUN/final) or a LoRA adapter directory
(adapter_config.json, no config.json, e.g. RUN/final/adapter or a LoRA checkpoint): the
adapter's base model, named by its `base_model_name_or_path`, is loaded and the adapter
merged into it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from posttrain.common.distributed import unwrap_model
from posttrain.models.lora import (
    ADAPTER_SUBDIR,
    adapter_base_path,
    attach_adapter,
    is_adapter_dir,
    merge_adapter,
)

# An adapter's base may itself be an adapter directory (a LoRA run started from one);
# deeper chains than this are taken for a loop.
_MAX_ADAPTER_DEPTH = 8


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Hide transformers' "Loading weights" / "Writing model shards" bars inside the block.

    They would break into the training progress bar, or clutter a one-line completion.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _model_dir(model_dir: str | os.PathLike[str]) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(
            f"model path {str(path)!r} does not exist or is not a directory (posttrain "
            "loads local Hugging Face model directories)"
        )
    return path


_TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges*", "*.model", "*.tiktoken")


def _has_tokenizer_files(path: Path, pattern: str) -> bool:
    return next(path.glob(pattern), None) is not None


def load_tokenizer(model_dir: str | os.PathLike[str]) -> Any:
    """The tokenizer of a local model directory; posttrain never downloads one.

    From a directory without tokenizer files transformers builds, without a word, one that
    knows only special tokens, and training dies on a 0-element reshape: a ValueError here.
    """
    from transformers import AutoTokenizer

    path = _model_dir(model_dir)
    tokenizer = None
    if any(_has_tokenizer_files(path, pattern) for pattern in _TOKENIZER_FILES):
        with quiet_hf_progress():
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot load a tokenizer from {path}: {exc}") from None
    if tokenizer is None or len(tokenizer) <= len(tokenizer.added_tokens_decoder):
        raise ValueError(f"{path} has no tokenizer files (tokenizer.json or a vocabulary)")
    return tokenizer


def load_pretrained(
    model_dir: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) of a local Hugging Face model or LoRA adapter directory.

    A model directory (config.json), e.g. RUN/final, loads with `from_pretrained`; `dtype`
    None keeps the saved dtype. An adapter directory (adapter_config.json, no config.json),
    e.g. RUN/final/adapter or a LoRA checkpoint, loads its base model (the adapter's
    `base_model_name_or_path`, which must be a directory here) with the adapter merged
    in: a plain transformers model. A run directory's final/ that holds only adapter/
    (trained with --no-merge-lora) loads that adapter. posttrain never downloads: a path
    that is not one of these is a ValueError naming it, raised before transformers would
    try the hub. The tokenizer loads first, so that its errors come before the weights.
    """
    chain = model_chain(model_dir)
    tokenizer = load_tokenizer_of(chain)
    return load_model(chain, dtype), tokenizer


def model_chain(model_dir: str | os.PathLike[str], *, require_weights: bool = True) -> list[Path]:
    """The directories a model is made of: its base model directory (config.json) first,
    then each adapter merged into it, the one `model_dir` names last. ValueError for a
    path that is neither, a directory without weight files, or an adapter whose base is
    not a directory here. Reads directory listings and configs only, no weights.
    `require_weights=False` leaves the weight check to `check_model_weights`, for a
    caller that may not need them (resuming a finished run answers without them)."""
    path = _model_dir(model_dir)
    adapters: list[Path] = []
    while not (path / "config.json").is_file():
        if is_adapter_dir(path / ADAPTER_SUBDIR):
            path = path / ADAPTER_SUBDIR
        if not is_adapter_dir(path):
            raise ValueError(
                f"{str(path)!r} has no config.json: expected a Hugging Face model directory "
                "such as RUN_DIR/final, or a LoRA adapter directory (adapter_config.json)"
            )
        if len(adapters) >= _MAX_ADAPTER_DEPTH:
            raise ValueError(f"{path}: adapters on adapters deeper than {len(adapters)} (a loop?)")
        adapters.append(path)
        path = _adapter_base(path)
    chain = [path, *reversed(adapters)]
    if require_weights:
        check_model_weights(chain)
    return chain


def check_model_weights(chain: list[Path]) -> None:
    """ValueError, one line, when the base model of a `model_chain` has no weight files."""
    _check_weights(chain[0], _MODEL_WEIGHTS, "model weights")


# The weight files transformers and peft load from a directory (one, or an index of shards).
_MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _check_weights(path: Path, names: tuple[str, ...], what: str) -> None:
    """A directory with a config but no weights (say, config and tokenizer copied without
    the weights) fails deep inside transformers with a 30-line OSError: one line here,
    before anything is loaded."""
    if any((path / name).is_file() for name in names):
        return
    present = sorted(p.name for p in path.iterdir())
    shown = ", ".join(present[:6]) + (", ..." if len(present) > 6 else "")
    raise ValueError(
        f"{path} has no {what} ({' or '.join(names[::2])}); it holds only {shown}: copy "
        "the weights there, or point --model at a directory that has them"
    )


def _adapter_base(adapter_dir: Path) -> Path:
    base = adapter_base_path(adapter_dir)
    if base is None or not Path(base).is_dir():
        where = f"base model {base!r}" if base else "no base model (base_model_name_or_path)"
        raise ValueError(
            f"{adapter_dir} is a LoRA adapter of {where}, which is not a directory on this "
            "machine (posttrain never downloads): put the base model there, or set "
            f"base_model_name_or_path in {adapter_dir / 'adapter_config.json'} to its path"
        )
    return Path(base)


def load_tokenizer_of(chain: list[Path]) -> Any:
    """The tokenizer of a `model_chain`: the last adapter's that has tokenizer files, else
    the base model's. Loads no weights."""
    for path in reversed(chain[1:]):
        if any(_has_tokenizer_files(path, pattern) for pattern in _TOKENIZER_FILES):
            return load_tokenizer(path)
    return load_tokenizer(chain[0])


def load_model(chain: list[Path], dtype: torch.dtype | None = None) -> Any:
    """The model of a `model_chain`: the base model with each adapter merged in, in
    order. `dtype` None keeps the saved dtype."""
    from transformers import AutoModelForCausalLM

    with quiet_hf_progress():
        loaded = AutoModelForCausalLM.from_pretrained(chain[0], dtype=dtype or "auto")
        for adapter_dir in chain[1:]:
            loaded = merge_adapter(attach_adapter(loaded, adapter_dir))
            # peft froze the base to attach the adapter; from_pretrained models train.
            loaded.requires_grad_(True)
    return loaded


def _weight_files(ckpt_dir: Path) -> list[Path]:
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [ckpt_dir / name for name in sorted(set(weight_map.values()))]
    single = ckpt_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"no model.safetensors (or sharded index) in {ckpt_dir}")


def load_model_weights(model: torch.nn.Module, ckpt_dir: str | os.PathLike[str]) -> None:
    """Load a checkpoint's safetensors weights into `model`, in place and strictly.

    `save_pretrained` stores a tied parameter (e.g. lm_head tied to the embeddings)
    once; a key is allowed to be missing only if it shares storage with one that was
    loaded. Any other missing or unexpected key is a `ValueError`.
    """
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    model = unwrap_model(model)
    loaded: dict[str, torch.Tensor] = {}
    for path in _weight_files(ckpt_dir):
        loaded.update(load_file(str(path), device="cpu"))

    own = model.state_dict()
    unexpected = sorted(set(loaded) - set(own))
    missing = set(own) - set(loaded)
    loaded_ptrs = {own[key].data_ptr() for key in loaded if key in own}
    untied_missing = sorted(key for key in missing if own[key].data_ptr() not in loaded_ptrs)
    if unexpected or untied_missing:
        raise ValueError(
            f"weights in {ckpt_dir} do not match the model: missing {untied_missing[:10]}, "
            f"unexpected {unexpected[:10]}"
        )
    result = model.load_state_dict(loaded, strict=False)
    # Only the tied aliases may remain missing (checked above); load_state_dict's own
    # report is kept as a second guard against a key we failed to account for.
    leftover = [key for key in result.missing_keys if key not in missing]
    if leftover or result.unexpected_keys:
        raise ValueError(f"weights in {ckpt_dir} do not match the model: {result}")
