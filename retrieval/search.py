"""Search: a query into scored passages, and the `search` tool the agent uses.

Ranking ("dense" or "hybrid", `[retrieval] ranking`): dense ranks by MiniLM similarity
alone; hybrid fuses that ranking with a BM25 ranking of the same collection (see
retrieval/lexical.py) by reciprocal rank fusion, so an exact term the question names (a
product code, a person) lifts its passage. Passage (`[retrieval] passage`): "chunk" is the
stored chunk; "paragraph" keeps the one paragraph or list item of the chunk that BM25 ranks
best for the query, "sentences" the best two sentences, so a small model is shown the fact
rather than 800 characters around it. Measured on docs-qa (benchmarks/bench_retrieval.py),
"paragraph" keeps every answer "chunk" shows in about half the characters; "sentences" loses
one answer in seven (a fact split over "The Heron Arm ... launched in 2014. It weighs ...").

Score, higher is better. Dense ranking: the cosine similarity of the query and the passage.
Chroma returns a distance; in a cosine-space collection distance = 1 - cos, so score =
1 - distance. For an l2-space collection of our normalised vectors, distance = |a - b|^2 =
2 - 2 cos, so score = 1 - distance / 2. For inner product ("ip"), distance = 1 - a.b, so
score = 1 - distance. Hybrid ranking: the fused score, the sum over the two rankings of
1 / (60 + rank), about 0.033 for a passage first in both. A cut passage keeps its chunk's id,
score and metadata (its start/end offsets are the chunk's).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

import bm25s
from chromadb.api.models.Collection import Collection

from retrieval.lexical import lexical_index, rrf, tokenize
from retrieval.schemas import PassageCut, Ranking
from tools.base import Tool, ToolError

CANDIDATES = 20  # how deep each ranking is read before fusion (at least k)
KEEP = {"paragraph": 1, "sentences": 2}  # units a cut passage keeps


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


def search(
    collection: Collection,
    query: str,
    k: int = 4,
    ranking: Ranking = "dense",
    passage: PassageCut = "chunk",
) -> list[Passage]:
    """The `k` passages best matching `query`, best first (see the module docstring)."""
    if not query.strip():
        raise ValueError("the search query is empty: say what to look for")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if ranking not in get_args(Ranking) or passage not in get_args(PassageCut):
        raise ValueError(
            f"unknown ranking {ranking!r} or passage {passage!r}: ranking is one of "
            f"{get_args(Ranking)}, passage one of {get_args(PassageCut)}"
        )
    if ranking == "dense":
        out = _dense(collection, query, k)
    else:
        out = _hybrid(collection, query, k)
    if passage != "chunk":
        out = [replace(p, text=cut_passage(p.text, query, passage)) for p in out]
    return out


def _dense(collection: Collection, query: str, n: int) -> list[Passage]:
    res = collection.query(
        query_texts=[query], n_results=n, include=["documents", "metadatas", "distances"]
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


def _hybrid(collection: Collection, query: str, k: int) -> list[Passage]:
    depth = max(k, CANDIDATES)
    dense = _dense(collection, query, depth)
    index = lexical_index(collection)
    lexical = index.top(query, depth)
    fused = rrf([[p.id for p in dense], [index.ids[i] for i, _ in lexical]])
    by_id = {p.id: p for p in dense}
    for i, _ in lexical:
        if index.ids[i] not in by_id:
            meta = index.metadatas[i]
            by_id[index.ids[i]] = Passage(
                index.ids[i], index.texts[i], str(meta.get("source", "")), 0.0, meta
            )
    best = sorted(fused, key=lambda id_: -fused[id_])[:k]
    return [replace(by_id[id_], score=round(fused[id_], 4)) for id_ in best]


_SPLIT = {
    "paragraph": re.compile(r"\n+"),  # a markdown paragraph or list item is one line
    "sentences": re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9*\-\[(\"'])|\n+"),
}
_HEADING_LINE = re.compile(r"^#{1,6}\s")


def units(text: str, unit: str = "paragraph") -> list[str]:
    """The paragraphs (or sentences) of a passage, headings left out: a chunk's heading is
    shown beside it (format_passages)."""
    parts = (s.strip() for s in _SPLIT[unit].split(text))
    return [s for s in parts if s and not _HEADING_LINE.match(s)]


def cut_passage(text: str, query: str, unit: str = "paragraph", keep: int | None = None) -> str:
    """The `keep` units (paragraphs or sentences) of `text` that BM25, over the passage's own
    units, ranks best for `query`, in their original order; the first units when none shares
    a word with the query."""
    keep = keep or KEEP[unit]
    parts = units(text, unit)
    if not parts:
        return text
    words = tokenize([query])[0]
    bm25 = bm25s.BM25()
    bm25.index(tokenize(parts), show_progress=False)
    ids = bm25.get_tokens_ids(words)
    if not ids:
        return " ".join(parts[:keep])
    scores = bm25.get_scores(ids)
    best = sorted(sorted(range(len(parts)), key=lambda i: -scores[i])[:keep])
    return " ".join(parts[i] for i in best if scores[i] > 0) or " ".join(parts[:keep])


async def asearch(
    collection: Collection,
    query: str,
    k: int = 4,
    ranking: Ranking = "dense",
    passage: PassageCut = "chunk",
) -> list[Passage]:
    """`search` in a worker thread (embedding, BM25 and Chroma are blocking)."""
    return await asyncio.to_thread(search, collection, query, k, ranking, passage)


def format_passages(passages: list[Passage]) -> str:
    """Passages as the model sees them: the file's name (and heading), then the text. The ids,
    full paths and scores go to the retrieval span, not to the model: on user_retrieval they
    were a quarter of each training row (777 tokens a row; 32-hex ids, absolute paths) and
    nothing a 135M model can use."""
    if not passages:
        return "No passages found."
    blocks = []
    for i, p in enumerate(passages, 1):
        where = Path(p.source).name or p.source
        if p.metadata.get("heading"):
            where += f" > {p.metadata['heading']}"
        blocks.append(f"[{i}] {where}\n{p.text}")
    return "\n\n".join(blocks)


@dataclass(eq=False)
class SearchTool(Tool):
    """The `search` tool; `asearch(query)` gives the structured passages for a retrieval span."""

    collection: Collection | None = field(default=None, repr=False)
    k: int = 4
    ranking: Ranking = "hybrid"
    passage: PassageCut = "paragraph"

    async def asearch(self, query: str, k: int | None = None) -> list[Passage]:
        assert self.collection is not None
        return await asearch(self.collection, query, k or self.k, self.ranking, self.passage)


def make_search_tool(
    collection: Collection,
    k: int = 4,
    name: str = "search",
    ranking: Ranking = "hybrid",
    passage: PassageCut = "paragraph",
) -> SearchTool:
    """A Tool that searches `collection` and returns the top `k` passages as text.
    `ranking` and `passage` default to `RetrievalConfig`'s defaults."""

    async def run(query: str) -> str:
        try:
            passages = await asearch(collection, query, k, ranking, passage)
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
        ranking=ranking,
        passage=passage,
    )
