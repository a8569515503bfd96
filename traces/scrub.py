"""Scrubbing: redact secrets and personal data from traces before they leave the store.

`scrub_text` replaces each match with `[REDACTED:<kind>]`; `scrub_trace` returns a scrubbed copy
of a whole trace (every string in messages, completions, tool arguments and results, retrieval
texts, answers, attributes and metadata), `scrub_grade` one of a grade (its reason quotes the
answer). Stored traces are never rewritten: every exit scrubs what it sends: dataset folders,
`traces export` (JSONL and OTLP/JSON), live OTLP and `traces push`.

What is caught:
- keys and tokens by their documented formats (the same prefixes gitleaks and detect-secrets
  match): OpenAI `sk-`/`sk-proj-` (short ones too), Anthropic, GitHub `ghp_`/`github_pat_`,
  AWS access keys and secret assignments, Slack `xox?-`, Google, Hugging Face, JWTs, bearer
  headers, PEM private-key blocks, `password=`-style assignments;
- e-mail addresses;
- numbers that only count when their check digits agree, so ordinary ids stay: IBANs (the
  country's length and the mod-97 check, python-stdnum), card numbers (13-19 digits from an
  issuer's range, Luhn check, python-stdnum), phone numbers (Google's libphonenumber rules via
  `phonenumbers`: any number written with +country code, and national numbers valid in
  `PHONE_REGION`);
- anything matching `[traces] scrub_patterns`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

from traces.schemas import Grade, Span, Trace

# national phone numbers (without +country code) are read as numbers of this region
PHONE_REGION = "US"

# (kind, pattern); a group named `key` is kept. Order matters: specific formats before the generic ones that would
# swallow them (sk-ant- before sk-, AWS secret assignment before the generic assignment).
_PATTERNS: list[tuple[str, str]] = [
    (
        "private_key",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----",
    ),
    ("anthropic_key", r"\bsk-ant-[A-Za-z0-9_\-]{20,}"),
    # short keys too (the probe leaked `sk-` keys under 20 characters): a short one
    # needs a digit, so words such as "sk-learn-style" stay; 20 characters or more always match
    (
        "openai_key",
        r"\bsk-(?:proj-|svcacct-|admin-)?"
        r"(?:[A-Za-z0-9_\-]{20,}|(?=[A-Za-z_\-]*\d)[A-Za-z0-9_\-]{10,})",
    ),
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

# candidates for the checked numbers: a match is redacted only when its check passes
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_CARD = re.compile(r"\b[2-6](?:[ -]?\d){12,18}\b")
# a run of digits with the separators people write phone numbers with, 7 digits at least
_PHONE = re.compile(r"(?:\+\(?|\(|\b)\d[\d ().\-/]{5,}\d\b")


def _iban(m: re.Match[str]) -> str:
    from stdnum import iban

    tokens = m.group().split(" ")
    while tokens:  # the pattern may have run on into the next word: try shorter prefixes
        candidate = " ".join(tokens)
        if iban.is_valid(candidate):
            return "[REDACTED:iban]" + m.group()[len(candidate) :]
        tokens.pop()
    return m.group()


def _card(m: re.Match[str]) -> str:
    from stdnum import luhn

    digits = re.sub(r"[ -]", "", m.group())
    ok = 13 <= len(digits) <= 19 and luhn.is_valid(digits)
    return "[REDACTED:card_number]" if ok else m.group()


def _phone(m: re.Match[str]) -> str:
    import phonenumbers

    text = m.group()
    if sum(c.isdigit() for c in text) < 7:
        return text
    found = list(
        phonenumbers.PhoneNumberMatcher(text, PHONE_REGION, leniency=phonenumbers.Leniency.VALID)
    )
    for match in reversed(found):
        text = text[: match.start] + "[REDACTED:phone]" + text[match.end :]
    return text


_CHECKED: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (_IBAN, _iban),
    (_CARD, _card),  # before phones: a card number also looks like a long phone number
    (_PHONE, _phone),
]


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
    """`s` with API keys, tokens, private keys, password assignments, e-mail addresses, IBANs,
    card numbers, phone numbers and anything matching `extra_patterns` replaced by
    `[REDACTED:<kind>]`."""
    if not s:
        return s
    for kind, pattern in _compiled(tuple(extra_patterns)):
        mark = f"[REDACTED:{kind}]"
        if "key" in pattern.groupindex:  # keep the name of an assignment, redact its value
            s = pattern.sub(lambda m, mark=mark: m.group("key") + mark, s)
        else:
            s = pattern.sub(mark, s)
    if any(c.isdigit() for c in s):
        for pattern, check in _CHECKED:
            s = pattern.sub(check, s)
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


def scrub_grade(grade: Grade, extra_patterns: Sequence[str] = ()) -> Grade:
    """A scrubbed copy of a grade: its reason and the judge's raw reply (which often quote the
    answer), grader name, flags and metadata; ids, value, source and time kept."""
    return grade.model_copy(
        update={
            "grader": scrub_text(grade.grader, extra_patterns),
            "reason": scrub_value(grade.reason, extra_patterns),
            "raw": scrub_value(grade.raw, extra_patterns),
            "flags": scrub_value(list(grade.flags), extra_patterns),
            "metadata": scrub_value(dict(grade.metadata), extra_patterns),
        }
    )


def scrub_trace(trace: Trace, extra_patterns: Sequence[str] = ()) -> Trace:
    """A scrubbed deep copy of `trace` (spans included); `trace` itself is unchanged.

    Ids, kinds, statuses and times are kept; every other string is scrubbed.
    """
    data = trace.model_dump()
    spans = [_walk(s, extra_patterns) for s in data.pop("spans")]
    out = _walk(data, extra_patterns)
    out["spans"] = spans
    return Trace.model_validate(out)
