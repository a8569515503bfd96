"""Write the docs-qa environment's corpus/*.md, tasks.jsonl and demos.jsonl.

    python -m agent.envs.docs_qa.make

The corpus is the Quillmoor Robotics handbook (agent/envs/handbook.py) written as markdown,
and every question asks one fact of it, so an answer always matches the documents. The only
random draw is which facts are test facts (a third, never also asked in train), from this
environment's own fixed seed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from agent.envs.calculator.make import tool_call, tool_turn, write_jsonl
from agent.envs.handbook import (
    COMPANY,
    FAMILY_TITLES,
    HISTORY,
    OFFICES,
    PEOPLE,
    POLICIES,
    PRODUCTS,
    Office,
    Person,
    Policy,
    Product,
)
from tools.builtins import format_number

HERE = Path(__file__).parent
SEED = 20250613
N_TEST = 105  # at least; a third of the facts when there are more

# --- the corpus ---------------------------------------------------------------------------------

_EUROPE = {"Bergen", "Oslo", "Lisbon", "Tallinn", "Krakow", "Dundee"}


def people_file(person: Person) -> str:
    """The people-directory file that lists this person."""
    if person.joined <= 2015:
        group = "leadership"
    else:
        group = "europe" if person.office in _EUROPE else "world"
    return f"people-{group}.md"


def _value_text(v: int | float | str) -> str:
    return format_number(v) if isinstance(v, int | float) else str(v)


def _catalogue_entry(p: Product) -> str:
    carries = f" and carries up to {format_number(p.payload)} kg" if p.payload else ", no payload"
    return (
        f"## {p.code} {p.name}\n\nThe {p.name} (product code {p.code}) launched in {p.launched}. "
        f"Its list price is {p.price:,} euros. It weighs {format_number(p.weight)} kg{carries}, "
        f"and its battery lasts {format_number(p.battery)} hours.\n"
    )


def corpus_files() -> dict[str, str]:
    """File name -> markdown text of the handbook."""
    h = HISTORY
    files = {
        "company-overview.md": (
            f"# {COMPANY}\n\n{COMPANY} builds robots for warehouses, laundries and harbours. The "
            f"company was founded in {h['founded']} by {h['founders']} in {h['hq_city']}, where "
            f"its headquarters still is. It employs {h['employees']} people in {len(OFFICES)} "
            "offices.\n\nProduct codes start with QR (grippers), QA (robot arms), QM (mobile "
            "robots) or QS (sensors).\n"
        ),
        "history.md": (
            f"# History\n\n{h['founders']} founded {COMPANY} in {h['founded']}. The first product "
            f"was {h['first_product']}, sold to hotel laundries from 2012. "
            + " ".join(f"The {o.city} office opened in {o.opened}." for o in OFFICES[1:])
            + "\n"
        ),
    }
    for o in OFFICES:
        files[f"office-{o.city.lower()}.md"] = (
            f"# The {o.city} office\n\nThe {o.city} office ({o.country}) is at {o.address}. It "
            f"opened in {o.opened} and is led by {o.head}. It has {o.desks} desks on {o.floors} "
            f"floor{'s' if o.floors > 1 else ''}, {o.rooms} meeting rooms and {o.parking} parking "
            "spaces.\n\nVisitors sign in at the front desk on the ground floor.\n"
        )
    for family, title in FAMILY_TITLES.items():
        entries = [_catalogue_entry(p) for p in PRODUCTS if p.family == family]
        files[f"products-{family}.md"] = "\n".join(
            [f"# Product catalogue: {title.lower()}\n"] + entries
        )
    for file in dict.fromkeys(people_file(p) for p in PEOPLE):
        group = file.removeprefix("people-").removesuffix(".md")
        lines = [f"# People directory: {group}\n"] + [
            f"- **{p.name}**: {p.role}, based in the {p.office} office, joined in {p.joined}, "
            f"badge number {p.badge}."
            for p in PEOPLE
            if people_file(p) == file
        ]
        files[file] = "\n".join(lines) + "\n"
    for file in dict.fromkeys(p.file for p in POLICIES):
        title = file.removeprefix("policy-").replace("-", " ")
        sentences = [p.sentence.format(v=_value_text(p.value)) for p in POLICIES if p.file == file]
        files[f"{file}.md"] = f"# Policy: {title}\n\n" + " ".join(sentences) + "\n"
    files["glossary.md"] = (
        "# Glossary\n\n- **Work cell**: a fenced area where people and robot arms work together.\n"
        "- **Dock**: a charging station for mobile robots.\n"
        "- **Field service**: repairs done at the customer's site.\n"
    )
    return files


# --- the questions ------------------------------------------------------------------------------

EURO, KG = r"euros?|EUR|€", r"kg|kilograms?"
# policy units -> the regex the numeric grader looks for after the number ("27 days")
POLICY_UNITS = {
    "days": "days?",
    "weeks": "weeks?",
    "years": "years?",
    "months": "months?",
    "hours": "hours?",
    "EUR": EURO,
    "monitors": "monitors?",
    "conferences": "conferences?",
    "mm/s": "mm|millimet(?:re|er)s?",
}


def number(prompt: str, answer: float, source: str, unit: str | None = None) -> dict[str, Any]:
    """A question the numeric grader checks; `unit` is the regex the number is read before."""
    fact = {"prompt": prompt, "answer": answer, "grader": "numeric", "source": source}
    return fact | ({"unit": unit} if unit else {})


def text(prompt: str, answer: str | list[str], source: str) -> dict[str, Any]:
    """A question the contains grader checks: every answer string must appear."""
    answers = answer if isinstance(answer, list) else [answer]
    return {"prompt": prompt, "answer": answers, "grader": "contains", "source": source}


def _company_facts() -> list[dict[str, Any]]:
    h, src = HISTORY, "company-overview.md"
    staff = "How many people does Quillmoor Robotics employ?"
    return [
        number("In which year was Quillmoor Robotics founded?", h["founded"], src),
        number(staff, h["employees"], src, "people|employees"),
        text("Who founded Quillmoor Robotics?", ["Maren Quill", "Tobias Moorcroft"], "history.md"),
        text("What was Quillmoor Robotics' first product?", "Linen Folder", "history.md"),
        text("In which city is Quillmoor Robotics headquartered?", "Bergen", src),
    ]


def _office_facts(o: Office) -> list[dict[str, Any]]:
    src = f"office-{o.city.lower()}.md"
    at, the = f"Quillmoor's {o.city} office", f"the Quillmoor {o.city} office"
    return [
        number(f"How many desks does {at} have?", o.desks, src, "desks?"),
        number(f"How many floors does {the} occupy?", o.floors, src, "floors?"),
        number(f"How many meeting rooms are there in {at}?", o.rooms, src, "meeting rooms?"),
        number(f"How many parking spaces does {the} have?", o.parking, src, "parking spaces?"),
        number(f"In which year did Quillmoor open its {o.city} office?", o.opened, src),
        text(f"Who leads {at}?", o.head, src),
        text(f"What is the street address of {at}?", o.address, src),
        text(f"In which country is {at}?", o.country, src),
    ]


def _product_facts(p: Product) -> list[dict[str, Any]]:
    src = f"products-{p.family}.md"
    battery = f"How many hours does the battery of the Quillmoor {p.code} last?"
    payload = f"What payload in kilograms can the Quillmoor {p.code} carry?"
    return [
        number(f"What is the list price in euros of Quillmoor's {p.code}?", p.price, src, EURO),
        number(f"How much does the Quillmoor {p.name} weigh, in kilograms?", p.weight, src, KG),
        number(battery, p.battery, src, "hours?"),
        number(f"In which year was the Quillmoor {p.name} launched?", p.launched, src),
        *([number(payload, p.payload, src, KG)] if p.payload else []),
        text(f"What is the product code of Quillmoor's {p.name}?", p.code, src),
        text(f"What is the name of the Quillmoor product with code {p.code}?", p.name, src),
    ]


def _person_facts(p: Person) -> list[dict[str, Any]]:
    src = people_file(p)
    role = f"What is {p.name}'s role at Quillmoor Robotics?"
    return [
        # office heads are asked "who leads ..." with their office
        *([] if p.role.startswith("Head of the") else [text(role, p.role, src)]),
        text(f"Which Quillmoor office is {p.name} based in?", p.office, src),
        number(f"In which year did {p.name} join Quillmoor Robotics?", p.joined, src),
        number(f"What is {p.name}'s badge number at Quillmoor?", p.badge, src),
    ]


def _policy_fact(p: Policy) -> dict[str, Any]:
    if p.unit is None:
        return text(p.question, str(p.value), f"{p.file}.md")
    return number(p.question, p.value, f"{p.file}.md", POLICY_UNITS.get(p.unit))


def facts() -> list[dict[str, Any]]:
    """Every question the handbook answers: prompt, answer, grader, source file (and the unit
    the numeric grader reads the number before)."""
    return [
        *_company_facts(),
        *(f for o in OFFICES for f in _office_facts(o)),
        *(f for p in PRODUCTS for f in _product_facts(p)),
        *(f for p in PEOPLE for f in _person_facts(p)),
        *(_policy_fact(p) for p in POLICIES),
    ]


def tasks(rng: random.Random) -> list[dict]:
    """One task per fact, a third of them (shuffled) in the test split."""
    shuffled = facts()
    rng.shuffle(shuffled)
    n_test = max(N_TEST, len(shuffled) // 3)
    rows = []
    for i, f in enumerate(shuffled):
        meta = {"requires_tools": ["search"], "source": f["source"]}
        if f.get("unit"):
            meta["unit"] = f["unit"]  # the numeric grader reads the number written before it
        rows.append(
            {
                "id": f"docs-{i:04d}",
                "prompt": f["prompt"],
                "answer": f["answer"],
                "grader": f["grader"],
                "split": "test" if i < n_test else "train",
                "metadata": meta,
            }
        )
    return sorted(rows, key=lambda t: (t["split"] != "train", t["id"]))


# --- demonstrations -----------------------------------------------------------------------------


def _passage(source: str, text: str) -> str:
    # exactly what the search tool shows the model
    from retrieval.search import Passage, format_passages

    return format_passages([Passage(id=f"{source}#0", text=text, source=source, score=0.71)])


def demos(files: dict[str, str]) -> list[dict]:
    """Two searches of the handbook `files` and their answers."""
    glossary = files["glossary.md"].split("\n\n", 1)[1].strip()
    overview = files["company-overview.md"].split("\n\n")[1].strip()
    dock, builds = "dock definition", "what Quillmoor Robotics builds"
    return [
        {
            "messages": [
                {"role": "user", "content": "At Quillmoor Robotics, what is a dock?"},
                tool_call("call_1", "search", {"query": dock}),
                tool_turn("call_1", "search", _passage("glossary.md", glossary)),
                {"role": "assistant", "content": "A dock is a charging station for mobile robots."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "What do Quillmoor Robotics' robots do?"},
                tool_call("call_1", "search", {"query": builds}),
                tool_turn("call_1", "search", _passage("company-overview.md", overview)),
                {
                    "role": "assistant",
                    "content": "Quillmoor Robotics builds robots for warehouses, laundries and "
                    "harbours.",
                },
            ]
        },
    ]


def write(folder: Path = HERE, seed: int = SEED) -> int:
    """Write corpus/*.md (replacing the old files), tasks.jsonl and demos.jsonl into `folder`;
    return the number of tasks."""
    files = corpus_files()
    corpus = folder / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for old in corpus.glob("*.md"):
        old.unlink()
    for name, text in files.items():
        (corpus / name).write_text(text, encoding="utf-8")
    rows = tasks(random.Random(seed))
    write_jsonl(folder / "tasks.jsonl", rows)
    write_jsonl(folder / "demos.jsonl", demos(files))
    return len(rows)


if __name__ == "__main__":
    print(f"docs-qa: {write()} tasks in {HERE}")
