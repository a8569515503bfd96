"""Reload: after a promotion (or rollback), running agents switch to the new adapter.

Two kinds of serving, one protocol (`Reloader.reload(record)`; `None` means the base model):

- in process (the local backend): `LocalReloader(engine)` loads the promoted version into the
  engine under its own name; the base model stays loaded.
- vLLM: `VllmReloader(base_url)` loads the adapter under its version ("v3", what selftune's
  agents ask for, so traces name the adapter that answered) and reloads the stable name
  (`selftune-active`) in place with `load_inplace`, so other clients that send
  `model="selftune-active"` get the new weights on their next request without a config change.

vLLM must be started with LoRA and runtime updating enabled and a rank limit that fits;
`selftune serve --engine vllm` does (`--print-command` shows the command):

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \\
    python -m vllm.entrypoints.openai.api_server --model BASE_MODEL_DIR \\
        --enable-lora --max-lora-rank 16 --max-loras 4 \\
        --enable-auto-tool-choice --tool-call-parser hermes --chat-template TEMPLATE

The HTTP requests are `agent.serving.vllm.VllmAdmin`'s (it lists the routes); `lora_path` is
read by the vLLM server, so the registry folder must be visible to it at the same path. A GRPO
run on a vLLM server of its own (`rollout_engine = "vllm"`) replaces the served base weights
instead (`VllmReloader.reload_weights`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.config import Config
from agent.model.adapters import verify_adapter
from agent.serving.vllm import SERVED_NAME, VllmAdmin, VllmAdminError
from tuner.schemas import AdapterRecord

_VERSION = re.compile(r"v\d+")
T = TypeVar("T")


class ReloadError(VllmAdminError):
    """The serving side refused or could not be reached; the message says how to fix it."""


def _check(record: AdapterRecord) -> None:
    """Refuse (RegistryError) a record whose files no longer match its checksums."""
    if not record.path:
        raise ReloadError(f"record {record.version} has no path: read it from the Registry")
    verify_adapter(Path(record.path), record.sha256, f"adapter {record.version}")


class Reloader(Protocol):
    """What the two kinds of serving offer: promote a record, or load and unload an adapter
    folder under a name (a GRPO run serves each step's policy that way)."""

    async def reload(self, record: AdapterRecord | None) -> None:
        """Make `record` (None: the base model) what agents get from now on."""
        ...

    async def load(self, name: str, path: Path | str, *, inplace: bool = False) -> None: ...

    async def unload(self, name: str, *, missing_ok: bool = False) -> None: ...


class AdapterHost(Protocol):
    """What the in-process local engine (agent.model.engine.LocalEngine) offers."""

    def adapters(self) -> dict[str, str]: ...

    def load_adapter(self, name: str, path: str, *, replace: bool = False) -> Any: ...

    def unload_adapter(self, name: str) -> Any: ...


class LocalReloader:
    """Make the promoted version ready in an in-process engine, without reloading the base.

    The local engine serves adapters by name per request and agents resolve "active" through
    the registry, so reloading means loading the new version under its own name (replacing a
    stale copy loaded from another folder). Adapters already loaded stay: episodes in flight
    may still be using them.
    """

    def __init__(self, backend: AdapterHost):
        self.backend = backend

    async def reload(self, record: AdapterRecord | None) -> None:
        if record is None:
            return  # the base model is always there
        _check(record)
        if self.backend.adapters().get(record.version) != str(record.path):
            await self.load(record.version, record.path, inplace=True)

    async def load(self, name: str, path: Path | str, *, inplace: bool = False) -> None:
        """Load the adapter at `path` as `name`; `inplace` replaces one already under that name."""
        self.backend.load_adapter(name, str(path), replace=inplace)

    async def unload(self, name: str, *, missing_ok: bool = False) -> None:
        """Unload `name`; `missing_ok`: a name that is not loaded is no error."""
        if missing_ok and name not in self.backend.adapters():
            return
        self.backend.unload_adapter(name)


class VllmReloader:
    """Which adapters a running vLLM serves after a promotion, through `VllmAdmin`."""

    def __init__(
        self,
        base_url: str,
        served_name: str = SERVED_NAME,
        *,
        timeout_s: float = 60.0,
        api_key: str | None = None,
    ):
        self.admin = VllmAdmin(base_url, timeout_s=timeout_s, api_key=api_key)
        self.served_name = served_name

    async def reload(self, record: AdapterRecord | None) -> None:
        """Serve `record` under the stable name and under its version; None unloads the stable
        name (requests for it then fail: point agents at the base model's name for base).

        selftune's own agents ask for the version ("v3"), so each trace names the adapter that
        answered; anything else asks for the stable name and gets the new weights on its next
        request. Version names other than this one and the one it replaces are unloaded, so
        retired adapters do not pile up in vLLM's LoRA slots, while episodes that started on
        the replaced version can still finish on it.
        """
        if record is None:
            await self.unload(self.served_name, missing_ok=True)
            return
        _check(record)
        served = await self.served()
        replaced = served.get(self.served_name)
        if served.get(record.version) != str(record.path):
            await self.load(record.version, record.path, inplace=record.version in served)
        await self.load(self.served_name, record.path, inplace=True)
        for name, path in served.items():
            if _VERSION.fullmatch(name) and path not in (str(record.path), replaced):
                await self.unload(name, missing_ok=True)

    async def served(self) -> dict[str, str]:
        """The LoRA adapters the server has loaded: name -> path."""
        return await self._admin(self.admin.served)

    async def load(self, name: str, path: Path | str, *, inplace: bool = False) -> None:
        """Load the adapter at `path` as `name`; `inplace` replaces one already under that name."""
        await self._admin(self.admin.load, name, path, inplace=inplace)

    async def unload(self, name: str, *, missing_ok: bool = False) -> None:
        """Unload `name` (e.g. a retired version loaded under its own name)."""
        await self._admin(self.admin.unload, name, missing_ok=missing_ok)

    async def reload_weights(self, folder: Path | str) -> None:
        """Replace the served base weights in place (`VllmAdmin.reload_weights`). Only a server
        started with weight reloading answers (`agent.serving.vllm.rollout_server`, the one a
        GRPO run with rollout_engine = "vllm" starts for itself)."""
        await self._admin(self.admin.reload_weights, folder)

    async def _admin(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One blocking admin request, off the event loop; its refusal as a ReloadError."""
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        except VllmAdminError as e:
            raise ReloadError(str(e), e.status) from None


def reloader_for(cfg: Config, engine: AdapterHost | None) -> Reloader:
    """How a promotion reaches running agents: the in-process engine (the local backend's, from
    `agent.workspace.get_engine`), or vLLM over HTTP (`engine` unused)."""
    if cfg.model.backend == "openai":
        if not cfg.model.base_url:
            raise ValueError("[model] backend = 'openai' needs [model] base_url to reload adapters")
        return VllmReloader(cfg.model.base_url)
    return LocalReloader(engine)
