"""Which LoRA adapter a request means: "active", "base", "vN" or a folder, read from the
registry's folder layout.

The agent only reads adapters; `tuner.registry.Registry` writes them (register, promote,
rollback) on the same layout, described here once:

    <workspace>/adapters/
        v1/ adapter_config.json adapter_model.safetensors record.json
        active      {"active": "v2", "history": ["v1"], "events": [...]}
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from agent.config import Config
from tools.errors import SelftuneError

POINTER = "active"
RECORD = "record.json"
VERSION = re.compile(r"v(\d+)")


class RegistryError(SelftuneError, RuntimeError):
    """A registry problem; the message names the file or version and what to do."""


def read_pointer(root: Path) -> dict[str, Any]:
    """The registry's `active` file: {"active": version or None, "history": [...], "events": [...]}."""
    path = root / POINTER
    if not path.exists():
        return {"active": None, "history": [], "events": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "active" not in data:
            raise ValueError("no 'active' key")
    except (OSError, ValueError) as e:
        raise RegistryError(
            f"the active pointer {path} is corrupt ({e}): delete it to fall back to the base "
            "model, then `selftune adapters promote VERSION` to choose an adapter again"
        ) from None
    data.setdefault("history", [])
    data.setdefault("events", [])
    return data


def versions(root: Path) -> list[str]:
    """The registry's version folders, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in root.iterdir() if (m := VERSION.fullmatch(p.name))]
    return [name for _, name in sorted(found)]


def version_dir(root: Path, version: str) -> Path:
    """The folder of `version`; RegistryError when it is not a version name or not registered."""
    if not VERSION.fullmatch(version):
        raise RegistryError(f"{version!r} is not a version name: use v1, v2, ... (see `list`)")
    folder = root / version
    if not (folder / RECORD).is_file():
        known = ", ".join(versions(root)) or "none"
        raise RegistryError(f"no adapter version {version} in {root} (known: {known})")
    return folder


def registry_adapter(cfg: Config, request: str) -> tuple[str, Path] | None:
    """ "active" or "vN" -> (version, folder) in the workspace's registry; None for the base."""
    root = cfg.workspace.adapters.expanduser().resolve()
    version = read_pointer(root)["active"] if request == "active" else request
    return None if version is None else (version, version_dir(root, version))


def resolve_adapter(cfg: Config, engine: Any, request: str | None) -> str | None:
    """Turn an adapter request into the name the backend serves it under.

    None/"base" -> None (the base model). "active" -> the registry's active version, or None.
    "vN" -> that version. A folder path -> loaded under its folder name. With the local
    backend the adapter is loaded into the engine on first use (without reloading the base);
    with the openai backend (vLLM) it is loaded into the server on first use, under that name.
    """
    if request in (None, "", "base"):
        return None
    candidate = Path(request).expanduser()
    if candidate.is_dir() and (candidate / "adapter_config.json").is_file():
        name, path = candidate.name, candidate.resolve()
    else:
        if request != "active" and not VERSION.fullmatch(request):
            # not a registry name: one the backend serves on its own (a GRPO policy, say)
            if cfg.model.backend == "openai":
                return request
            if engine is not None and request in engine.adapters():
                return request
        found = registry_adapter(cfg, request)
        if found is None:
            return None
        name, path = found
    if cfg.model.backend == "local" and engine is not None and name not in engine.adapters():
        engine.load_adapter(name, path)
    elif cfg.model.backend == "openai" and cfg.model.base_url:
        from agent.model.openai import ensure_served

        ensure_served(cfg.model.base_url, name, path)
    return name
