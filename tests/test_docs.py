"""The documentation site stays buildable and true to the code.

- `mkdocs build --strict` passes (broken links and anchors included); the docs extras are
  part of `.[dev]`, so a missing mkdocs is a failure, not a skip.
- Every setting of every command has help, and the settings page covers every command.
- Every metrics key a real run writes is declared (`ENGINE_METRICS`, `Method.metrics`, the
  `metrics` of `Method.hook_types`).
- Examples: ```pycon blocks of docs/ run as doctests (a page's blocks in order, sharing
  names, in a temporary directory); ```python blocks of docs/ and README.md compile and
  their posttrain imports import; `posttrain ...` command lines in ```bash, ```sh,
  ```shell and ```console blocks name a real subcommand and only flags it accepts.
- README.md stays short, and its relative links point at files that exist.

The checkers take a page's text and return its problems, so each is also tested on a
page made to fail.
"""

from __future__ import annotations

import ast
import doctest
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import make_config, metrics, reverse_task, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 200


def load_hooks() -> Any:
    """docs/hooks.py, the mkdocs hooks that generate the reference tables."""
    spec = importlib.util.spec_from_file_location("posttrain_docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


hooks = load_hooks()


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def label(path: Path, root: Path = ROOT) -> str:
    return str(path.relative_to(root))


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


# --------------------------------------------------------------------------- code blocks


@dataclass
class Block:
    """A fenced code block: its language, text (dedented) and first line in the file."""

    lang: str
    text: str
    line: int


FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")


def code_blocks(text: str) -> Iterator[Block]:
    """The fenced code blocks of a markdown text, nested ones (in lists, admonitions,
    tabs) included."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = len(match["indent"]), match["fence"]
        info = match["info"].strip().lstrip("{").lstrip(".")
        lang = re.split(r"[\s{}]", info, maxsplit=1)[0].lower() if info else ""
        body = []
        j = i + 1
        while j < len(lines):
            close = FENCE.match(lines[j])
            if (
                close
                and close["fence"][0] == fence[0]
                and len(close["fence"]) >= len(fence)
                and not close["info"].strip()
            ):
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        yield Block(lang, "\n".join(body) + "\n", i + 2)
        i = j + 1


def blocks_of(path: Path, *langs: str) -> list[Block]:
    return [b for b in code_blocks(path.read_text(encoding="utf-8")) if b.lang in langs]


# ---- pycon: doctests


def pycon_problems(name: str, blocks: list[Block], cwd: Path) -> list[str]:
    """Run a page's ```pycon blocks as doctests, in order, sharing their names, in `cwd`."""
    parser = doctest.DocTestParser()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    globs: dict[str, Any] = {"__name__": "__docs__"}
    problems = []
    before = Path.cwd()
    os.chdir(cwd)
    try:
        for block in blocks:
            test = parser.get_doctest(block.text, globs, name, name, block.line - 1)
            report = io.StringIO()
            runner = doctest.DocTestRunner(optionflags=flags)
            result = runner.run(test, out=report.write, clear_globs=False)
            if result.failed:
                problems.append(report.getvalue())
    finally:
        os.chdir(before)
    return problems


def test_pycon_examples_run(tmp_path: Path) -> None:
    problems = []
    for page in doc_pages():
        blocks = blocks_of(page, "pycon")
        if blocks:
            cwd = tmp_path / page.stem
            cwd.mkdir(parents=True, exist_ok=True)
            problems += pycon_problems(label(page), blocks, cwd)
    assert not problems, "\n".join(problems)


def test_a_wrong_pycon_example_is_reported(tmp_path: Path) -> None:
    page = "```pycon\n>>> x = 40\n>>> x + 2\n42\n```\n\n```pycon\n>>> x + 1\n42\n```\n"
    problems = pycon_problems("docs/scratch.md", blocks_of_text(page, "pycon"), tmp_path)
    assert len(problems) == 1 and "x + 1" in problems[0] and "docs/scratch.md" in problems[0]


def blocks_of_text(text: str, *langs: str) -> list[Block]:
    return [b for b in code_blocks(text) if b.lang in langs]


# ---- python: compiles, posttrain imports import


PYTHON_LANGS = ("python", "py", "python3")


def python_problems(name: str, blocks: list[Block]) -> list[str]:
    """A ```python block must compile, and its imports of posttrain names must work."""
    problems = []
    for block in blocks:
        where = f"{name}:{block.line}"
        try:
            tree = ast.parse(block.text, filename=where)
        except SyntaxError as exc:
            problems.append(f"{where}: does not compile: {exc}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                ours = (node.module or "").split(".")[0] == "posttrain" and node.level == 0
            elif isinstance(node, ast.Import):
                ours = any(alias.name.split(".")[0] == "posttrain" for alias in node.names)
            else:
                continue
            if ours:
                statement = ast.unparse(node)
                try:
                    exec(statement, {})
                except Exception as exc:
                    problems.append(f"{where}: `{statement}` fails: {type(exc).__name__}: {exc}")
    return problems


def test_python_examples_compile_and_import() -> None:
    problems = []
    for page in [*doc_pages(), README]:
        problems += python_problems(label(page), blocks_of(page, *PYTHON_LANGS))
    assert not problems, "\n".join(problems)


def test_a_wrong_python_example_is_reported() -> None:
    page = (
        "```python\nfrom posttrain import train_sft, no_such_name\n```\n\n"
        "```py\nx = (\n```\n\n```python\nimport json\nfrom posttrain.rl import kl_penalty\n```\n"
    )
    problems = python_problems("docs/scratch.md", blocks_of_text(page, *PYTHON_LANGS))
    assert len(problems) == 2
    assert "docs/scratch.md:2" in problems[0] and "no_such_name" in problems[0]
    assert "docs/scratch.md:6: does not compile" in problems[1]


# ---- shell: posttrain command lines


SHELL_LANGS = ("bash", "sh", "shell", "console", "zsh")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
WRAPPERS = {"nohup", "time", "exec", "env", "sudo", "command"}
OPERATORS = {"&&", "||", "|", ";", "&", "|&"}


def shell_commands(block: Block) -> Iterator[tuple[int, str]]:
    """(line, command) of a shell block: continuations joined; in a console block only
    the `$ ` lines (the rest is output), elsewhere every line but comments."""
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        line, start = lines[i], block.line + i
        i += 1
        stripped = line.strip()
        if block.lang == "console" and not stripped.startswith("$ "):
            continue
        if stripped.startswith("$ "):
            stripped = stripped[2:]
        if not stripped or stripped.startswith("#"):
            continue
        while stripped.endswith("\\") and i < len(lines):
            stripped = stripped[:-1] + " " + lines[i].strip()
            i += 1
        yield start, stripped


def posttrain_args(tokens: list[str]) -> list[str] | None:
    """The arguments after `posttrain` in one simple command, or None if it runs no
    posttrain: `posttrain ...`, `.venv/bin/posttrain ...`, `python -m posttrain ...`,
    `torchrun ... -m posttrain ...`, after `VAR=value` and `nohup`/`time`/`env`."""
    i = 0
    while i < len(tokens) and (ENV_ASSIGNMENT.match(tokens[i]) or tokens[i] in WRAPPERS):
        i += 1
    if i < len(tokens) and os.path.basename(tokens[i]) == "posttrain":
        return tokens[i + 1 :]
    for j in range(i, len(tokens) - 1):
        if tokens[j] in ("-m", "--module") and tokens[j + 1] == "posttrain":
            return tokens[j + 2 :]
    return None


def simple_commands(command: str) -> list[list[str]]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    parts: list[list[str]] = [[]]
    for token in lexer:
        if token in OPERATORS:
            parts.append([])
        else:
            parts[-1].append(token)
    return [p for p in parts if p]


def cli_problems(args: list[str]) -> list[str]:
    """What is wrong with `posttrain ARGS`: an unknown subcommand, a flag its parser does
    not accept, or a value outside a flag's choices."""
    from posttrain.cli.main import _NEGATIVE_NUMBER, SUBCOMMANDS, build_parser

    top, parsers = build_parser(args)
    i = 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] not in top._option_string_actions:
            return [f"unknown option {args[i]} (before the subcommand)"]
        i += 1
    if i == len(args):
        return []
    name = args[i]
    if name not in SUBCOMMANDS:
        return [f"unknown subcommand {name!r} (the subcommands: {', '.join(SUBCOMMANDS)})"]
    accepted = parsers[name]._option_string_actions
    problems = []
    rest = args[i + 1 :]
    for k, token in enumerate(rest):
        if token == "--":
            break
        if not token.startswith("-") or token == "-" or _NEGATIVE_NUMBER.fullmatch(token):
            continue
        option, _, value = token.partition("=")
        action = accepted.get(option)
        if action is None:
            problems.append(f"posttrain {name}: no flag {option}")
            continue
        if not value and k + 1 < len(rest) and action.nargs != 0:
            value = rest[k + 1]
        if action.choices and value and "$" not in value and value not in action.choices:
            problems.append(f"posttrain {name}: {option} {value}: not one of {action.choices}")
    return problems


def shell_problems(name: str, blocks: list[Block]) -> list[str]:
    problems = []
    for block in blocks:
        for line, command in shell_commands(block):
            try:
                parts = simple_commands(command)
            except ValueError as exc:
                problems.append(f"{name}:{line}: cannot parse `{command}`: {exc}")
                continue
            for tokens in parts:
                args = posttrain_args(tokens)
                if args is not None:
                    problems += [f"{name}:{line}: {p}" for p in cli_problems(args)]
    return problems


def test_posttrain_command_lines_use_real_subcommands_and_flags() -> None:
    problems = []
    for page in [*doc_pages(), README]:
        problems += shell_problems(label(page), blocks_of(page, *SHELL_LANGS))
    assert not problems, "\n".join(problems)


def test_a_wrong_command_line_is_reported() -> None:
    page = """```bash
posttrain sft --config run.yaml --lr 1e-4   # fine
.venv/bin/posttrain sft --model m \\
    --micro-batch 4
CUDA_VISIBLE_DEVICES=0,1 torchrun --nproc-per-node 2 -m posttrain grpo --precision fp16
pip install posttrain[lora] && posttrain trian --help
```

```console
$ posttrain eval --model RUN/final --lr 0.1
posttrain eval: error: this line is output, --not-a-flag
$ python -m posttrain inspect --config run.yaml --lr 1 --num-examples 2
```
"""
    problems = shell_problems("docs/scratch.md", blocks_of_text(page, *SHELL_LANGS))
    assert problems == [
        "docs/scratch.md:3: posttrain sft: no flag --micro-batch",
        "docs/scratch.md:5: posttrain grpo: --precision fp16: not one of ['auto', 'fp32', 'bf16']",
        "docs/scratch.md:6: unknown subcommand 'trian' (the subcommands: sft, grpo, dpo, "
        "expert-iteration, inspect, demo, generate, eval)",
        "docs/scratch.md:10: posttrain eval: no flag --lr",
    ]


# --------------------------------------------------------------------------- README


MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HTML_LINK = re.compile(r"<(?:a|img)\s[^>]*?(?:href|src)=\"([^\"]+)\"", re.I)


def outside_code(text: str) -> str:
    """The text with its fenced code blocks and inline code blanked out."""
    lines = text.splitlines()
    for block in code_blocks(text):
        first = block.line - 1  # the first line inside the fence, 0-based
        for k in range(first, first + block.text.count("\n")):
            if k < len(lines):
                lines[k] = ""
    return re.sub(r"`[^`\n]*`", "", "\n".join(lines))


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """The relative links of a markdown file (in `root`) to files that do not exist."""
    text = outside_code(path.read_text(encoding="utf-8"))
    targets = MD_LINK.findall(text) + REF_LINK.findall(text) + HTML_LINK.findall(text)
    problems = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "/")):
            continue  # a URL, mailto:, an anchor in the page, or site-absolute
        file = target.split("#")[0].split("?")[0]
        if file and not (path.parent / file).exists():
            problems.append(f"{label(path, root)}: link to {target}: no such file")
    return problems


def test_readme_links_point_at_files_that_exist() -> None:
    assert not broken_links(README), "\n".join(broken_links(README))


def test_a_broken_readme_link_is_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "sft.md").write_text("# sft\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/sft.md#usage) [gone](docs/nope.md) [web](https://x.org/a.md) [top](#a)\n"
        "`[code](docs/code.md)`\n\n```md\n[fenced](docs/fenced.md)\n```\n\n"
        "[ref]: docs/missing.md\n"
    )
    assert broken_links(page, tmp_path) == [
        "README.md: link to docs/nope.md: no such file",
        "README.md: link to docs/missing.md: no such file",
    ]


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, more than {README_MAX_LINES}: the details belong in docs/"
    )
