"""How a subcommand is added to the ``ditvla`` parser, and the help texts several share.

Each command module (``data_commands``, ``training_commands``, ``evaluation_commands``,
``deploy_commands``) has one ``add_<command>(commands, configured)`` per subcommand and
the function that runs it. ``configured`` says whether to add the options derived from
config dataclasses: those import the part that owns the config (torch, simulators,
ZeroMQ), so they are added only for the command being run, or for ``ditvla --help``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ditvla.envs.registry import SUITES

ENV_HELP = "SUITE:TASKS — " + "; ".join(suite.task_names for suite in SUITES.values())

Commands = argparse._SubParsersAction


def add_command(
    commands: Commands,
    name: str,
    run: Callable[[argparse.Namespace], int],
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    """A subcommand that shows its options' defaults and runs ``run(args)``."""
    parser = commands.add_parser(
        name,
        help=help,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.set_defaults(func=run)
    return parser
