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

Routes used: `POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace"}` and
`POST /v1/unload_lora_adapter {"lora_name"}`. `lora_path` is read by the vLLM server, so the
registry folder must be visible to it at the same path.

A GRPO run on a vLLM server of its own (`rollout_engine = "vllm"`) replaces the served base
weights instead (`VllmReloader.reload_weights`): `POST /collective_rpc {"method":
"reload_weights"}` and `POST /reset_prefix_cache`, routes vLLM only has with
VLLM_SERVER_DEV_MODE=1, which is why only a loopback server of the run's own turns them on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

import httpx

from agent.config import Config
from agent.serving.vllm import SERVED_NAME
from tuner.schemas import AdapterRecord

_VERSION = re.compile(r"v\d+")
VLLM_HINT = (
    "start vLLM with --enable-lora, --max-lora-rank at least the adapter's rank, and the "
    "environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
)

WEIGHTS_HINT = (
    "reloading weights needs a vLLM server started with VLLM_SERVER_DEV_MODE=1 on loopback, "
    "like the one a GRPO run with rollout_engine = 'vllm' starts for itself"
)


class ReloadError(RuntimeError):
    """The serving side refused or could not be reached; the message says how to fix it."""


class Reloader(Protocol):
    """What the two kinds of serving offer: promote a record, or load and unload an adapter
    folder under a name (a GRPO run serves each step's policy that way)."""

    async def reload(self, record: AdapterRecord | None) -> None:
        """Make `record` (None: the base model) what agents get from now on."""
        ...

    async def load(self, name: str, path: Path | str, *, inplace: bool = False) -> None: ...

    async def unload(self, name: str, *, missing_ok: bool = False) -> None: ...


class AdapterHost(Protocol):
    """What the in-process local engine (agent.model.local.LocalEngine) offers."""

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
        if not record.path:
            raise ReloadError(f"record {record.version} has no path: read it from the Registry")
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
    """Load adapters into a running vLLM server through its runtime LoRA routes."""

    def __init__(
        self,
        base_url: str,
        served_name: str = SERVED_NAME,
        *,
        timeout_s: float = 60.0,
        api_key: str | None = None,
    ):
        # accept both http://host:8000 and http://host:8000/v1 (the OpenAI client's form)
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.served_name = served_name
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.loaded: set[str] = set()  # names this reloader loaded, for unload bookkeeping

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
        if not record.path:
            raise ReloadError(f"record {record.version} has no path: read it from the Registry")
        served = await self.served()
        replaced = served.get(self.served_name)
        if served.get(record.version) != str(record.path):
            await self.load(record.version, record.path, inplace=record.version in served)
        await self.load(self.served_name, record.path, inplace=True)
        for name, path in served.items():
            if _VERSION.fullmatch(name) and path not in (str(record.path), replaced):
                await self.unload(name, missing_ok=True)

    async def served(self) -> dict[str, str]:
        """The LoRA adapters the server has loaded: name -> path (vLLM's `root`)."""
        url = self.base_url + "/v1/models"
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, headers=self.headers) as client:
                resp = await client.get(url)
            data = resp.json().get("data") or []
        except (httpx.HTTPError, ValueError) as e:
            raise ReloadError(
                f"could not list the models at {url} ({type(e).__name__}: {e}): is vLLM running?"
            ) from None
        # vLLM lists a LoRA with its parent (the base model's name) and its path as root
        return {m["id"]: str(m.get("root")) for m in data if m.get("parent")}

    async def load(self, name: str, path: Path | str, *, inplace: bool = False) -> None:
        """Load the adapter at `path` as `name`; `inplace` replaces one already under that name."""
        body = {"lora_name": name, "lora_path": str(path), "load_inplace": inplace}
        await self._post("/v1/load_lora_adapter", body)
        self.loaded.add(name)

    async def unload(self, name: str, *, missing_ok: bool = False) -> None:
        """Unload `name` (e.g. a retired version loaded under its own name)."""
        try:
            await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        except ReloadError as e:
            if not (missing_ok and "HTTP 404" in str(e)):
                raise
        self.loaded.discard(name)

    async def reload_weights(self, folder: Path | str) -> None:
        """Replace the served base weights, in place, with the safetensors in `folder` (the same
        architecture under the checkpoint's names), then drop the prefix cache computed with
        the old ones. Only a server started with weight reloading answers
        (`agent.serving.vllm.rollout_server`, the one a GRPO run with rollout_engine = "vllm"
        starts for itself): every client of the server gets the new weights."""
        body = {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}}
        await self._post("/collective_rpc", body, hint=WEIGHTS_HINT)
        await self._post("/reset_prefix_cache", {}, hint=WEIGHTS_HINT)

    async def _post(self, route: str, body: dict[str, Any], *, hint: str = VLLM_HINT) -> str:
        url = self.base_url + route
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, headers=self.headers) as client:
                resp = await client.post(url, json=body)
        except httpx.HTTPError as e:
            raise ReloadError(
                f"could not reach vLLM at {url} ({type(e).__name__}: {e}): is it running? " + hint
            ) from None
        if resp.status_code >= 400:
            hint = hint if resp.status_code in (404, 405) else "see the server's log"
            raise ReloadError(
                f"vLLM at {url} answered HTTP {resp.status_code} for {body}: "
                f"{resp.text.strip()[:500]} ({hint})"
            )
        return resp.text


def reloader_for(cfg: Config, engine: AdapterHost | None) -> Reloader:
    """How a promotion reaches running agents: the in-process engine (the local backend's, from
    `agent.workspace.get_engine`), or vLLM over HTTP (`engine` unused)."""
    if cfg.model.backend == "openai":
        if not cfg.model.base_url:
            raise ValueError("[model] backend = 'openai' needs [model] base_url to reload adapters")
        return VllmReloader(cfg.model.base_url)
    return LocalReloader(engine)
