"""`ditvla eval --ray`: an evaluation's shards as tasks on a real Ray cluster on this
machine (`ray start --head`, loopback only), merged into the report of one machine."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from subprocess import PIPE

import pytest

from ditvla.cli import main

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ditvla.cli"]
ENV = "metaworld:reach-v3,drawer-close-v3"  # within 60 steps reach succeeds, drawer-close not
RUN = ["--episodes-per-task", "2", "--max-steps", "60", "--videos-per-task", "0"]
RAY_MISSING = "Ray is an optional extra (pip install 'ditvla[ray]'); `make test` installs it"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the cluster's environment (the launcher's too)
RAY_ENV = {
    "PYTHONPATH": str(REPO),  # the workers import the ditvla under test
    "OMP_NUM_THREADS": "1",
    # the node's address is 127.0.0.1, not the machine's network address: nothing of the
    # cluster leaves the loopback (Ray's switch for a laptop's local cluster)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # a worker process has 60 s to start by default, which a loaded 2-core machine misses
    "RAY_worker_register_timeout_seconds": "600",
}
HEAD_START_TRIES = 3  # Ray gives a starting node 30 s, fixed, to register with its head


def _session_processes(session: int) -> list[int]:
    """The live processes of the session ``session`` (the head leads its own: Ray puts
    each worker in a process group of its own, but not in another session)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            state, _, _, sid = stat.read_text().rsplit(")", 1)[1].split()[:4]
            if int(sid) == session and state != "Z":
                pids.append(int(stat.parent.name))
    return pids


