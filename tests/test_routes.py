"""Routed adapters: one active adapter per route in the registry, kill -9 safe like the global
pointer, and the CLI that promotes, rolls back and lists them."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _tuner_fixtures import make

from agent.model.adapters import route_versions
from tuner.registry import Registry, RegistryError
from tuner.schemas import GateResult

ROOT = Path(__file__).resolve().parent.parent
PASS = GateResult(promote=True, reasons=["test"], numbers={})


def test_each_route_has_its_own_active_and_history_beside_the_global(tmp_path):
    reg = make(tmp_path, 3)
    reg.promote("v1", PASS)
    reg.promote("v2", PASS, route="calculator")
    reg.promote("v3", PASS, route="docs-qa")
    reg.promote("v3", PASS, route="calculator")
    assert reg.routes() == {"calculator": "v3", "docs-qa": "v3"}
    assert route_versions(reg.root) == reg.routes()  # what the agent's side reads
    assert reg.route_active("calculator").version == "v3"
    assert reg.route_active("researcher") is None  # no route: the global answers
    # the global pointer and the statuses speak of the global active only
    assert reg.active().version == "v1"
    assert [r.status for r in reg.list()] == ["active", "candidate", "candidate"]
    # lineage: the record names the routes it was promoted on
    assert any("promoted on route calculator" in n for n in reg.get("v3").notes)
    assert reg.rollback(route="calculator").version == "v2"
    assert reg.rollback(route="calculator") is None  # back to none: falls back to the global
    assert reg.routes() == {"calculator": None, "docs-qa": "v3"}
    assert reg.active().version == "v1"  # untouched by route rollbacks
    events = json.loads((reg.root / "active").read_text())["events"]
    assert [e.get("route") for e in events] == [
        None,
        "calculator",
        "docs-qa",
        "calculator",
        "calculator",
        "calculator",
    ]


def test_route_promotion_is_gated_and_checked_like_the_global(tmp_path):
    reg = make(tmp_path, 2)
    with pytest.raises(RegistryError, match="not passed the eval gate"):
        reg.promote("v1", route="calculator")
    with pytest.raises(RegistryError, match="not a route name"):
        reg.promote("v1", PASS, route="no spaces/please")
    with pytest.raises(RegistryError, match="no route 'ghost'.*--route ghost"):
        reg.rollback(route="ghost")
    reg.promote("v1", force=True, route="calculator")
    assert any("route calculator with --force" in n for n in reg.get("v1").notes)
    with pytest.raises(RegistryError, match="active on route calculator.*rollback --route"):
        reg.reject("v1")
    (reg.root / "v2" / "adapter_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(RegistryError, match="damaged|not a complete"):
        reg.promote("v2", force=True, route="docs-qa")
    assert reg.routes() == {"calculator": "v1"}


_ROUTE_FLIPPER = """
import sys
from tuner.registry import Registry
from tuner.schemas import GateResult
reg = Registry(sys.argv[1])
ok = GateResult(promote=True, reasons=[], numbers={})
print("ready", flush=True)
i = 0
while True:
    reg.promote(["v1", "v2", "v3"][i % 3], ok, route=["calculator", "docs-qa"][i % 2])
    if i % 5 == 4:
        reg.rollback(route="calculator")
    if i % 7 == 6:
        reg.promote(["v1", "v2"][i % 2], ok)
    i += 1
"""


def test_kill_9_during_route_promotions_leaves_a_valid_pointer(tmp_path):
    make(tmp_path, 3)
    root = tmp_path / "adapters"
    script = tmp_path / "flip.py"
    script.write_text(_ROUTE_FLIPPER)
    rng = random.Random(11)
    seen = set()
    for _ in range(8):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(root)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.01, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reg = Registry(root)  # opening must succeed whatever moment the kill hit
        routes = reg.routes()
        for route, version in routes.items():
            assert version in (None, "v1", "v2", "v3")
            rec = reg.route_active(route)
            if rec is not None:
                assert (Path(rec.path) / "adapter_model.safetensors").is_file()
        statuses = [r.status for r in reg.list()]
        assert statuses.count("active") == (0 if reg.active() is None else 1)
        assert not list(root.glob(".*.tmp-*")) and not list(root.glob("v*/.*.tmp-*"))
        seen.add(tuple(sorted(routes.items(), key=str)))
    assert len(seen) >= 2  # the kills really landed at different states


def test_adapters_cli_promotes_rolls_back_and_lists_routes(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from agent.cli.tune import adapters_app

    make(tmp_path, 2)
    monkeypatch.setenv("SELFTUNE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    app.add_typer(adapters_app, name="adapters")
    run = CliRunner().invoke

    res = run(app, ["adapters", "promote", "v2", "--route", "docs-qa"], obj={})
    assert res.exit_code == 1 and "not passed the eval gate" in res.output
    res = run(app, ["adapters", "promote", "v2", "--route", "docs-qa", "--force"], obj={})
    assert res.exit_code == 0 and "route docs-qa: v2" in res.output
    listing = run(app, ["adapters", "list"], obj={}).output
    assert "routes: docs-qa -> v2" in listing and "base model" in listing
    res = run(app, ["adapters", "rollback", "--route", "docs-qa"], obj={})
    assert res.exit_code == 0 and "global active answers" in res.output
    res = run(app, ["adapters", "rollback", "--route", "nope"], obj={})
    assert res.exit_code == 1 and "no route 'nope'" in res.output
