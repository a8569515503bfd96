"""Reload against a real HTTP server on loopback that implements vLLM's runtime LoRA routes."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from _tuner_fixtures import make

from tuner.registry import Registry
from tuner.reload import SERVED_NAME, LocalReloader, ReloadError, VllmReloader
from tuner.schemas import GateResult


class FakeVllm(BaseHTTPRequestHandler):
    """vLLM's checks, as its serving code does them: a name loaded twice without
    load_inplace is a 400, unloading an unknown name is a 404, the path must exist."""

    loaded: dict[str, str]
    requests: list[tuple[str, dict]]

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _answer(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path != "/v1/models":
            return self._answer(404, "Not Found")
        # vLLM lists the base model, then each LoRA with its path as root and the base as parent
        data = [{"id": "base", "root": "/models/base", "parent": None}]
        data += [{"id": n, "root": p, "parent": "base"} for n, p in self.server.loaded.items()]
        body = json.dumps({"object": "list", "data": data})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))
        loaded = self.server.loaded
        if self.path == "/v1/load_lora_adapter":
            name, path = body.get("lora_name"), body.get("lora_path")
            if not name or not path:
                return self._answer(400, "Both 'lora_name' and 'lora_path' must be provided.")
            if name in loaded and not body.get("load_inplace", False):
                return self._answer(400, f"The lora adapter '{name}' has already been loaded.")
            if not (Path(path) / "adapter_config.json").is_file():
                return self._answer(400, f"No adapter found at {path}")
            loaded[name] = path
            return self._answer(200, f"Success: LoRA adapter '{name}' added successfully.")
        if self.path == "/v1/unload_lora_adapter":
            name = body.get("lora_name")
            if name not in loaded:
                return self._answer(404, f"The lora adapter '{name}' cannot be found.")
            del loaded[name]
            return self._answer(200, f"Success: LoRA adapter '{name}' removed successfully.")
        return self._answer(404, "Not Found")


@pytest.fixture
def vllm():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeVllm)
    server.loaded, server.requests = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


PASS = GateResult(promote=True, reasons=[], numbers={})


def test_promotion_swaps_the_served_adapter_in_place(tmp_path, vllm):
    reg: Registry = make(tmp_path, 3)
    reloader = VllmReloader(url(vllm))
    p1, p2, p3 = (str(reg.path(v)) for v in ("v1", "v2", "v3"))
    asyncio.run(reloader.reload(reg.promote("v1", PASS)))
    assert vllm.loaded == {"v1": p1, SERVED_NAME: p1}
    asyncio.run(reloader.reload(reg.promote("v2", PASS)))
    # the stable name now answers with v2; v1 stays for episodes that started on it
    assert vllm.loaded == {"v1": p1, "v2": p2, SERVED_NAME: p2}
    stable = [b for p, b in vllm.requests if b.get("lora_name") == SERVED_NAME]
    assert len(stable) == 2 and all(b["load_inplace"] is True for b in stable)
    asyncio.run(reloader.reload(reg.promote("v3", PASS)))
    # v1 is retired twice over: unloaded, so retired adapters do not fill vLLM's LoRA slots
    assert vllm.loaded == {"v2": p2, "v3": p3, SERVED_NAME: p3}
    assert ("/v1/unload_lora_adapter", {"lora_name": "v1"}) in vllm.requests
    # rollback to the base model unloads the stable name
    for _ in range(3):
        reg.rollback()
    assert reg.active() is None
    asyncio.run(reloader.reload(reg.active()))
    assert SERVED_NAME not in vllm.loaded


def test_named_versions_load_and_unload(tmp_path, vllm):
    reg = make(tmp_path, 1)
    reloader = VllmReloader(url(vllm))
    asyncio.run(reloader.load("v1", reg.get("v1").path))
    with pytest.raises(ReloadError, match="HTTP 400.*already been loaded"):
        asyncio.run(reloader.load("v1", reg.get("v1").path))  # vLLM refuses without inplace
    asyncio.run(reloader.unload("v1"))
    with pytest.raises(ReloadError, match="HTTP 404.*cannot be found.*--enable-lora"):
        asyncio.run(reloader.unload("v1"))
    asyncio.run(reloader.unload("v1", missing_ok=True))


def test_connection_refused_names_the_url_and_the_flags():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    reloader = VllmReloader(f"http://127.0.0.1:{port}", timeout_s=5)
    with pytest.raises(ReloadError) as e:
        asyncio.run(reloader.load("x", "/nowhere"))
    msg = str(e.value)
    assert f"127.0.0.1:{port}/v1/load_lora_adapter" in msg
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in msg and "--max-lora-rank" in msg


def _random_lora(folder: Path, model_path: Path) -> Path:
    """A real PEFT folder with nonzero B (no training needed to change the outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    cfg = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(str(folder))
    acfg = json.loads((folder / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = "smollm2-135m-instruct"
    (folder / "adapter_config.json").write_text(json.dumps(acfg))
    return folder


def test_local_reloader_loads_the_promoted_version_into_the_engine(tmp_path, model_path):
    from agent.model.engine import LocalEngine

    reg = Registry(tmp_path / "adapters")
    reg.register(_random_lora(tmp_path / "a", model_path), base_model="smollm2-135m-instruct")
    engine = LocalEngine(model_path, name="smollm2-135m-instruct", dtype="float32")
    try:
        reloader = LocalReloader(engine)
        asyncio.run(reloader.reload(reg.promote("v1", PASS)))
        assert engine.adapters() == {"v1": str(reg.path("v1"))}
        asyncio.run(reloader.reload(reg.active()))  # already loaded from that folder: a no-op
        asyncio.run(reloader.reload(reg.rollback()))  # back to base: nothing to load
        assert list(engine.adapters()) == ["v1"]
    finally:
        engine.close()


def test_the_agent_loads_an_adapter_on_first_use_through_the_same_client(tmp_path, vllm):
    from agent.model.openai import ensure_served, forget_served

    reg = make(tmp_path, 1)
    p1 = str(reg.path("v1"))
    forget_served()
    ensure_served(url(vllm), "v1", p1)
    ensure_served(url(vllm), "v1", p1)  # known to be loaded: no second request
    assert vllm.loaded == {"v1": p1}
    assert [route for route, _ in vllm.requests] == ["/v1/load_lora_adapter"]
    with pytest.raises(ValueError, match="HTTP 400.*No adapter found"):
        ensure_served(url(vllm), "v2", tmp_path / "nowhere")
