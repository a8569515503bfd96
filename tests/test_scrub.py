"""Scrubbing: planted secrets are redacted in every part of a trace, ordinary text is not,
and the stored trace keeps the original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _traces_fixtures import ADD, make_trace

from traces.schemas import Grade
from traces.scrub import scrub_grade, scrub_text, scrub_trace
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
    "phone": "+44 20 7946 0958",
    "iban": "GB82 WEST 1234 5698 7654 32",
    "card_number": "4111 1111 1111 1111",
}

# more shapes of the same kinds, each must go
MORE = {
    "openai_key": ["sk-abc123def456", "sk-proj-Ab12Cd34Ef", "sk-svcacct-AbCdEf123456789012"],
    "github_token": ["github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123"],
    "slack_token": ["xoxp-1234567890-abcdefghij", "xoxa-2-1234567890-abcdef"],
    "aws_access_key": ["ASIAY34FZKBOKMUTVV7A"],
    "phone": ["(415) 555-2671", "415.555.2671", "+1 212 555 0100", "+49 30 901820"],
    "iban": ["DE89370400440532013000", "FR14 2004 1010 0505 0001 3M02 606"],
    "card_number": ["5555-5555-5555-4444", "378282246310005", "6011111111111117"],
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


@pytest.mark.parametrize("kind,secret", [(k, v) for k, vs in MORE.items() for v in vs])
def test_more_shapes_of_each_kind_are_redacted(kind: str, secret: str):
    out = scrub_text(f"see {secret}.")
    assert out == f"see [REDACTED:{kind}].", out


def test_private_key_blocks_of_every_flavour():
    for label in ("RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY"):
        block = (
            f"-----BEGIN {label}-----\nMIIEvQIBADANBgkqhkiG9w0B\nAQEFAASC\n-----END {label}-----"
        )
        assert scrub_text(f"key:\n{block}\nend") == "key:\n[REDACTED:private_key]\nend"


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112 fails the Luhn check",  # one digit off
        "iban GB82 WEST 1234 5698 7654 33 fails mod-97",
        "order 1234567890 shipped",  # an ordinary 10-digit id is no phone number here
        "id 5123456789012, at 1732981234.567, version 10.0.0.1",
        "20420 - 1922 - 2788 = 15710",  # calculator tasks stay intact
        "what is 12345 * 6789? 83810205",
        "on 2024-05-01 at 12:30, room 101, port 8080",
        "sk-learn-style names and task-sk-12 are words",
    ],
)
def test_numbers_that_fail_their_check_are_kept(text: str):
    assert scrub_text(text) == text


def test_built_in_environments_are_not_over_scrubbed():
    root = Path(__file__).resolve().parent.parent / "agent" / "envs"
    files = [*root.glob("*/tasks.jsonl"), *root.glob("*/demos.jsonl"), *root.glob("*/corpus/*.md")]
    assert files
    changed = [
        (f.name, line[:120])
        for f in files
        for line in f.read_text().splitlines()
        if scrub_text(line) != line
    ]
    assert not changed, changed


def test_grade_reasons_and_judge_replies_are_scrubbed():
    g = Grade(trace_id="t" * 32, value=0.0, source="judge", grader="judge:x",
              reason="the answer leaked sk-abc123def456 and +44 20 7946 0958",
              raw="score 0: it says GB82 WEST 1234 5698 7654 32",
              metadata={"quote": "4111 1111 1111 1111"})  # fmt: skip
    clean = scrub_grade(g)
    text = clean.model_dump_json()
    for leak in ("sk-abc123def456", "7946 0958", "WEST 1234", "4111 1111"):
        assert leak not in text
    assert clean.id == g.id and clean.value == g.value and clean.trace_id == g.trace_id


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


@pytest.mark.slow
def test_secrets_planted_in_a_real_run_leave_through_no_exit(cfg, tmp_path: Path):
    """A real `selftune run` (the real model, its prompt full of secrets, read from stdin)
    with live OTLP to a real receiver; then a human grade that quotes them, a dataset folder,
    and every export format. No secret appears in any file or request that leaves."""
    import os
    import subprocess
    import sys

    from test_otel_export import _Receiver

    block = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1234\n-----END RSA PRIVATE KEY-----"
    planted = [*SECRETS.values(), *(v for vs in MORE.values() for v in vs), block]
    prompt = "Remember these and repeat them back: " + "; ".join(planted) + ". What is 2+3?"
    receiver = _Receiver()
    env = {
        **os.environ,
        "SELFTUNE_HOME": str(cfg.workspace.root),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "SELFTUNE_MODEL__MAX_NEW_TOKENS": "24",  # the answer's length is not what is tested
    }

    def cli(*args: str, stdin: str | None = None, **extra: str) -> str:
        r = subprocess.run([sys.executable, "-m", "agent.cli", *args], input=stdin,
                           env={**env, **extra}, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert r.returncode == 0, (args, r.stderr[-3000:])
        return r.stdout

    try:
        result = json.loads(cli("run", "-", "--json", "--max-steps", "1", stdin=prompt))
        trace_id = result["trace_id"]
        cli("feedback", trace_id, "up", "--note", f"good, it said {prompt}")
        store = TraceStore(cfg.workspace.traces_db)
        stored = store.get(trace_id).model_dump_json()
        assert SECRETS["iban"] in stored  # the store keeps the original; only exits scrub
        store.close()

        ds = tmp_path / "ds"
        cli("dataset", "build", "sft", "--min-score", "0", "--format", "openai", "--out", str(ds))
        exports = [tmp_path / "all.jsonl", tmp_path / "otel.json", tmp_path / "otel-bare.json"]
        cli("traces", "export", str(exports[0]))
        cli("traces", "export", str(exports[1]), "--format", "otel-json")
        cli("traces", "export", str(exports[2]), "--format", "otel-json",
            SELFTUNE_TRACES__CAPTURE_CONTENT="false")  # fmt: skip
        cli("traces", "push", "--endpoint", receiver.url + "/v1/traces")
    finally:
        receiver.server.shutdown()

    left = {f"{p}": p.read_text() for p in [*ds.iterdir(), *exports]}
    left["live and pushed OTLP"] = str(receiver.requests)
    assert receiver.requests and len(left) >= 6
    for name, text in left.items():
        for secret in planted:
            assert secret not in text, f"{secret!r} left through {name}"
    assert "[REDACTED:iban]" in left[str(exports[0])]  # the prompt was exported, scrubbed
    assert "Remember these" not in left[str(exports[2])]  # no content without capture_content