def _stop_head(head: subprocess.Popen) -> bool:
    """Stop the head and every process it started (by their session: `ray stop` would
    stop every Ray process of the machine, another user's cluster too); whether they all
    ended by themselves within 90 s (else they are killed)."""
    head.terminate()  # `ray start --block` stops its node's processes on SIGTERM
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=60)
    for _ in range(60):
        if not _session_processes(head.pid):
            return True
        time.sleep(0.5)
    for pid in _session_processes(head.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    head.wait()
    return False


def _start_head(folder: Path) -> tuple[subprocess.Popen, str | None]:
    """`ray start --head --block` on 127.0.0.1 with 2 CPUs, its files in ``folder``; the
    process, and its address once it is up (None if it gave up starting)."""
    port = free_port()
    command = [Path(sys.executable).with_name("ray"), "start", "--head", "--block"]
    command += ["--num-cpus", "2", "--port", str(port), "--temp-dir", str(folder)]
    command += ["--include-dashboard=false", "--disable-usage-stats"]
    # fixed by default (10001, 52365): free ones, beside any other Ray on this machine
    command += ["--ray-client-server-port", str(free_port())]
    command += ["--dashboard-agent-listen-port", str(free_port())]
    log = folder / "head.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            command,
            env={**os.environ, **RAY_ENV},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 300
    while "Ray runtime started" not in log.read_text():
        if head.poll() is not None or time.monotonic() > deadline:
            return head, None
        time.sleep(0.5)
    return head, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def ray_head():
    """The address of a Ray head with 2 CPUs on 127.0.0.1, and the environment to reach
    it with; every process of the cluster is gone after the module's tests."""
    pytest.importorskip("ray", reason=RAY_MISSING)
    for _ in range(HEAD_START_TRIES):
        # Ray's socket paths must fit in 107 bytes: a short folder, not pytest's tmp_path
        folder = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        head, address = _start_head(folder)
        if address is not None:
            break
        log = (folder / "head.log").read_text()
        _stop_head(head)
        shutil.rmtree(folder, ignore_errors=True)
    else:
        raise AssertionError(f"no Ray head started in {HEAD_START_TRIES} tries:\n{log[-3000:]}")
    try:
        yield address, {**os.environ, **RAY_ENV}
    finally:
        ended = _stop_head(head)
        shutil.rmtree(folder, ignore_errors=True)
    assert ended, "Ray processes outlived their head by 30 s (killed)"


def _results(folder: Path):
    summary = json.loads((folder / "results.json").read_text())
    summary.pop("seconds")
    episodes = sorted((folder / "episodes.jsonl").read_text().splitlines())
    return summary, episodes


def test_shards_run_as_ray_tasks_and_merge_into_the_report_of_one_machine(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "ray"
    on_ray = ["eval", "--policy", "expert", "--env", ENV, *RUN, "--workers", "1"]
    on_ray += ["--ray", address, "--shards", "2", "--out", "ray"]  # (the tasks' folder is not this)
    out.mkdir()
    (out / "shard_1").touch()  # a file where shard 1 writes its folder: its task fails
    failing = subprocess.Popen(
        [*CLI, *on_ray], env=env, cwd=tmp_path, stdout=PIPE, stderr=PIPE, text=True
    )
    try:  # meanwhile, the same episodes on this machine alone
        one = ["eval", "--policy", "expert", "--env", ENV, *RUN, "--workers", "1"]
        assert main([*one, "--out", str(tmp_path / "one")]) == 0
        stdout, stderr = failing.communicate(timeout=300)
    finally:
        failing.kill()  # (a no-op once it has ended)
        failing.wait()
    assert failing.returncode == 2, stderr
    assert "shard 0/2 done: 1/2 episodes succeeded" in stdout
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("ditvla: error: 1 of 2 shards failed (shard 1/2: FileExistsError")
    assert "the same command with --resume runs only what is missing" in error
    assert not (out / "results.json").exists()  # nothing merged

    (out / "shard_1").unlink()
    finished = (out / "shard_0" / "episodes.jsonl").read_text().splitlines()
    # shard 0's records in reverse order: a resume keeps them as they are, a rerun would
    # write them in the order its episodes end (one worker: the run's order)
    (out / "shard_0" / "episodes.jsonl").write_text("\n".join(finished[::-1]) + "\n")
    resumed = subprocess.run(
        [*CLI, *on_ray, "--resume"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "(2 of 2 shards ended)" in resumed.stdout
    kept = (out / "shard_0" / "episodes.jsonl").read_text().splitlines()
    assert kept == finished[::-1]  # shard 0 ran no episode again
    assert _results(out) == _results(tmp_path / "one")
    seeds = {(json.loads(line)["task"], json.loads(line)["seed"]) for line in _results(out)[1]}
    assert seeds == {(t, s) for t in ("reach-v3", "drawer-close-v3") for s in (100000, 100001)}


def test_ray_settings_that_cannot_run_are_refused_in_one_line(capsys, monkeypatch):
    args = ["eval", "--policy", "expert", "--env", ENV, *RUN]
    for wrong, reason in [
        (["--ray", "127.0.0.1:6379", "--shards", "0"], "--ray runs --shards N tasks, N >= 1"),
        (["--shards", "2"], "--shards N splits an evaluation over the Ray cluster"),
        (["--ray", "head-node", "--shards", "2"], "--ray takes a Ray head's HOST:PORT"),
        (["--ray", "127.0.0.1:1", "--shards", "2", "--shard", "0/2"], "drop --shard"),
    ]:
        assert main([*args, *wrong]) == 2
        assert reason in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "ray", None)  # as where Ray is not installed
    assert main([*args, "--ray", "127.0.0.1:6379", "--shards", "2"]) == 2
    assert "pip install 'ditvla[ray]'" in capsys.readouterr().err


def test_a_ray_run_resumed_with_other_episodes_per_task_is_refused_before_ray(tmp_path, capsys):
    """Each shard resumes its own folder, and a shard of 3 episodes per task holds other
    episodes than one of 2: refused here, before any node loads the policy."""
    (tmp_path / "ray" / "shard_0").mkdir(parents=True)
    (tmp_path / "ray" / "shard_0" / "run.json").write_text(json.dumps({"episodes_per_task": 3}))
    on_ray = ["eval", "--policy", "expert", "--env", ENV, *RUN, "--resume"]
    on_ray += ["--ray", "127.0.0.1:1", "--shards", "2", "--out", str(tmp_path / "ray")]
    assert main(on_ray) == 2
    assert "resumes only with --episodes-per-task 3" in capsys.readouterr().err


def test_an_address_where_no_cluster_answers_is_refused_at_once(capsys):
    pytest.importorskip("ray", reason=RAY_MISSING)
    nobody = f"127.0.0.1:{free_port()}"
    assert main(["eval", "--policy", "expert", "--env", ENV, "--ray", nobody, "--shards", "2"]) == 2
    assert f"no Ray cluster answers at {nobody} (Connection refused)" in capsys.readouterr().err
