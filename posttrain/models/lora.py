"""LoRA through `peft`: which layers get adapters, wrapping a model, adapter files, merging.

peft is an optional dependency (`pip install 'posttrain[lora]'`), imported only when a
run asks for LoRA (`lora_r > 0`) or an adapter directory is loaded; `require_peft` turns
its absence into one line saying what to install.

Target modules: `all-linear` is every linear layer of the decoder body (attention and
MLP projections), never the output head or the embeddings, which a user can still name
(`all-linear,lm_head`). Named modules match a layer's full name or its last parts
(`q_proj` matches `model.layers.0.self_attn.q_proj`), as in peft; a name that matches no
linear or embedding layer is a ValueError listing the names that exist.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (peft's
own format, loadable with `peft.PeftModel.from_pretrained`) and no `config.json`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("posttrain")

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# OUTPUT_DIR/final/adapter: the adapter of a finished LoRA run (final/ is the merged model).
ADAPTER_SUBDIR = "adapter"
ALL_LINEAR = "all-linear"
INSTALL_HINT = "pip install 'posttrain[lora]'"


class PeftUnavailable(ImportError):
    """LoRA was asked for but peft is not installed; the CLI prints the message alone."""

    user_facing = True


def require_peft() -> ModuleType:
    """The `peft` module, or `PeftUnavailable` saying how to install it."""
    try:
        import peft
    except ImportError:
        raise PeftUnavailable(
            f"LoRA needs the peft package, which is not installed: {INSTALL_HINT}"
        ) from None
    return peft


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is an adapter directory: adapter_config.json, no config.json."""
    path = Path(path)
    return (path / ADAPTER_CONFIG_FILE).is_file() and not (path / "config.json").is_file()


def adapter_base_path(adapter_dir: str | os.PathLike[str]) -> str | None:
    """The `base_model_name_or_path` an adapter directory was trained on (None if unset)."""
    config_path = Path(adapter_dir) / ADAPTER_CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {config_path}: {exc}") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return str(base) if base else None


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class LoraSettings:
    """What LoRA to apply: rank `r` (> 0), `alpha` (None: 2r), dropout on the adapter
    input, and `target_modules` ("all-linear" and/or comma-separated module names)."""

    r: int
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: str = ALL_LINEAR

    @property
    def scaled_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.r


