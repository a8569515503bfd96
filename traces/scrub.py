"""Scrubbing: redact secrets and e-mail addresses from traces before they leave the store.

`scrub_text` replaces each match with `[REDACTED:<kind>]`; `scrub_trace` returns a scrubbed copy
of a whole trace (every string in messages, completions, tool arguments and results, retrieval
texts, answers, attributes and metadata). Stored traces are never rewritten: exports and
the OTLP exporter scrub what they send.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

from traces.schemas import Span, Trace

# (kind, pattern); a group named `key` is kept. Order matters: specific formats before the generic ones that would
# swallow them (sk-ant- before sk-, AWS secret assignment before the generic assignment).
_PATTERNS: list[tuple[str, str]] = [
    (
        "private_key",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----",
    ),
    ("anthropic_key", r"\bsk-ant-[A-Za-z0-9_\-]{20,}"),
    ("openai_key", r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}"),
    ("github_token", r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"),
    ("aws_access_key", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    (
        "aws_secret",
        r"(?i)(?P<key>\baws_secret_access_key\b[\"']?\s*[:=]\s*)[\"']?[A-Za-z0-9/+=]{40}[\"']?",
    ),
    ("slack_token", r"\bxox[baprs]-[A-Za-z0-9-]{10,}"),
    ("google_api_key", r"\bAIza[0-9A-Za-z_\-]{35}"),
    ("hf_token", r"\bhf_[A-Za-z0-9]{30,}"),
    ("jwt", r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    ("bearer", r"(?i)\bbearer\s+[A-Za-z0-9._~+/=\-]{16,}"),
    (
        "secret",
        r"(?i)(?P<key>\b(?:password|passwd|pwd|api[_-]?key|apikey|secret|access[_-]?token|auth[_-]?token|token)"
        r"\b[\"']?\s*[:=]\s*)(?:\"[^\"\s]{4,}\"|'[^'\s]{4,}'|[^\s,;\"']{4,})",
    ),
    ("email", r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b"),
]
_BUILTIN = [(kind, re.compile(p)) for kind, p in _PATTERNS]


@functools.lru_cache(maxsize=64)
def _compiled(extra: tuple[str, ...]) -> list[tuple[str, re.Pattern[str]]]:
    out = list(_BUILTIN)
    for p in extra:
        try:
            out.append(("custom", re.compile(p)))
        except re.error as e:
            raise ValueError(f"scrub pattern {p!r} is not a valid regular expression: {e}") from e
    return out


def scrub_text(s: str, extra_patterns: Sequence[str] = ()) -> str:
    """`s` with API keys, tokens, private keys, password assignments, e-mail addresses and
    anything matching `extra_patterns` replaced by `[REDACTED:<kind>]`."""
    if not s:
        return s
    for kind, pattern in _compiled(tuple(extra_patterns)):
        mark = f"[REDACTED:{kind}]"
        if "key" in pattern.groupindex:  # keep the name of an assignment, redact its value
            s = pattern.sub(lambda m, mark=mark: m.group("key") + mark, s)
        else:
            s = pattern.sub(mark, s)
    return s


def scrub_value(v: Any, extra_patterns: Sequence[str] = ()) -> Any:
    """Scrub every string inside nested dicts, lists and tuples (keys included)."""
    if isinstance(v, str):
        return scrub_text(v, extra_patterns)
    if isinstance(v, dict):
        return {
            (scrub_text(k, extra_patterns) if isinstance(k, str) else k): scrub_value(
                x, extra_patterns
            )
            for k, x in v.items()
        }
    if isinstance(v, list | tuple):
        return [scrub_value(x, extra_patterns) for x in v]
    return v


_KEEP = frozenset(
    {"id", "trace_id", "parent_id", "kind", "status", "start", "end", "schema_version"}
)


def _walk(d: dict[str, Any], extra_patterns: Sequence[str]) -> dict[str, Any]:
    return {k: (v if k in _KEEP else scrub_value(v, extra_patterns)) for k, v in d.items()}


def scrub_span(span: Span, extra_patterns: Sequence[str] = ()) -> Span:
    """A scrubbed copy of one span (ids, kind, status and times kept); `span` is unchanged."""
    return Span.model_validate(_walk(span.model_dump(), extra_patterns))


def scrub_trace(trace: Trace, extra_patterns: Sequence[str] = ()) -> Trace:
    """A scrubbed deep copy of `trace` (spans included); `trace` itself is unchanged.

    Ids, kinds, statuses and times are kept; every other string is scrubbed.
    """
    data = trace.model_dump()
    spans = [_walk(s, extra_patterns) for s in data.pop("spans")]
    out = _walk(data, extra_patterns)
    out["spans"] = spans
    return Trace.model_validate(out)
