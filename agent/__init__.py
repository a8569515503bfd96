"""selftune's agent: config, model backends, the orchestrator, environments and the CLI.

from agent import Agent, load_config
async with Agent.from_config(load_config()) as agent:
    result = await agent.run("What is 48 * 97?")
"""

from agent.config import Config, ConfigError, load_config

__all__ = [
    "Agent",
    "Config",
    "ConfigError",
    "RunResult",
    "load_config",
    "load_environment",
    "run_suite",
]


def __getattr__(name: str):
    # Imported on first use: the orchestrator pulls in LangGraph, and `selftune --help` should not.
    if name in ("Agent", "RunResult"):
        from agent import agent as _agent

        return getattr(_agent, name)
    if name == "load_environment":
        from agent.envs import load_environment

        return load_environment
    if name == "run_suite":
        from agent.envs.run import run_suite

        return run_suite
    raise AttributeError(f"module 'agent' has no attribute {name!r}")
