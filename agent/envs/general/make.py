"""Write the general-ability probe's tasks.jsonl from its own fixed seed.

    python -m agent.envs.general.make

Plain questions a small chat model answers from what it already knows, with no tool: capitals,
opposites, colours, counts, spelling, simple sums said in words. The gate runs this probe on
every candidate beside the job's own environments, so an adapter that wins calculator by
answering everything with a tool call, or that breaks plain chat, is caught.
The answers are short and graded with `contains`, so a chatty but right answer passes.
"""

from __future__ import annotations

import random
from pathlib import Path

from agent.envs.calculator.make import write_jsonl

SEED = 20251130
HERE = Path(__file__).parent

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
    ("Spain", "Madrid"), ("England", "London"), ("Russia", "Moscow"), ("China", "Beijing"),
    ("Egypt", "Cairo"), ("Greece", "Athens"), ("Canada", "Ottawa"), ("Portugal", "Lisbon"),
]  # fmt: skip
OPPOSITES = [
    ("hot", "cold"), ("up", "down"), ("big", "small"), ("day", "night"), ("open", "close"),
    ("fast", "slow"), ("happy", "sad"), ("old", "new"), ("left", "right"), ("wet", "dry"),
]  # fmt: skip
COLOURS = [
    ("the sky on a clear day", "blue"), ("grass", "green"), ("snow", "white"),
    ("a ripe banana", "yellow"), ("coal", "black"), ("a ripe tomato", "red"),
]  # fmt: skip
COUNTS = [
    ("days in a week", 7), ("legs on a spider", 8), ("months in a year", 12),
    ("sides of a triangle", 3), ("legs on a dog", 4), ("hours in a day", 24),
    ("minutes in an hour", 60), ("wheels on a bicycle", 2),
]  # fmt: skip
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def tasks(rng: random.Random) -> list[dict]:
    out = []
    for country, city in CAPITALS:
        out.append((f"What is the capital of {country}?", [city], "capital"))
    for word, opposite in OPPOSITES:
        out.append(
            (f"What is the opposite of '{word}'? Answer with one word.", [opposite], "opposite")
        )
    for thing, colour in COLOURS:
        out.append((f"What colour is {thing}?", [colour], "colour"))
    for what, n in COUNTS:
        out.append((f"How many {what} are there?", n, "count"))
    for _ in range(10):
        a, b = rng.randint(1, 4), rng.randint(1, 4)
        out.append(
            (f"What is {WORDS[a - 1]} plus {WORDS[b - 1]}? Answer with a number.", a + b, "sum")
        )
    rng.shuffle(out)
    rows = []
    for i, (prompt, answer, kind) in enumerate(out):
        rows.append({
            "id": f"general-{i:03d}",
            "prompt": prompt,
            "answer": answer,
            "grader": "numeric" if isinstance(answer, int) else "contains",
            "split": "test" if i % 2 else "train",
            "metadata": {"kind": kind},
        })  # fmt: skip
    return rows


def write(folder: Path = HERE, seed: int = SEED) -> int:
    """Write tasks.jsonl into `folder`; return the number of tasks."""
    rows = tasks(random.Random(seed))
    write_jsonl(folder / "tasks.jsonl", rows)
    return len(rows)


if __name__ == "__main__":
    print(f"general: {write()} tasks in {HERE}")
