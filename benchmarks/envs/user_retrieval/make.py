"""Write the user-style retrieval environment: tasks.jsonl and corpus/, nothing else.

    python -m benchmarks.envs.user_retrieval.make

What a user brings: questions with reference answers and the documents that hold them, no
demonstrations, no hints, no environment.py. The documents are a gazetteer of invented towns
(names, rivers, founders, festivals, exports drawn from syllables with a fixed seed), so no
model can answer from memory: every right answer has to come from `search`. It resembles none
of the built-ins (docs-qa is a company handbook). Test towns never appear in a train task.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SEED = 15015
N_TOWNS = 70
N_TEST_TOWNS = 20  # 3 questions each: 60 test tasks, 150 train tasks
REGIONS = ("north-coast", "high-valleys", "river-plains", "eastern-marches", "salt-islands")

_ON = ["dra", "vel", "mor", "ka", "tir", "os", "bren", "ul", "ste", "quo", "fa", "gil", "ner"]
_MID = ["va", "ri", "len", "do", "sa", "mi", "tho", "ra", "ke", "lo", "ny"]
_END = ["vik", "holm", "dal", "mere", "wick", "ton", "sund", "by", "gard", "ach", "ness"]
_FIRST = ["Ilsa", "Orvan", "Maret", "Tobin", "Sella", "Havard", "Runa", "Edric", "Nila", "Corwen"]
_GOODS = ["blue slate", "amber glass", "smoked eel", "copperleaf tea", "felt hats", "rope",
          "cider vinegar", "lamp oil", "sea salt", "linen", "clay pipes", "barley malt",
          "walnut timber", "goat cheese", "iron nails", "dyed wool"]  # fmt: skip
_FEAST = ["Lantern", "Heron", "Frost", "Barley", "Kite", "Ember", "Tide", "Moth", "Bell", "Apple"]
_FEAST_END = ["Fair", "Night", "Race", "Parade", "Market", "Feast"]

QUESTIONS = {
    "river": ["Which river flows through {town}?", "What river runs through the town of {town}?"],
    "founder": ["Who founded {town}?", "Who was the founder of the town of {town}?"],
    "festival": ["What festival is {town} known for?", "Which yearly festival is held in {town}?"],
    "export": [
        "What is the main export of {town}?",
        "What does {town} mostly sell to other towns?",
    ],
}


def _word(rng: random.Random, parts: int = 2) -> str:
    syll = [rng.choice(_ON)] + [rng.choice(_MID) for _ in range(parts - 2)] + [rng.choice(_END)]
    return "".join(syll).capitalize()


def towns(rng: random.Random) -> list[dict]:
    """N_TOWNS invented towns with distinct names, rivers, founders and festivals."""
    out, seen = [], set()
    while len(out) < N_TOWNS:
        name = _word(rng, rng.choice((2, 3)))
        river = (rng.choice(_ON) + rng.choice(_MID)).capitalize() + rng.choice(["we", "la", "nna"])
        founder = f"{rng.choice(_FIRST)} {_word(rng, 2)}"
        festival = f"{rng.choice(_FEAST)} {rng.choice(_FEAST_END)}"
        if name in seen or founder in seen or river in seen:
            continue
        seen |= {name, founder, river}
        out.append(
            {
                "town": name,
                "region": rng.choice(REGIONS),
                "river": river,
                "founder": founder,
                "year": rng.randint(1120, 1890),
                "festival": festival,
                "export": rng.choice(_GOODS),
                "people": rng.randint(800, 64000),
            }
        )
    return out


def paragraph(t: dict) -> str:
    return (
        f"{t['town']} lies on the river {t['river']}. It was founded in {t['year']} by "
        f"{t['founder']}, and about {t['people']:,} people live there today. The town is known "
        f"for the {t['festival']}, held every year. Its main export is {t['export']}."
    )


def write(root: Path = HERE) -> tuple[int, int]:
    """Write corpus/*.md and tasks.jsonl under `root`; returns (train, test) task counts."""
    rng = random.Random(SEED)
    all_towns = towns(rng)
    test_towns = {t["town"] for t in rng.sample(all_towns, N_TEST_TOWNS)}
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for region in REGIONS:
        here = [t for t in all_towns if t["region"] == region]
        title = region.replace("-", " ").title()
        body = "\n\n".join(f"## {t['town']}\n\n{paragraph(t)}" for t in here)
        (corpus / f"{region}.md").write_text(f"# Towns of the {title}\n\n{body}\n")
    rows = []
    for t in all_towns:
        for attr in rng.sample(sorted(QUESTIONS), 3):
            prompt = rng.choice(QUESTIONS[attr]).format(town=t["town"])
            split = "test" if t["town"] in test_towns else "train"
            rows.append(
                {
                    "id": f"{t['town'].lower()}-{attr}",
                    "prompt": prompt,
                    "answer": [t[attr]],
                    "grader": "contains",
                    "split": split,
                    "tools": ["search"],
                }
            )
    rows.sort(key=lambda r: (r["split"] == "test", r["id"]))
    with (root / "tasks.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    train = sum(r["split"] == "train" for r in rows)
    return train, len(rows) - train


if __name__ == "__main__":
    train, test = write()
    print(f"train {train}, test {test}")
