"""Continued pre-training (CPT): a folder of documents becomes a dataset of plain text, and the
trainer learns it with a causal language-model loss on every token.

    selftune tune cpt CORPUS_DIR          # build <workspace>/datasets/cpt-<name>, then train

`build_corpus_dataset` reads the files `search` indexes (retrieval's reader: .md, .txt, HTML
with tags stripped), cuts them at headings and paragraphs into chunks, and writes them through
`traces.datasets.write_dataset`: the same scrubbing, `manifest.json` and `SUMMARY.md` as every
dataset, one row `{"text", "source"}` per chunk, in a stable order. `pack_blocks` is what the
trainer does with the rows (tuner.train, kind "cpt"): each chunk's tokens end with EOS, the
chunks are concatenated and the stream is cut into blocks of `max_length` tokens, all trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrieval.ingest import SUPPORTED, chunk_text, read_text
from tools.errors import SelftuneError
from traces.datasets import Built, DatasetFilters, DatasetResult, write_dataset

# a chunk of about a screen: long enough to hold a document's section whole, short enough that
# the manifest says which part of which file a row came from
CHUNK_CHARS = 2000


class CorpusError(SelftuneError, ValueError):
    """The corpus cannot become a dataset; the message says why and what to do."""


def corpus_files(corpus_dir: Path) -> list[Path]:
    """The readable documents under `corpus_dir`, in path order."""
    if not corpus_dir.is_dir():
        raise CorpusError(f"corpus folder {corpus_dir} does not exist: give a folder of documents")
    files = sorted(
        p for p in corpus_dir.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED
    )
    if not files:
        kinds = ", ".join(sorted(SUPPORTED))
        raise CorpusError(f"{corpus_dir} holds no documents to train on (readable kinds: {kinds})")
    return files


def corpus_rows(corpus_dir: str | Path, chunk_chars: int = CHUNK_CHARS) -> Built:
    """One `{"text", "source"}` row per chunk of every document under `corpus_dir`."""
    root = Path(corpus_dir).expanduser().resolve()
    rows: list[dict[str, Any]] = []
    info: list[dict[str, Any]] = []
    for path in corpus_files(root):
        source = path.relative_to(root).as_posix()
        for chunk in chunk_text(read_text(path), chunk_chars=chunk_chars, overlap=0):
            rows.append({"text": chunk.text, "source": source})
            info.append(
                {"env": root.name, "task_id": source, "trace_ids": [], "label": None,
                 "subagent": None}
            )  # fmt: skip
    if not rows:
        raise CorpusError(f"the documents under {root} are empty: there is no text to train on")
    return Built("cpt", rows, info, trace_ids=[], grade_ids=[])


def build_corpus_dataset(
    corpus_dir: str | Path,
    out: str | Path,
    *,
    chunk_chars: int = CHUNK_CHARS,
    scrub_patterns: tuple[str, ...] | list[str] = (),
) -> DatasetResult:
    """Write the CPT dataset of `corpus_dir` to `out` (scrubbed, with its manifest)."""
    return write_dataset(
        corpus_rows(corpus_dir, chunk_chars), out, DatasetFilters(), scrub_patterns=scrub_patterns
    )


def pack_blocks(
    rows: list[dict[str, Any]], tokenizer: Any, block: int
) -> tuple[list[list[int]], dict[str, int]]:
    """The rows' texts as token blocks of `block` tokens: each text tokenized without special
    tokens and ended with EOS, all concatenated, then cut. Returns (blocks, report)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CorpusError("the tokenizer has no EOS token to separate documents with")
    stream: list[int] = []
    for i, row in enumerate(rows):
        text = row.get("text")
        if not isinstance(text, str):
            raise CorpusError(f"CPT row {i} has no text string (it has {', '.join(row)})")
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    blocks = [stream[i : i + block] for i in range(0, len(stream), block)]
    report = {"rows": len(blocks), "truncated": 0, "dropped": 0, "tokens": sum(map(len, blocks))}
    return blocks, report
