"""Retrieval with real parts: the MiniLM model, an embedded Chroma store on disk, a second
process reopening it."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from retrieval import embedding
from retrieval.ingest import chunk_text, html_to_text, index_paths
from retrieval.schemas import RetrievalConfig
from retrieval.search import format_passages, make_search_tool, search
from retrieval.store import get_collection, open_client
from tools import ToolError

REPO = Path(__file__).resolve().parent.parent

DOCS = {
    "cats.md": "# Cats\n\nCats are small carnivorous mammals that purr and chase mice.\n\n"
    "## Care\n\nFeed a cat twice a day and give it fresh water.\n",
    "rockets.txt": "Rockets burn liquid oxygen and kerosene to reach orbit.\n\n"
    "The first stage separates after about two minutes of flight.\n",
    "bread.html": "<html><head><style>p{color:red}</style><title>x</title></head><body>"
    "<h1>Sourdough</h1><p>Bake the bread at 230 degrees for forty minutes.</p>"
    "<script>alert('no')</script><p>Let the dough rise overnight in the fridge.</p></body></html>",
    "manual.pdf": "%PDF-1.4 not really",
}


def make_docs(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (root / name).write_text(text)
    return root


def test_chunks_follow_headings_and_keep_offsets():
    text = "Intro line.\n\n# Alpha\n\n" + "alpha words here. " * 30 + "\n\n## Beta\n\nbeta text.\n"
    chunks = chunk_text(text, chunk_chars=200, overlap=40)
    assert [c.heading for c in chunks][0] == ""
    assert {c.heading for c in chunks} == {"", "Alpha", "Beta"}
    for c in chunks:
        assert text[c.start : c.end] == c.text
        assert len(c.text) <= 200 + 40
    alpha = [c for c in chunks if c.heading == "Alpha"]
    assert alpha[0].text.startswith("# Alpha\n\nalpha")  # a heading never stands alone
    assert len(alpha) > 1 and alpha[1].start < alpha[0].end  # overlap with the previous chunk
    assert chunks[-1].text == "## Beta\n\nbeta text."
    with pytest.raises(ValueError, match="overlap < chunk_chars"):
        chunk_text(text, chunk_chars=100, overlap=100)


def test_html_is_reduced_to_visible_text():
    text = html_to_text(DOCS["bread.html"])
    assert text.startswith("# Sourdough\n\nBake the bread")
    assert "alert" not in text and "color" not in text and "<" not in text


def test_registered_embedding_function_is_rebuilt_from_config():
    from chromadb.utils.embedding_functions import config_to_embedding_function

    ef = config_to_embedding_function({"name": "selftune_minilm", "config": {"device": "cpu"}})
    assert isinstance(ef, embedding.MiniLMEmbedding)
    a, b = ef(["a red apple", "a green apple"]), ef(["quarterly tax filing"])
    assert len(a[0]) == 384
    assert float(a[0] @ a[1]) > float(a[0] @ b[0])  # similar texts are closer
    model = embedding.load_model()
    assert embedding.MiniLMEmbedding.build_from_config({}) and embedding.load_model() is model


def test_index_search_and_reindex_only_changed_files(tmp_path: Path):
    docs = make_docs(tmp_path / "docs")
    store = tmp_path / "chroma"
    col = get_collection(open_client(RetrievalConfig(), store), "docs")

    report = index_paths([docs], col, chunk_chars=200, overlap=30)
    assert sorted(Path(p).name for p in report.added) == ["bread.html", "cats.md", "rockets.txt"]
    assert [Path(p).name for p in report.unsupported] == ["manual.pdf"]
    assert report.chunks_added == col.count() > 3

    hits = search(col, "how long to bake sourdough", k=2)
    assert Path(hits[0].source).name == "bread.html"
    assert hits[0].score > hits[1].score and -1.0 <= hits[1].score <= 1.0
    assert hits[0].metadata["heading"] == "Sourdough" and "chunk" in hits[0].metadata

    # unchanged: nothing is embedded again
    before = embedding.calls["texts"]
    again = index_paths([docs], col, chunk_chars=200, overlap=30)
    assert len(again.skipped) == 3 and not again.added and not again.updated
    assert embedding.calls["texts"] == before

    # one file changed, one removed: only the changed file is re-embedded
    (docs / "rockets.txt").write_text("Rockets now run on methane.\n\nReusable boosters land.\n")
    (docs / "cats.md").unlink()
    n_before = col.count()
    before = embedding.calls["texts"]
    third = index_paths([docs], col, chunk_chars=200, overlap=30)
    assert [Path(p).name for p in third.updated] == ["rockets.txt"]
    assert [Path(p).name for p in third.removed] == ["cats.md"]
    assert [Path(p).name for p in third.skipped] == ["bread.html"]
    expected = len(chunk_text((docs / "rockets.txt").read_text(), 200, 30))
    assert embedding.calls["texts"] - before == third.chunks_added == expected
    assert col.count() == n_before - third.chunks_removed + third.chunks_added
    assert "methane" in search(col, "what fuel do rockets use", k=1)[0].text
    assert not col.get(where={"source": str((docs / "cats.md").resolve())})["ids"]


def test_search_tool_returns_text_and_structured_passages(tmp_path: Path):
    docs = make_docs(tmp_path / "docs")
    col = get_collection(open_client(RetrievalConfig(), tmp_path / "chroma"), "kb-1")
    index_paths([docs / "cats.md", docs / "rockets.txt"], col)
    t = make_search_tool(col, k=2)
    assert t.schema()["function"]["parameters"]["required"] == ["query"]
    text = asyncio.run(t.ainvoke({"query": "what do cats eat"}))
    assert text.startswith("[1] cats.md") and "[2] " in text
    passages = asyncio.run(t.asearch("what do cats eat"))
    assert len(passages) == 2 and Path(passages[0].source).name == "cats.md"
    # the model sees the file's name and the text; ids, paths and scores stay in the span
    assert passages[0].id not in text and str(docs) not in text and "score" not in text
    assert text == format_passages(passages)
    with pytest.raises(ToolError, match="query is empty"):
        asyncio.run(t.ainvoke({"query": "  "}))
    with pytest.raises(ToolError, match="query"):
        asyncio.run(t.ainvoke({"q": "cats"}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        index_paths([tmp_path / "nope"], col)


def test_bad_settings_are_explained(tmp_path: Path):
    with pytest.raises(ValueError, match="not an http"):
        open_client(RetrievalConfig(url="localhost:8000"))
    with pytest.raises(ValueError, match="collection name 'kb' is not valid"):
        get_collection(open_client(RetrievalConfig(), tmp_path / "chroma"), "kb")


def test_reopen_in_another_process_finds_the_embedding_function(tmp_path: Path):
    docs = make_docs(tmp_path / "docs")
    store = tmp_path / "chroma"
    index_paths([docs], get_collection(open_client(RetrievalConfig(), store), "docs"))
    # the other process opens the store without passing the embedding function
    script = textwrap.dedent(
        f"""
        import json, chromadb
        import retrieval.embedding  # registers selftune_minilm with Chroma
        from chromadb.config import Settings
        from retrieval.search import search
        client = chromadb.PersistentClient({str(store)!r}, settings=Settings(anonymized_telemetry=False))
        col = client.get_collection("docs")
        hits = search(col, "dough rising in the fridge", k=1)
        ef = col.configuration["embedding_function"]  # rebuilt from the stored config
        print(json.dumps([type(ef).__name__, hits[0].source, hits[0].text]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    ef_name, source, text = json.loads(out.stdout.strip().splitlines()[-1])
    assert ef_name == "MiniLMEmbedding"
    assert source.endswith("bread.html") and "overnight" in text


TOPICS = {
    "whales.md": ["Blue whales", "krill", "baleen plates", "whale song", "migration to calving"],
    "volcanoes.txt": ["Basalt lava", "magma chambers", "pyroclastic flows", "calderas", "ash"],
    "chess.md": ["The queen's gambit", "castling", "en passant", "endgame tablebases", "zugzwang"],
}


def test_index_killed_between_batches_is_completed_next_run(tmp_path: Path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, subjects in TOPICS.items():
        # one paragraph per chunk, each long enough that two never pack together
        paras = [f"{s} are the subject of this paragraph. " * 2 for s in subjects]
        (docs / name).write_text("\n\n".join(paras) + "\n")
    store, flag = tmp_path / "chroma", tmp_path / "first-batch-stored"
    expected = {
        str((docs / n).resolve()): len(chunk_text((docs / n).read_text(), 150, 0)) for n in TOPICS
    }
    assert all(n == 5 for n in expected.values())
    # the child stores one batch of 4 (the first file, cut short) and then waits to be killed
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from retrieval.ingest import index_paths
        from retrieval.schemas import RetrievalConfig
        from retrieval.store import get_collection, open_client
        col = get_collection(open_client(RetrievalConfig(), {str(store)!r}), "docs")
        add = col.add
        def add_then_wait(**kw):
            add(**kw)
            Path({str(flag)!r}).write_text("stored")
            time.sleep(300)
        col.add = add_then_wait
        index_paths([{str(docs)!r}], col, chunk_chars=150, overlap=0, batch_size=4)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert child.poll() is None, child.stderr.read()
            assert time.monotonic() < deadline, "the child never stored its first batch"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.stderr.close()

    col = get_collection(open_client(RetrievalConfig(), store), "docs")
    assert col.count() == 4  # one file partly indexed, with its current hash

    report = index_paths([docs], col, chunk_chars=150, overlap=0, batch_size=4)
    assert [Path(p).name for p in report.updated] == ["chess.md"]  # sorted first: the cut one
    assert sorted(Path(p).name for p in report.added) == ["volcanoes.txt", "whales.md"]
    for source, n in expected.items():
        got = col.get(where={"source": source}, include=["metadatas"])["metadatas"]
        assert sorted(m["chunk"] for m in got) == list(range(n)), source
    assert col.count() == sum(expected.values())
    for name, subjects in TOPICS.items():
        for subject in (subjects[0], subjects[-1]):
            hit = search(col, f"{subject} are the subject", k=1)[0]
            assert Path(hit.source).name == name and subject in hit.text

    # complete now: the next run embeds nothing
    before = embedding.calls["texts"]
    again = index_paths([docs], col, chunk_chars=150, overlap=0, batch_size=4)
    assert len(again.skipped) == 3 and embedding.calls["texts"] == before


# --- hybrid ranking and the sentence cut -----------------------------------------------------

ARMS = {  # codes alike to a sentence embedding; the Cormorant's passage is about paint
    "arms.md": "# Robot arms\n\n"
    "Product code QA-120 is the Heron Arm, a light robot arm for laboratory benches.\n\n"
    "Product code QA-310 is the Kestrel Arm, a six-axis robot arm for assembly lines.\n\n"
    "Product code QA-380 is the Osprey Arm, a heavy robot arm for pallets.\n\n"
    "The Cormorant ships in teal paint with a QA-450 plate and a two-year warranty.\n",
}


def rank_of(passages, needle: str) -> int | None:
    return next((i for i, p in enumerate(passages, 1) if needle in p.text), None)


def test_hybrid_ranking_lifts_an_exact_term_that_dense_ranks_lower(tmp_path: Path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in ARMS.items():
        (docs / name).write_text(text)
    col = get_collection(open_client(RetrievalConfig(), tmp_path / "chroma"), "arms")
    index_paths([docs], col, chunk_chars=100, overlap=0)
    query = "Which product has code QA-450?"
    dense = search(col, query, k=4, ranking="dense")
    hybrid = search(col, query, k=4, ranking="hybrid")
    assert rank_of(dense, "QA-450") == 4  # dense: last of the four arms
    assert rank_of(hybrid, "QA-450") < 4  # BM25 ranks it first, the fusion lifts it
    # fused scores: 1/(60 + rank) per ranking, best first
    assert hybrid[0].score > hybrid[1].score and hybrid[0].score <= 2 / 61 + 1e-4
    with pytest.raises(ValueError, match="unknown ranking"):
        search(col, query, ranking="sparse")  # type: ignore[arg-type]


def test_cut_keeps_the_matching_paragraph_or_sentences():
    from retrieval.search import cut_passage

    text = (
        "# People\n\n- **Duarte Valente**: Head of the Lisbon office, joined in 2016.\n"
        "- **Mateus Coelho**: Warehouse Systems Architect, badge number 1284.\n"
        "- **Elin Fjeldstad**: General Counsel, based in Oslo. She joined in 2016."
    )
    cut = cut_passage(text, "What is Mateus Coelho's badge number?")
    assert cut == "- **Mateus Coelho**: Warehouse Systems Architect, badge number 1284."
    elin = cut_passage(text, "Where is Elin Fjeldstad based?")
    assert elin == "- **Elin Fjeldstad**: General Counsel, based in Oslo. She joined in 2016."
    two = cut_passage(text, "When did Elin Fjeldstad and Duarte Valente join?", "sentences")
    assert "Duarte Valente" in two and "Elin Fjeldstad" in two and "Coelho" not in two
    assert "She joined" not in two  # a sentence, not its whole list item
    assert cut_passage(text, "nothing matches here").startswith("- **Duarte")  # no heading


def test_search_tool_cuts_passages_to_the_matching_paragraph(tmp_path: Path):
    docs = make_docs(tmp_path / "docs")
    col = get_collection(open_client(RetrievalConfig(), tmp_path / "chroma"), "kb-cut")
    index_paths([docs / "rockets.txt"], col, chunk_chars=400, overlap=0)
    chunk = make_search_tool(col, k=1, ranking="dense", passage="chunk")
    cut = make_search_tool(col, k=1)  # the defaults: hybrid ranking, paragraph cut
    whole = asyncio.run(chunk.asearch("when does the first stage separate"))[0].text
    short = asyncio.run(cut.asearch("when does the first stage separate"))[0].text
    assert "kerosene" in whole and "two minutes" in whole
    assert short == "The first stage separates after about two minutes of flight."


def test_lexical_index_is_rebuilt_when_documents_are_added(tmp_path: Path):
    from retrieval import lexical

    docs = make_docs(tmp_path / "docs")
    store = tmp_path / "chroma"
    col = get_collection(open_client(RetrievalConfig(), store), "kb-lex")
    index_paths([docs / "cats.md"], col)
    assert lexical.lexical_index(col).count == col.count()
    assert not lexical.lexical_index(col).top("zeppelin hangar", 3)

    # indexed through index_paths: found by its exact word at once
    (docs / "airship.md").write_text("The zeppelin hangar at Friedrichshafen is 240 m long.\n")
    index_paths([docs / "airship.md"], col)
    hits = search(col, "zeppelin hangar", k=1, ranking="hybrid")
    assert "Friedrichshafen" in hits[0].text

    # added by another client (no index_paths in this process): the count changed
    other = get_collection(open_client(RetrievalConfig(), store), "kb-lex")
    other.add(
        ids=["x1"], documents=["Quokkas live on Rottnest Island."], metadatas=[{"source": "q"}]
    )
    assert lexical.lexical_index(col).count == col.count()
    assert lexical.lexical_index(col).top("quokkas", 1)
    # a reopened collection (same id) reuses the index
    again = get_collection(open_client(RetrievalConfig(), store), "kb-lex")
    assert lexical.lexical_index(again) is lexical.lexical_index(col)


async def test_retrieval_span_records_ids_and_fused_scores(cfg, scripted):
    """The span keeps what a grader needs to tell a retrieval miss from a reading miss: the
    passages' ids, sources, texts as shown, and the hybrid ranking's fused scores."""
    from _agent_fixtures import call
    from langchain_core.messages import AIMessage

    from agent.agent import Agent
    from agent.workspace import open_collection

    docs = make_docs(cfg.workspace.root / "docs")
    col = open_collection(cfg)
    index_paths([docs], col, chunk_chars=200, overlap=30)
    expected = search(col, "sourdough baking time", 4, "hybrid", "paragraph")
    scripted(call("search", query="sourdough baking time"), AIMessage("Forty minutes."))
    async with Agent(cfg, engine=object()) as agent:
        res = await agent.run("How long is sourdough baked?", tools=["search"])
        trace = agent.tracer.store.get(res.trace_id)
    span = next(s for s in trace.spans if s.kind == "retrieval")
    r = span.retrieval
    assert r.ids == [p.id for p in expected] and r.scores == [p.score for p in expected]
    assert r.scores == sorted(r.scores, reverse=True) and r.scores[0] <= 2 / 61 + 1e-4
    assert Path(r.sources[0]).name == "bread.html" and r.texts == [p.text for p in expected]
    assert span.tool.result == format_passages(expected)
