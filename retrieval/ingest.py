"""Ingestion: files into chunks into a Chroma collection, incrementally.

Formats: `.md`, `.markdown`, `.txt`, `.html`/`.htm` (tags stripped with the stdlib
html.parser; headings kept as markdown `#` lines). PDFs are not read: no PDF library is
installed in selftune's environment, so `.pdf` files are reported as unsupported.

Chunks follow headings and paragraphs: a chunk never crosses a heading, paragraphs are
packed up to `chunk_chars`, a longer paragraph is cut at whitespace, and every chunk after
the first in a section starts with up to `overlap` characters of the one before. Each
chunk's metadata keeps its source path, chunk index, character offsets (into the extracted
text: for HTML that is the text after tags are stripped) and heading. Ids are stable: a
hash of the source path and chunk index.

Incremental: every chunk stores its file's content hash and chunk count (`n_chunks`). A
file is unchanged, and skipped, only when all `n_chunks` of its chunks are stored with the
current hash; any other file that has chunks (changed, or cut short by a killed run) has
them deleted and re-added; a file that disappeared from an indexed folder has its chunks
removed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from chromadb.api.models.Collection import Collection

from retrieval.lexical import forget

TEXT_SUFFIXES = {".md", ".markdown", ".txt"}
HTML_SUFFIXES = {".html", ".htm"}
SUPPORTED = TEXT_SUFFIXES | HTML_SUFFIXES
_ADD_BATCH = 256
_HEADING_RE = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
_PARAGRAPH_BREAK_RE = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class Chunk:
    text: str
    start: int  # offsets into the extracted text
    end: int
    heading: str


@dataclass
class IndexReport:
    added: list[str] = field(default_factory=list)  # files new to the collection
    updated: list[str] = field(default_factory=list)  # files whose content changed
    skipped: list[str] = field(default_factory=list)  # files unchanged since the last run
    removed: list[str] = field(default_factory=list)  # files gone from an indexed folder
    unsupported: list[str] = field(default_factory=list)  # files we cannot read (e.g. .pdf)
    chunks_added: int = 0
    chunks_removed: int = 0

    def summary(self) -> str:
        return (
            f"{len(self.added)} added, {len(self.updated)} updated, {len(self.skipped)} unchanged, "
            f"{len(self.removed)} removed, {len(self.unsupported)} unsupported files; "
            f"{self.chunks_added} chunks added, {self.chunks_removed} removed"
        )


class _HtmlText(HTMLParser):
    """Visible text of an HTML page; h1-h6 become markdown headings, blocks become paragraphs."""

    BLOCKS = {"p", "div", "section", "article", "li", "tr", "br", "pre", "blockquote", "table"}
    HIDDEN = {"script", "style", "head", "template", "noscript"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self.HIDDEN:
            self.hidden += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif re.fullmatch(r"h[1-6]", tag) or tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    p = _HtmlText()
    p.feed(html)
    p.close()
    text = "".join(p.parts)
    text = re.sub(r"[ \t]*\n[ \t]*", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def read_text(path: Path) -> str:
    """The text of a supported file (HTML with tags stripped)."""
    raw = path.read_bytes().decode("utf-8", errors="replace")
    return html_to_text(raw) if path.suffix.lower() in HTML_SUFFIXES else raw


def chunk_text(text: str, chunk_chars: int = 800, overlap: int = 120) -> list[Chunk]:
    """Split `text` on headings and paragraphs into chunks of at most ~chunk_chars + overlap."""
    if chunk_chars < 1 or overlap < 0 or overlap >= chunk_chars:
        raise ValueError(
            f"need chunk_chars >= 1 and 0 <= overlap < chunk_chars, got {chunk_chars}, {overlap}"
        )
    chunks: list[Chunk] = []
    for s, e, heading in _sections(text):
        pieces = _pieces(text, s, e, chunk_chars)
        if heading and len(pieces) > 1 and _HEADING_RE.fullmatch(text[slice(*pieces[0])].strip()):
            pieces[0:2] = [(pieces[0][0], pieces[1][1])]  # a heading never stands alone
        prev: tuple[int, int] | None = None
        for start, end in _pack(pieces, chunk_chars):
            ostart = start
            if prev is not None and overlap:
                ostart = max(s, start - overlap)
                # begin the overlap at a word boundary
                m = re.search(r"\s", text[ostart:start])
                ostart = ostart + m.end() if m and ostart > s else ostart
            body = text[ostart:end]
            lead = len(body) - len(body.lstrip())
            body = body.strip()
            if body:
                chunks.append(Chunk(body, ostart + lead, ostart + lead + len(body), heading))
            prev = (start, end)
    return chunks


def _sections(text: str) -> list[tuple[int, int, str]]:
    marks = [(m.start(), m.group(2).strip()) for m in _HEADING_RE.finditer(text)]
    if not marks or marks[0][0] > 0:
        marks.insert(0, (0, ""))
    return [
        (pos, marks[i + 1][0] if i + 1 < len(marks) else len(text), heading)
        for i, (pos, heading) in enumerate(marks)
    ]


def _pieces(text: str, s: int, e: int, limit: int) -> list[tuple[int, int]]:
    """Paragraph spans in [s, e); paragraphs longer than `limit` cut at whitespace."""
    spans, pos = [], s
    for m in _PARAGRAPH_BREAK_RE.finditer(text, s, e):
        spans.append((pos, m.start()))
        pos = m.end()
    spans.append((pos, e))
    out = []
    for ps, pe in spans:
        while pe - ps > limit:
            cut = text.rfind(" ", ps + limit // 2, ps + limit)
            cut = cut if cut > ps else ps + limit
            out.append((ps, cut))
            ps = cut
        if text[ps:pe].strip():
            out.append((ps, pe))
    return out


def _pack(pieces: list[tuple[int, int]], limit: int) -> Iterable[tuple[int, int]]:
    cur: tuple[int, int] | None = None
    for ps, pe in pieces:
        if cur is None:
            cur = (ps, pe)
        elif pe - cur[0] <= limit:
            cur = (cur[0], pe)
        else:
            yield cur
            cur = (ps, pe)
    if cur is not None:
        yield cur


def chunk_id(source: str, index: int) -> str:
    return hashlib.sha256(f"{source}\0{index}".encode()).hexdigest()[:32]


def _files(paths: Iterable[Path | str], report: IndexReport) -> tuple[list[Path], list[Path]]:
    """(files to index, folders scanned); unsupported files go into the report."""
    files: list[Path] = []
    folders: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser().resolve()
        if p.is_dir():
            folders.append(p)
            for f in sorted(p.rglob("*")):
                if not f.is_file() or any(part.startswith(".") for part in f.relative_to(p).parts):
                    continue
                if f.suffix.lower() in SUPPORTED:
                    files.append(f)
                elif f.suffix.lower() == ".pdf":
                    report.unsupported.append(str(f))
        elif p.is_file():
            if p.suffix.lower() in SUPPORTED:
                files.append(p)
            else:
                report.unsupported.append(str(p))
        else:
            raise FileNotFoundError(f"{raw} does not exist: give files or folders to index")
    return list(dict.fromkeys(files)), folders


def _indexed_files(collection: Collection) -> dict[str, str | None]:
    """{source: file_hash} for every file with chunks in the collection; None where the file
    is not completely indexed."""
    by_source: dict[str, list[dict]] = {}
    for m in collection.get(include=["metadatas"])["metadatas"] or []:
        if m:
            by_source.setdefault(m["source"], []).append(m)
    known: dict[str, str | None] = {}
    for source, metas in by_source.items():
        # complete = every chunk stored with one hash: a run killed between two batches
        # leaves fewer than n_chunks (ids are unique per chunk index, so no more)
        hashes = {m["file_hash"] for m in metas}
        complete = len(hashes) == 1 and all(m.get("n_chunks") == len(metas) for m in metas)
        known[source] = hashes.pop() if complete else None
    return known


def index_paths(
    paths: Iterable[Path | str],
    collection: Collection,
    chunk_chars: int = 800,
    overlap: int = 120,
    on_file: Callable[[str, str], None] | None = None,
    batch_size: int = _ADD_BATCH,
) -> IndexReport:
    """Index files and folders into `collection`, embedding only new or changed files.

    A file left partly indexed by an interrupted run is indexed again from scratch.
    `on_file(path, what)` is called per file with what happened ("added", "updated",
    "unchanged", "removed") for progress display. Chunks are embedded and stored
    `batch_size` at a time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    report = IndexReport()
    files, folders = _files(paths, report)
    known = _indexed_files(collection)
    notify = on_file or (lambda path, what: None)

    pending: list[tuple[str, str, int, int, Chunk]] = []  # embedded in batches across files
    for f in files:
        source = str(f)
        data = f.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        old = source in known
        if old and known[source] == digest:
            report.skipped.append(source)
            notify(source, "unchanged")
            continue
        if old:
            report.chunks_removed += _delete_source(collection, source)
        chunks = chunk_text(read_text(f), chunk_chars, overlap)
        pending.extend((source, digest, i, len(chunks), c) for i, c in enumerate(chunks))
        if len(pending) >= batch_size:
            _add_chunks(collection, pending, batch_size)
            pending = []
        report.chunks_added += len(chunks)
        (report.updated if old else report.added).append(source)
        notify(source, "updated" if old else "added")

    if pending:
        _add_chunks(collection, pending, batch_size)

    present = {str(f) for f in files}
    for source in known:
        inside = any(Path(source).is_relative_to(d) for d in folders)
        if inside and source not in present and not Path(source).exists():
            report.chunks_removed += _delete_source(collection, source)
            report.removed.append(source)
            notify(source, "removed")
    if report.chunks_added or report.chunks_removed:
        forget(collection)  # the BM25 index is rebuilt on the next hybrid search
    return report


def _delete_source(collection: Collection, source: str) -> int:
    ids = collection.get(where={"source": source}, include=[])["ids"]
    if ids:
        collection.delete(ids=ids)
    return len(ids)


def _add_chunks(
    collection: Collection, rows: list[tuple[str, str, int, int, Chunk]], batch_size: int
) -> None:
    for b in range(0, len(rows), batch_size):
        batch = rows[b : b + batch_size]
        collection.add(
            ids=[chunk_id(source, i) for source, _, i, _, _ in batch],
            documents=[c.text for *_, c in batch],
            metadatas=[
                {
                    "source": source,
                    "file_hash": digest,
                    "chunk": i,
                    "n_chunks": n,
                    "start": c.start,
                    "end": c.end,
                    "heading": c.heading,
                }
                for source, digest, i, n, c in batch
            ],
        )
