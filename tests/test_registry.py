"""The adapter registry: versions, lineage, one active pointer that survives kill -9."""

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
from _tuner_fixtures import fake_adapter, make

from tuner.registry import Registry, RegistryError
from tuner.schemas import GateResult

ROOT = Path(__file__).resolve().parent.parent
PASS = GateResult(promote=True, reasons=["test"], numbers={})


def test_register_moves_folder_and_numbers_versions(tmp_path):
    reg = make(tmp_path, 2)
    v1, v2 = reg.list()
    assert (v1.version, v2.version) == ("v1", "v2")
    assert not (tmp_path / "train0").exists()  # moved, not copied
    assert (Path(v2.path) / "adapter_model.safetensors").is_file()
    assert v2.parent == "v1" and v2.status == "candidate"
    assert v2.dataset_hash and len(v2.dataset_hash) == 64
    assert reg.active() is None  # nothing promoted: the base model


def test_register_refuses_non_peft_folder(tmp_path):
    reg = Registry(tmp_path / "adapters")
    (tmp_path / "junk").mkdir()
    with pytest.raises(RegistryError, match="adapter_config.json"):
        reg.register(tmp_path / "junk", base_model="m")
    bad = fake_adapter(tmp_path / "bad")
    (bad / "adapter_config.json").write_text(json.dumps({"modules_to_save": ["lm_head"]}))
    with pytest.raises(RegistryError, match="modules_to_save|whole modules"):
        reg.register(bad, base_model="m")


def test_promote_retires_previous_and_rollback_walks_history(tmp_path):
    reg = make(tmp_path, 3)
    reg.promote("v1", PASS)
    reg.promote("v2", PASS)
    assert reg.active().version == "v2"
    assert reg.get("v1").status == "retired"
    assert [r.status for r in reg.list()].count("active") == 1
    assert reg.rollback().version == "v1"
    assert reg.get("v2").status == "retired" and reg.get("v1").status == "active"
    assert reg.rollback() is None  # back to the base model
    assert reg.rollback() is None  # no history: stays on base
    assert all(r.status != "active" for r in reg.list())


def test_promote_needs_a_passing_gate_unless_forced(tmp_path):
    reg = make(tmp_path, 2)
    with pytest.raises(RegistryError, match="not passed the eval gate"):
        reg.promote("v1")
    fail = GateResult(promote=False, reasons=["worse"], numbers={})
    with pytest.raises(RegistryError, match="says reject"):
        reg.promote("v1", fail)
    reg.record_eval("v2", {"gate": PASS.model_dump()})
    assert reg.promote("v2").status == "active"  # the recorded gate result counts
    rec = reg.promote("v1", force=True)
    assert rec.status == "active" and any("--force" in n for n in rec.notes)


def test_reject_and_record_eval(tmp_path):
    reg = make(tmp_path, 2)
    fail = GateResult(promote=False, reasons=["success fell"], numbers={"x": {"candidate": 0.1}})
    reg.record_eval("v2", {"gate": fail.model_dump()})
    rec = reg.reject("v2", fail)
    assert rec.status == "rejected"
    assert rec.eval_results[-1]["gate"]["reasons"] == ["success fell"]
    reg.promote("v1", PASS)
    with pytest.raises(RegistryError, match="is active"):
        reg.reject("v1")


def test_diff_names_what_changed(tmp_path):
    reg = make(tmp_path, 2)
    d = reg.diff("v1", "v2")
    assert d["train_config"] == {"lora_r": (8, 16)}
    assert d["metrics"]["train_loss"] == (1.0, 0.5)
    assert d["lineage"]["parent"] == (None, "v1")


def test_unknown_and_corrupt_records_give_clear_errors(tmp_path):
    reg = make(tmp_path, 1)
    with pytest.raises(RegistryError, match="no adapter version v9"):
        reg.get("v9")
    with pytest.raises(RegistryError, match="not a version name"):
        reg.get("../etc")
    (reg.root / "v1" / "record.json").write_text("{not json")
    with pytest.raises(RegistryError, match=r"v1/record.json is corrupt.*delete the folder"):
        reg.get("v1")
    (reg.root / "active").write_text("[]")
    with pytest.raises(RegistryError, match="active pointer .* corrupt.*delete it"):
        reg.active()


