"""Durations and points in time as people type them on the command line and in filters.

- A duration is a number and a unit: s, m, h, d or w ("90s", "30m", "12h", "7d", "2w").
- A point in time is epoch seconds, an ISO date or time ("2026-05-01", "2026-05-01T12:00"; UTC
  unless it says otherwise), or a duration, read as that long ago.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from tools.errors import SelftuneError

UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


class TimeParseError(SelftuneError, ValueError):
    """A duration or a time that cannot be read; the message lists the accepted forms."""


def parse_duration(text: str) -> float:
    """Seconds in a duration such as "90s", "30m", "12h", "7d" or "2w"."""
    m = _DURATION.match(str(text or ""))
    if not m:
        raise TimeParseError(
            f"{text!r} is not a duration: give a number and s, m, h, d or w, such as 30m, 12h, "
            "7d or 2w"
        )
    return float(m.group(1)) * UNIT_SECONDS[m.group(2)]


def parse_time(value: float | str, now: float | None = None) -> float:
    """Epoch seconds from epoch seconds (a number, or text holding one), an ISO date or time
    (UTC unless it says otherwise) or a duration, counted back from `now` (default: now)."""
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    if _DURATION.match(text):
        return (time.time() if now is None else now) - parse_duration(text)
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise TimeParseError(
            f"{value!r} is not a time: it is neither a duration ago (30m, 12h, 7d, 2w) nor an "
            "ISO date (2026-05-01, 2026-05-01T12:00) nor epoch seconds"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()
