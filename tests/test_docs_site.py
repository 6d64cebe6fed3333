"""The documentation site stays buildable and true to the code: the site, its settings
tables and its metrics keys.

- `mkdocs build --strict` passes (broken links and anchors included); the docs extras are
  part of `.[dev]`, so a missing mkdocs is a failure, not a skip.
- Every setting of every command has help, and the settings page covers every command.
- Every metrics key a real run writes is declared (`ENGINE_METRICS`, `Method.metrics`, the
  `metrics` of `Method.hook_types`).

The checkers take a page's text (or a run's rows) and return its problems, so each is
also tested on a page made to fail. The examples are checked in tests/test_docs_examples.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import make_config, metrics, reverse_task, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def load_hooks() -> Any:
    """docs/hooks.py, the mkdocs hooks that generate the reference tables."""
    spec = importlib.util.spec_from_file_location("posttrain_docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


hooks = load_hooks()


# --------------------------------------------------------------------------- the build


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with `mkdocs build --strict`."""
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, (
        "`mkdocs build --strict` failed (the docs extras come with `pip install -e '.[dev]'`):\n"
        + proc.stdout[-4000:]
        + proc.stderr[-8000:]
    )
    return out


def test_the_site_builds_strict_with_the_generated_tables(site: Path) -> None:
    settings = (site / "reference" / "settings" / "index.html").read_text(encoding="utf-8")
    metrics_page = (site / "reference" / "metrics" / "index.html").read_text(encoding="utf-8")
    api = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    for page in (settings, metrics_page):
        assert "posttrain:" not in page, "a placeholder was left in a generated page"
    assert "--micro-batch-size" in settings and "--max-new-tokens" in settings
    assert "eval_accuracy" in metrics_page and "reward_margin" in metrics_page
    assert "tokenize_prompt_and_output" in api and "compute_grpo_clip_loss" in api


# --------------------------------------------------------------------------- settings


def test_every_setting_of_every_command_has_help() -> None:
    from posttrain.config.train import TrainConfig

    missing = []
    for cmd in hooks.commands():
        if cmd.spec is not None:
            for name, field in cmd.spec.fields.items():
                if not str(field.metadata.get("help", "")).strip():
                    missing.append(f"posttrain {cmd.name}: setting {name!r}")
        for _, action in cmd.visible():
            if not (action.help or "").strip():
                missing.append(f"posttrain {cmd.name}: flag {'/'.join(action.option_strings)}")
    for field in TrainConfig.__dataclass_fields__.values():
        if not str(field.metadata.get("help", "")).strip():
            missing.append(f"TrainConfig: setting {field.name!r}")
    assert not missing, "settings without help text:\n" + "\n".join(missing)


def settings_problems(text: str) -> list[str]:
    """What the settings page `text` leaves out: a command without its table, or a flag or
    YAML key of a command missing from the tables it renders to."""
    asked = {m.group(2).split()[0] for m in hooks.PLACEHOLDER.finditer(text) if m.group(2)}
    problems = []
    for cmd in hooks.commands():
        if cmd.name not in asked:
            problems.append(f"no <!-- posttrain:settings {cmd.name} --> table")
            continue
        rendered = hooks.render("settings", [cmd.name])
        if cmd.training:
            rendered += hooks.render("settings", ["train"])
            if "train" not in asked:
                problems.append("no <!-- posttrain:settings train --> table")
        for _, action in cmd.visible():
            for option in action.option_strings:
                if option not in rendered:
                    problems.append(f"posttrain {cmd.name}: {option} is in no table")
        shown = {a.dest for _, a in cmd.visible()}
        for name in cmd.spec.fields if cmd.spec is not None else ():
            if name in shown and f"<code>{name}</code>" not in rendered:
                problems.append(f"posttrain {cmd.name}: setting {name} is in no table")
    return problems


def test_the_settings_page_has_every_command_and_every_flag() -> None:
    text = (DOCS / "reference" / "settings.md").read_text(encoding="utf-8")
    assert not settings_problems(text)
    # Made to fail: a command's table left out.
    assert settings_problems(text.replace("<!-- posttrain:settings dpo -->", "")) == [
        "no <!-- posttrain:settings dpo --> table"
    ]


def test_an_unknown_placeholder_fails_the_build() -> None:
    from mkdocs.exceptions import PluginError

    page = type("Page", (), {"file": type("File", (), {"src_uri": "x.md"})()})()
    with pytest.raises(PluginError, match="no command 'nope'"):
        hooks.on_page_markdown("<!-- posttrain:settings nope -->\n", page=page)
    with pytest.raises(PluginError, match="no method runs as 'eval'"):
        hooks.on_page_markdown("<!-- posttrain:metrics eval -->\n", page=page)
    # In fenced code a placeholder is shown, not replaced.
    shown = "```markdown\n<!-- posttrain:settings nope -->\n```\n"
    assert hooks.on_page_markdown(shown, page=page) == shown