def test_reopen_reconciles_a_stale_status(tmp_path):
    """A writer killed between the pointer and the record updates leaves a stale status."""
    reg = make(tmp_path, 2)
    reg.promote("v1", PASS)
    rec = json.loads((reg.root / "v2" / "record.json").read_text())
    rec["status"] = "active"  # as if killed before v2's record was corrected
    (reg.root / "v2" / "record.json").write_text(json.dumps(rec))
    reg2 = Registry(reg.root)
    assert [r.version for r in reg2.list() if r.status == "active"] == ["v1"]


_FLIPPER = """
import sys
from tuner.registry import Registry
from tuner.schemas import GateResult
reg = Registry(sys.argv[1])
ok = GateResult(promote=True, reasons=[], numbers={})
print("ready", flush=True)
i = 0
while True:
    reg.promote(["v1", "v2", "v3"][i % 3], ok)
    if i % 4 == 3:
        reg.rollback()
    i += 1
"""


def test_kill_9_during_promote_rollback_leaves_a_valid_active(tmp_path):
    make(tmp_path, 3)
    root = tmp_path / "adapters"
    script = tmp_path / "flip.py"
    script.write_text(_FLIPPER)
    rng = random.Random(7)
    seen = set()
    for _ in range(20):
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
        active = reg.active()
        if active is not None:
            assert (Path(active.path) / "adapter_config.json").is_file()
            assert (Path(active.path) / "adapter_model.safetensors").is_file()
        statuses = [r.status for r in reg.list()]
        assert statuses.count("active") == (0 if active is None else 1)
        seen.add(active.version if active else None)
        # a killed writer's temp files are swept when the registry opens
        assert not list(root.glob(".*.tmp-*")) and not list(root.glob("v*/.*.tmp-*"))
    assert len(seen) >= 2  # the kills really landed at different states


def test_adapters_cli_list_show_promote_rollback_diff(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from agent.cli.tune import adapters_app

    make(tmp_path, 2)  # registry at tmp_path/adapters = the workspace's adapters folder
    monkeypatch.setenv("SELFTUNE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no stray ./selftune.toml
    app = typer.Typer()
    app.add_typer(adapters_app, name="adapters")
    run = CliRunner().invoke

    res = run(app, ["adapters", "promote", "v1"], obj={})
    assert res.exit_code == 1 and "not passed the eval gate" in res.output
    assert run(app, ["adapters", "promote", "v1", "--force"], obj={}).exit_code == 0
    assert run(app, ["adapters", "promote", "v2", "--force"], obj={}).exit_code == 0
    listing = run(app, ["adapters", "list"], obj={}).output
    assert "v1" in listing and "retired" in listing and "active" in listing
    shown = json.loads(run(app, ["adapters", "show", "v2"], obj={}).output)
    assert shown["status"] == "active" and shown["parent"] == "v1"
    diff = run(app, ["adapters", "diff", "v1", "v2"], obj={}).output
    assert "lora_r" in diff and "train_loss" in diff
    assert "active: v1" in run(app, ["adapters", "rollback"], obj={}).output
    assert "base model" in run(app, ["adapters", "rollback"], obj={}).output
    res = run(app, ["adapters", "show", "v7"], obj={})
    assert res.exit_code == 1 and "no adapter version v7" in res.output


# -- checksums: a damaged weights file is refused at promote and at every load ---------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the tensor data: the file still opens, only the hash tells
    path.write_bytes(bytes(data))


def test_register_records_the_files_checksums(tmp_path):
    from agent.model.adapters import adapter_checksums

    reg = make(tmp_path, 1)
    rec = reg.get("v1")
    assert set(rec.sha256) == {"adapter_config.json", "adapter_model.safetensors"}
    assert rec.sha256 == adapter_checksums(Path(rec.path))
    assert reg.verify("v1").version == "v1"


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte])
def test_promote_refuses_damaged_weights_even_forced(tmp_path, damage):
    reg = make(tmp_path, 2)
    reg.promote("v1", PASS)
    weights = Path(reg.get("v2").path) / "adapter_model.safetensors"
    damage(weights)
    for kwargs in ({"gate_result": PASS}, {"force": True}):
        with pytest.raises(
            RegistryError, match="adapter v2: .*adapter_model.safetensors is damaged"
        ):
            reg.promote("v2", **kwargs)
    assert reg.active().version == "v1"  # nothing moved
    with pytest.raises(RegistryError, match="train the adapter again"):
        reg.verify("v2")


