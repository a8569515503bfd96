"""Every command reads the root `--config`: a missing or broken file stops it with exit 2 and
the file's name, instead of running on the defaults."""

from __future__ import annotations

import json

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


def test_a_selftune_error_ends_the_command_with_one_line_and_exit_1(monkeypatch, capsys):
    import agent.cli as cli
    from agent.model.files import ModelError

    def boom() -> None:
        raise ModelError("model folder /x has no config.json: run `selftune setup`")

    monkeypatch.setattr(cli, "app", boom)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "run `selftune setup`" in err and "Traceback" not in err


def test_every_error_class_of_the_library_is_a_selftune_error():
    import inspect

    import agent.config
    import agent.envs
    import agent.model.adapters
    import agent.model.engine
    import agent.model.files
    import agent.model.openai
    import agent.model.template
    import agent.serving.vllm
    import tools.base
    import tools.catalog
    import tools.mcp_client
    import traces.datasets
    import traces.schemas
    import traces.store
    import traces.times
    import tuner.gate
    import tuner.grpo
    import tuner.improve
    import tuner.registry
    import tuner.reload
    import tuner.train
    from tools.errors import SelftuneError

    modules = [
        agent.envs, agent.model.adapters, agent.model.engine, agent.model.files,
        agent.model.openai, agent.model.template, agent.serving.vllm, tools.base, tools.catalog,
        tools.mcp_client, traces.datasets, traces.schemas, traces.store, traces.times,
        agent.config, tuner.gate, tuner.grpo, tuner.improve, tuner.reload, tuner.registry,
        tuner.train,
    ]  # fmt: skip
    errors = [
        obj
        for m in modules
        for obj in vars(m).values()
        if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == m.__name__
    ]
    assert len(errors) >= 20
    assert [e.__name__ for e in errors if not issubclass(e, SelftuneError)] == []


def test_run_reads_long_tasks_from_a_file_or_stdin_and_refuses_bad_utf8(
    tmp_path, scripted, cli_env
):
    from langchain_core.messages import AIMessage

    from agent.cli.run import read_task

    long_task = "Summarise this. " + "word " * 20000
    (tmp_path / "task.txt").write_text(long_task)
    assert read_task(None, tmp_path / "task.txt") == long_task
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    result = CliRunner().invoke(app, ["run", "--file", str(tmp_path / "bad.txt")])
    assert result.exit_code == 2 and "not valid UTF-8 (byte 3" in result.output
    result = CliRunner().invoke(app, ["run", "-"], input="")
    assert result.exit_code == 2 and "stdin is empty" in result.output
    scripted(AIMessage("read it"))
    result = CliRunner(env=cli_env).invoke(app, ["run", "-", "--json"], input=long_task)
    assert result.exit_code == 0, result.output
    assert '"answer": "read it"' in result.output


def test_help_keeps_its_brackets_and_h_and_version_work():
    runner = CliRunner()
    result = runner.invoke(app, ["run", "-h"])
    assert result.exit_code == 0 and "(default: [agent] tools)" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("selftune ")


def test_doctor_and_adapters_list_speak_json(cli_env):
    result = CliRunner(env=cli_env).invoke(app, ["doctor", "--json"])
    checks = json.loads(result.output)
    assert {"name", "ok", "detail"} <= set(checks[0]) and any(c["name"] == "config" for c in checks)
    result = CliRunner(env=cli_env).invoke(app, ["adapters", "list", "--json"])
    assert result.exit_code == 0 and json.loads(result.output) == []
