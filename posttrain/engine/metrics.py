"""Metrics of a training run: a JSONL log, optional trackers, a progress bar and a plot.

`OUTPUT_DIR/metrics.jsonl` has one JSON object per line, each with an integer
"step" and whatever the loop logged at that step, for example::

    {"step": 10, "loss": 1.93, "lr": 2e-05, "grad_norm": 0.71, "entropy": 2.1,
     "token_accuracy": 0.55, "tokens_per_s": 5321.0}
    {"step": 10, "eval_loss": 1.88, "eval_perplexity": 6.55, "eval_entropy": 2.0,
     "eval_token_accuracy": 0.56}

Non-finite values are written as NaN / Infinity (which Python's json and pandas
read). Lines are flushed as they are written, so the file can be followed live.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from posttrain.common.jsonl import read_jsonl
from posttrain.common.plotting import quiet_font_cache

METRICS_FILE = "metrics.jsonl"

# The keys on the training lines of every method -> what each means: "step" is added by
# `MetricsLogger.log`, "loss" is what the loop reports as the final loss, and `lr` and
# `grad_norm` are what `Run.optimizer_step` returns. What else a method logs is its
# `Method.metrics`, and its evaluations' keys the `metrics` of its `Method.hook_types`
# (docs/reference/metrics.md is generated from these; tests/test_docs_site.py checks them
# against real runs).
ENGINE_METRICS: dict[str, str] = {
    "step": "optimizer steps done, counted from 1 (RL: rollout batches); on every line",
    "loss": "the training loss of the step (what it is: the method's table)",
    "lr": "learning rate of the step's last optimizer update",
    "grad_norm": "gradient norm before clipping (a step of several updates: their mean)",
}

# Trackers `report_to` may name -> (module to import, pip package).
_TRACKERS = {"wandb": ("wandb", "wandb"), "tensorboard": ("torch.utils.tensorboard", "tensorboard")}


def _plain(value: Any) -> Any:
    """A JSON-serialisable builtin for a metric (tensors and numpy scalars become numbers)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    item = getattr(value, "item", None)  # 0-d torch tensors and numpy scalars
    if callable(item):
        return item()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def require_tracker(report_to: str) -> Any:
    """Import and return the module of tracker `report_to` ("none" -> None).

    Raises ImportError with the install command when the package is missing, so a
    run fails at start rather than after its first steps.
    """
    if report_to == "none":
        return None
    if report_to not in _TRACKERS:
        raise ValueError(
            f"report_to must be one of 'none', {', '.join(map(repr, _TRACKERS))}, got {report_to!r}"
        )
    module_name, package = _TRACKERS[report_to]
    try:
        if report_to == "tensorboard":
            # torch.utils.tensorboard's own ImportError does not name the pip package.
            importlib.import_module("tensorboard")
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"report_to={report_to!r} needs `pip install {package}`") from exc


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; a torn last line (from a kill) is skipped."""
    rows = read_jsonl(path, skip_malformed=True)
    return [r for _, r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)]


class MetricsLogger:
    """Append metrics to OUTPUT_DIR/metrics.jsonl and, if asked, to wandb or tensorboard.

    `run_config`: the run's settings as a dict; its `report_to` picks the tracker, and
    wandb records the whole dict.

    With `resume_step` set (a resumed run), earlier lines are kept except those with
    step > resume_step, which the resumed run is about to log again; otherwise the file
    is started afresh. With `enabled=False` (non-main ranks) every call is a no-op.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        run_config: Mapping[str, Any] | None = None,
        enabled: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._file: IO[str] | None = None
        self._wandb_run: Any = None
        self._tb_writer: Any = None
        if not enabled:
            return
        config_dict = dict(run_config) if run_config is not None else {}
        report_to = config_dict.get("report_to", "none")
        tracker = require_tracker(report_to)  # before touching any file: fail fast

        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
            mode = "a"
        else:
            mode = "w"
        # Held open for the logger's lifetime (closed in close()), not a with-block.
        self._file = open(self.path, mode, encoding="utf-8")  # noqa: SIM115

        if report_to == "wandb":
            self._wandb_run = self._start_wandb(tracker, config_dict, resume_step)
        elif report_to == "tensorboard":
            self._tb_writer = tracker.SummaryWriter(
                log_dir=str(Path(output_dir) / "tensorboard"),
                # Drops events past the resumed step, as the JSONL truncation does.
                purge_step=None if resume_step is None else resume_step + 1,
            )

    def _truncate_after(self, step: int) -> None:
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            for record in kept:
                fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def _start_wandb(self, wandb: Any, config_dict: dict[str, Any], resume_step: int | None) -> Any:
        # The run id is kept in the output dir so that a resumed run continues the
        # same wandb run instead of starting a second one.
        id_file = self.path.parent / "wandb_run_id.txt"
        run_id = None
        if resume_step is not None and id_file.exists():
            run_id = id_file.read_text(encoding="utf-8").strip() or None
        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "posttrain"),
            config=config_dict,
            dir=str(self.path.parent),
            id=run_id,
            resume="allow",
        )
        id_file.write_text(str(run.id), encoding="utf-8")
        return run

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one line: {"step": step, **metrics}."""
        if not self.enabled or self._file is None:
            return
        record = {"step": int(step)}
        record.update({str(k): _plain(v) for k, v in metrics.items() if k != "step"})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if self._tb_writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb_writer.add_scalar(key, value, step)

    def close(self) -> None:
        """Close the file and finish the trackers (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- console


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{key} {value}"
    if key in ("lr",) or key.endswith("_lr"):
        return f"{key} {value:.2e}"
    if "tokens_per_s" in key:
        return f"tok/s {value:,.0f}"
    if isinstance(value, int):
        return f"{key} {value}"
    if not math.isfinite(value) or value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{key} {value:.4f}"
    return f"{key} {value:.3e}"


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """`loss 1.2345 | lr 2.00e-05 | tok/s 1,234` (loss first, then as given)."""
    keys = sorted(metrics, key=lambda k: (k not in ("loss", "eval_loss"), k != "lr"))
    return " | ".join(_fmt(k, metrics[k]) for k in keys if k != "step")


BAR_KEYS = ("loss", "eval_loss", "lr", "tokens_per_s")
# Off a terminal, status lines (evaluation progress) are printed at most this often.
STATUS_EVERY_S = 10.0


def progress_bar(label: str, stream: IO[str], with_info: bool = False) -> Any:
    """A rich progress bar for a terminal: `label done/total`, the bar, elapsed and
    remaining time, and (`with_info`) a task field `info` shown after them."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn(f"[bold]{label}"),
        MofNCompleteColumn(),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("<"),
        TimeRemainingColumn(),
    ]
    if with_info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, console=Console(file=stream), transient=False)


class ProgressReporter:
    """A rich progress bar on a terminal, a plain line per logged step otherwise.

    Call `update(step)` every step and `update(step, metrics)` when there are metrics
    to show; without a terminal (CI logs, `nohup`), or with `bar=False` (`--no-progress`),
    only the latter print, one line each, so log files stay readable. `enabled=False`
    (every rank but rank 0) prints nothing.
    """

    def __init__(
        self,
        total_steps: int,
        enabled: bool = True,
        stream: IO[str] | None = None,
        bar: bool = True,
    ) -> None:
        self.total_steps = int(total_steps)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self._start = time.monotonic()
        self._last_status = self._start
        self._progress: Any = None
        self._task: Any = None
        if not enabled:
            return
        isatty = getattr(self.stream, "isatty", None)
        if bar and callable(isatty) and isatty():
            self._progress = progress_bar("step", self.stream, with_info=True)
            self._task = self._progress.add_task("train", total=self.total_steps, info="")
            self._progress.start()

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Show progress up to `step` (and `metrics`, if given)."""
        if not self.enabled:
            return
        if self._progress is not None:
            # The bar shares one terminal line: only the headline numbers fit beside it;
            # metrics.jsonl has them all.
            shown = {k: metrics[k] for k in BAR_KEYS if k in metrics} if metrics else {}
            fields = {"info": format_metrics(shown)} if shown else {}
            self._progress.update(self._task, completed=step, **fields)
        elif metrics:
            elapsed = time.monotonic() - self._start
            line = f"step {step}/{self.total_steps} | {format_metrics(metrics)} | {elapsed:.0f}s"
            print(line, file=self.stream, flush=True)

    def status(self, text: str) -> None:
        """Show what the run is doing between steps (e.g. "eval 40/1319"): beside the bar
        on a terminal, else a plain line at most every `STATUS_EVERY_S` seconds."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, info=text)
            return
        now = time.monotonic()
        if now - self._last_status >= STATUS_EVERY_S:
            self._last_status = now
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Stop the bar, leaving its last state on screen."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- plot


def _series(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]


# Panels of the plot, top to bottom: (title, metrics drawn in it, relative height).
PANELS = (
    ("loss", ("loss", "eval_loss"), 3),
    ("reward", ("reward", "answer_reward", "format_reward"), 2),
    ("reward margin", ("reward_margin", "eval_reward_margin"), 2),
    ("preference accuracy", ("reward_accuracy", "eval_reward_accuracy"), 1),
    ("held-out accuracy", ("eval_accuracy",), 2),
    ("response length", ("response_length",), 1),
    ("lr", ("lr",), 1),
)
# Panels drawn only when a run logged what they show (RL rewards, generation evaluation).
_OPTIONAL_PANELS = (
    "reward",
    "reward margin",
    "preference accuracy",
    "held-out accuracy",
    "response length",
)


def plot_panels(records: list[dict[str, Any]]) -> list[str]:
    """Titles of the panels `plot_metrics` draws for these records: loss and lr always;
    rewards, held-out accuracy and response length when the run logged them."""
    return [
        title
        for title, keys, _ in PANELS
        if title not in _OPTIONAL_PANELS or any(_series(records, k) for k in keys)
    ]


def plot_metrics(
    metrics_jsonl_path: str | os.PathLike[str], png_path: str | os.PathLike[str]
) -> Path:
    """Plot the loss (train and eval), an RL run's rewards and response length, a DPO run's
    reward margin and preference accuracy, held-out accuracy when a generation evaluation
    ran, and the learning rate over steps; return the PNG path."""
    # Figure without pyplot: no global state and no GUI backend, safe in any process.
    with quiet_font_cache():
        from matplotlib.figure import Figure

    records = read_metrics(metrics_jsonl_path)
    series = {key: _series(records, key) for _, keys, _ in PANELS for key in keys}
    panels = [p for p in PANELS if p[0] in plot_panels(records)]
    fig = Figure(figsize=(8, 5.5 + 1.5 * (len(panels) - 2)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, height_ratios=[p[2] for p in panels])
    styles = {"loss": ("-", "train loss"), "eval_loss": ("o-", "eval loss"), "lr": ("-", "lr")}
    for ax, (title, keys, _) in zip(axes, panels, strict=True):
        drawn = [key for key in keys if series[key]]
        for key in drawn:
            style, label = styles.get(key, ("o-", key))
            ax.plot(*zip(*series[key], strict=True), style, label=label, markersize=4)
        if title in ("loss", "reward", "reward margin", "preference accuracy"):
            if drawn:
                ax.legend()
            else:
                ax.text(0.5, 0.5, "no loss logged", ha="center", va="center")
        if title == "held-out accuracy":
            ax.set_ylim(-0.02, 1.02)
        if title == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(Path(metrics_jsonl_path).parent.name or "metrics")
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    return png_path


# --------------------------------------------------------------------------- memory


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes."""
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    return int(peak if sys.platform == "darwin" else peak * 1024)
