"""Search: a query into scored passages, and the `search` tool the agent uses.

Score: the cosine similarity of the query and the passage, higher is better. Chroma returns
a distance; in a cosine-space collection distance = 1 - cos, so score = 1 - distance. For an
l2-space collection of our normalised vectors, distance = |a - b|^2 = 2 - 2 cos, so
score = 1 - distance / 2. For inner product ("ip"), distance = 1 - a.b, so score = 1 - distance.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from chromadb.api.models.Collection import Collection

from tools.base import Tool, ToolError


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    source: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)


def _space(collection: Collection) -> str:
    conf = collection.configuration or {}
    hnsw = conf.get("hnsw") or {}
    spann = conf.get("spann") or {}
    return hnsw.get("space") or spann.get("space") or "cosine"


def search(collection: Collection, query: str, k: int = 4) -> list[Passage]:
    """The `k` passages most similar to `query`, best first."""
    if not query.strip():
        raise ValueError("the search query is empty: say what to look for")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    res = collection.query(
        query_texts=[query], n_results=k, include=["documents", "metadatas", "distances"]
    )
    space = _space(collection)
    out = []
    for id_, doc, meta, dist in zip(
        res["ids"][0], res["documents"][0], res["metadatas"][0], res["distances"][0], strict=True
    ):
        score = 1.0 - dist / 2.0 if space == "l2" else 1.0 - dist
        meta = dict(meta or {})
        out.append(Passage(id_, doc or "", str(meta.get("source", "")), round(score, 4), meta))
    return out


async def asearch(collection: Collection, query: str, k: int = 4) -> list[Passage]:
    """`search` in a worker thread (embedding and Chroma are blocking)."""
    return await asyncio.to_thread(search, collection, query, k)


def format_passages(passages: list[Passage]) -> str:
    """Passages as the model sees them: id, source, score, then the text."""
    if not passages:
        return "No passages found."
    blocks = []
    for i, p in enumerate(passages, 1):
        where = p.source
        if p.metadata.get("heading"):
            where += f" > {p.metadata['heading']}"
        blocks.append(f"[{i}] id={p.id} source={where} score={p.score:.3f}\n{p.text}")
    return "\n\n".join(blocks)


@dataclass(eq=False)
class SearchTool(Tool):
    """The `search` tool; `asearch(query)` gives the structured passages for a retrieval span."""

    collection: Collection | None = field(default=None, repr=False)
    k: int = 4

    async def asearch(self, query: str, k: int | None = None) -> list[Passage]:
        assert self.collection is not None
        return await asearch(self.collection, query, k or self.k)


def make_search_tool(collection: Collection, k: int = 4, name: str = "search") -> SearchTool:
    """A Tool that searches `collection` and returns the top `k` passages as text."""

    async def run(query: str) -> str:
        try:
            passages = await asearch(collection, query, k)
        except ValueError as e:
            raise ToolError(str(e)) from None
        return format_passages(passages)

    return SearchTool(
        name=name,
        description=(
            f"Search the '{collection.name}' document collection and return the {k} most "
            "relevant passages with their sources."
        ),
        parameters={
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look for, in a few words."}
            },
            "required": ["query"],
            "additionalProperties": False,
        },
        func=run,
        source="builtin",
        collection=collection,
        k=k,
    )
