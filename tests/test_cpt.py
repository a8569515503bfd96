"""Continued pre-training: a folder of documents becomes a scrubbed dataset with a manifest,
packed into token blocks, and `selftune tune cpt` trains an adapter that has learned the text
(its loss on the documents drops) on the real SmolLM2 model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuner.cpt import CorpusError, build_corpus_dataset, corpus_rows, pack_blocks

# Invented facts, so the base model cannot know them; repeated in two files.
DOC = """# The Vellacott ferry

The Vellacott ferry leaves Harrowmere pier at 7:40 every morning and reaches the island of
Osk at 9:15. Its captain since 2011 has been Idony Marchbank, and its bell is painted teal.

## Fares

A single crossing costs 14 crowns; a season pass costs 310 crowns.
"""


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "ferry.md").write_text(DOC)
    (corpus / "sub" / "contact.txt").write_text(
        "Write to the harbour master at harbour.master@vellacott.example or call "
        "+44 20 7946 0958.\n"
    )
    (corpus / "photo.png").write_bytes(b"\x89PNG not text")  # not a document: skipped
    return corpus


def test_corpus_becomes_a_scrubbed_dataset_with_a_manifest(tmp_path):
    corpus = _corpus(tmp_path)
    built = corpus_rows(corpus)
    assert {r["source"] for r in built.rows} == {"ferry.md", "sub/contact.txt"}
    assert any("Idony Marchbank" in r["text"] for r in built.rows)

    res = build_corpus_dataset(corpus, tmp_path / "ds")
    text = (res.path / "train.jsonl").read_text()
    assert "harbour.master@vellacott.example" not in text  # the one scrubber ran
    assert "Idony Marchbank" in text
    manifest = json.loads((res.path / "manifest.json").read_text())
    assert manifest["kind"] == "cpt" and manifest["rows"] == len(built.rows)
    assert manifest["counts"]["tasks"] == 2  # two source files
    assert (res.path / "SUMMARY.md").is_file()


def test_bad_corpus_folders_are_named(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        corpus_rows(tmp_path / "nowhere")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.pdf").write_bytes(b"%PDF")
    with pytest.raises(CorpusError, match="no documents to train on"):
        corpus_rows(tmp_path / "pics")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.md").write_text("\n\n")
    with pytest.raises(CorpusError, match="empty"):
        corpus_rows(tmp_path / "blank")


def test_blocks_pack_every_document_with_eos_between(model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    rows = [{"text": DOC}, {"text": "Second document."}]
    blocks, report = pack_blocks(rows, tok, block=32)
    flat = [t for b in blocks for t in b]
    assert all(len(b) == 32 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 32
    assert flat.count(tok.eos_token_id) == 2 and flat[-1] == tok.eos_token_id
    assert tok.decode(flat).replace(tok.eos_token, "") == DOC + "Second document."
    assert report["tokens"] == len(flat)


def _doc_loss(model_dir: Path, adapter: Path | None) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    ids = torch.tensor([tok(DOC, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


@pytest.mark.slow
def test_tune_cpt_learns_the_documents(tmp_path, cfg, cli_env, model_path):
    corpus = _corpus(tmp_path)
    env = {
        **cli_env,
        "SELFTUNE_TUNER__TRAIN__CPT_BLOCK": "64",
        "SELFTUNE_TUNER__TRAIN__BATCH_SIZE": "4",
    }
    p = subprocess.run(
        [sys.executable, "-m", "agent.cli", "tune", "cpt", str(corpus), "--max-steps", "12"],
        env=env, capture_output=True, text=True, timeout=900, cwd=os.getcwd(),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "registered v1" in p.stdout
    from tuner.registry import open_registry

    rec = open_registry(cfg).get("v1")
    assert rec.train_config["kind"] == "cpt"
    assert rec.dataset_manifest is not None  # lineage: the adapter names its dataset
    before = _doc_loss(model_path, None)
    after = _doc_loss(model_path, Path(rec.path))
    assert after < before * 0.8, (before, after)  # it learned the invented text

    # a folder with nothing to read: one line, exit 1, no traceback
    (tmp_path / "empty").mkdir()
    bad = subprocess.run(
        [sys.executable, "-m", "agent.cli", "tune", "cpt", str(tmp_path / "empty")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 1 and "no documents to train on" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_knowledge_bench_asks_what_the_corpus_lacks_and_closes_the_book():
    from benchmarks.bench_knowledge import _environments, declined, unanswerable_prompts

    # declining, in the words a small model uses, against an answer that makes something up
    assert declined("I do not know.") and declined("The handbook does not mention it.")
    assert declined("") and declined(None)
    assert not declined("The Porto office has 32 desks.") and not declined("2019")
    # an invented name that the corpus does hold would make a question answerable: refused
    with pytest.raises(ValueError, match="Porto"):
        unanswerable_prompts("Quillmoor opened its Porto office in 2015.")
    envs = _environments(eval_limit=4)
    closed, opened = envs["closed-book"], envs["open-book"]
    assert [t.prompt for t in closed.tasks] == [t.prompt for t in opened.tasks]
    absent = [t for t in closed.tasks if t.metadata.get("unanswerable")]
    assert len(closed.tasks) == 4 + len(absent) and len(absent) >= 40
    # closed-book: no tool offered, none required; open-book keeps docs-qa's search
    assert closed.tool_names == [] and all(t.tools == [] for t in closed.tasks)
    assert all(t.metadata["requires_tools"] == [] for t in closed.tasks)
    assert opened.tool_names == ["search"] and "search" in opened.system_prompt
    assert "do not know" in closed.system_prompt