def _adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules peft can put LoRA on, by full name: linear (and GPT-2's Conv1D) layers and
    embeddings."""
    kinds = (nn.Linear, nn.Embedding)
    return {
        name: module
        for name, module in model.named_modules()
        if name and (isinstance(module, kinds) or type(module).__name__ == "Conv1D")
    }


def _body_prefix(model: nn.Module) -> str | None:
    """The name of the decoder body inside a CausalLM (`model` for Llama), or None."""
    get_decoder = getattr(model, "get_decoder", None)
    body = get_decoder() if callable(get_decoder) else None
    if not isinstance(body, nn.Module) or body is model:
        return None
    return next((name for name, module in model.named_modules() if module is body), None)


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of targets: the full name, or its trailing dotted parts.
    return name == target or name.endswith("." + target)


def _body_linear_names(model: nn.Module, modules: Mapping[str, nn.Module]) -> list[str]:
    prefix = _body_prefix(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in modules.items()
        if not isinstance(module, nn.Embedding)
        and module is not head
        and (prefix is None or name.startswith(prefix + "."))
    ]


def _short_names(selected: list[str], modules: Mapping[str, nn.Module]) -> list[str]:
    """peft targets that match exactly `selected`: leaf names (q_proj, ...) where a leaf
    name matches nothing else, full names where it would (so the head never rides along)."""
    chosen = set(selected)
    targets: list[str] = []
    for leaf in sorted({name.rpartition(".")[2] for name in selected}):
        hits = {name for name in modules if _matches(name, leaf)}
        targets += [leaf] if hits <= chosen else sorted(hits & chosen)
    return targets


def resolve_target_modules(model: nn.Module, spec: str) -> list[str]:
    """peft `target_modules` for `spec`: "all-linear" (every linear layer of the decoder
    body, not the head or embeddings) and/or comma-separated module names.

    Raises ValueError for a name that matches no linear or embedding layer, listing the
    layer names the model has.
    """
    modules = _adaptable_modules(model)
    entries = [part.strip() for part in spec.split(",") if part.strip()]
    if not entries:
        raise ValueError("lora_target_modules is empty: use 'all-linear' or module names")
    targets: list[str] = []
    for entry in entries:
        if entry == ALL_LINEAR:
            targets += _short_names(_body_linear_names(model, modules), modules)
        elif any(_matches(name, entry) for name in modules):
            targets.append(entry)
        else:
            linear = sorted({n.rpartition(".")[2] for n, m in modules.items() if _is_linear(m)})
            embeddings = sorted(
                {n.rpartition(".")[2] for n, m in modules.items() if isinstance(m, nn.Embedding)}
            )
            raise ValueError(
                f"lora_target_modules: {entry!r} matches no linear or embedding layer of "
                f"{type(model).__name__}; its linear layers are {', '.join(linear) or 'none'} "
                f"and its embeddings {', '.join(embeddings) or 'none'} (or use 'all-linear')"
            )
    if not targets:
        raise ValueError(f"lora_target_modules {spec!r}: the model has no linear layers")
    return list(dict.fromkeys(targets))


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


# --------------------------------------------------------------------------- wrapping


@contextlib.contextmanager
def _peft_deprecations_hidden() -> Iterator[None]:
    """peft asks transformers 5 a deprecated question (`is_gradient_checkpointing`) when it
    wraps a model; the FutureWarning is peft's to fix, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        yield


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared (tied) tensor counted once."""
    params = list(model.parameters())  # parameters() yields a tied tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def apply_lora(
    model: nn.Module, settings: LoraSettings, base_path: str | None = None, log: bool = True
) -> nn.Module:
    """Wrap `model` (a transformers CausalLM) in a peft LoRA model; returns the PeftModel.

    Everything but the adapters is frozen (requires_grad False). The adapters' A matrices
    are drawn from torch's global RNG and B is zero, so the wrapped model computes what
    `model` did and a seeded run is repeatable. `base_path` is written to the adapter's
    config as `base_model_name_or_path` (use an absolute path: adapter directories are
    loaded from anywhere). `log`: log the targets and trainable/total parameter counts.
    """
    if settings.r <= 0:
        raise ValueError(f"lora_r must be > 0 to apply LoRA, got {settings.r}")
    peft = require_peft()
    targets = resolve_target_modules(model, settings.target_modules)
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.scaled_alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _peft_deprecations_hidden():
        wrapped = peft.get_peft_model(model, config)
    if base_path is not None:
        wrapped.peft_config["default"].base_model_name_or_path = base_path
    if log:
        trainable, total = parameter_counts(wrapped)
        layers = sum(1 for name, _ in wrapped.named_modules() if name.endswith(".lora_A"))
        logger.info(
            "LoRA r=%d, alpha %g, dropout %g on %d layers (%s): %s trainable of %s "
            "parameters (%.2f%%)",
            settings.r,
            settings.scaled_alpha,
            settings.dropout,
            layers,
            ", ".join(targets[:12]) + (", ..." if len(targets) > 12 else ""),
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / max(total, 1),
        )
    return wrapped


# --------------------------------------------------------------------------- files


def adapter_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's file keys (adapter name removed).

    `state_dict`: the model's gathered weights (e.g. only the trainable ones, from a
    sharded model); None reads the model's own parameters.
    """
    peft = require_peft()
    return peft.get_peft_model_state_dict(
        model,
        state_dict=dict(state_dict) if state_dict is not None else None,
        save_embedding_layers=False,  # "auto" may look the base model up on the hub
    )


def save_adapter(
    directory: str | os.PathLike[str],
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write adapter_model.safetensors and adapter_config.json of a PeftModel.

    The files are peft's own (no model card); `state_dict` as in `adapter_state_dict`.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {
        key: tensor.detach().to("cpu").contiguous()
        for key, tensor in adapter_state_dict(model, state_dict).items()
    }
    save_file(weights, str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    config = model.peft_config["default"]
    # A saved adapter is loaded for inference unless asked otherwise (peft's convention).
    training_mode = config.inference_mode
    config.inference_mode = True
    try:
        config.save_pretrained(str(directory))
    finally:
        config.inference_mode = training_mode


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Load a saved adapter's weights into a PeftModel with the same LoRA layout, strictly.

    A missing, unexpected or differently shaped tensor is a ValueError naming it (a run
    resumed with another rank or other target modules).
    """
    from safetensors.torch import load_file

    peft = require_peft()
    path = Path(directory) / ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"no {ADAPTER_WEIGHTS_FILE} in {directory}")
    loaded = load_file(str(path), device="cpu")
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(loaded))
    unexpected = sorted(set(loaded) - set(own))
    reshaped = sorted(
        f"{key} {tuple(loaded[key].shape)} vs {tuple(own[key].shape)}"
        for key in set(own) & set(loaded)
        if loaded[key].shape != own[key].shape
    )
    if missing or unexpected or reshaped:
        raise ValueError(
            f"the adapter in {directory} does not fit the model's LoRA layers: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}, other shapes {reshaped[:5]}"
        )
    peft.set_peft_model_state_dict(model, loaded)


def attach_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> Any:
    """`model` (the adapter's base) with the adapter of `directory` loaded, frozen, as a
    PeftModel for inference (any adapter type peft reads)."""
    peft = require_peft()
    with _peft_deprecations_hidden():
        return peft.PeftModel.from_pretrained(model, str(directory), is_trainable=False)


def merge_adapter(model: nn.Module) -> nn.Module:
    """The base model with the adapter's update folded into its weights (W + s B A): a
    plain transformers model, whose logits equal the adapter model's up to rounding."""
    return model.merge_and_unload()
