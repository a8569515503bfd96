"""The Chroma store: embedded (a PersistentClient in the workspace) by default, a Chroma
server when `[retrieval] url` is set. Telemetry is off either way.

(chromadb 1.5's product telemetry is already a no-op and posthog is not installed; the
setting below keeps it off should a later version turn it back on.)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

import chromadb
from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection
from chromadb.config import Settings

from retrieval.embedding import MiniLMEmbedding
from retrieval.schemas import RetrievalConfig

os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")


def _settings() -> Settings:
    return Settings(anonymized_telemetry=False, allow_reset=False)


def open_client(cfg: RetrievalConfig, path: Path | str | None = None) -> ClientAPI:
    """A Chroma client: `HttpClient` for `cfg.url`, else a `PersistentClient` at `path`
    (the workspace's chroma folder; the caller passes `Config.workspace.chroma`)."""
    if cfg.url:
        u = urlparse(cfg.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(
                f"[retrieval] url {cfg.url!r} is not an http(s) URL like http://localhost:8000"
            )
        return chromadb.HttpClient(
            host=u.hostname,
            port=u.port or (443 if u.scheme == "https" else 8000),
            ssl=u.scheme == "https",
            settings=_settings(),
        )
    if path is None:
        raise ValueError("open_client needs the Chroma folder (Config.workspace.chroma) or a url")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(path), settings=_settings())


_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]$")


def get_collection(client: ClientAPI, name: str) -> Collection:
    """The collection `name` (created if missing) with selftune's embedding function."""
    if not _NAME_RE.match(name):
        raise ValueError(
            f"collection name {name!r} is not valid for Chroma: use 3-512 letters, digits, "
            "'.', '_' or '-', starting and ending with a letter or digit (--collection or "
            "[retrieval] collection)"
        )
    return client.get_or_create_collection(
        name=name, embedding_function=MiniLMEmbedding(), configuration={"hnsw": {"space": "cosine"}}
    )
