"""The lexical side of hybrid search: a BM25 index (the `bm25s` library) over a collection.

Dense MiniLM similarity finds paraphrases but blurs exact terms: a product code (QA-450), a
name or a number ranks no higher than a passage about the same topic. BM25 ranks on the
terms themselves. `rrf` fuses the two rankings (reciprocal rank fusion: each list adds
1 / (RRF_K + rank) per passage), so neither list's score scale matters.

The index is built from the collection's stored documents on first use, so it needs nothing
beyond what Chroma keeps and works the same for the embedded store and a Chroma server. It
is cached per collection id and rebuilt when the collection's count changes; `index_paths`
also drops it after changing a collection, which covers a file rewritten with the same
number of chunks in this process.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import bm25s
import numpy as np
from chromadb.api.models.Collection import Collection

RRF_K = 60  # the usual constant: damps the difference between the first few ranks
_STOPWORDS = "en"


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """Lower-cased words of two or more characters, English stopwords removed."""
    return bm25s.tokenize(list(texts), stopwords=_STOPWORDS, return_ids=False, show_progress=False)


@dataclass
class LexicalIndex:
    """BM25 over every document of a collection, with the documents kept for the results."""

    count: int
    ids: list[str]
    texts: list[str]
    metadatas: list[dict[str, Any]]
    bm25: bm25s.BM25 | None  # None for an empty collection

    @classmethod
    def build(cls, collection: Collection) -> LexicalIndex:
        got = collection.get(include=["documents", "metadatas"])
        ids = list(got["ids"])
        texts = [d or "" for d in got["documents"] or [""] * len(ids)]
        metas = [dict(m or {}) for m in got["metadatas"] or [{}] * len(ids)]
        bm25 = None
        if ids:
            bm25 = bm25s.BM25()
            bm25.index(tokenize(texts), show_progress=False)
        return cls(len(ids), ids, texts, metas, bm25)

    def top(self, query: str, n: int) -> list[tuple[int, float]]:
        """(position in `ids`, BM25 score) of the best `n` documents with a positive score."""
        if self.bm25 is None:
            return []
        words = tokenize([query])[0]
        ids = self.bm25.get_tokens_ids(words)
        if not ids:
            return []
        scores = self.bm25.get_scores(ids)
        best = np.argsort(-scores, kind="stable")[:n]
        return [(int(i), float(scores[i])) for i in best if scores[i] > 0]


_cache: dict[str, LexicalIndex] = {}
_lock = threading.Lock()


def lexical_index(collection: Collection) -> LexicalIndex:
    """The collection's BM25 index: cached per collection id, rebuilt when its count changes."""
    key = str(collection.id)
    count = collection.count()
    with _lock:
        index = _cache.get(key)
        if index is None or index.count != count:
            index = _cache[key] = LexicalIndex.build(collection)
        return index


def forget(collection: Collection) -> None:
    """Drop the cached index of `collection` (its documents changed)."""
    with _lock:
        _cache.pop(str(collection.id), None)


def rrf(rankings: Sequence[Sequence[str]], k: int = RRF_K) -> dict[str, float]:
    """Reciprocal rank fusion: {id: sum over rankings of 1 / (k + rank)}, rank from 1."""
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, id_ in enumerate(ranking, 1):
            fused[id_] = fused.get(id_, 0.0) + 1.0 / (k + rank)
    return fused
