"""Write tasks.jsonl and demos.jsonl for date-gaps with a fixed seed.

python benchmarks/envs/date_gaps/make.py
"""

import json
import random
from datetime import date, timedelta
from pathlib import Path

HERE = Path(__file__).parent
SEED = 7
EVENTS = [
    ("the kickoff", "the launch"), ("the order", "the delivery"), ("check-in", "check-out"),
    ("the first payment", "the last payment"), ("the audit", "the review"),
    ("planting", "harvest"), ("the contract start", "the contract end"),
    ("the trial", "the appeal"), ("the booking", "the trip"), ("enrolment", "graduation"),
]  # fmt: skip


def fmt(d: date, style: int) -> str:
    return (d.isoformat(), d.strftime("%B %-d, %Y"), d.strftime("%-d %B %Y"))[style]


def phrasing(r: random.Random, a: str, b: str) -> str:
    e1, e2 = r.choice(EVENTS)
    return r.choice(
        [
            f"How many days are there between {a} and {b}?",
            f"{e1.capitalize()} was on {a} and {e2} on {b}. How many days apart are they?",
            f"Count the days from {a} to {b}.",
            f"If {e1} is on {a} and {e2} is on {b}, how many days lie between them?",
        ]
    )


def tasks(r: random.Random) -> list[dict]:
    rows, seen = [], set()
    for split, count in (("train", 150), ("test", 80)):
        made = 0
        while made < count:
            start = date(2019, 1, 1) + timedelta(days=r.randint(0, 2500))
            end = start + timedelta(days=r.randint(20, 900))
            style = r.randint(0, 2)
            a, b = fmt(start, style), fmt(end, style)
            prompt = phrasing(r, a, b)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append(
                {
                    "id": f"dg-{len(rows):03d}",
                    "prompt": prompt,
                    "answer": (end - start).days,
                    "split": split,
                    "hint": f'call days_between with start "{a}" and end "{b}"',
                }
            )
            made += 1
    return rows


def demos() -> list[dict]:
    out = []
    for i, (a, b, q) in enumerate(
        [
            ("2021-02-11", "2021-06-30", "How many days are there between 2021-02-11 and 2021-06-30?"),
            ("May 3, 2022", "January 17, 2023", "The order was on May 3, 2022 and the delivery on January 17, 2023. How many days apart are they?"),
        ]
    ):  # fmt: skip
        from environment import days_between

        n = days_between(start=a, end=b)
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": "days_between", "arguments": {"start": a, "end": b}}}  # fmt: skip
        out.append(
            {
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": "", "tool_calls": [call]},
                    {
                        "role": "tool",
                        "tool_call_id": f"call_{i}",
                        "name": "days_between",
                        "content": n,
                    },
                    {"role": "assistant", "content": f"The answer is {n} days."},
                ]
            }
        )
    return out


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(HERE))
    rng = random.Random(SEED)
    (HERE / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks(rng)))
    (HERE / "demos.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos()))
    print("wrote", HERE / "tasks.jsonl", HERE / "demos.jsonl")
