"""Scrubbing: planted secrets are redacted in every part of a trace, ordinary text is not,
and the stored trace keeps the original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _traces_fixtures import ADD, make_trace

from traces.scrub import scrub_text, scrub_trace
from traces.store import TraceStore, export_jsonl

SECRETS = {
    "openai_key": "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx1234",
    "anthropic_key": "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWx",
    "github_token": "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "aws_access_key": "AKIAIOSFODNN7EXAMPLE",
    "slack_token": "xoxb-123456789012-abcdefghijkl",
    "google_api_key": "AIzaSyA1234567890abcdefghijklmnopqrstuv",
    "hf_token": "hf_abcdefghijklmnopqrstuvwxyzABCDEF",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFU",
    "email": "alice.smith@example.co.uk",
}


@pytest.mark.parametrize("kind,secret", SECRETS.items())
def test_each_secret_format_is_redacted(kind: str, secret: str):
    out = scrub_text(f"before {secret} after")
    assert out == f"before [REDACTED:{kind}] after"


def test_assignments_headers_and_private_keys():
    text = (
        "password=hunter2hunter api_key: 'abcd1234efgh' "
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY "
        "Authorization: Bearer abcdefghijklmnop.qrstuv "
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----"
    )
    out = scrub_text(text)
    assert "hunter2" not in out and "abcd1234" not in out and "wJalr" not in out
    assert "password=[REDACTED:secret]" in out and "api_key: [REDACTED:secret]" in out
    assert "aws_secret_access_key = [REDACTED:aws_secret]" in out
    assert "Authorization: [REDACTED:bearer]" in out
    assert "[REDACTED:private_key]" in out and "b3Blbn" not in out


@pytest.mark.parametrize(
    "text",
    [
        "the sk of the task is 42",
        "tokens: 1234, input_tokens=40, 3.14159 and 1e-9",
        "ask-me-anything about sk- prefixes",
        "AKIA is a prefix; a short hf_x and ghp_ are fine",
        "The token count was 17 and the password policy is strict.",
        "call add(2, 3) -> 5",
    ],
)
def test_ordinary_text_is_untouched(text: str):
    assert scrub_text(text) == text


def test_user_patterns_apply_and_bad_ones_are_named():
    assert scrub_text("order ORD-12345 shipped", ["ORD-\\d+"]) == "order [REDACTED:custom] shipped"
    with pytest.raises(ValueError, match="not a valid regular expression"):
        scrub_text("x", ["(unclosed"])


def test_scrub_trace_covers_every_string_and_keeps_the_original(tmp_path: Path):
    key = SECRETS["openai_key"]
    t = make_trace(calls=[ADD, ADD], metadata={"note": f"used {key}"})
    t.answer = f"the key is {key}"
    t.spans[1].llm.messages.append({"role": "user", "content": f"mail bob@corp.io key {key}"})
    t.spans[1].llm.completion = f"ok {key}"
    t.spans[1].llm.tool_calls[0].raw_arguments = json.dumps({"k": key})
    t.spans[2].tool.arguments = {"token": key, "nested": [{"v": key}]}
    t.spans[2].tool.result = f"result {key}"
    t.spans[-1].retrieval.texts = [f"doc with {key}"]
    t.spans[0].attributes = {"header": f"Bearer {key}"}
    store = TraceStore(tmp_path / "traces.db")
    store.save(t)

    clean = scrub_trace(store.get(t.id))
    dumped = clean.model_dump_json()
    assert key not in dumped and "bob@corp.io" not in dumped
    assert dumped.count("[REDACTED:") >= 9
    assert clean.id == t.id and [s.id for s in clean.spans] == [s.id for s in t.spans]
    assert store.get(t.id).model_dump() == t.model_dump()  # stored trace untouched

    out = tmp_path / "export.jsonl"
    assert export_jsonl(store, out, extra_patterns=["calculator"]) == 1
    row = json.loads(out.read_text())
    assert key not in out.read_text() and "calculator" not in out.read_text()
    assert row["id"] == t.id and len(row["spans"]) == len(t.spans) and row["grades"] == []
    assert key in store.get(t.id).answer
    store.close()
