"""Simulator worker processes for the rollout evaluator: one simulator each, over a pipe.

A worker answers ``reset`` / ``step`` / ``close`` commands. An exception in the simulator
is sent back as a :class:`SimulatorError` (the episode fails with the reason; the worker
lives on); a worker that dies or stops answering is the evaluator's to restart. Workers
are spawned (not forked), so that each builds its own simulator and render context.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import OrderedDict
from typing import Any

from ditvla.envs.perturbations import Perturbation
from ditvla.envs.registry import SUITES

WORKER_TIMEOUT_S = 120.0
# Simulators a worker keeps built (the tasks it ran last): episodes come task by task, and
# one LIBERO scene holds about a gigabyte, so keeping every task's would not fit a
# 30-task evaluation in memory.
KEPT_SIMULATORS = 2


class SimulatorError(RuntimeError):
    """The simulator raised during an episode (sent back by the worker, which lives on)."""


def _worker_main(
    conn,
    suite: str,
    cameras: tuple[str, ...],
    image_size: int,
    max_steps: int | None,
    with_expert: bool,
    state_keys: tuple[str, ...] | None,
    perturb: str = "",
) -> None:
    """One simulator process: answers reset/step/close commands over a pipe; its
    simulators apply ``perturb``'s scene axes at every reset."""
    # One thread for whatever computes here. torch is not imported for it: Meta-World never
    # needs it (1.5 s and about 300 MB less per worker); a simulator that imports it later
    # (LIBERO reads its init states with it) reads the variable.
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    envs: OrderedDict[str, Any] = OrderedDict()  # least recently used first
    env: Any = None

    def reply(obs: dict[str, Any], success: bool, truncated: bool) -> None:
        if with_expert and not (success or truncated):
            obs["expert_action"] = env.expert_action()
        conn.send((obs, success, truncated))

    try:
        while True:
            command, args = conn.recv()
            if command == "close":
                break
            try:
                if command == "reset":
                    task, seed, render = args
                    if task not in envs:
                        while len(envs) >= KEPT_SIMULATORS:
                            envs.popitem(last=False)[1].close()
                        made = SUITES[suite].make(
                            task,
                            cameras=cameras,
                            image_size=image_size,
                            max_episode_steps=max_steps,
                            state_keys=state_keys,
                        )
                        try:  # kept only once perturbed as asked
                            made.perturb(Perturbation.parse(perturb))
                        except Exception:
                            made.close()
                            raise
                        envs[task] = made
                    envs.move_to_end(task)
                    env = envs[task]
                    obs, _ = env.reset(seed=seed, options={"skip_images": not render})
                    reply(obs, False, False)
                elif command == "step":
                    action, render = args
                    obs, _, success, truncated, _ = env.step(action, render=render)
                    reply(obs, success, truncated)
            except Exception as exc:  # the episode fails with the reason; the worker lives on
                conn.send(SimulatorError(f"{type(exc).__name__}: {exc}"))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        for e in envs.values():
            e.close()


class SimulatorWorker:
    """A worker process and the parent's end of its pipe; ``args`` are those of
    :func:`_worker_main` after the pipe."""

    def __init__(self, context, *args: Any):
        self._args = args
        self._context = context
        self.start()

    def start(self) -> None:
        self.conn, child = self._context.Pipe()
        self.process = self._context.Process(
            target=_worker_main, args=(child, *self._args), daemon=True
        )
        self.process.start()
        child.close()

    def restart(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.start()

    def request(self, command: str, *args: Any) -> None:
        self.conn.send((command, args))

    def response(self) -> tuple[dict, bool, bool]:
        """(observation, success, truncated); SimulatorError if the simulator raised,
        TimeoutError / EOFError / OSError if the worker is gone."""
        if not self.conn.poll(WORKER_TIMEOUT_S):
            raise TimeoutError(f"simulator worker {self.process.pid} did not answer")
        answer = self.conn.recv()
        if isinstance(answer, SimulatorError):
            raise answer
        return answer

    def close(self) -> None:
        with contextlib.suppress(OSError):  # BrokenPipeError is an OSError
            self.conn.send(("close", ()))
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
