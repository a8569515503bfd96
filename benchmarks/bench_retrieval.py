"""Retrieval speed: indexing throughput and query latency (with embedding) on ~2,000 chunks.

    .venv/bin/python -m benchmarks.bench_retrieval [--files 200] [--queries 100]

Writes `--files` synthetic markdown files of ten ~500-character paragraphs each (one chunk
per paragraph), indexes them into an embedded Chroma store in a temporary folder, re-indexes
them unchanged (everything skipped), then runs `--queries` searches. The model is loaded
before timing starts. Prints a table and writes benchmarks/results/bench_retrieval.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from retrieval import embedding
from retrieval.ingest import index_paths
from retrieval.schemas import RetrievalConfig
from retrieval.search import search
from retrieval.store import get_collection, open_client

ROOT = Path(__file__).resolve().parents[1]


def words() -> list[str]:
    # a deterministic vocabulary: the words of a stdlib module's source
    return sorted(set(re.findall(r"[a-z]{4,}", Path(random.__file__).read_text())))


def paragraph(rng: random.Random, vocab: list[str], chars: int = 500) -> str:
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append(rng.choice(vocab))
    return " ".join(out).capitalize() + "."


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--queries", type=int, default=100)
    a = p.parse_args()
    rng, vocab = random.Random(0), words()
    embedding.load_model()  # not part of any timing
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"
        docs.mkdir()
        for i in range(a.files):
            paras = [paragraph(rng, vocab) for _ in range(10)]
            (docs / f"doc{i:04d}.md").write_text(f"# Document {i}\n\n" + "\n\n".join(paras))
        col = get_collection(open_client(RetrievalConfig(), Path(tmp) / "chroma"), "bench")

        t = time.perf_counter()
        report = index_paths([docs], col, chunk_chars=600, overlap=0)
        index_s = time.perf_counter() - t
        t = time.perf_counter()
        again = index_paths([docs], col, chunk_chars=600, overlap=0)
        reindex_s = time.perf_counter() - t
        assert len(again.skipped) == a.files

        queries = [" ".join(rng.choice(vocab) for _ in range(6)) for _ in range(a.queries)]
        search(col, queries[0], k=4)  # warm-up
        times = []
        for q in queries:
            t = time.perf_counter()
            hits = search(col, q, k=4)
            times.append(time.perf_counter() - t)
            assert len(hits) == 4
        chunks = col.count()

    ms = 1000.0
    result = {
        "chunks": chunks,
        "files": a.files,
        "index_s": index_s,
        "index_chunks_per_s": report.chunks_added / index_s,
        "reindex_unchanged_s": reindex_s,
        "query_p50_ms": statistics.median(times) * ms,
        "query_p95_ms": pct(times, 0.95) * ms,
        "queries": a.queries,
    }
    table = Table("measure", "value", title=f"Chroma + MiniLM, {chunks} chunks, embedded store")
    table.add_row(
        "index (embed + add)", f"{result['index_chunks_per_s']:.0f} chunks/s ({index_s:.1f} s)"
    )
    table.add_row("re-index, all unchanged", f"{reindex_s * ms:.0f} ms")
    table.add_row("query p50 (with embedding, k=4)", f"{result['query_p50_ms']:.1f} ms")
    table.add_row("query p95", f"{result['query_p95_ms']:.1f} ms")
    console = Console()
    console.print(table)
    out = ROOT / "benchmarks" / "results" / "bench_retrieval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
