"""The faults the tests inject, in one place: a process killed as SIGKILL leaves it.

Production code calls these hooks at the two points where a real fault matters most; they do
nothing unless a test asked for the fault:

- ``before_manifest(unit)``: a stage's driver dies with every output of the unit written and
  no manifest (the test sets ``KILL_BEFORE_MANIFEST_ENV`` to the unit in the job's environment);
  a rerun must redo the unit (tests/test_killed_jobs.py);
- ``after_step(...)``: a Ray Train worker dies after a step, as the OOM killer or a lost spot
  instance's agent would kill it (``pipeline.training.train.train(crash_at_step=...)``); with
  ``train.max_failures`` Ray Train restarts the worker group from the latest checkpoint
  (tests/test_train.py).

A SIGKILL, not an exception: no cleanup runs, and Ray sees the process die.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

KILL_BEFORE_MANIFEST_ENV = "MODE_TEST_KILL_BEFORE_MANIFEST"


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def before_manifest(unit: str) -> None:
    """Kill this driver if a test asked to kill it before ``unit``'s manifest."""
    if os.environ.get(KILL_BEFORE_MANIFEST_ENV) == unit:
        _kill()


def after_step(step: int, crash_at_step: int | None, resumed: bool, rank: int,
               say: Callable[[str], None]) -> None:
    """Kill this worker after step ``crash_at_step`` of a worker group that did not resume from
    a checkpoint of its own (so its restart goes on), on rank 0 only."""
    if crash_at_step is not None and step == crash_at_step and not resumed and rank == 0:
        say(f"crash_at_step={step}: killing this worker (SIGKILL)")
        _kill()
