"""Schemas that cross the retrieval/ boundary."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RetrievalConfig(_Section):
    url: str | None = None  # a Chroma server; None = embedded PersistentClient in the workspace
    collection: str = "docs"
    chunk_chars: int = Field(default=800, ge=100)
    chunk_overlap: int = Field(default=120, ge=0)
    top_k: int = Field(default=4, ge=1, le=100)
