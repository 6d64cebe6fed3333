"""The package's layout stays walkable: imports go one way only, files and functions
stay short, and no module shadows a standard-library one."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "posttrain"

# Each folder's layer; a module imports only from its own layer or lower ones, and never
# in a cycle: ops and common <- models, data, generation, rewards (and the guide's
# primitives and RL losses) <- configs and evaluation <- the engine <- the methods (one
# folder each) <- the demo <- the CLI. A new folder (or top-level module) is placed here.
LAYERS: dict[str, int] = {
    "posttrain.ops": 0,
    "posttrain.common": 0,
    "posttrain.models": 1,
    "posttrain.primitives": 1,
    "posttrain.rl": 1,
    "posttrain.data": 1,
    "posttrain.generation": 1,
    "posttrain.rewards": 1,
    "posttrain.config": 2,
    "posttrain.rollouts": 2,
    "posttrain.losses": 2,
    "posttrain.evaluation": 2,
    "posttrain.engine": 3,
    "posttrain.sft": 4,
    "posttrain.grpo": 4,
    "posttrain.dpo": 4,
    "posttrain.demo": 5,
    "posttrain.cli": 6,
    "posttrain._moved": 0,
    "posttrain": 7,  # the package's __init__: the public API re-exports
    "posttrain.__main__": 7,
}
# Training methods: each is a folder on the engine; none imports another's modules.
METHODS = ("posttrain.sft", "posttrain.grpo", "posttrain.dpo")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(name: str) -> int:
    """The layer of the longest LAYERS key that is `name` or a package above it."""
    if name in LAYERS:
        return LAYERS[name]
    parts = name.split(".")
    # Down to "posttrain.x": the bare package key holds only its __init__.
    for n in range(len(parts), 1, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(name)


def imports_of(path: Path, name: str) -> set[str]:
    """Every module of the package that `path` imports, at any depth of the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = modules()
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from posttrain import rl` imports the module posttrain.rl, not the package.
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def third_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            roots.add(node.module.split(".")[0])
    return {r for r in roots if r not in sys.stdlib_module_names and r != "__future__"}


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for name in modules():
        try:
            layer_of(name)
        except KeyError:
            unplaced.append(name)
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"


def test_imports_go_one_way() -> None:
    upward = []
    for name, path in modules().items():
        for target in imports_of(path, name):
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} (layer {layer_of(name)}) imports {target}")
    assert not upward, "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = {name: imports_of(path, name) for name, path in modules().items()}
    # A package's __init__ may re-export its submodules; that edge is not a cycle.
    graph = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_ops_import_only_torch() -> None:
    for name, path in modules().items():
        if name == "posttrain.ops" or name.startswith("posttrain.ops."):
            assert third_party_imports(path) <= {"torch", "posttrain"}, name
            assert all(t.startswith("posttrain.ops") for t in imports_of(path, name)), name


def test_files_and_functions_are_short() -> None:
    long = []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_FILE_LINES:
            long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, "\n".join(long)


def test_no_module_shadows_the_standard_library() -> None:
    shadowing = [name for name in modules() if name.rpartition(".")[2] in sys.stdlib_module_names]
    assert not shadowing, shadowing


def test_methods_never_import_each_other() -> None:
    crossing = []
    for name, path in modules().items():
        own = next((m for m in METHODS if name == m or name.startswith(m + ".")), None)
        if own is None:
            continue
        for target in imports_of(path, name):
            other = next((m for m in METHODS if target == m or target.startswith(m + ".")), None)
            if other is not None and other != own:
                crossing.append(f"{name} imports {target}")
    assert not crossing, "\n".join(crossing)


def test_nothing_imports_the_cli() -> None:
    importers = [
        f"{name} imports {target}"
        for name, path in modules().items()
        if not name.startswith("posttrain.cli") and name != "posttrain.__main__"
        for target in imports_of(path, name)
        if target.startswith("posttrain.cli")
    ]
    assert not importers, "\n".join(importers)


def test_only_the_sft_side_mentions_sft_config() -> None:
    """The engine and everything below it know no method's config."""
    allowed = ("posttrain.sft", "posttrain.cli", "posttrain.config", "posttrain.demo")
    mentions = [
        name
        for name, path in modules().items()
        if "SFTConfig" in path.read_text(encoding="utf-8")
        and not any(name == a or name.startswith(a + ".") for a in allowed)
        and name != "posttrain"
    ]
    assert not mentions, mentions
