"""Retrieval quality on docs-qa, then speed: indexing throughput and query latency on ~2,000
chunks.

    .venv/bin/python -m benchmarks.bench_retrieval [--files 200] [--queries 100] [--only quality]

Quality: the docs-qa corpus is indexed as `selftune eval` indexes it (`[retrieval]` chunk
settings) and every test-split question is the query (the oracle query: what a model that
searched with the question itself would get). For dense and hybrid ranking: recall@k (the
task's source file among the first k passages, k = 1, 3, 4, 8) and MRR (1 / rank of the first
passage from the source, 0 past rank 8). At the configured top_k, for each passage cut: the
share of questions whose reference answer appears in the returned texts (the test the
`ungrounded` flag applies) and the characters returned.

Speed: writes `--files` synthetic markdown files of ten ~500-character paragraphs each (one
chunk per paragraph), indexes them into an embedded Chroma store in a temporary folder,
re-indexes them unchanged (everything skipped), then runs `--queries` searches, dense and
hybrid. The model is loaded before timing starts.

Prints tables and writes benchmarks/results/bench_retrieval.json.
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
from traces.flags import reference_in

ROOT = Path(__file__).resolve().parents[1]
DOCS_QA = ROOT / "agent" / "envs" / "docs_qa"
KS = (1, 3, 4, 8)


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


def docs_qa_tasks(split: str = "test") -> list[dict]:
    lines = (DOCS_QA / "tasks.jsonl").read_text().splitlines()
    return [t for t in map(json.loads, filter(str.strip, lines)) if t["split"] == split]


def quality(tmp: Path) -> dict:
    """Recall@k and MRR per ranking, answer presence and size per passage cut, on docs-qa."""
    cfg = RetrievalConfig()
    col = get_collection(open_client(cfg, tmp / "chroma-qa"), "docs-qa")
    index_paths([DOCS_QA / "corpus"], col, cfg.chunk_chars, cfg.chunk_overlap)
    tasks = docs_qa_tasks()
    rankings: dict[str, dict] = {}
    for ranking in ("dense", "hybrid"):
        hits = {k: 0 for k in KS}
        rr = 0.0
        t = time.perf_counter()
        for task in tasks:
            sources = [Path(p.source).name for p in search(col, task["prompt"], max(KS), ranking)]
            rank = (
                sources.index(task["metadata"]["source"]) + 1
                if task["metadata"]["source"] in sources
                else None
            )
            for k in KS:
                hits[k] += rank is not None and rank <= k
            rr += 1.0 / rank if rank else 0.0
        rankings[ranking] = {
            **{f"recall@{k}": hits[k] / len(tasks) for k in KS},
            "mrr": rr / len(tasks),
            "query_mean_ms": (time.perf_counter() - t) / len(tasks) * 1000.0,
        }
    cuts: dict[str, dict] = {}
    for ranking in ("dense", "hybrid"):
        for passage in ("chunk", "paragraph", "sentences"):
            found, chars = 0, 0
            for task in tasks:
                texts = [p.text for p in search(col, task["prompt"], cfg.top_k, ranking, passage)]
                found += reference_in(task["answer"], texts)
                chars += sum(map(len, texts))
            cuts[f"{ranking}+{passage}"] = {
                "answer_in_passages": found / len(tasks),
                "mean_chars": chars / len(tasks),
            }
    return {
        "tasks": len(tasks),
        "chunks": col.count(),
        "top_k": cfg.top_k,
        "rankings": rankings,
        "passages": cuts,
    }


def speed(tmp: Path, files: int, n_queries: int) -> dict:
    rng, vocab = random.Random(0), words()
    docs = tmp / "docs"
    docs.mkdir()
    for i in range(files):
        paras = [paragraph(rng, vocab) for _ in range(10)]
        (docs / f"doc{i:04d}.md").write_text(f"# Document {i}\n\n" + "\n\n".join(paras))
    col = get_collection(open_client(RetrievalConfig(), tmp / "chroma"), "bench")

    t = time.perf_counter()
    report = index_paths([docs], col, chunk_chars=600, overlap=0)
    index_s = time.perf_counter() - t
    t = time.perf_counter()
    again = index_paths([docs], col, chunk_chars=600, overlap=0)
    reindex_s = time.perf_counter() - t
    assert len(again.skipped) == files

    queries = [" ".join(rng.choice(vocab) for _ in range(6)) for _ in range(n_queries)]
    times: dict[str, list[float]] = {}
    for ranking in ("dense", "hybrid"):
        search(col, queries[0], 4, ranking)  # warm-up (hybrid: builds the BM25 index)
        times[ranking] = []
        for q in queries:
            t = time.perf_counter()
            hits = search(col, q, 4, ranking)
            times[ranking].append(time.perf_counter() - t)
            assert len(hits) == 4
    ms = 1000.0
    return {
        "chunks": col.count(),
        "files": files,
        "index_s": index_s,
        "index_chunks_per_s": report.chunks_added / index_s,
        "reindex_unchanged_s": reindex_s,
        "query_p50_ms": statistics.median(times["dense"]) * ms,
        "query_p95_ms": pct(times["dense"], 0.95) * ms,
        "hybrid_query_p50_ms": statistics.median(times["hybrid"]) * ms,
        "hybrid_query_p95_ms": pct(times["hybrid"], 0.95) * ms,
        "queries": n_queries,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--only", choices=["quality", "speed"], help="run one part")
    a = p.parse_args()
    t0 = time.perf_counter()
    embedding.load_model()  # not part of any timing
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if a.only != "speed":
            result["quality"] = quality(Path(tmp))
        if a.only != "quality":
            result.update(speed(Path(tmp), a.files, a.queries))
    result["wall_s"] = time.perf_counter() - t0
    console = Console()
    if "quality" in result:
        q = result["quality"]
        table = Table(
            "ranking",
            *(f"recall@{k}" for k in KS),
            "MRR",
            "ms/query",
            title=f"docs-qa test split, question as query ({q['tasks']} tasks, "
            f"{q['chunks']} chunks)",
        )
        for name, r in q["rankings"].items():
            table.add_row(
                name,
                *(f"{r[f'recall@{k}']:.3f}" for k in KS),
                f"{r['mrr']:.3f}",
                f"{r['query_mean_ms']:.1f}",
            )
        console.print(table)
        table = Table(
            "ranking + passage",
            f"answer in top-{q['top_k']} texts",
            "chars returned",
            title="what the model is shown",
        )
        for name, r in q["passages"].items():
            table.add_row(name, f"{r['answer_in_passages']:.3f}", f"{r['mean_chars']:.0f}")
        console.print(table)
    if "chunks" in result:
        ms = 1000.0
        index_s = result["index_s"]
        table = Table(
            "measure", "value", title=f"Chroma + MiniLM, {result['chunks']} chunks, embedded store"
        )
        table.add_row(
            "index (embed + add)",
            f"{result['index_chunks_per_s']:.0f} chunks/s ({index_s:.1f} s)",
        )
        table.add_row("re-index, all unchanged", f"{result['reindex_unchanged_s'] * ms:.0f} ms")
        table.add_row("query p50 (with embedding, k=4)", f"{result['query_p50_ms']:.1f} ms")
        table.add_row("query p95", f"{result['query_p95_ms']:.1f} ms")
        table.add_row(
            "hybrid query p50 / p95",
            (f"{result['hybrid_query_p50_ms']:.1f} / {result['hybrid_query_p95_ms']:.1f} ms"),
        )
        console.print(table)
    console.print(f"wall time {result['wall_s']:.1f} s")
    out = ROOT / "benchmarks" / "results" / "bench_retrieval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
