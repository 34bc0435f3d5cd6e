"""``ditvla serve``, ``ditvla robot`` and ``ditvla keygen``: a policy served to a robot
controller process."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from ditvla.cli.config_options import add_config_options, given_options
from ditvla.cli.subcommand import Commands, add_command


# ---------------------------------------------------------------------- serve
def _print_status(stats, last_error) -> None:
    """The server's status line (once a second on stderr)."""
    line = (
        f"robots {stats.robots} | chunks {stats.chunks} | contexts {stats.contexts} | "
        f"S1 {stats.system1_hz:.1f} Hz "
        f"| S2 {stats.system2_hz:.1f} Hz | stale {stats.stale_skips} | "
        f"S2 restarts {stats.system2_restarts} | rejected {stats.rejected_messages} | "
        f"bad observations {stats.bad_observations}"
    )
    print(line + (f" (last: {last_error})" if last_error else ""), file=sys.stderr)


def run_serve(args: argparse.Namespace) -> int:
    import signal

    from ditvla.deploy.keys import server_keys
    from ditvla.deploy.server import PolicyServer, ServeConfig

    keys = server_keys(args.keys) if args.keys else None
    config = ServeConfig(**{**given_options(args, ServeConfig), "keys": keys})
    server = PolicyServer(config)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    print(
        f"serving {config.policy} on {config.address} (merge: {config.merge}; up to "
        f"{config.max_robots} robot(s), each in its own session); Ctrl-C stops"
    )
    stats = server.serve(
        duration_s=args.duration_s, on_status=None if args.quiet else _print_status
    )
    if args.stats_json:
        report = {k: v for k, v in asdict(stats).items() if k != "act_ms"}
        Path(args.stats_json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def add_serve(commands: Commands, configured: bool) -> None:
    serve = add_command(
        commands,
        "serve",
        run_serve,
        "run a policy as the slow/fast dual-system server for a robot controller",
        "System 2 (the VLM, its own process) refreshes the context from the newest camera "
        "frames; System 1 (the DiT head) denoises action chunks from the newest context and "
        "state and streams them to the controller (`ditvla robot`); --max-robots N serves a "
        "fleet, each robot in its own session. Loopback only unless --keys is given.",
    )
    if configured:
        from ditvla.deploy.server import ServeConfig

        add_config_options(serve, ServeConfig, exclude=("keys",))
    serve.add_argument(
        "--keys",
        help="a key folder (ditvla keygen): server.key_secret, and the public keys of the "
        "robots it admits (CURVE: authenticated, encrypted); required off loopback",
    )
    serve.add_argument("--duration-s", type=float, help="stop after this many seconds")
    serve.add_argument("--quiet", action="store_true", help="no status line every second")
    serve.add_argument("--stats-json", help="write the server's final counters here on exit")


# ---------------------------------------------------------------------- robot
def run_robot(args: argparse.Namespace) -> int:
    from ditvla.deploy.controller import ControllerConfig, RunConfig, run_lerobot, run_sim
    from ditvla.deploy.keys import client_keys
    from ditvla.deploy.transport import ClientChannel

    config = ControllerConfig(**given_options(args, ControllerConfig))
    run = RunConfig(**given_options(args, RunConfig))
    out = Path(args.out)
    keys = client_keys(args.keys, args.key_name) if args.keys else None
    with ClientChannel(args.server, keys=keys) as channel:
        if args.sim:
            summary = run_sim(channel, args.sim, config=config, run=run, out=out)
        else:
            options = dict(item.split("=", 1) for item in args.robot_arg)
            summary = run_lerobot(
                channel, args.robot, options, args.instruction, config=config, run=run, out=out
            )
    report = asdict(summary)
    episodes = report.pop("episodes")
    print(json.dumps(report, indent=2))
    if episodes:
        print(f"success: {sum(e['success'] for e in episodes)}/{len(episodes)} episodes")
    print(f"metrics: {out}/ticks.csv, {out}/summary.json")
    return 0


def add_robot(commands: Commands, configured: bool) -> None:
    robot = add_command(
        commands,
        "robot",
        run_robot,
        "the robot controller process: a fixed-rate loop fed by `ditvla serve`",
        "Run the control loop at --hz: execute the action due at each tick, hold the robot "
        "when none is due (or the watchdog fires), send observations. --sim runs a simulator "
        "in real time as the robot; --robot drives a LeRobot robot through its own API. "
        "Writes OUT/ticks.csv and OUT/summary.json.",
    )
    target = robot.add_mutually_exclusive_group(required=True)
    target.add_argument("--sim", help="metaworld:<task>, stepped in real time")
    target.add_argument("--robot", help="a LeRobot robot type, e.g. so101_follower")
    robot.add_argument(
        "--robot-arg", action="append", default=[], help="KEY=VALUE for the robot's config"
    )
    robot.add_argument("--instruction", default="", help="the task instruction (--robot)")
    robot.add_argument(
        "--keys", help="a key folder (ditvla keygen): this robot's NAME.key_secret and server.key"
    )
    robot.add_argument("--key-name", default="robot", help="NAME of this robot's key pair")
    robot.add_argument("--out", default="outputs/robot", help="metrics folder")
    if not configured:
        return
    from ditvla.deploy.controller import ControllerConfig, RunConfig
    from ditvla.deploy.transport import DEFAULT_ADDRESS

    robot.add_argument("--server", default=DEFAULT_ADDRESS, help="the policy server's address")
    add_config_options(robot, ControllerConfig)
    add_config_options(robot, RunConfig)


# ---------------------------------------------------------------------- keygen
def run_keygen(args: argparse.Namespace) -> int:
    from ditvla.deploy.keys import generate_keypair

    secret = generate_keypair(args.folder, args.name, force=args.force)
    print(
        f"wrote {secret} (secret, mode 600) and {secret.with_suffix('.key')} (public). The "
        "server needs server.key_secret and the robots' *.key; a robot needs its own "
        "NAME.key_secret and server.key."
    )
    return 0


def add_keygen(commands: Commands, configured: bool) -> None:
    keygen = add_command(
        commands,
        "keygen",
        run_keygen,
        "write a CURVE key pair for serve/robot",
        "Write FOLDER/NAME.key (public) and FOLDER/NAME.key_secret (mode 600, never through a "
        "link). Make one pair named server and one per robot; give the server its secret "
        "and the robots' public keys, each robot its secret and server.key.",
    )
    keygen.add_argument("folder", help="the key folder")
    keygen.add_argument("--name", default="server", help="the key pair's name: server, robot, ...")
    keygen.add_argument("--force", action="store_true", help="replace an existing key pair")
