"""What a training method gives the engine: its data, its step, its hooks, its config.

The engine (`posttrain.engine.loop.run_method`) owns the loop, the run directory, the
model and its wrapping, the optimizer and schedule, checkpoints, resume, signals,
metrics and ranks. A method subclasses `Method` and fills in:

- `prepare`: read and check its data (every input error here, before the model loads)
  and say how many optimizer steps the run has;
- `step`: one optimizer step: its micro-batches through `run.accumulate` with its
  objective, then `run.optimizer_step`; returns the step's metrics;
- optionally `hooks` (evaluations on their own cadence), `state_dict` /
  `load_state_dict` (its data source's position, saved in every checkpoint), a data
  `fingerprint` and `resume_problems` (what makes a resumed run inexact), `log_plan`.

A method's config is saved with every checkpoint as `config_dict()`; on resume, a change
of a key in `breaks_exact_resume` is refused unless the user insists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

from posttrain.common.distributed import DistInfo
from posttrain.engine.run import Run


class Hook(Protocol):
    """Something the engine runs after some steps, e.g. an evaluation.

    `every`: run after every `every` steps (0: only after the last one). Called on every
    rank with the run, the number of steps done and a status callback for progress text;
    returns the metrics to log (rank 0 logs them).
    """

    every: int

    def __call__(self, run: Run, done: int, status: Callable[[str], None]) -> dict[str, float]: ...


class Method:
    """A training method on the engine. Subclasses set `command` and implement
    `config_dict`, `prepare` and `step`; the rest has defaults that do nothing."""

    # The command that runs it ("sft"): config.yaml's header says which config it is.
    command: str = "train"
    # Config keys of the method whose change on resume breaks exactness (data, objective).
    breaks_exact_resume: tuple[str, ...] = ()
    # Whether the run holds a frozen reference model (`run.reference_log_probs`).
    needs_reference: bool = False
    # Optimizer updates per step: a step may update several times (RL: one rollout batch,
    # then several optimizer steps on it); the learning-rate schedule spans them all.
    updates_per_step: int = 1
    # The metrics keys its `step` logs besides `engine.metrics.ENGINE_METRICS` (or with a
    # meaning of its own) -> one line on what each means.
    metrics: ClassVar[Mapping[str, str]] = {}
    # The classes of the hooks `hooks` may return; each declares the keys it logs in its
    # own `metrics` (an evaluation's, `eval_` keys).
    hook_types: ClassVar[tuple[type, ...]] = ()

    def config_dict(self) -> dict[str, Any]:
        """The method's whole config as plain values, saved with every checkpoint."""
        raise NotImplementedError

    def prepare(self, tokenizer: Any, info: DistInfo) -> int:
        """Load and check the data; return the run's number of optimizer steps."""
        raise NotImplementedError

    def step(self, run: Run, step: int) -> dict[str, float]:
        """Optimizer step `step` (0-based): gradients, `run.optimizer_step`, metrics."""
        raise NotImplementedError

    def setup(self, run: Run) -> None:
        """Once the run is prepared (and restored), before its first step: work that needs
        the model, such as scoring the data with the starting weights. Every rank calls it."""

    def hooks(self, run: Run) -> list[Hook]:
        """Evaluations and other work the engine runs on their own cadence."""
        return []

    def log_plan(self, run: Run) -> None:
        """Log, on rank 0, what the data became and how it is batched."""

    def fingerprint(self) -> str:
        """A short hash of the training data; a resumed run with other data is refused."""
        return ""

    def resume_problems(
        self, saved_config: Mapping[str, Any], saved_state: Mapping[str, Any], world_size: int
    ) -> list[str]:
        """What, besides changed `breaks_exact_resume` keys, makes resuming a checkpoint
        with this config inexact (e.g. another global batch); [] when nothing."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """The data source's position and anything else a resumed run needs: numbers,
        strings, tensors and containers of them."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (the checkpoint's trainer-state extra)."""
