"""The dependency rule of ARCHITECTURE.md, checked on every import, including those inside
functions (they hid the agent <-> tuner cycle for months).

- tools, retrieval and traces import nothing above them (retrieval may use tools);
- agent (outside agent/cli) imports only tools, retrieval and traces;
- tuner may import agent, but never agent.cli;
- agent/cli, the composition root, may import anything;
- every layer may import tools.errors, the home of the one error base class.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "tools", "retrieval", "traces", "tuner")

# which first-party packages each layer may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "tools": set(),
    "retrieval": {"tools"},
    "traces": set(),
    "agent": {"tools", "retrieval", "traces"},
    "tuner": {"agent", "tools", "retrieval", "traces"},
    "agent.cli": {"agent", "tools", "retrieval", "traces", "tuner"},
}


def layer_of(module: str) -> str:
    return (
        "agent.cli"
        if module == "agent.cli" or module.startswith("agent.cli.")
        else module.split(".")[0]
    )


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            # `from agent import cli` names a sub-module, not an attribute
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def library_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def edges() -> list[tuple[str, int, str, str]]:
    """(file, line, from layer, to layer) for every first-party import across layers."""
    out = []
    for path in library_files():
        src = layer_of(module_name(path))
        for line, target in imports_of(path):
            if target.split(".")[0] not in PACKAGES or target.startswith("tools.errors"):
                continue
            dst = layer_of(target)
            if dst != src:
                out.append((str(path.relative_to(REPO)), line, src, dst))
    return out


def test_every_import_points_down_the_layers():
    bad = [
        f"{f}:{line}: {src} imports {dst}"
        for f, line, src, dst in edges()
        if dst not in ALLOWED[src] and not (src == "agent.cli" and dst == "agent")
    ]
    graph = Counter((src, dst) for _, _, src, dst in edges())
    print("\nimport graph (layer -> layer: import sites)")
    for (src, dst), n in sorted(graph.items()):
        print(f"  {src:10} -> {dst:10} {n}")
    assert not bad, "imports against the dependency rule:\n" + "\n".join(bad)


def test_the_rule_catches_a_function_level_import(tmp_path):
    # the check must see imports hidden inside functions, or it proves nothing
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from tuner.registry import Registry\n    return Registry\n")
    assert (2, "tuner.registry") in imports_of(f)


@pytest.mark.parametrize("module", ["agent.cli", "agent.cli.tune", "agent"])
def test_layers_are_named_by_their_package(module):
    assert layer_of(module) == ("agent" if module == "agent" else "agent.cli")


def test_every_home_in_architecture_md_exists():
    # the map of record must not point at files that moved
    text = (REPO / "ARCHITECTURE.md").read_text()
    table = text.split("## Where each concept lives", 1)[1].split("## Conventions", 1)[0]
    paths = {p for p in re.findall(r"`((?:agent|tools|retrieval|traces|tuner)/[\w/<>.]*)`", table)}
    missing = [p for p in sorted(paths) if "<" not in p and not (REPO / p).exists()]
    assert paths and not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"
