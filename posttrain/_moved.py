"""Module names from before the package was grouped into folders (0.1.0), kept for one
release: `import posttrain.training` still works, warns, and gives the new module's names.
CHANGELOG.md lists each move."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

# Old module -> the module that holds its names now.
MOVED: dict[str, str] = {
    "posttrain.jsonl": "posttrain.common.jsonl",
    "posttrain.distributed": "posttrain.common.distributed",
    "posttrain.model_heads": "posttrain.models.heads",
    "posttrain.model_loading": "posttrain.models.loading",
    "posttrain.lora": "posttrain.models.lora",
    "posttrain.loss": "posttrain.models.policy",
    "posttrain.offline": "posttrain.models.tiny",
    "posttrain.data_report": "posttrain.data.report",
    "posttrain.prompts": "posttrain.generation.prompts",
    "posttrain.answer_eval": "posttrain.evaluation.answers",
    "posttrain.generation_eval": "posttrain.evaluation.hooks",
    "posttrain.checkpoints": "posttrain.engine.checkpoints",
    "posttrain.resume": "posttrain.engine.resume",
    "posttrain.run_dir": "posttrain.engine.run_dir",
    "posttrain.interrupts": "posttrain.engine.interrupts",
    "posttrain.metrics": "posttrain.engine.metrics",
    "posttrain.optim": "posttrain.engine.optim",
    "posttrain.rng_state": "posttrain.engine.rng_state",
    "posttrain.run_state": "posttrain.engine.setup",
    "posttrain.training": "posttrain.sft.train",
    "posttrain.config.schema": "posttrain.config.sft",
    "posttrain.config.eval_schema": "posttrain.config.eval",
    "posttrain.config.args": "posttrain.config.flags",
    "posttrain.demo_task": "posttrain.demo.task",
}


class _Alias(importlib.abc.Loader):
    """Loads an old name as a module that forwards every attribute to the new one."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new}; the old name goes in the next release",
            DeprecationWarning,
            stacklevel=3,
        )
        target = importlib.import_module(self.new)
        module = types.ModuleType(spec.name, target.__doc__)

        def forward(name: str) -> Any:
            return getattr(target, name)

        module.__getattr__ = forward  # type: ignore[method-assign]
        module.__dir__ = lambda: dir(target)  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    """Put the finder on `sys.meta_path` once."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
