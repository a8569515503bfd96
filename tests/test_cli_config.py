"""Every command reads the root `--config`: a missing or broken file stops it with exit 2 and
the file's name, instead of running on the defaults."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from agent.cli import app

COMMANDS = [
    ["setup"],
    ["doctor"],
    ["chat", "hi"],
    ["run", "hi"],
    ["eval", "calculator"],
    ["collect", "calculator"],
    ["feedback", "abc", "up"],
    ["review"],
    ["improve", "calculator"],
    ["tools", "list"],
    ["tools", "call", "calculator", '{"expression": "1+1"}'],
    ["mcp", "serve"],
    ["index", "."],
    ["search", "x"],
    ["serve"],
    ["traces", "list"],
    ["dataset", "build", "sft"],
    ["tune", "sft", "."],
    ["adapters", "list"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_a_missing_config_file_stops_every_command(argv, tmp_path):
    missing = tmp_path / "nope.toml"
    result = CliRunner().invoke(app, ["--config", str(missing), *argv])
    assert result.exit_code == 2, result.output
    assert "nope.toml" in result.output and "does not exist" in result.output


@pytest.mark.parametrize("argv", [["doctor"], ["tools", "list"], ["serve"], ["traces", "list"]])
def test_a_config_with_an_unknown_key_stops_every_command(argv, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nmax_new_tokenz = 8\n")
    result = CliRunner().invoke(app, ["--config", str(bad), *argv])
    assert result.exit_code == 2, result.output
    assert "max_new_tokenz" in result.output
