"""The documentation's examples stay true to the code, and README.md stays short.

- ```pycon blocks of docs/ run as doctests (a page's blocks in order, sharing names, in a
  temporary directory); ```python blocks of docs/ and README.md compile and their
  posttrain imports import; `posttrain ...` command lines in ```bash, ```sh, ```shell and
  ```console blocks name a real subcommand and only flags it accepts.
- README.md stays short, and its relative links point at files that exist.

The checkers take a page's text and return its problems, so each is also tested on a
page made to fail. The site build, settings and metrics are checked in
tests/test_docs_site.py.
"""

from __future__ import annotations

import ast
import doctest
import io
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 200


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def label(path: Path, root: Path = ROOT) -> str:
    return str(path.relative_to(root))


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
