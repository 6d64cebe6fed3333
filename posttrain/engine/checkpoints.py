"""Atomic, resumable checkpoints in Hugging Face format.

Layout of a run directory::

    OUTPUT_DIR/
      checkpoints/
        step-000010/            a complete checkpoint
          config.json, model.safetensors, ...   model.save_pretrained()
          tokenizer.json, tokenizer_config.json, ...   tokenizer.save_pretrained()
          trainer_state.pt      optimizer, scheduler, every rank's RNG states, step, `extra`
          config.yaml           the run's resolved config (whichever command made it)
          COMPLETE              marker, written last
        step-000020/
      final/                    the trained model (+ tokenizer, config.yaml, COMPLETE)

A LoRA run (a peft model) saves its adapter instead of the whole model: a checkpoint
holds adapter_model.safetensors and adapter_config.json in place of config.json and
model.safetensors (the rest as above), and final/ holds the merged model (with
merge_lora; nothing but config.yaml without) plus the adapter in final/adapter/.

A checkpoint is written into `step-000020.tmp-<pid>` next to its final place,
fsynced, marked complete, and only then renamed into place. A kill at any point
therefore leaves either no `step-*` directory or a complete one: `latest_checkpoint`
only returns directories that carry the marker, and stale temporary directories
are removed by the next successful save.

Weights are restored with `posttrain.models.loading.load_model_weights` (or
`AutoModelForCausalLM.from_pretrained` on the checkpoint directory), an adapter's with
`posttrain.models.lora.load_adapter_weights`; everything else with `load_trainer_state` and
`restore_rng_state`. Only the main process should call the save functions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from posttrain.common.distributed import unwrap_model
from posttrain.config.spec import load_config, save_config_dict
from posttrain.engine.rng_state import collect_rng_state
from posttrain.models.heads import is_peft_model

# Loading moved to posttrain.models.loading; these names stay importable from here.
from posttrain.models.loading import load_model_weights as load_model_weights
from posttrain.models.loading import load_pretrained as load_pretrained
from posttrain.models.loading import load_tokenizer as load_tokenizer
from posttrain.models.loading import quiet_hf_progress
from posttrain.models.lora import ADAPTER_SUBDIR, save_adapter

CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
TRAINER_STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
COMPLETE_MARKER = "COMPLETE"
STATE_FORMAT_VERSION = 1

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Temporary names made by this module: `<name>.tmp-<pid>` (being written) and
# `<name>.old-<pid>` (a replaced directory awaiting deletion).
_SCRATCH_DIR = re.compile(r"^(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


# --------------------------------------------------------------------------- helpers

# What `torch.load(weights_only=True)` can rebuild. Checking this before saving turns
# a resume-time failure (hours later) into an immediate error at the first save.
_SAFE_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _check_loadable(value: Any, path: str) -> None:
    # Exact types: subclasses such as numpy.float64 or torch's TorchVersion (a str)
    # are pickled as their own class, which weights_only loading rejects.
    if type(value) in _SAFE_LEAVES or isinstance(value, (torch.Tensor, torch.Size)):
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in (str, int, float, bool, type(None)):
                raise TypeError(f"{path} has a key of type {type(key).__name__}: {key!r}")
            _check_loadable(item, f"{path}[{key!r}]")
        return
    if type(value) in (list, tuple, set):
        for index, item in enumerate(value):
            _check_loadable(item, f"{path}[{index}]")
        return
    raise TypeError(
        f"{path} has type {type(value).__name__}, which a checkpoint cannot store safely; "
        "use tensors, numbers, strings and lists/dicts of them"
    )


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory entry; directories cannot be opened on Windows."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            _fsync_path(Path(dirpath) / filename)
        _fsync_path(Path(dirpath))


def _write_marker(directory: Path, info: dict[str, Any]) -> None:
    marker = directory / COMPLETE_MARKER
    with open(marker, "w", encoding="utf-8") as fh:
        json.dump(info, fh)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_path(directory)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` to `target`, replacing an existing `target`.

    A directory cannot atomically replace a non-empty one, so an existing target is
    first moved aside (it is then invisible to `latest_checkpoint`, which is fine: it
    is being superseded by the same step) and deleted after the rename.
    """
    old = None
    if target.exists():
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _clean_scratch(parent: Path) -> None:
    """Delete temporary directories left by interrupted saves (of any earlier process)."""
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        match = _SCRATCH_DIR.match(entry.name)
        if match and entry.is_dir() and int(match["pid"]) != os.getpid():
            shutil.rmtree(entry, ignore_errors=True)


