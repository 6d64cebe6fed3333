"""The metrics tables of the docs (`<!-- posttrain:metrics [METHOD] -->`), and the
markdown helpers and placeholder error they share with the settings tables.

docs/hooks.py, the mkdocs hook, imports this module (it sits beside it in docs/; mkdocs.yml's
`exclude_docs` keeps it out of the site). Metrics keys come from their declarations:
`ENGINE_METRICS` (`posttrain/engine/metrics.py`), each method's `metrics` and the `metrics`
of its `hook_types`.
"""

from __future__ import annotations

import html
import inspect
import re


class PlaceholderError(ValueError):
    """A placeholder names no command, method or option that exists."""


# --------------------------------------------------------------------------- markdown


def code(text: str) -> str:
    """Inline code safe inside a table cell (a `|` would end the cell)."""
    return f"<code>{cell(text)}</code>"


def cell(text: str) -> str:
    """Plain text safe inside a table cell: no HTML, no cell break, one line."""
    return html.escape(" ".join(text.split()), quote=False).replace("|", "&#124;")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def heading_id(*parts: str) -> str:
    return "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts)


# --------------------------------------------------------------------------- metrics


def methods() -> dict[str, type]:
    """Command -> the Method subclass it runs, in `posttrain --help` order."""
    import importlib

    from posttrain.cli.main import SUBCOMMANDS
    from posttrain.engine.method import Method

    for module in ("sft.method", "grpo.method", "grpo.expert_iteration", "dpo.method"):
        importlib.import_module(f"posttrain.{module}")
    found: dict[str, type] = {}
    todo = list(Method.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("posttrain.") and cls.command in SUBCOMMANDS:
            found[cls.command] = cls
    return {name: found[name] for name in SUBCOMMANDS if name in found}


def metrics_file_markdown() -> str:
    """engine/metrics.py's docstring on metrics.jsonl, its `::` block fenced as JSON."""
    import posttrain.engine.metrics as module

    doc = inspect.getdoc(module) or ""
    paragraphs = doc.split("\n\n")[1:]  # the first is the module's one-line summary
    out: list[str] = []
    for paragraph in paragraphs:
        lines = paragraph.splitlines()
        if lines and all(line.startswith("    ") for line in lines) and out:
            out.append("```json\n" + "\n".join(line[4:] for line in lines) + "\n```")
        else:
            text = " ".join(line.strip() for line in lines)
            out.append(text[:-2] + ":" if text.endswith("::") else text)
    return "\n\n".join(out)


def key_table(keys: dict[str, str]) -> str:
    return table(["Key", "Meaning"], [[code(k), cell(v)] for k, v in keys.items()])


def first_sentence(cls: type) -> str:
    """The first paragraph of the class's docstring, on one line."""
    return " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())


def method_markdown(name: str, cls: type) -> str:
    from posttrain.engine.metrics import ENGINE_METRICS

    own = dict(cls.metrics)
    parts = [f"## {name} {{#{heading_id('metrics', name)}}}"]
    parts.append(f"`{cls.__name__}`: {first_sentence(cls)} Its training lines:")
    # The engine's keys (as this method means them), then its own.
    rows = {k: own.get(k, v) for k, v in ENGINE_METRICS.items()}
    rows.update(own)
    parts.append(key_table(rows))
    for hook in cls.hook_types:
        parts.append(f"Its evaluation lines from `{hook.__name__}` (`step` and these):")
        parts.append(key_table(dict(hook.metrics)))
    return "\n\n".join(parts)


def metrics_markdown(name: str | None = None) -> str:
    """All of it (`name` None), or the keys of the method of command `name`."""
    from posttrain.engine.metrics import ENGINE_METRICS

    found = methods()
    if name is not None:
        if name not in found:
            raise PlaceholderError(f"no method runs as {name!r}; the methods: {', '.join(found)}")
        return method_markdown(name, found[name]) + "\n"
    parts = [
        metrics_file_markdown(),
        f"## Every method {{#{heading_id('metrics', 'engine')}}}",
        "The keys on the training lines of every method (`ENGINE_METRICS`); a method's table "
        "below says what its `loss` is.",
        key_table(dict(ENGINE_METRICS)),
    ]
    parts += [method_markdown(n, cls) for n, cls in found.items()]
    return "\n\n".join(parts) + "\n"
