"""Write the delegate environment's tasks.jsonl and demos.jsonl from its own fixed seed.

    python -m agent.envs.delegate.make

Each task needs one number from the Quillmoor Robotics handbook (agent/envs/handbook.py),
which the `researcher` subagent looks up in docs_qa/corpus, and a calculation with it. A third
of the facts are test facts, never looked up by a train task.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from agent.envs.calculator.make import clean, tool_call, tool_turn, write_jsonl
from agent.envs.handbook import OFFICES, POLICIES, PRODUCTS
from tools.builtins import evaluate, format_number

HERE = Path(__file__).parent
SEED = 20250614
N_TRAIN, N_TEST = 210, 105
POLICY_LOOKUPS = ("meal_allowance", "hotel_cap", "mileage_rate", "training_budget", "oncall_pay")

# a fact's kind -> (question, expression) patterns: {s} is the fact's subject ({S} capitalised),
# {k} a drawn count, {km} a drawn distance, {v} the fact's value
QUESTIONS = {
    "desks": [
        ("How many desks would {k} offices the size of {s} need in total?", "{k} * {v}"),
        ("If {s} added {k} desks, how many desks would it have?", "{v} + {k}"),
    ],
    "rooms": [
        (
            "Each meeting room in {s} is booked {k} times a week. How many bookings is that per "
            "week across the office?",
            "{v} * {k}",
        )
    ],
    "parking": [
        (
            "{S} rents out its parking spaces at {k} euros per month each. What is the yearly "
            "income?",
            "{v} * {k} * 12",
        )
    ],
    "price": [
        ("A customer orders {k} units of {s}. What is the total list price in euros?", "{k} * {v}"),
        (
            "A customer gets {k}% off the list price of {s}. What do they pay in euros?",
            "{v} * (1 - {k} / 100)",
        ),
    ],
    "weight": [("How many kilograms do {k} units of {s} weigh together?", "{k} * {v}")],
    "battery": [("How many hours of work do {k} full charges of {s} give?", "{k} * {v}")],
    "meal_allowance": [
        (
            "A team of {k} people travels for 4 days. What is the total meal allowance in euros?",
            "{k} * 4 * {v}",
        )
    ],
    "hotel_cap": [
        ("What is the most Quillmoor reimburses for {k} hotel nights, in euros?", "{k} * {v}")
    ],
    "mileage_rate": [
        (
            "An employee drives {km} km in a private car for work. How many euros are reimbursed?",
            "{km} * {v}",
        )
    ],
    "training_budget": [
        (
            "What is the total yearly training budget of a team of {k} employees, in euros?",
            "{k} * {v}",
        )
    ],
    "oncall_pay": [
        (
            "An engineer is on call for {k} weeks. How many euros of on-call pay is that?",
            "{k} * {v}",
        )
    ],
}


def facts() -> list[dict[str, Any]]:
    """The numeric handbook facts the researcher can look up: what to ask for, the value, the
    kind of question it feeds (a key of QUESTIONS) and what it is about."""

    def fact(what: str, value: float, kind: str, subject: str) -> dict[str, Any]:
        return {"what": what, "value": value, "kind": kind, "subject": subject}

    out = []
    for o in OFFICES:
        s = f"the {o.city} office"
        out += [
            fact(f"the number of desks in {s}", o.desks, "desks", s),
            fact(f"the number of meeting rooms in {s}", o.rooms, "rooms", s),
            fact(f"the number of parking spaces at {s}", o.parking, "parking", s),
        ]
    for p in PRODUCTS:
        s = f"the {p.code} {p.name}"
        out += [
            fact(f"the list price of {s}", p.price, "price", s),
            fact(f"the weight of {s}", p.weight, "weight", s),
            fact(f"the battery life of {s}", p.battery, "battery", s),
        ]
    for p in POLICIES:
        if p.key in POLICY_LOOKUPS:
            out.append(fact(f"Quillmoor's {p.key.replace('_', ' ')}", p.value, p.key, p.key))
    return out


def question(r: random.Random, fact: dict[str, Any]) -> tuple[str, str]:
    """A task that needs `fact` looked up, and the expression that answers it."""
    k = r.randint(3, 47)
    km = r.randint(120, 2400) if fact["kind"] == "mileage_rate" else None
    prompt, expression = r.choice(QUESTIONS[fact["kind"]])
    s = fact["subject"]
    values = {"k": k, "km": km, "s": s, "S": s[0].upper() + s[1:]}
    ask = f"Ask the researcher for {fact['what']}, then compute with the calculator."
    v = format_number(fact["value"])
    return f"{prompt.format(**values)} {ask}", expression.format(v=v, **values)


def tasks(rng: random.Random) -> list[dict]:
    """N_TRAIN train tasks on two thirds of the facts, N_TEST test tasks on the rest."""
    shuffled = facts()
    rng.shuffle(shuffled)
    n_test_facts = len(shuffled) // 3
    rows, seen = [], set()
    for split, pool, count in (
        ("train", shuffled[n_test_facts:], N_TRAIN),
        ("test", shuffled[:n_test_facts], N_TEST),
    ):
        made = 0
        while made < count:
            f = pool[made % len(pool)]
            prompt, expression = question(rng, f)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append(
                {
                    "id": f"delegate-{len(rows):04d}",
                    "prompt": prompt,
                    "answer": clean(evaluate(expression)),
                    "grader": "numeric",
                    "split": split,
                    # collection only: the reference wave plays these calls through the real
                    # researcher and calculator (agent.envs.bootstrap.ReferencePolicy)
                    "plan": [
                        {
                            "tool": "researcher",
                            "arguments": {"task": f"What is {f['what']}?"},
                            "expect": f["value"],
                        },
                        {"tool": "calculator", "arguments": {"expression": expression}},
                    ],
                    "metadata": {
                        "requires_tools": ["researcher", "calculator"],
                        "expression": expression,
                        "lookup": f["what"],
                        "lookup_value": f["value"],
                        "abs_tol": 1e-6,
                    },
                }
            )
            made += 1
    return rows


def demos() -> list[dict]:
    """One delegation, on facts no task looks up: the Bergen office's floors."""
    expression = "6 * 4"
    result = format_number(evaluate(expression))
    lookup = {"task": "How many floors does Quillmoor's Bergen office have?"}
    return [
        {
            "messages": [
                {
                    "role": "user",
                    "content": "Each floor of the Bergen office needs 4 first-aid kits. How many "
                    "kits does the office need? Ask the researcher for the number of floors of "
                    "the Bergen office, then compute with the calculator.",
                },
                tool_call("call_1", "researcher", lookup),
                tool_turn("call_1", "researcher", "The Bergen office has 6 floors."),
                tool_call("call_2", "calculator", {"expression": expression}),
                tool_turn("call_2", "calculator", result),
                {
                    "role": "assistant",
                    "content": f"The Bergen office has 6 floors, so it needs 6 * 4 = {result} "
                    "first-aid kits.",
                },
            ]
        },
    ]


def write(folder: Path = HERE, seed: int = SEED) -> int:
    """Write tasks.jsonl and demos.jsonl into `folder`; return the number of tasks."""
    rows = tasks(random.Random(seed))
    write_jsonl(folder / "tasks.jsonl", rows)
    write_jsonl(folder / "demos.jsonl", demos())
    return len(rows)


if __name__ == "__main__":
    print(f"delegate: {write()} tasks in {HERE}")
