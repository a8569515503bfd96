"""Messy prompts: seeded copies of a task's prompt the way real users type it.

`selftune eval ENV --perturb typos,case,spacing,verbose,terse` runs the same tasks with each
perturbation and reports the gap to the clean prompts; the gate's robustness guard uses the
same functions. Every perturbation keeps the numbers, names and quoted text a task needs, so
the reference answer stays right: only the wrapping changes.

- typos: about one word in six of four letters or more gets a swapped, dropped or doubled
  letter (never a digit, never a capitalised name or code);
- case: all lower case;
- spacing: doubled spaces, no space after commas, a trailing newline;
- verbose: a chatty opening and closing around the question;
- terse: polite and filler words dropped, no question mark.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

_OPENERS = [
    "hey, quick question for you.",
    "Hi! I was wondering about something, hope you can help.",
    "ok so my boss asked me this and I have no idea:",
    "Sorry to bother you again.",
]
_CLOSERS = ["thanks a lot!!", "Thank you in advance.", "pls be quick, thx", "cheers"]
_FILLER = re.compile(
    r"\b(please|kindly|exactly|just|the|a|an|that|does|do|is|are|was|of)\b\s*", re.IGNORECASE
)


def typos(text: str, rng: random.Random) -> str:
    def mangle(m: re.Match[str]) -> str:
        word = m.group(0)
        if word[0].isupper() or rng.random() > 1 / 6:
            return word  # names and codes stay as they are
        i = rng.randrange(1, len(word) - 1)
        kind = rng.choice(("swap", "drop", "double"))
        if kind == "swap":
            return word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]
        if kind == "drop":
            return word[:i] + word[i + 1 :]
        return word[:i] + word[i] + word[i:]

    return re.sub(r"\b[A-Za-z]{4,}\b", mangle, text)


def case(text: str, rng: random.Random) -> str:
    return text.lower()


def spacing(text: str, rng: random.Random) -> str:
    text = re.sub(r",\s+", ",", text)
    text = re.sub(r" (?=\w)", lambda m: "  " if rng.random() < 0.3 else " ", text)
    return text + "\n"


def verbose(text: str, rng: random.Random) -> str:
    return f"{rng.choice(_OPENERS)} {text} {rng.choice(_CLOSERS)}"


def terse(text: str, rng: random.Random) -> str:
    short = _FILLER.sub("", text).rstrip(" ?")
    return short if short.strip() else text


PERTURBATIONS: dict[str, Callable[[str, random.Random], str]] = {
    "typos": typos,
    "case": case,
    "spacing": spacing,
    "verbose": verbose,
    "terse": terse,
}


def parse_perturbations(spec: str) -> list[str]:
    """'typos,case' -> ["typos", "case"]; an unknown name is a ValueError listing the known."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown or not names:
        raise ValueError(
            f"unknown perturbation {', '.join(unknown) or repr(spec)}: choose from "
            f"{', '.join(PERTURBATIONS)} (comma-separated)"
        )
    return names


def perturb(prompt: str, name: str, seed: int, key: str = "") -> str:
    """`prompt` as perturbation `name` writes it; the same (seed, key) gives the same text."""
    rng = random.Random(f"{seed}:{name}:{key}")
    return PERTURBATIONS[name](prompt, rng)
