"""Write the word-problems environment's tasks.jsonl and demos.jsonl from its own fixed seed.

    python -m agent.envs.word_problems.make

Harder word problems of 20 kinds, one phrasing each. Many need a step that is not in the text
(x 12 months, x 3600 seconds, 1 - p/100); the base SmolLM2 solved 1 of 192 such tries at
temperature 1 with two demonstrations, so these measure what self-training from the
model's own traces cannot bootstrap. Nine kinds are the calculator's (its numbers and expression, in one phrasing); the
demonstrations are the calculator's too.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from agent.envs.calculator.make import (
    NAMES,
    TEMPLATES,
    Template,
    demos,
    draw,
    money,
    template_tasks,
    write_jsonl,
)
from tools.builtins import evaluate, format_number

HERE = Path(__file__).parent
SEED = 20250611
CALCULATOR = {t.name: t for t in TEMPLATES}


def calculator(name: str, phrasing: str | None = None, *, rename: str | None = None) -> Template:
    """The calculator's template `name` with one phrasing: `phrasing`, else its first."""
    t = CALCULATOR[name]
    return replace(t, name=rename or name, phrasings=(phrasing or t.phrasings[0],))


def _tiles(r: random.Random) -> dict:
    t, n = r.choice([0.25, 0.36, 0.45, 0.6, 0.75]), r.randint(140, 960)
    return {"t": t, "area": format_number(evaluate(f"{t} * {n}"))}


CENTS = {"abs_tol": 0.005}  # answers rounded to the cent
TEMPLATES = [
    calculator("shopping"),
    calculator("travel", "A train runs at an average of {v} km/h for {h} hours. How many "
               "kilometres does it cover?"),
    calculator("area"),
    Template("percent", draw(p=(11, 89), n=(1200, 98000)), "{n} * {p} / 100", (
        "What is {p}% of {n:,}?",
    )),
    Template("discount", draw(price=(350, 4800), p=[12, 15, 18, 22, 25, 35, 40]),
             "{price} * (1 - {p} / 100)", (
        "A laptop costs ${price:,}. It is on sale at {p}% off. What is the sale price in dollars?",
    )),
    Template("unit_price", draw(n=(7, 48), c=money(40, 390)), "round({c} / {n}, 2)", (
        "A pack of {n} rechargeable batteries costs ${c}. What is the price of one battery, to "
        "the nearest cent?",
    ), CENTS),
    Template("sharing", draw(n=(3, 14), b=money(180, 2400)), "round({b} / {n}, 2)", (
        "{n} colleagues split a restaurant bill of ${b} equally. How much does each pay, to the "
        "nearest cent?",
    ), CENTS),
    Template("salary", draw(n=NAMES, w=money(17, 64), h=(118, 176)), "{w} * {h} * 12", (
        "{n} earns ${w} per hour and works {h} hours every month. How much does {n} earn in a "
        "year?",
    )),
    Template("fuel", draw(lit=[4.7, 5.3, 6.1, 6.8, 7.4, 8.2, 9.6], d=(380, 2950)),
             "{lit} * {d} / 100", (
        "A car uses {lit} litres of fuel per 100 km. How many litres does it need for a {d:,} km "
        "trip?",
    )),
    Template("speed", draw(d=(95, 480), h=[3, 4, 6, 7, 8, 9]), "round({d} / {h}, 2)", (
        "A cyclist covers {d} km in {h} hours. What is the average speed in km/h, to two "
        "decimal places?",
    ), CENTS),
    calculator("production"),
    calculator("seats"),
    Template("savings", draw(p=(1500, 48000), rate=[1.5, 2.25, 3.1, 3.75, 4.2, 5.5]),
             "{p} * (1 + {rate} / 100)", (
        "You put ${p:,} in a savings account that pays {rate}% interest once a year. How much is "
        "in the account after one year?",
    )),
    calculator("currency", "One euro is worth {x} units of another currency. How many units "
               "is {e:,} euros?"),
    calculator("tank"),
    calculator("volume"),
    Template("machine", draw(s=[4, 5, 6, 8, 9, 12, 15, 16], h=(7, 23)), "{h} * 3600 / {s}", (
        "A machine makes one part every {s} seconds. How many parts does it make in {h} hours?",
    )),
    Template("tiles", _tiles, "{area} / {t}", (
        "A floor of {area} square metres is covered with tiles of {t} square metres each. How "
        "many tiles are needed?",
    )),
    Template("vat", draw(x=money(240, 9800), p=[8, 12.5, 19, 20, 21, 25]),
             "round({x} * (1 + {p} / 100), 2)", (
        "An invoice of ${x} gets {p}% VAT added. What is the total, to the nearest cent?",
    ), CENTS),
    calculator("wages", "A team of {n} workers each earn ${w} per day. What do they earn "
               "together in {d} working days?", rename="wages_team"),
]  # fmt: skip


def tasks(rng: random.Random) -> list[dict]:
    return template_tasks(rng, TEMPLATES, "wp")


def write(folder: Path = HERE, seed: int = SEED) -> int:
    """Write tasks.jsonl and demos.jsonl into `folder`; return the number of tasks."""
    rows = tasks(random.Random(seed))
    write_jsonl(folder / "tasks.jsonl", rows)
    write_jsonl(folder / "demos.jsonl", demos())
    return len(rows)


if __name__ == "__main__":
    print(f"word-problems: {write()} tasks in {HERE}")
