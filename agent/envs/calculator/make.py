"""Write the calculator environment's tasks.jsonl and demos.jsonl from its own fixed seed.

    python -m agent.envs.calculator.make

Arithmetic word problems of 18 kinds, each in two or three phrasings. Every number the
expression needs is written in the question and the words say which operation; the numbers
are too large for a 135M model's head. The reference answer is what the calculator prints for
the task's expression.

word_problems/make.py builds on these templates, and the helpers at the end (a clean answer,
demonstration turns, writing JSONL) serve the other built-ins' make.py files too.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.builtins import evaluate, format_number

HERE = Path(__file__).parent
SEED = 20250612
N_TRAIN, N_TEST = 210, 105

NAMES = [
    "Amara", "Bastian", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas",
    "Keiko", "Lars", "Mina", "Nils", "Olga", "Pavel", "Rosa", "Samir", "Tove", "Uma",
]  # fmt: skip
ITEMS = [
    "notebooks", "garden chairs", "light bulbs", "bags of rice", "printer cartridges",
    "tins of paint", "bicycle helmets", "boxes of tea", "desk lamps", "water filters",
]  # fmt: skip
HOURS = [2.5, 3.5, 4.25, 5.75, 6.5, 7.25]
RATES = [1.0842, 1.1276, 0.8561, 1.4713, 11.4925]


@dataclass(frozen=True)
class Template:
    """One kind of question. `draw` picks its numbers; `expression` and each of `phrasings`
    are str.format patterns over them. With more than one phrasing, one is drawn as well."""

    name: str
    draw: Callable[[random.Random], dict[str, Any]]
    expression: str
    phrasings: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. the grader's abs_tol

    def make(self, r: random.Random) -> tuple[str, str]:
        """(prompt, expression) with freshly drawn numbers."""
        values = self.draw(r)
        phrasing = r.choice(self.phrasings) if len(self.phrasings) > 1 else self.phrasings[0]
        return phrasing.format(**values), self.expression.format(**values)


def draw(**spec: Any) -> Callable[[random.Random], dict[str, Any]]:
    """A draw of named values, in the order given: (lo, hi) is an integer in [lo, hi], a list
    is one of its items, a function is called with the random generator."""

    def values(r: random.Random) -> dict[str, Any]:
        return {
            k: s(r) if callable(s) else r.randint(*s) if isinstance(s, tuple) else r.choice(s)
            for k, s in spec.items()
        }

    return values


def money(lo: int, hi: int) -> Callable[[random.Random], str]:
    """A price with cents, "12.05", between lo and hi + 0.99."""
    return lambda r: f"{r.randint(lo, hi)}.{r.randint(0, 99):02d}"


def _shopping(r: random.Random) -> dict[str, Any]:
    v = draw(n=NAMES, a=(12, 97), item=ITEMS, p=money(3, 89))(r)
    return v | {"Item": v["item"].capitalize()}


def _prize(r: random.Random) -> dict[str, Any]:
    n, share = r.randint(6, 48), r.randint(120, 980)
    return {"n": n, "total": n * share}


def _trip(r: random.Random) -> dict[str, Any]:
    v, h = r.randint(45, 120), r.randint(6, 38)
    return {"v": v, "km": v * h}


# {n} is a name or a count, {p} a price, {h} hours, {d} days: each template says what it draws
TEMPLATES = [
    Template("shopping", _shopping, "{a} * {p}", (
        "{n} buys {a} {item} at ${p} each. How much does {n} pay in total?",
        "What do {a} {item} cost at ${p} each?",
        "{Item} cost ${p} each. {n} orders {a}. What is the bill?",
    )),
    Template("travel", draw(v=(112, 298), h=HOURS), "{v} * {h}", (
        "A train runs at {v} km/h for {h} hours. How many kilometres does it cover?",
        "How far does a car go in {h} hours at {v} km/h, in km?",
    )),
    Template("area", draw(w=(101, 489), l=(101, 489)), "{w} * {l}", (
        "A warehouse floor measures {w} m by {l} m. What is its area in square metres?",
        "A field is {w} metres long and {l} metres wide. What is its area?",
    )),
    Template("seats", draw(rows=(38, 96), s=(112, 348)), "{rows} * {s}", (
        "A stadium has {rows} rows with {s} seats in each row. How many seats does it have?",
        "A hall has {rows} rows of {s} chairs. How many chairs are there?",
    )),
    Template("production", draw(a=(1150, 8900), d=(13, 62)), "{a} * {d}", (
        "A factory makes {a:,} bolts per day. How many bolts does it make in {d} days?",
        "A bakery bakes {a:,} rolls a day. How many rolls does it bake in {d} days?",
    )),
    Template("crates", draw(k=(24, 96), n=(35, 420)), "{n} * {k}", (
        "A crate holds {k} jars. How many jars are in {n} crates?",
        "There are {n} boxes with {k} pencils in each box. How many pencils are there?",
    )),
    Template("rent", draw(m=(7, 36), rent=(650, 4800)), "{rent} * {m}", (
        "The rent is ${rent:,} per month. How much rent is paid over {m} months?",
        "An office costs ${rent:,} a month to rent. What do {m} months cost?",
    )),
    Template("currency", draw(x=RATES, e=(240, 9800)), "{e} * {x}", (
        "One euro is worth {x} dollars. How many dollars is {e:,} euros?",
        "At {x} francs per euro, how many francs do you get for {e:,} euros?",
    )),
    Template("books", draw(a=(1200, 9800), b=(1200, 9800)), "{a} + {b}", (
        "A library has {a:,} novels and {b:,} comics. How many books does it have in all?",
        "A farm picked {a:,} apples and {b:,} pears. How many fruits is that altogether?",
    )),
    Template("sales", draw(a=(850, 6400), b=(850, 6400), c=(850, 6400)), "{a} + {b} + {c}", (
        "A shop sold {a:,} items on Monday, {b:,} on Tuesday and {c:,} on Wednesday. "
        "How many items did it sell in the three days?",
        "Three trucks carry {a:,} kg, {b:,} kg and {c:,} kg. What is the total load in kg?",
    )),
    Template("withdraw", draw(a=(3200, 48000), b=(300, 2900)), "{a} - {b}", (
        "An account holds ${a:,}. ${b:,} is withdrawn. How much is left?",
        "A school has a budget of ${a:,} and spends ${b:,}. How much money remains?",
    )),
    Template("tank", draw(c=(9000, 25000), a=(1200, 3900), b=(1100, 3800)), "{c} - {a} - {b}", (
        "A tank holds {c:,} litres. {a:,} litres are used on Monday and {b:,} on Tuesday. "
        "How many litres are left?",
        "A warehouse stores {c:,} boxes. {a:,} are shipped in May and {b:,} in June. "
        "How many boxes remain?",
    )),
    Template("heights", draw(a=(3100, 8800), b=(1200, 3000)), "{a} - {b}", (
        "One mountain is {a:,} m high and another is {b:,} m high. How much higher is the "
        "first, in metres?",
        "A plane flies at {a:,} m and a balloon at {b:,} m. What is the difference in height, "
        "in metres?",
    )),
    Template("prize", _prize, "{total} / {n}", (
        "A prize of ${total:,} is shared equally by {n} winners. How much does each winner get?",
        "{n} friends split a bill of ${total:,} equally. How much does each pay?",
    )),
    Template("trip", _trip, "{km} / {v}", (
        "How many hours does a {km:,} km trip take at {v} km/h?",
        "A ship sails {km:,} km at {v} km/h. How many hours does the voyage take?",
    )),
    Template("volume", draw(a=(23, 98), b=(23, 98), c=(14, 77)), "{a} * {b} * {c}", (
        "A shipping box is {a} cm long, {b} cm wide and {c} cm high. What is its volume in "
        "cubic centimetres?",
    )),
    Template("wages", draw(n=(6, 38), w=(142, 389), d=(11, 26)), "{n} * {w} * {d}", (
        "A team of {n} workers each earn ${w} per day. What do they earn together in {d} days?",
        "Each of {n} guides is paid ${w} a day. What are they paid in total for {d} days?",
    )),
    Template("printer", draw(a=(850, 2400), d=(12, 48), bad=(300, 2900)), "{a} * {d} - {bad}", (
        "A printer prints {a:,} pages a day for {d} days, and {bad:,} pages are spoiled. How "
        "many good pages are there?",
    )),
]  # fmt: skip


def template_tasks(rng: random.Random, templates: list[Template], prefix: str) -> list[dict]:
    """N_TRAIN train then N_TEST test tasks, the templates in turn; no prompt twice."""
    tasks, seen = [], set()
    for split, count in (("train", N_TRAIN), ("test", N_TEST)):
        made = 0
        while made < count:
            template = templates[len(tasks) % len(templates)]
            prompt, expression = template.make(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            tasks.append(
                {
                    "id": f"{prefix}-{len(tasks):04d}",
                    "prompt": prompt,
                    "answer": clean(evaluate(expression)),
                    "hint": f"call the calculator with {expression}",
                    "grader": "numeric",
                    "split": split,
                    "metadata": {
                        "requires_tools": ["calculator"],
                        "expression": expression,
                        "template": template.name,
                        **template.metadata,
                    },
                }
            )
            made += 1
    return tasks


def tasks(rng: random.Random) -> list[dict]:
    return template_tasks(rng, TEMPLATES, "calc")


def demos() -> list[dict]:
    """Two worked problems, one and two calculator calls (word_problems uses them too)."""
    e1, e2a, e2b = "37 * 48.75", "1284 * 36", "46224 - 2750"
    r1, r2a, r2b = (format_number(evaluate(e)) for e in (e1, e2a, e2b))
    q1 = "Wiebke buys 37 folding tables at $48.75 each. How much does she pay in total?"
    q2 = (
        "A printer prints 1,284 pages a day for 36 days, and 2,750 pages are spoiled. "
        "How many good pages are there?"
    )
    return [
        {
            "messages": [
                {"role": "user", "content": q1},
                tool_call("call_1", "calculator", {"expression": e1}),
                tool_turn("call_1", "calculator", r1),
                # a terse final answer that repeats the tool's result: a 135M model imitates
                # "37 * 48.75 = ..." by doing the arithmetic itself, and gets it wrong
                {"role": "assistant", "content": f"The answer is {r1}."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": q2},
                tool_call("call_1", "calculator", {"expression": e2a}),
                tool_turn("call_1", "calculator", r2a),
                tool_call("call_2", "calculator", {"expression": e2b}),
                tool_turn("call_2", "calculator", r2b),
                {"role": "assistant", "content": f"The answer is {r2b}."},
            ]
        },
    ]


def write(folder: Path = HERE, seed: int = SEED) -> int:
    """Write tasks.jsonl and demos.jsonl into `folder`; return the number of tasks."""
    rows = tasks(random.Random(seed))
    write_jsonl(folder / "tasks.jsonl", rows)
    write_jsonl(folder / "demos.jsonl", demos())
    return len(rows)


# --- shared by the built-ins' make.py files ----------------------------------------------------


def clean(value: float) -> int | float:
    """A computed answer without float noise (3609.0000000000005 -> 3609), as the calculator
    prints it."""
    text = format_number(value)
    number = float(text)
    return int(number) if number.is_integer() and "e" not in text else number


def tool_call(call_id: str, name: str, arguments: dict) -> dict:
    """An assistant turn that calls one tool."""
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def tool_turn(call_id: str, name: str, content: str) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "name": name, "content": content}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    print(f"calculator: {write()} tasks in {HERE}")
