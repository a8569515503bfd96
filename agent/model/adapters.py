"""Which LoRA adapter a request means: "active", "base", "vN" or a folder, read from the
registry's folder layout.

The agent only reads adapters; `tuner.registry.Registry` writes them (register, promote,
rollback) on the same layout, described here once:

    <workspace>/adapters/
        v1/ adapter_config.json adapter_model.safetensors record.json
        active      {"active": "v2", "history": ["v1"], "events": [...],
                     "routes": {"calculator": {"active": "v3", "history": []}}}

`routes` holds one active adapter per route (an environment, a subagent role, any label); the
route-less `active` is the global one and the fallback for a request whose route has none
(agent/model/router.py picks the route). Both live in the one pointer file, so one atomic
write changes either.

Each record carries the sha256 of the adapter's two files (`sha256` in record.json, written by
`Registry.register`). Every load of a registry version (`registry_adapter`, hence
`resolve_adapter`, eval, gate, chat, run, serve) and every promote verifies them, so a truncated
or altered weights file is refused by name instead of loaded or served. A record from before
checksums has none: its weights must still open as a complete safetensors file (a truncated
one does not), a warning says so, and the next promote records its checksums.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.config import Config
from tools.errors import SelftuneError

POINTER = "active"
RECORD = "record.json"
VERSION = re.compile(r"v(\d+)")
ROUTE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = ("adapter_config.json", WEIGHTS)

log = logging.getLogger(__name__)


class RegistryError(SelftuneError, RuntimeError):
    """A registry problem; the message names the file or version and what to do."""


def read_pointer(root: Path) -> dict[str, Any]:
    """The registry's `active` file: {"active": version or None, "history": [...], "events": [...]}."""
    path = root / POINTER
    if not path.exists():
        return {"active": None, "history": [], "events": [], "routes": {}}
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
    data.setdefault("routes", {})
    return data


def check_route(route: str) -> str:
    """`route` if it is a usable route name; RegistryError naming the rule otherwise."""
    if not isinstance(route, str) or not ROUTE.fullmatch(route):
        raise RegistryError(
            f"{route!r} is not a route name: use letters, digits, '_', '.', ':' or '-' "
            "(an environment name like docs-qa, or a subagent role like researcher)"
        )
    return route


def route_versions(root: Path) -> dict[str, str | None]:
    """Every route of the registry under `root` and the version active on it (None: the
    route was rolled back to nothing, so it falls back to the global active)."""
    routes = read_pointer(root)["routes"]
    return {name: entry.get("active") for name, entry in sorted(routes.items())}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def adapter_checksums(folder: Path) -> dict[str, str]:
    """sha256 of each file of a PEFT adapter folder (what a record stores at registration)."""
    return {name: file_sha256(folder / name) for name in ADAPTER_FILES}


def recorded_checksums(folder: Path) -> dict[str, str]:
    """The checksums in a version folder's record.json ({} for a record from before them)."""
    try:
        data = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RegistryError(
            f"adapter record {folder / RECORD} is unreadable ({e}): restore it, or delete the "
            f"folder {folder} to drop that version"
        ) from None
    sums = data.get("sha256") if isinstance(data, dict) else None
    return dict(sums) if isinstance(sums, dict) else {}


def _check_safetensors(path: Path, label: str) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):  # reads the header; a truncated file does not open
            pass
    except (SafetensorError, OSError, ValueError) as e:
        raise RegistryError(
            f"{label}: {path} is not a complete safetensors file ({e}): restore it from a "
            "backup, or train the adapter again"
        ) from None


def verify_adapter(folder: Path, recorded: Mapping[str, str] | None, label: str) -> None:
    """Raise RegistryError unless the adapter files in `folder` are present and match the
    checksums `recorded` at registration. With none recorded (an adapter registered before
    checksums, or a folder given by path), the weights must at least open as a complete
    safetensors file. `label` names the adapter in the message ("adapter v3")."""
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise RegistryError(
                f"{label}: {folder / name} is missing: restore it from a backup, or train the "
                "adapter again (`selftune tune sft`)"
            )
    if not recorded:
        _check_safetensors(folder / WEIGHTS, label)
        return
    for name, expected in recorded.items():
        if name not in ADAPTER_FILES:
            continue
        actual = file_sha256(folder / name)
        if actual != expected:
            raise RegistryError(
                f"{label}: {folder / name} is damaged (sha256 {actual[:12]}... is not the "
                f"{expected[:12]}... recorded at registration: the file was truncated or "
                "altered): restore it from a backup, or train the adapter again "
                "(`selftune tune sft`); `selftune adapters rollback` returns to the previous one"
            )


def verify_version(folder: Path, version: str) -> None:
    """`verify_adapter` for a registry version folder, against the checksums in its record."""
    sums = recorded_checksums(folder)
    if not sums:
        log.warning(
            "adapter %s was registered before checksums; its weights are only checked to be "
            "complete (the next `selftune adapters promote %s` records them)",
            version,
            version,
        )
    verify_adapter(folder, sums, f"adapter {version}")


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
    """ "active" or "vN" -> (version, folder) in the workspace's registry; None for the base.
    The folder's files are verified against its record's checksums (RegistryError if not)."""
    root = cfg.workspace.adapters.expanduser().resolve()
    version = read_pointer(root)["active"] if request == "active" else request
    if version is None:
        return None
    folder = version_dir(root, version)
    verify_version(folder, version)
    return version, folder


def resolve_adapter(cfg: Config, engine: Any, request: str | None) -> str | None:
    """Turn an adapter request into the name the backend serves it under.

    None/"base" -> None (the base model). "active" -> the registry's active version, or None.
    "routed" -> the same as "active" (the Agent routes each episode itself: agent/model/router.py).
    "vN" -> that version. A folder path -> loaded under its folder name. With the local
    backend the adapter is loaded into the engine on first use (without reloading the base);
    with the openai backend (vLLM) it is loaded into the server on first use, under that name.
    """
    if request in (None, "", "base"):
        return None
    if request == "routed":  # outside an episode (chat, an eval's label): the fallback
        request = "active"
    candidate = Path(request).expanduser()
    if candidate.is_dir() and (candidate / "adapter_config.json").is_file():
        name, path = candidate.name, candidate.resolve()
        if (path / RECORD).is_file():  # a registry version given by its folder
            verify_version(path, name)
        elif (path / WEIGHTS).is_file():  # a folder of another tool may hold .bin weights
            _check_safetensors(path / WEIGHTS, f"adapter folder {path}")
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
    if cfg.model.backend == "local" and engine is not None:
        held = engine.adapters().get(name)
        if held is not None and Path(held).resolve() != Path(path).resolve():
            # the same folder name from elsewhere (v1 of another workspace): never serve one
            # for the other; this folder gets a name of its own
            name = f"{name}-{hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:8]}"
            held = engine.adapters().get(name)
        if held is None:
            engine.load_adapter(name, path)
    elif cfg.model.backend == "openai" and cfg.model.base_url:
        from agent.model.openai import ensure_served

        ensure_served(cfg.model.base_url, name, path)
    return name
