"""The adapter registry: every trained adapter as a numbered version, and one `active` pointer.

Layout under `root` (normally `<workspace>/adapters`):

    v1/ adapter_config.json adapter_model.safetensors record.json
    v2/ ...
    active        {"active": "v2", "history": ["v1"], "events": [...],
                   "routes": {"docs-qa": {"active": "v3", "history": [null]}}}
    .lock         fcntl lock that serializes writers across processes

The `active` file is the single source of truth for which adapter is live (none = the base
model), globally and per route. A route (an environment, a subagent role, any label) has its
own active adapter and history; a request whose route has none gets the global one. A record's
`status` speaks of the global pointer only; `routes()` says which versions serve which route,
`active_for(route)` which version answers a route's requests (the router's answer). A gate
on a route (tuner/gate.py) promotes on that route only, and its pass never counts for the
global pointer. The pointer and every record are written to a temporary file, fsynced,
`os.replace`d and the directory fsynced, so a kill -9 at any moment leaves either the old or
the new state, never a mix. Record statuses are reconciled to the pointer when the registry opens, because a writer
killed between the pointer and the record updates leaves a stale status behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.config import Config
from agent.model.adapters import (
    ADAPTER_FILES,
    POINTER,
    RECORD,
    VERSION,
    RegistryError,
    adapter_checksums,
    check_route,
    file_sha256,
    read_pointer,
    verify_adapter,
    versions,
)
from agent.model.files import fsync_dir as _fsync_dir
from agent.model.files import write_atomic
from tuner.schemas import AdapterRecord, GateResult, Verdict


def check_adapter_dir(path: Path) -> None:
    """Raise RegistryError unless `path` is a standard PEFT LoRA folder vLLM can load."""
    missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
    if missing:
        raise RegistryError(
            f"{path} is not a PEFT adapter folder (missing {', '.join(missing)}): "
            "train one with `selftune tune sft DATASET_DIR`"
        )
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RegistryError(
            f"{path}/adapter_config.json is corrupt ({e}): train it again"
        ) from None
    if cfg.get("modules_to_save"):
        raise RegistryError(
            f"{path} saves whole modules ({cfg['modules_to_save']}); vLLM cannot serve that: "
            "train without modules_to_save"
        )


class Registry:
    """Versions, lineage and the active pointer of the adapters under `root`."""

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            self._sweep()
            self._reconcile()

    # -- locking and files ------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _dir(self, version: str) -> Path:
        if not VERSION.fullmatch(version):
            raise RegistryError(f"{version!r} is not a version name: use v1, v2, ... (see `list`)")
        return self.root / version

    def _read_pointer(self) -> dict[str, Any]:
        return read_pointer(self.root)

    def _write_pointer(self, data: dict[str, Any]) -> None:
        write_atomic(self.root / POINTER, json.dumps(data, indent=2))

    def _write_record(self, record: AdapterRecord, folder: Path | None = None) -> None:
        folder = folder or self._dir(record.version)
        write_atomic(folder / RECORD, record.model_dump_json(indent=2))

    def _versions(self) -> list[str]:
        return versions(self.root)

    def _sweep(self) -> None:
        """Remove temp files a killed writer left (every write holds the lock). A `.tmp-vN`
        folder from a killed `register` is kept: it holds the trained adapter."""
        for p in [*self.root.glob(".*.tmp-*"), *self.root.glob("v*/.*.tmp-*")]:
            p.unlink(missing_ok=True)

    def _reconcile(self) -> None:
        """Make record statuses agree with the pointer (a killed writer may have left one stale)."""
        active = self._read_pointer()["active"]
        for v in self._versions():
            rec = self.get(v)
            if v == active and rec.status != "active":
                rec.status = "active"
                self._write_record(rec)
            elif v != active and rec.status == "active":
                rec.status = "retired"
                self._write_record(rec)

    # -- reading ----------------------------------------------------------------------------

    def get(self, version: str) -> AdapterRecord:
        """The record of `version`; RegistryError if there is none or it is corrupt."""
        folder = self._dir(version)
        path = folder / RECORD
        if not path.is_file():
            known = ", ".join(self._versions()) or "none"
            raise RegistryError(f"no adapter version {version} in {self.root} (known: {known})")
        try:
            rec = AdapterRecord.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValidationError, ValueError) as e:
            raise RegistryError(
                f"adapter record {path} is corrupt ({str(e).splitlines()[0]}): restore it, or "
                f"delete the folder {folder} to drop version {version}"
            ) from None
        rec.path = str(folder)
        return rec

    def list(self) -> list[AdapterRecord]:
        """All versions, oldest first."""
        return [self.get(v) for v in self._versions()]

    def active(self) -> AdapterRecord | None:
        """The live adapter, or None when the base model is live."""
        v = self._read_pointer()["active"]
        return None if v is None else self.get(v)

    def history(self) -> list[str | None]:
        """Previously active versions, most recent last (what `rollback` walks back through)."""
        return list(self._read_pointer()["history"])

    def routes(self) -> dict[str, str | None]:
        """Each route and the version active on it (None: rolled back to the global fallback)."""
        return {n: e.get("active") for n, e in sorted(self._read_pointer()["routes"].items())}

    def route_active(self, route: str) -> AdapterRecord | None:
        """The adapter promoted on `route`, or None when the route has none (the global
        active then answers its requests)."""
        v = self._read_pointer()["routes"].get(check_route(route), {}).get("active")
        return None if v is None else self.get(v)

    def active_for(self, route: str | None) -> AdapterRecord | None:
        """The adapter that answers `route`'s requests, as the router picks it: the route's
        own active adapter, else the global active, else None (the base model). None: the
        global active."""
        rec = self.route_active(route) if route is not None else None
        return rec if rec is not None else self.active()

    def promoted_on(self, route: str) -> list[str]:
        """Every version ever promoted on `route`, oldest first (rolled back ones too, as a
        rolled back global adapter stays `retired`): read from the pointer's events."""
        check_route(route)
        seen: dict[str, None] = {}
        for e in self._read_pointer()["events"]:
            if e.get("route") == route and e.get("action") == "promote" and e.get("to"):
                seen.setdefault(e["to"], None)
        return list(seen)

    def path(self, version: str) -> Path:
        return self._dir(version)

    def verify(self, version: str) -> AdapterRecord:
        """The record of `version` after checking its files against the checksums recorded at
        registration; RegistryError naming the damaged file otherwise. A record from before
        checksums only has its weights checked to be a complete safetensors file."""
        rec = self.get(version)
        verify_adapter(self._dir(version), rec.sha256, f"adapter {version}")
        return rec

    def resolve(self, name: str | None) -> AdapterRecord | None:
        """'active', 'base'/None, or a version -> its record (None for the base model)."""
        if name in (None, "base"):
            return None
        if name == "active":
            return self.active()
        return self.get(name)

    # -- writing ----------------------------------------------------------------------------

    def register(
        self,
        adapter_dir: Path | str,
        *,
        base_model: str,
        parent: str | None = None,
        dataset_manifest: Path | str | None = None,
        train_config: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        notes: list[str] | None = None,
        verdicts: Sequence[Verdict] = (),
    ) -> AdapterRecord:
        """Move `adapter_dir` into the registry as the next version, status `candidate`, with
        its training's sanity `verdicts` (tuner/sanity.py).

        The folder appears under its version name complete with its record, or not at all.
        """
        src = Path(adapter_dir).expanduser().resolve()
        check_adapter_dir(src)
        verify_adapter(src, None, f"adapter folder {src}")  # a complete safetensors file
        sums = adapter_checksums(src)
        if parent is not None:
            self.get(parent)  # the parent must exist
        manifest_hash = None
        if dataset_manifest is not None:
            dataset_manifest = Path(dataset_manifest).resolve()
            if not dataset_manifest.is_file():
                raise RegistryError(f"dataset manifest {dataset_manifest} does not exist")
            manifest_hash = file_sha256(dataset_manifest)
        with self._lock():
            versions = self._versions()
            n = int(versions[-1][1:]) + 1 if versions else 1
            version = f"v{n}"
            record = AdapterRecord(
                version=version,
                base_model=base_model,
                parent=parent,
                dataset_manifest=str(dataset_manifest) if dataset_manifest else None,
                dataset_hash=manifest_hash,
                sha256=sums,
                train_config=train_config or {},
                metrics=metrics or {},
                notes=notes or [],
                verdicts=list(verdicts),
            )
            tmp = self.root / f".tmp-{version}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                os.rename(src, tmp)  # same filesystem: instant
            except OSError:
                shutil.copytree(src, tmp)
                shutil.rmtree(src)
            self._write_record(record, tmp)
            os.rename(tmp, self.root / version)
            _fsync_dir(self.root)
        return self.get(version)

    def record_eval(self, version: str, results: dict[str, Any]) -> AdapterRecord:
        """Append one evaluation (a gate decision and the numbers behind it) to the record."""
        with self._lock():
            rec = self.get(version)
            rec.eval_results.append({"at": time.time(), **results})
            self._write_record(rec)
        return rec

    def add_note(self, version: str, note: str) -> AdapterRecord:
        with self._lock():
            rec = self.get(version)
            rec.notes.append(note)
            self._write_record(rec)
        return rec

    def promote(
        self,
        version: str,
        gate_result: GateResult | None = None,
        *,
        force: bool = False,
        route: str | None = None,
    ) -> AdapterRecord:
        """Make `version` the one active adapter; the previously active one becomes `retired`.
        With `route`, make it the active adapter of that route instead: the global pointer
        and every status stay as they are, and the record gets a note.

        Needs a gate result that says promote (given, or recorded by `record_eval`), unless
        `force` (a person's decision, noted in the record).
        """
        if route is not None:
            check_route(route)
        with self._lock():
            check_adapter_dir(self._dir(version))
            rec = self.verify(version)  # a truncated or altered file is refused, --force or not
            if not rec.sha256:  # registered before checksums: record them now they checked out
                rec.sha256 = adapter_checksums(self._dir(version))
                rec.notes.append(f"checksums recorded at promote, {time.ctime()}")
            if gate_result is not None and not gate_result.promote:
                raise RegistryError(
                    f"the gate result for {version} says reject ({'; '.join(gate_result.reasons)})"
                )
            if gate_result is None and not force and not _passed_gate(rec, route):
                where, opt = (f" on route {route}", f" --route {route}") if route else ("", "")
                raise RegistryError(
                    f"{version} has not passed the eval gate{where}: run `selftune gate "
                    f"{version}{opt}`, or pass --force to promote it anyway (noted in its record)"
                )
            pointer = self._read_pointer()
            if route is not None:
                return self._promote_route(pointer, rec, route, forced=force and not gate_result)
            previous = pointer["active"]
            if previous == version:
                return rec
            pointer["history"].append(previous)
            pointer["active"] = version
            pointer["events"].append(
                {"at": time.time(), "action": "promote", "from": previous, "to": version}
            )
            self._write_pointer(pointer)  # the commit point
            rec.status = "active"
            if force and gate_result is None:
                rec.notes.append(f"promoted with --force at {time.ctime()}")
            self._write_record(rec)
            if previous is not None:
                self._set_status(previous, "retired")
        return self.get(version)

    def _promote_route(
        self, pointer: dict[str, Any], rec: AdapterRecord, route: str, *, forced: bool
    ) -> AdapterRecord:
        entry = pointer["routes"].setdefault(route, {"active": None, "history": []})
        previous = entry["active"]
        if previous == rec.version:
            return rec
        entry["history"].append(previous)
        entry["active"] = rec.version
        pointer["events"].append(
            {
                "at": time.time(),
                "action": "promote",
                "route": route,
                "from": previous,
                "to": rec.version,
            }
        )
        self._write_pointer(pointer)  # the commit point
        # lineage: the record says which routes it was promoted on (a note, like --force)
        how = " with --force" if forced else ""
        rec.notes.append(f"promoted on route {route}{how} at {time.ctime()}")
        self._write_record(rec)
        return self.get(rec.version)

    def reject(
        self, version: str, gate_result: GateResult | None = None, *, route: str | None = None
    ) -> AdapterRecord:
        """Mark a candidate `rejected` (the gate said no). The active adapter cannot be rejected,
        nor one active on a route. With `route` (the gate said no for that route alone) the
        record gets a note, and the status `rejected` only if no route or global pointer
        serves it: a version that serves elsewhere keeps serving there."""
        with self._lock():
            rec = self.get(version)
            pointer = self._read_pointer()
            if route is not None:
                why = "; ".join(gate_result.reasons) if gate_result is not None else "no reason"
                rec.notes.append(f"rejected by the gate on route {check_route(route)}: {why}")
                live = pointer["active"] == version or any(
                    e.get("active") == version for e in pointer["routes"].values()
                )
                if not live:
                    rec.status = "rejected"
                self._write_record(rec)
                return self.get(version)
            if pointer["active"] == version:
                raise RegistryError(f"{version} is active: roll back first, then reject it")
            on = [n for n, e in pointer["routes"].items() if e.get("active") == version]
            if on:
                raise RegistryError(
                    f"{version} is active on route {', '.join(sorted(on))}: "
                    f"`selftune adapters rollback --route {sorted(on)[0]}` first, then reject it"
                )
            rec.status = "rejected"
            if gate_result is not None:
                rec.notes.append("rejected by the gate: " + "; ".join(gate_result.reasons))
            self._write_record(rec)
        return self.get(version)

    def rollback(self, route: str | None = None) -> AdapterRecord | None:
        """Move the pointer back to the previously active version (the base model if none).
        With `route`, move that route's pointer back (to none: the route falls back to the
        global active); the global pointer stays.

        Returns the now active record, or None for the base model (for a route: none).
        """
        if route is not None:
            return self._rollback_route(check_route(route))
        with self._lock():
            pointer = self._read_pointer()
            current = pointer["active"]
            target = pointer["history"].pop() if pointer["history"] else None
            if target is not None and not (self._dir(target) / RECORD).is_file():
                raise RegistryError(
                    f"cannot roll back to {target}: its folder {self._dir(target)} is gone"
                )
            pointer["active"] = target
            pointer["events"].append(
                {"at": time.time(), "action": "rollback", "from": current, "to": target}
            )
            self._write_pointer(pointer)
            if current is not None:
                self._set_status(current, "retired")
            if target is not None:
                self._set_status(target, "active")
        return self.active()

    def _rollback_route(self, route: str) -> AdapterRecord | None:
        with self._lock():
            pointer = self._read_pointer()
            if route not in pointer["routes"]:
                known = ", ".join(sorted(pointer["routes"])) or "none"
                raise RegistryError(
                    f"no route {route!r} in {self.root} (routes: {known}): "
                    f"`selftune adapters promote VERSION --route {route}` makes one"
                )
            entry = pointer["routes"][route]
            current = entry["active"]
            target = entry["history"].pop() if entry["history"] else None
            if target is not None and not (self._dir(target) / RECORD).is_file():
                raise RegistryError(
                    f"cannot roll route {route} back to {target}: its folder "
                    f"{self._dir(target)} is gone"
                )
            entry["active"] = target
            pointer["events"].append(
                {
                    "at": time.time(),
                    "action": "rollback",
                    "route": route,
                    "from": current,
                    "to": target,
                }
            )
            self._write_pointer(pointer)
        return self.route_active(route)

    def _set_status(self, version: str, status: str) -> None:
        rec = self.get(version)
        if rec.status != status:
            rec.status = status  # type: ignore[assignment]
            self._write_record(rec)

    # -- comparing --------------------------------------------------------------------------

    def diff(self, v1: str, v2: str) -> dict[str, dict[str, tuple[Any, Any]]]:
        """What differs between two versions: lineage, training config, metrics, latest eval."""
        a, b = self.get(v1), self.get(v2)

        def changed(x: dict[str, Any], y: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
            return {
                k: (x.get(k), y.get(k)) for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)
            }

        def lineage(r: AdapterRecord) -> dict[str, Any]:
            return {
                "base_model": r.base_model,
                "parent": r.parent,
                "dataset_manifest": r.dataset_manifest,
                "dataset_hash": r.dataset_hash,
                "status": r.status,
            }

        def last_eval(r: AdapterRecord) -> dict[str, Any]:
            if not r.eval_results:
                return {}
            numbers = r.eval_results[-1].get("gate", {}).get("numbers", {})
            return {k: v.get("candidate") for k, v in numbers.items()}

        return {
            "lineage": changed(lineage(a), lineage(b)),
            "train_config": changed(a.train_config, b.train_config),
            "metrics": changed(a.metrics, b.metrics),
            "eval": changed(last_eval(a), last_eval(b)),
        }


def _passed_gate(rec: AdapterRecord, route: str | None = None) -> bool:
    """Whether the last gate that speaks for `route` said promote. A gate on a route judged the
    version on that route's environments only, so it never counts for the global pointer; a
    global gate (on the job's environments, its route's among them) counts for any route."""
    gates = [e["gate"] for e in rec.eval_results if "gate" in e and e.get("route") in (None, route)]
    return bool(gates) and bool(gates[-1].get("promote"))


def open_registry(cfg: Config) -> Registry:
    """The registry in the workspace's `adapters/` folder."""
    return Registry(cfg.workspace.adapters)