def test_a_record_without_checksums_is_checked_for_completeness_and_sealed_at_promote(tmp_path):
    reg = make(tmp_path, 2)
    for v in ("v1", "v2"):  # as registered before checksums existed
        path = Path(reg.path(v)) / "record.json"
        data = json.loads(path.read_text())
        del data["sha256"]
        path.write_text(json.dumps(data))
    assert reg.get("v1").sha256 == {}
    _truncate(Path(reg.path("v2")) / "adapter_model.safetensors")
    with pytest.raises(RegistryError, match="not a complete safetensors file"):
        reg.promote("v2", force=True)
    rec = reg.promote("v1", force=True)
    assert set(rec.sha256) == {"adapter_config.json", "adapter_model.safetensors"}
    assert any("checksums recorded" in n for n in rec.notes)


def test_loading_a_damaged_version_names_the_file(tmp_path, cfg):
    from agent.model.adapters import registry_adapter, resolve_adapter

    reg = Registry(cfg.workspace.adapters)
    manifest = tmp_path / "m.json"
    manifest.write_text("{}")
    reg.register(fake_adapter(tmp_path / "a"), base_model="m", dataset_manifest=manifest)
    reg.promote("v1", PASS)
    assert registry_adapter(cfg, "active")[0] == "v1"
    _flip_a_byte(Path(reg.path("v1")) / "adapter_model.safetensors")
    for request in ("active", "v1", str(reg.path("v1"))):
        with pytest.raises(
            RegistryError, match=r"adapter v1: .*v1/adapter_model.safetensors is damaged"
        ):
            resolve_adapter(cfg, None, request)


def test_two_adapter_folders_with_one_name_are_served_apart(tmp_path, cfg):
    """`v1` of this workspace and `v1` of another: each request gets its own weights (the
    second was answered by the first's, and bench_knowledge's "retrieval skill" row with it)."""
    from agent.model.adapters import resolve_adapter

    class Engine:  # the engine's adapter table, nothing else (load_adapter is tested on the real one)
        def __init__(self):
            self.loaded: dict[str, str] = {}

        def adapters(self):
            return dict(self.loaded)

        def load_adapter(self, name, path):
            assert name not in self.loaded
            self.loaded[name] = str(path)

    ours, theirs = tmp_path / "here" / "v1", tmp_path / "there" / "v1"
    fake_adapter(ours), fake_adapter(theirs)
    engine = Engine()
    assert resolve_adapter(cfg, engine, str(ours)) == "v1"
    other = resolve_adapter(cfg, engine, str(theirs))
    assert other != "v1" and other.startswith("v1-")
    assert engine.loaded == {"v1": str(ours.resolve()), other: str(theirs.resolve())}
    # asked again, each folder gets the name it was loaded under, and nothing loads twice
    assert resolve_adapter(cfg, engine, str(theirs)) == other
    assert resolve_adapter(cfg, engine, str(ours)) == "v1" and len(engine.loaded) == 2


@pytest.mark.slow
def test_eval_and_promote_cli_refuse_a_truncated_adapter(tmp_path, cfg):
    """The issue's probe: `adapters promote --force` on a truncated weights file, and `eval`
    on it, must end at once with the file named (they accepted it, then hung)."""
    from _runtime_fixtures import make_random_adapter

    reg = Registry(cfg.workspace.adapters)
    manifest = tmp_path / "m.json"
    manifest.write_text("{}")
    reg.register(make_random_adapter(tmp_path / "a", r=4), base_model="smollm2-135m-instruct",
                 dataset_manifest=manifest)  # fmt: skip
    _truncate(Path(reg.path("v1")) / "adapter_model.safetensors")
    env = {**os.environ, "SELFTUNE_HOME": str(cfg.workspace.root), "PYTHONPATH": str(ROOT)}
    for args in (
        ["adapters", "promote", "v1", "--force"],
        ["eval", "calculator", "--limit", "1", "--adapter", "v1"],
        ["chat", "hi", "--adapter", "v1"],
    ):
        r = subprocess.run([sys.executable, "-m", "agent.cli", *args], env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 1, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        assert "adapter_model.safetensors" in r.stderr and "v1" in r.stderr, r.stderr[-2000:]
    assert Registry(cfg.workspace.adapters).active() is None
