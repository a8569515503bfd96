"""The tuner's pictures: the improve job's learning curve and a GRPO run's reward curve.

Drawn with matplotlib's file backend (no display needed), written beside the job's state and
replaced whole, so a reader never opens a half-written PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    _pyplot().close(fig)
    tmp.replace(path)
    return path


def learning_curve(
    points: Sequence[tuple[str, dict[str, float]]], envs: Sequence[str], title: str, path: Path
) -> Path:
    """Success rate (%) at each labelled point, one line per environment."""
    plt = _pyplot()
    labels = [label for label, _ in points]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    for env in envs:
        ys = [rates.get(env) for _, rates in points]
        xs = [i for i, y in enumerate(ys) if y is not None]
        ax.plot(xs, [ys[i] * 100 for i in xs], marker="o", label=env)
    ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right")
    ax.set_ylabel("test success, %")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def reward_curve(log: Sequence[dict[str, Any]], title: str, path: Path) -> Path:
    """Reward mean ± sd and success rate against step, from a GRPO run's step logs."""
    plt = _pyplot()
    steps = [r["step"] for r in log]
    mean = [r["reward_mean"] for r in log]
    sd = [r["reward_std"] for r in log]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, mean, marker="o", label="reward mean")
    low = [m - s for m, s in zip(mean, sd, strict=True)]
    high = [m + s for m, s in zip(mean, sd, strict=True)]
    ax.fill_between(steps, low, high, alpha=0.2, label="± sd")
    ax.plot(steps, [r["success_rate"] for r in log], ls="--", label="success")
    ax.set(xlabel="step", ylabel="reward", ylim=(-0.05, 1.05), title=title)
    ax.legend(loc="lower right")
    return _save(fig, path)
