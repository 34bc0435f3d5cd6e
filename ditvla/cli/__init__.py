"""The ``ditvla`` command: train, benchmark and deploy VLA policies with DiT heads.

Each subcommand's ``--help`` explains it. Options that set a config field are derived
from the config dataclass (:mod:`ditvla.cli.config_options`), so every default and its
description has one home. Errors in user input (:class:`~ditvla.errors.DitvlaError`: a
damaged store, a wrong path, an unknown task, a setting out of range) print one line and
exit with status 2; anything else is a bug and shows its traceback.

Only the light parts are imported here; a command imports what it runs (``ditvla keygen``
loads neither zarr, h5py nor MuJoCo). The subcommands live in modules by job:
:mod:`~ditvla.cli.data_commands`, :mod:`~ditvla.cli.training_commands`,
:mod:`~ditvla.cli.evaluation_commands`, :mod:`~ditvla.cli.deploy_commands`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ditvla.cli import data_commands, deploy_commands, evaluation_commands, training_commands
from ditvla.errors import DitvlaError

DESCRIPTION = """\
ditvla: a vision-language backbone feeding Diffusion-Transformer heads, for robot policies.

Three jobs: train a policy on demonstrations (collect, train), benchmark it in simulators
(eval), deploy it to a robot controller process (serve, robot). Data are LIBERO-style
zarr replay buffers, converted from LIBERO HDF5 files and LeRobot datasets. Start with
`ditvla demo`.
"""
# (name, add) in the order --help lists them
SUBCOMMANDS = (
    ("demo", evaluation_commands.add_demo),
    ("collect", data_commands.add_collect),
    ("train", training_commands.add_train),
    ("eval", evaluation_commands.add_eval),
    ("serve", deploy_commands.add_serve),
    ("robot", deploy_commands.add_robot),
    ("quantize", training_commands.add_quantize),
    ("calibrate-steps", training_commands.add_calibrate_steps),
    ("distill", training_commands.add_distill),
    ("keygen", deploy_commands.add_keygen),
    ("dataset", data_commands.add_dataset),
    ("convert", data_commands.add_convert),
)
# A path the user named that is not there is the user's to fix, like a DitvlaError.
USER_ERRORS = (DitvlaError, FileNotFoundError)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``ditvla`` parser; ``command`` (the one being run, if known) limits the
    options derived from configs to that command's, so other parts are not imported."""
    parser = argparse.ArgumentParser(
        prog="ditvla", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, add in SUBCOMMANDS:
        add(commands, configured=command in (None, name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"ditvla: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ditvla: interrupted", file=sys.stderr)
        return 130
