"""`python -m agent.cli` is the `selftune` command."""

from agent.cli import main

main()