def _config_dict(config: Any) -> dict[str, Any] | None:
    """A config dataclass (any command's) or a mapping, as a plain dict."""
    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return dict(config)


def _write_model_dir(
    tmp: Path,
    model: torch.nn.Module,
    tokenizer: Any | None,
    config: Mapping[str, Any] | None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    command: str = "sft",
) -> None:
    # transformers 5 always writes safetensors (the `safe_serialization` switch is gone).
    # A sharded (FSDP) model is saved from its gathered full state dict; a peft model as
    # its adapter alone (from its gathered trainable weights, if given).
    model = unwrap_model(model)
    if is_peft_model(model):
        save_adapter(tmp, model, state_dict)
    else:
        with quiet_hf_progress():
            model.save_pretrained(
                tmp, state_dict=dict(state_dict) if state_dict is not None else None
            )
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if config is not None:
        save_config_dict(config, tmp / CONFIG_FILE, command)


# --------------------------------------------------------------------------- save


def _write_atomically(
    target: Path, write: Callable[[Path], None], marker_info: dict[str, Any]
) -> None:
    """Have `write` fill a temporary directory next to `target`, sync it, mark it complete
    and rename it into place: a kill at any point leaves no half-written `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        # The marker goes last: its presence vouches for everything written before it.
        _write_marker(tmp, {**marker_info, "time": time.time()})
        _move_into_place(tmp, target)
    except BaseException:
        # Includes KeyboardInterrupt; the partial directory would only be cleaned by
        # the next save, so try now (a hard kill still leaves it for that cleanup).
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _clean_scratch(target.parent)


def checkpoint_dir(output_dir: str | os.PathLike[str], step: int) -> Path:
    """Where the checkpoint of `step` lives (whether or not it exists)."""
    return Path(output_dir) / CHECKPOINTS_DIR / f"step-{step:06d}"


def save_checkpoint(
    output_dir: str | os.PathLike[str],
    step: int,
    model: torch.nn.Module,
    tokenizer: Any | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    config: Any,
    extra: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
    *,
    model_state_dict: Mapping[str, torch.Tensor] | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    rng_per_rank: list[dict[str, Any]] | None = None,
    command: str = "sft",
) -> Path:
    """Write a complete checkpoint of `step` atomically and return its directory.

    `config`: the run's config (a dataclass of any command, or a plain mapping), written
    as config.yaml headed by `command`. `extra` holds whatever else the loop needs to
    continue exactly (data position, sampler state, token counts...): tensors, numbers,
    strings and containers of them. After the save, all but the `keep_last` newest
    complete checkpoints are deleted (`keep_last` defaults to the config's `keep_last`;
    None keeps everything when neither is given), as are temporary directories of
    earlier, interrupted saves. `rng_per_rank`: each rank's generator states, gathered
    (None: this process's, as rank 0's).

    In a distributed run the caller gathers the state on every rank and passes it
    here on the main process: `model_state_dict`, the full weights of a sharded model
    (None: the model's own parameters), and `optimizer_state`, which replaces
    `optimizer.state_dict()` (posttrain passes a name-keyed full state so that any
    number of ranks can resume it).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    cfg = _config_dict(config)
    if keep_last is None and cfg is not None:
        keep_last = cfg.get("keep_last")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")

    if optimizer_state is not None:
        optimizer_state = dict(optimizer_state)
    elif optimizer is not None:
        optimizer_state = optimizer.state_dict()
    state: dict[str, Any] = {
        "format_version": STATE_FORMAT_VERSION,
        "step": int(step),
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        # Rank 0's states also under "rng", which older posttrain versions read.
        "rng": rng_per_rank[0] if rng_per_rank else collect_rng_state(),
        "rng_per_rank": list(rng_per_rank) if rng_per_rank else None,
        "extra": dict(extra) if extra is not None else {},
        "torch_version": str(torch.__version__),
    }
    _check_loadable(state, "trainer_state")

    def write(tmp: Path) -> None:
        _write_model_dir(tmp, model, tokenizer, cfg, model_state_dict, command)
        torch.save(state, tmp / TRAINER_STATE_FILE)

    target = checkpoint_dir(output_dir, step)
    _write_atomically(target, write, {"step": int(step)})
    if keep_last is not None:
        prune_checkpoints(output_dir, keep_last)
    return target


def save_final_model(
    output_dir: str | os.PathLike[str],
    model: torch.nn.Module,
    tokenizer: Any | None,
    config: Any,
    *,
    model_state_dict: Mapping[str, torch.Tensor] | None = None,
    step: int | None = None,
    merge_lora: bool = True,
    command: str = "sft",
) -> Path:
    """Write the trained model (and tokenizer, config.yaml) to OUTPUT_DIR/final atomically.

    `model_state_dict`: the gathered full weights of a sharded model (see `save_checkpoint`).
    `step`: the optimizer steps the model was trained for, recorded in the marker so that a
    resumed run knows the run is finished (`final_step`).

    A peft (LoRA) model writes its adapter to final/adapter/ (`model_state_dict` may then
    hold just the trainable weights) and, with `merge_lora`, the merged model to final/
    itself: the base model is loaded again from the adapter's `base_model_name_or_path`
    in float32 on the CPU and the adapter folded in, so final/ loads with
    `AutoModelForCausalLM.from_pretrained` like a full fine-tuning run's.
    """
    target = Path(output_dir) / FINAL_DIR
    info: dict[str, Any] = {"final": True}
    if step is not None:
        info["step"] = int(step)

    cfg = _config_dict(config)

    def write(tmp: Path) -> None:
        if not is_peft_model(unwrap_model(model)):
            _write_model_dir(tmp, model, tokenizer, cfg, model_state_dict, command)
            return
        adapter = tmp / ADAPTER_SUBDIR
        _write_model_dir(adapter, model, tokenizer, cfg, model_state_dict, command)
        if merge_lora:
            merged, _ = load_pretrained(adapter, dtype=torch.float32)
            _write_model_dir(tmp, merged, tokenizer, cfg, command=command)
        elif cfg is not None:
            save_config_dict(cfg, tmp / CONFIG_FILE, command)

    _write_atomically(target, write, info)
    return target


def final_step(output_dir: str | os.PathLike[str]) -> int | None:
    """The step count recorded with OUTPUT_DIR/final, or None (no final model, or one
    written before steps were recorded)."""
    marker = Path(output_dir) / FINAL_DIR / COMPLETE_MARKER
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    step = info.get("step") if isinstance(info, dict) else None
    return step if isinstance(step, int) else None


# --------------------------------------------------------------------------- find / prune


def is_complete(ckpt_dir: str | os.PathLike[str]) -> bool:
    """Whether `ckpt_dir` is a finished checkpoint (its marker was written)."""
    return (Path(ckpt_dir) / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The complete checkpoints of a run, oldest step first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and is_complete(entry):
            found.append((int(match[1]), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step, or None if there is none."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(output_dir: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest complete checkpoints; return the deleted ones."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    doomed = list_checkpoints(output_dir)[:-keep_last]
    for path in doomed:
        # Remove the marker first so that a half-deleted directory never looks complete.
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# --------------------------------------------------------------------------- load


def _require_complete(ckpt_dir: Path) -> None:
    if not ckpt_dir.is_dir():
        raise ValueError(f"checkpoint directory not found: {ckpt_dir}")
    if not is_complete(ckpt_dir):
        raise ValueError(
            f"{ckpt_dir} is not a complete checkpoint (no {COMPLETE_MARKER} marker): "
            "its save was interrupted"
        )


def load_trainer_state(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The trainer state of a checkpoint: step, optimizer, scheduler, rng, extra.

    Loaded on the CPU with `weights_only=True` (`save_checkpoint` only stores types
    that allow it), so a tampered file cannot run code. Pass `state["optimizer"]` to
    `optimizer.load_state_dict` (it moves tensors to the parameters' device).
    """
    ckpt_dir = Path(ckpt_dir)
    _require_complete(ckpt_dir)
    state = torch.load(ckpt_dir / TRAINER_STATE_FILE, map_location="cpu", weights_only=True)
    version = state.get("format_version")
    if version != STATE_FORMAT_VERSION:
        raise ValueError(
            f"{ckpt_dir / TRAINER_STATE_FILE} has format version {version}, this posttrain "
            f"reads version {STATE_FORMAT_VERSION}"
        )
    return state


def load_checkpoint_config(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The config saved with a checkpoint (or the final model), as a plain dict; the
    command's config class validates it."""
    return load_config(Path(ckpt_dir) / CONFIG_FILE)
