"""Retrieval: the Chroma store, the local embedding function, ingestion and the search tool."""

from retrieval.ingest import IndexReport, chunk_text, index_paths
from retrieval.search import Passage, SearchTool, asearch, format_passages, make_search_tool, search
from retrieval.store import get_collection, open_client

__all__ = [
    "IndexReport",
    "Passage",
    "SearchTool",
    "asearch",
    "chunk_text",
    "format_passages",
    "get_collection",
    "index_paths",
    "make_search_tool",
    "open_client",
    "search",
]
