"""``ditvla eval --ray HOST:PORT --shards N``: one evaluation's shards as tasks on a Ray cluster.

``--shard I/N`` splits an evaluation across machines and ``ditvla eval merge`` joins the
shards (:mod:`ditvla.envs.evaluation_runs`); here a Ray cluster does both. Each shard is
one Ray task that runs what ``ditvla eval --shard I/N --out OUT/shard_I`` runs
(:func:`~ditvla.envs.evaluate.evaluate_named_policy`), asking for the CPUs of its
``workers`` simulator processes (and a GPU when the policy runs on CUDA). As tasks end,
one line per shard says so; once all have, the shards are merged into OUT by
:func:`~ditvla.envs.evaluation_runs.merge_runs`, as ``ditvla eval merge`` does: the report
one machine would have written for the same episodes.

A shard whose task fails is named with its error once the others have ended, and nothing
is merged; the shards' folders keep what they finished, so the same command with
``--resume`` runs only the episodes that are missing.

What the nodes need: ditvla with the same simulators installed, the same environment
(``MUJOCO_GL=egl``) where their ``ray start`` ran, and the paths the command names — the
policy folder, ``--out``, a ``--rewordings`` file — at the same place on every node and
on the machine that launches (shared storage: NFS or a cluster file system). Nothing is
copied to the nodes: a policy folder can be gigabytes, and OUT is read back here to merge.

Why Ray and not a scheduler of our own: it places tasks by the CPUs and GPUs they ask
for, reruns a task whose node died, and is one ``pip install``; a SLURM job array runs
the same shards without it (docs/simulators.md). Ray is an optional extra
(``pip install 'ditvla[ray]'``), imported only when a run starts.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ditvla.envs.evaluation_report import EvaluationReport
from ditvla.envs.evaluation_runs import (
    check_shard_size,
    claim_folder,
    merge_runs,
    parse_shard,
)
from ditvla.errors import ConfigError, DitvlaError

if TYPE_CHECKING:
    from ditvla.contract import HeadDType
    from ditvla.envs.evaluate import EvalConfig

CONNECT_TIMEOUT_S = 10.0  # Ray's own connection attempt to a silent address takes minutes


class RayUnavailable(DitvlaError, RuntimeError):
    """Ray is not installed, or no Ray cluster answers at the address given."""


class ShardsFailedError(DitvlaError):
    """Shards of an evaluation on Ray whose tasks failed."""


@dataclass(frozen=True)
class RayShardsConfig:
    """Where ``ditvla eval`` runs its shards as Ray tasks.

    Args:
        ray: HOST:PORT of a Ray cluster's head (as `ray start --head` prints it): run the
            evaluation there as --shards tasks, each writing OUT/shard_I, and merge them
            into OUT; the policy folder and OUT must be on storage every node shares.
            Empty: run here.
        shards: how many shards (Ray tasks) the evaluation on --ray is split into; each
            asks for --workers CPUs.
    """

    ray: str = ""
    shards: int = 0

    def __post_init__(self) -> None:
        if self.ray:
            head_address(self.ray)
            if self.shards < 1:
                raise ConfigError(f"--ray runs --shards N tasks, N >= 1; got {self.shards}")
        elif self.shards:
            raise ConfigError(
                "--shards N splits an evaluation over the Ray cluster given by --ray "
                "HOST:PORT; to run one shard here, give --shard I/N"
            )


def head_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> (HOST, PORT); ConfigError for anything else."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            "--ray takes a Ray head's HOST:PORT, as `ray start --head` prints it "
            f"(e.g. 10.0.0.5:6379), got {address!r}"
        )
    return host, int(port)


def _import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise RayUnavailable(
            "--ray needs Ray, an optional extra: pip install 'ditvla[ray]'"
        ) from None
    return ray


def _check_reachable(address: str) -> None:
    """RayUnavailable unless something answers at ``address`` (before Ray's slow attempt)."""
    try:
        socket.create_connection(head_address(address), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RayUnavailable(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
            "`ray start --head` there, or give the head's HOST:PORT"
        ) from None


def _shard_folder(out: Path, index: int) -> Path:
    """Where the Ray run in ``out`` keeps shard ``index``."""
    return out / f"shard_{index}"


def evaluate_on_ray(
    policy: str,
    env_spec: str,
    config: EvalConfig,
    out: Path,
    on_ray: RayShardsConfig,
    *,
    device: str,
    head_dtype: HeadDType,
) -> EvaluationReport:
    """Run the evaluation ``ditvla eval --policy policy --env env_spec`` as
    ``on_ray.shards`` Ray tasks on the cluster at ``on_ray.ray``, shard I in
    ``out/shard_I``, and merge them into ``out``; ShardsFailedError names the shards
    whose tasks failed (then nothing is merged)."""
    from ditvla.envs.evaluate import evaluate_named_policy

    if config.shard:
        raise ConfigError("--ray runs every shard of the evaluation: drop --shard")
    if config.resume:  # each shard resumes its own folder: refused here, not on every node
        first = _shard_folder(Path(out), 0)
        check_shard_size(first, f"0/{on_ray.shards}", config.episodes_per_task)
    ray = _import_ray()
    _check_reachable(on_ray.ray)
    policy, config, out = _absolute_paths(policy, config, out)
    count = on_ray.shards
    folders = [_shard_folder(out, index) for index in range(count)]
    # checked here, once (a task Ray retries resumes its shard), with the merged report's
    for folder in (*folders, out):
        claim_folder(folder, resume=config.resume, overwrite=config.overwrite)
    try:
        ray.init(address=on_ray.ray, log_to_driver=False)
    except (ConnectionError, RuntimeError) as exc:  # another Ray version, a stale head
        raise RayUnavailable(f"cannot join the Ray cluster at {on_ray.ray}: {exc}") from None
    try:
        resources = {"num_cpus": config.workers, "num_gpus": int(device.startswith("cuda"))}
        _warn_if_no_node_fits(ray, resources, config.progress)
        run_shard = ray.remote(evaluate_named_policy).options(**resources)
        tasks = {
            run_shard.remote(
                policy,
                env_spec,
                replace(
                    config, shard=f"{index}/{count}", progress=False, resume=True, overwrite=False
                ),
                folder,
                device=device,
                head_dtype=head_dtype,
            ): f"{index}/{count}"
            for index, folder in enumerate(folders)
        }
        failures = _wait_for_shards(ray, tasks, config.progress)
    finally:
        ray.shutdown()
    if failures:
        raise ShardsFailedError(_failures_line(failures, count, out))
    return merge_runs(folders, out, overwrite=True)  # (out was claimed above)


def _absolute_paths(policy: str, config: EvalConfig, out: Path) -> tuple[str, EvalConfig, Path]:
    """The paths the shards read and write, as absolute paths: a task's working folder on
    a node is not the one the command was given in."""
    from ditvla.envs.baselines import BASELINES

    if policy not in BASELINES:
        policy = str(Path(policy).absolute())
    if config.rewordings:
        config = replace(config, rewordings=str(Path(config.rewordings).absolute()))
    return policy, config, out.absolute()


def _warn_if_no_node_fits(ray: ModuleType, resources: dict[str, int], progress: bool) -> None:
    """Say so when no live node has the CPUs (or GPU) one shard asks for: Ray then keeps
    the tasks waiting for a node that may never join."""
    wanted = {"CPU": resources["num_cpus"], "GPU": resources["num_gpus"]}
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if progress and not any(all(n.get(k, 0) >= v for k, v in wanted.items()) for n in nodes):
        print(
            f"no node of the cluster has the {wanted['CPU']} CPUs"
            f"{' and a GPU' if wanted['GPU'] else ''} a shard asks for (--workers): the "
            "shards wait until such a node joins",
            file=sys.stderr,
            flush=True,
        )


def _wait_for_shards(ray: ModuleType, tasks: dict, progress: bool) -> dict[str, str]:
    """Wait for every task, printing a line as each shard ends; the failed shards' errors
    by shard (``"I/N"``)."""
    failures: dict[str, str] = {}
    pending = list(tasks)
    while pending:
        (done,), pending = ray.wait(pending, num_returns=1)
        shard = tasks[done]
        try:
            report = ray.get(done)
        except ray.exceptions.RayError as exc:
            failures[shard] = _shard_error(ray, exc)
            line = f"shard {shard} failed: {failures[shard]}"
        else:
            wins = sum(e.success for e in report.episodes)
            line = f"shard {shard} done: {wins}/{len(report.episodes)} episodes succeeded"
        if progress:
            finished = len(tasks) - len(pending)
            print(f"{line} ({finished} of {len(tasks)} shards ended)", flush=True)
    return failures


def _shard_error(ray: ModuleType, exc: Exception) -> str:
    """What failed a shard's task, in one line: the error the shard raised (a bug's
    traceback, as it ran on the node, is printed too), or what Ray says (a node died)."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        if not isinstance(cause, DitvlaError | FileNotFoundError):
            print(exc, file=sys.stderr, flush=True)  # the remote traceback
        exc = cause
    return f"{type(exc).__name__}: {_first_line(str(exc))}"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _failures_line(failures: dict[str, str], count: int, out: Path) -> str:
    """One line naming each failed shard (shards failing alike share an entry)."""
    by_error: dict[str, list[str]] = {}
    for shard, error in sorted(failures.items(), key=lambda item: parse_shard(item[0])):
        by_error.setdefault(error, []).append(shard)
    named = "; ".join(
        f"shard{'s' if len(shards) > 1 else ''} {', '.join(shards)}: {error}"
        for error, shards in by_error.items()
    )
    return (
        f"{len(failures)} of {count} shards failed ({named}); what the shards finished is "
        f"kept in {out}/shard_*: the same command with --resume runs only what is missing"
    )
