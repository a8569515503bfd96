"""Schemas that cross the retrieval/ boundary."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Ranking = Literal["hybrid", "dense"]  # see retrieval/search.py
PassageCut = Literal["paragraph", "sentences", "chunk"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RetrievalConfig(_Section):
    url: str | None = None  # a Chroma server; None = embedded PersistentClient in the workspace
    collection: str = "docs"
    chunk_chars: int = Field(default=800, ge=100)
    chunk_overlap: int = Field(default=120, ge=0)
    top_k: int = Field(default=4, ge=1, le=100)
    ranking: Ranking = "hybrid"  # dense MiniLM fused with BM25, or dense alone
    passage: PassageCut = "paragraph"  # the chunk's best-matching paragraph, 2 sentences, all
