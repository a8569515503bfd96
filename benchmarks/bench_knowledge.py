"""Prompt, retriever or weights: where should a corpus's knowledge live for this model?

    .venv/bin/python -m benchmarks.bench_knowledge [--work /tmp/bench-knowledge] \\
        [--eval-limit 60] [--cpt-epochs 30] [--skill ADAPTER_DIR] [--skill-dataset SFT_DIR]

On docs-qa (the Quillmoor Robotics handbook, agent/envs/docs_qa/corpus), in a fresh workspace:
1. `selftune tune cpt` on the corpus (a LoRA trained with a causal LM loss on the documents);
2. every model below answers the first `--eval-limit` held-out test questions and a set of
   questions the corpus cannot answer (the same question forms about offices, products and
   people the handbook does not have; checked absent from the corpus text), in two settings:
   - **closed-book**: no tool at all, a system prompt that asks for an answer from memory and
     allows "I do not know";
   - **open-book**: the environment as it is, with the `search` tool over the corpus.

Models: the base model, the CPT adapter, and, when given, `--skill` (an adapter that learned
the retrieval skill, e.g. the v1 of `selftune improve docs-qa`) and `--cpt-skill` (the same
skill trained on top of the CPT adapter). Adapters are folders, so they can come from other
workspaces.

For each (setting, model): the share of answerable questions answered right (the
environment's grader), the share of unanswerable questions answered with something made up
(any answer that does not decline: `declined` below), both with their 95 % Wilson interval, the
mean tokens (prompt and completion, every call of the episode) and the mean seconds per
episode. Prints a table and writes benchmarks/results/bench_knowledge.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "bench_knowledge.json"
CORPUS = ROOT / "agent" / "envs" / "docs_qa" / "corpus"

CLOSED_BOOK_PROMPT = (
    "You answer questions about the company Quillmoor Robotics from what you know. Answer "
    "briefly. If you do not know the answer, say that you do not know."
)
# question forms of docs_qa/make.py, about offices, products and people the handbook lacks
ABSENT_CITIES = ("Reykjavik", "Porto", "Leeds", "Graz", "Turku", "Brno", "Lyon", "Perth")
ABSENT_CODES = ("QM-990", "QA-777", "QS-615", "QR-905", "QG-333", "QM-120", "QA-999", "QS-101")
ABSENT_PEOPLE = (
    "Ilse Vandermeer",
    "Kofi Boateng",
    "Marisol Quintero",
    "Henrik Aalto",
    "Yuki Tanabe",
    "Dorota Kwiek",
    "Farid Haddad",
    "Greta Lindqvist",
)
DECLINED = re.compile(
    r"\b(do not know|don't know|not know|no information|not (?:in|mentioned|found|available|"
    r"listed|stated|provided|sure)|could not find|couldn't find|cannot find|can't find|"
    r"unable to|unknown|no (?:record|such|data|answer)|does not (?:say|mention|exist|have)|"
    r"doesn't (?:say|mention|exist|have)|not able to)\b",
    re.IGNORECASE,
)


def declined(answer: str | None) -> bool:
    """Whether an answer declines (says it does not know or found nothing) rather than
    answering. An empty answer (the episode ended without one) counts as declining."""
    return not (answer or "").strip() or bool(DECLINED.search(answer or ""))


def unanswerable_prompts(corpus_text: str) -> list[str]:
    """Questions in docs-qa's forms about offices, products and people not in the corpus.
    Raises if one of the invented names does appear in `corpus_text` (the set would lie)."""
    text = corpus_text.lower()
    for name in (*ABSENT_CITIES, *ABSENT_CODES, *ABSENT_PEOPLE):
        if name.lower() in text:
            raise ValueError(f"{name!r} is in the corpus: it cannot make an unanswerable question")
    out = []
    for city in ABSENT_CITIES:
        out += [
            f"How many desks does Quillmoor's {city} office have?",
            f"In which year did Quillmoor open its {city} office?",
        ]
    for code in ABSENT_CODES:
        out += [
            f"What is the list price in euros of Quillmoor's {code}?",
            f"How many hours does the battery of the Quillmoor {code} last?",
        ]
    for person in ABSENT_PEOPLE:
        out += [
            f"In which year did {person} join Quillmoor Robotics?",
            f"What is {person}'s role at Quillmoor Robotics?",
        ]
    return out


def wilson(k: int, n: int) -> list[float]:
    from agent.envs.run import wilson_interval

    return list(wilson_interval(k, n)) if n else [0.0, 1.0]


def _environments(eval_limit: int) -> dict[str, Any]:
    """{"open": docs-qa with the unanswerable tasks added, "closed": the same without tools}."""
    from agent.envs import load_environment
    from traces.schemas import Task

    env = load_environment("docs-qa")
    answerable = env.split("test")[:eval_limit]
    corpus_text = "\n".join(p.read_text() for p in sorted(CORPUS.glob("*.md")))
    absent = [
        Task(
            id=f"absent-{i:03d}",
            prompt=p,
            answer=["<the handbook does not say>"],  # never matched: only `declined` is read
            grader="contains",
            split="test",
            metadata={"unanswerable": True},
        )
        for i, p in enumerate(unanswerable_prompts(corpus_text))
    ]
    open_book = replace(env, tasks=[*answerable, *absent])
    closed = [t.model_copy(update={"tools": []}) for t in open_book.tasks]
    for t in closed:
        t.metadata = {**t.metadata, "requires_tools": []}
    closed_book = replace(
        env,
        name="docs-qa-closed-book",
        tasks=closed,
        tool_names=[],
        requires_tools=[],
        system_prompt=CLOSED_BOOK_PROMPT,
        corpus_dir=None,
        collection=None,
    )
    return {"open-book": open_book, "closed-book": closed_book}


def summarise(result: Any) -> dict[str, Any]:
    answerable = [o for o in result.outcomes if not o.task_id.startswith("absent-")]
    absent = [o for o in result.outcomes if o.task_id.startswith("absent-")]
    right = sum(o.success for o in answerable)
    made_up = sum(not declined(o.answer) for o in absent)
    outcomes = result.outcomes
    return {
        "n": len(answerable),
        "right": right,
        "right_rate": right / len(answerable) if answerable else None,
        "right_ci95": wilson(right, len(answerable)),
        "n_unanswerable": len(absent),
        "made_up": made_up,
        "made_up_rate": made_up / len(absent) if absent else None,
        "made_up_ci95": wilson(made_up, len(absent)),
        "declined_answerable": sum(declined(o.answer) for o in answerable),
        "mean_tokens": sum(o.tokens for o in outcomes) / len(outcomes),
        "mean_s": sum(o.wall_s for o in outcomes) / len(outcomes),
        "wall_s": result.wall_s,
        "examples_unanswerable": [o.answer for o in absent[:3]],
    }


def train_cpt(home: Path, epochs: float, lr: float) -> tuple[Path, float]:
    """`selftune tune cpt` on the docs-qa corpus in `home`; (the adapter folder, seconds)."""
    env = {
        **os.environ,
        "SELFTUNE_HOME": str(home),
        "SELFTUNE_TUNER__TRAIN__EPOCHS": str(epochs),
        "SELFTUNE_TUNER__TRAIN__LEARNING_RATE": str(lr),
        "SELFTUNE_TUNER__TRAIN__BATCH_SIZE": "4",
        "PYTHONPATH": str(ROOT),
    }
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "agent.cli", "tune", "cpt", str(CORPUS)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    return _newest_adapter(home), time.perf_counter() - started


def _newest_adapter(home: Path) -> Path:
    from agent.config import load_config
    from tuner.registry import open_registry

    os.environ["SELFTUNE_HOME"] = str(home)
    registry = open_registry(load_config())
    newest = max(registry.list(), key=lambda r: r.created_at)
    return registry.path(newest.version)


def skill_on_cpt(home: Path, cpt_version: str, dataset: Path) -> Path:
    """The retrieval skill learned on top of the CPT adapter: `selftune tune sft DATASET --from
    CPT` on the SFT dataset that taught `--skill` (e.g. an improve job's cycle1-sft), so the
    two differ only in where training started. Returns the new adapter's folder."""
    env = {**os.environ, "SELFTUNE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    cmd = ["tune", "sft", str(dataset), "--from", cpt_version]
    print("$ selftune", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "agent.cli", *cmd], env=env, check=True, cwd=ROOT)
    return _newest_adapter(home)


async def evaluate(models: dict[str, str | None], eval_limit: int, concurrency: int) -> dict:
    from agent.agent import Agent
    from agent.config import load_config
    from agent.envs.run import run_suite

    cfg = load_config()
    envs = _environments(eval_limit)
    out: dict[str, dict[str, Any]] = {}
    async with Agent(cfg) as agent:
        for setting, env in envs.items():
            for label, adapter in models.items():
                print(f"== {setting} / {label}", flush=True)
                res = await run_suite(
                    cfg,
                    env,
                    split="test",
                    concurrency=concurrency,
                    adapter=adapter,
                    agent=agent,
                    tags=["bench:knowledge"],
                )
                out.setdefault(setting, {})[label] = summarise(res)
    return out


def _pct(rate: float | None, ci: list[float]) -> str:
    if rate is None:
        return "-"
    return f"{100 * rate:.1f} % [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def table(results: dict[str, Any]) -> str:
    lines = [
        "| setting | model | right (answerable) | made up (unanswerable) | tokens/episode | "
        "s/episode |",
        "|---|---|---|---|---|---|",
    ]
    for setting, models in results["evals"].items():
        for label, r in models.items():
            lines.append(
                f"| {setting} | {label} | {r['right']}/{r['n']} = "
                f"{_pct(r['right_rate'], r['right_ci95'])} | {r['made_up']}/{r['n_unanswerable']}"
                f" = {_pct(r['made_up_rate'], r['made_up_ci95'])} | {r['mean_tokens']:.0f} | "
                f"{r['mean_s']:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-knowledge"))
    ap.add_argument("--eval-limit", type=int, default=60)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--cpt-epochs", type=float, default=30.0)
    ap.add_argument("--cpt-lr", type=float, default=1e-3)
    ap.add_argument("--cpt", type=Path, help="an existing CPT adapter folder: skip training")
    ap.add_argument("--skill", type=Path, help="an adapter that learned docs-qa's retrieval skill")
    ap.add_argument("--cpt-skill", type=Path, help="the retrieval skill trained on the CPT adapter")
    ap.add_argument(
        "--skill-dataset",
        type=Path,
        help="the SFT dataset of --skill: trained here on top of the CPT adapter (--cpt-skill)",
    )
    ap.add_argument("--model-dir", type=Path, default=ROOT / ".selftune" / "models")
    args = ap.parse_args(argv)

    home = args.work.resolve()
    (home / "models").mkdir(parents=True, exist_ok=True)
    for model in args.model_dir.iterdir():  # the converted model, linked, not copied
        link = home / "models" / model.name
        if not link.exists():
            link.symlink_to(model.resolve(), target_is_directory=True)
    os.environ["SELFTUNE_HOME"] = str(home)
    started = time.perf_counter()
    cpt_s = None
    cpt = args.cpt
    if cpt is None:
        cpt, cpt_s = train_cpt(home, args.cpt_epochs, args.cpt_lr)
    models: dict[str, str | None] = {"base": None, "cpt": str(cpt)}
    if args.skill:
        models["retrieval skill"] = str(args.skill.resolve())
    cpt_skill, cycle_s = args.cpt_skill, None
    if args.skill_dataset and not cpt_skill:
        t0 = time.perf_counter()
        cpt_skill = skill_on_cpt(home, cpt.name, args.skill_dataset.resolve())
        cycle_s = time.perf_counter() - t0
    if cpt_skill:
        models["cpt + retrieval skill"] = str(cpt_skill.resolve())
    evals = asyncio.run(evaluate(models, args.eval_limit, args.concurrency))
    results = {
        "benchmark": "knowledge",
        "env": "docs-qa",
        "eval_limit": args.eval_limit,
        "cpt": {
            "adapter": str(cpt),
            "seconds": cpt_s,
            "epochs": args.cpt_epochs,
            "learning_rate": args.cpt_lr,
        },  # fmt: skip
        "cpt_skill_train_s": cycle_s,
        "models": models,
        "evals": evals,
        "wall_s": time.perf_counter() - started,
    }
    print(table(results))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")
    return results


if __name__ == "__main__":
    main()
