"""The package's dependencies point one way (docs/architecture.md): no module imports one of a layer above
it, at the top or inside a function, and the module-level imports have no cycle. Read from the source with
``ast``: nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lvlm_cl"

# Lowest first. A module may import its own layer and those below; a name ending in ".*" is a package and
# everything in it.
LAYERS = [
    ["lvlm_cl", "lvlm_cl.io", "lvlm_cl.errors", "lvlm_cl.settings"],
    ["lvlm_cl.distributed", "lvlm_cl.state_io"],
    ["lvlm_cl.data.*"],
    ["lvlm_cl.models.*", "lvlm_cl.benchmarks.*", "lvlm_cl.evaluation.*"],
    ["lvlm_cl.stream", "lvlm_cl.checkpoint"],
    ["lvlm_cl.methods.*"],
    ["lvlm_cl.config", "lvlm_cl.recipe_checks", "lvlm_cl.pretrained"],
    ["lvlm_cl.train", "lvlm_cl.loop", "lvlm_cl.build"],
    ["lvlm_cl.stage", "lvlm_cl.pretrain"],
    ["lvlm_cl.evaluate", "lvlm_cl.chat"],
]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def layer_of(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if name == entry or (entry.endswith(".*") and (name == entry[:-2] or name.startswith(entry[:-1]))):
                return i
    raise AssertionError(f"{name} has no layer in tests/test_layering.py: add it where it belongs")


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(imported lvlm_cl module, at module level, line) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            target = resolve(t)
            if target and target.startswith("lvlm_cl") and target != name:
                found.append((target, id(node) in top, node.lineno))
    return found


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_module_imports_one_above_it():
    known = modules()
    upward = [f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)}) at line {line}"
              for name, path in known.items() for target, _, line in imports(name, path, known)
              if layer_of(target) > layer_of(name)]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a path that comes back to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_module_level_imports_have_no_cycle():
    known = modules()
    graph = {name: {t for t, at_top, _ in imports(name, path, known) if at_top} for name, path in known.items()}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("bad, message", [
    ("from lvlm_cl.train import run\n", "imports lvlm_cl.train"),
    ("def f():\n    from lvlm_cl.methods.routing import routers\n", "imports lvlm_cl.methods.routing"),
])
def test_the_check_finds_an_upward_import(tmp_path, monkeypatch, bad, message):
    """The check itself can fail: a data module importing the training loop (at the top or lazily) is named."""
    known = modules()
    path = tmp_path / "records.py"
    path.write_text(bad)
    found = [t for t, _, _ in imports("lvlm_cl.data.records", path, known)]
    assert found and all(layer_of(t) > layer_of("lvlm_cl.data.records") for t in found)
    assert message.split()[-1] in found