# --------------------------------------------------------------------------- metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, workdir: Path) -> dict[str, list[dict]]:
    """Command -> the metrics.jsonl rows of a tiny run of it with every evaluation and
    every optional key on (grpo_clip and a KL penalty)."""
    from posttrain.config.dpo import DPOConfig
    from posttrain.config.grpo import ExpertIterationConfig, GRPOConfig
    from posttrain.dpo.train import train_dpo
    from posttrain.grpo.train import train_expert_iteration, train_grpo
    from posttrain.sft.train import train

    root = tmp_path_factory.mktemp("docs_metrics")
    tasks = reverse_task(8, seed=0)
    questions = write_jsonl(
        root / "questions.jsonl", [{"prompt": r["prompt"], "answer": r["response"]} for r in tasks]
    )
    pairs = write_jsonl(
        root / "pairs.jsonl",
        [
            {"prompt": r["prompt"], "chosen": r["response"], "rejected": " " + r["response"][::-1]}
            for r in tasks
        ],
    )
    common: dict[str, Any] = {
        "model": str(workdir / "model"),
        "precision": "fp32",
        "num_threads": 1,
        "progress": False,
        "eval_generate_file": str(questions),
        "eval_generate_limit": 2,
        "eval_max_new_tokens": 3,
        "reward": "exact",
    }
    rollout: dict[str, Any] = {
        **common,
        "train_file": str(questions),
        "max_steps": 1,
        "rollout_batch_size": 4,
        "group_size": 2,
        "generation_batch_size": 4,
        "train_batch_size": 2,
        "micro_batch_size": 2,
        "max_new_tokens": 3,
    }
    out: dict[str, Path] = {name: root / name for name in ("sft", "grpo", "ei", "dpo")}
    train(
        make_config(
            workdir,
            out["sft"],
            max_steps=1,
            eval_file=str(workdir / "eval.jsonl"),
            eval_limit=2,
            **{k: v for k, v in common.items() if k != "model"},
        )
    )
    train_grpo(GRPOConfig(**rollout, output_dir=str(out["grpo"]), loss_type="grpo_clip", beta=0.1))
    train_expert_iteration(ExpertIterationConfig(**rollout, output_dir=str(out["ei"])))
    train_dpo(
        DPOConfig(
            **common,
            train_file=str(pairs),
            eval_file=str(pairs),
            output_dir=str(out["dpo"]),
            max_steps=1,
            micro_batch_size=2,
        )
    )
    return {
        "sft": metrics(out["sft"]),
        "grpo": metrics(out["grpo"]),
        "expert-iteration": metrics(out["ei"]),
        "dpo": metrics(out["dpo"]),
    }


def declared(method: type) -> set[str]:
    """Every key the method declares: the engine's, its own, its hooks'."""
    from posttrain.engine.metrics import ENGINE_METRICS

    keys = {*ENGINE_METRICS, *method.metrics}
    for hook in method.hook_types:
        keys |= set(hook.metrics)
    return keys


def undeclared(method: type, rows: list[dict]) -> list[str]:
    """The keys of `rows` (metrics.jsonl lines) that `method` does not declare."""
    keys = {key for row in rows for key in row}
    return sorted(keys - declared(method))


def test_every_metrics_key_a_run_writes_is_declared(runs: dict[str, list[dict]]) -> None:
    from posttrain.engine.metrics import ENGINE_METRICS

    methods = hooks.methods()
    assert set(methods) == set(runs), "a method without a run here, or a run without a method"
    assert ENGINE_METRICS
    for name, rows in runs.items():
        method = methods[name]
        assert method.metrics and all(h.metrics for h in method.hook_types), name
        missing = undeclared(method, rows)
        assert not missing, f"{name} logs keys it does not declare: {missing}"
        # The engine's keys are on every training line; the evaluations ran.
        training = [r for r in rows if "loss" in r and "eval_loss" not in r]
        assert training and all(set(ENGINE_METRICS) <= set(r) for r in training), name
        for hook in method.hook_types:
            assert any(set(hook.metrics) <= set(r) for r in rows), f"{name}: {hook.__name__}"
    # Made to fail: a key nobody declared.
    assert undeclared(methods["sft"], [{"step": 1, "loss": 1.0, "bogus": 2.0}]) == ["bogus"]
