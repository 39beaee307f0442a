"""Faults: how a failure caused by a dead process is told from an error of the work's own
(``died``), and the faults the tests inject, in one place.

``died`` decides what is retried without a human: a training run whose controller, helper
actor or worker group died is relaunched (``pipeline.training.train``), and a data stage whose
Ray process died is run again (``pipeline.core.stages.run_stage``); an error raised by the
code or the data is not, since a retry would fail the same way.

The injected faults kill as SIGKILL would. Production code calls these hooks at the two points
where a real fault matters most; they do nothing unless a test asked for the fault:

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
import re
import signal
from collections.abc import Callable

import ray.exceptions as rx

KILL_BEFORE_MANIFEST_ENV = "MODE_TEST_KILL_BEFORE_MANIFEST"


def died(error: BaseException) -> str | None:
    """What died, when work failed because a Ray process it depended on died: for a training
    run's ``fit``, its Ray Train controller, a helper actor (placement-group cleaner, dataset
    manager, split coordinator), its worker group or their node; for a data stage, an actor or
    task it called, or an object lost with its node. None when the work failed for its own
    reasons (its code or its data raised: a retry would fail the same way).

    Ray reports a death as ``RayActorError`` (``ActorDiedError``, ``ActorUnavailableError``),
    ``WorkerCrashedError``, ``NodeDiedError``, ``LocalRayletDiedError`` or ``ObjectLostError``
    (``OwnerDiedError``, a failed reconstruction), raised directly or wrapped: by a task that
    called the dead process (``RayTaskError``), in a ``ControllerError``, or per worker in a
    ``WorkerGroupError`` (a worker's health check that failed, or its loop's exception, which is
    a death when the loop only passed on one, e.g. from the dataset manager). A
    ``WorkerGroupError`` is a death only when every failed worker's error is one. An exception
    Ray could not deserialize (``UnserializableException``, as Ray Data's parquet footer reader's
    death reaches the driver) is known by the innermost Ray exception its text names.
    """
    from ray.train import ControllerError, WorkerGroupError  # late import: ray.train is heavy

    deaths = (rx.RayActorError, rx.WorkerCrashedError, rx.NodeDiedError, rx.ObjectLostError,
              rx.LocalRayletDiedError)

    def find(e: BaseException | None, depth: int = 0) -> str | None:
        if e is None or depth > 8:
            return None
        if isinstance(e, WorkerGroupError):
            found = [find(f, depth + 1) for f in e.worker_failures.values()]
            return f"its worker group died ({found[0]})" if found and all(found) else None
        if isinstance(e, ControllerError):
            return find(e.controller_failure, depth + 1)
        # Ray Train's wrappers of a worker's exception and of a failed health check are private
        # classes: known by name, and by the attribute that holds what they wrap
        if type(e).__name__ == "UserExceptionWithTraceback":
            return find(getattr(e, "_base_exc", None) or e.__cause__, depth + 1)
        if type(e).__name__ == "WorkerHealthCheckFailedError":
            return find(getattr(e, "health_check_failure", None) or e.__cause__, depth + 1)
        if isinstance(e, rx.RayTaskError):  # before `deaths`: its class also subclasses its cause's
            return find(e.cause, depth + 1)
        if isinstance(e, rx.UnserializableException):
            return _died_as_text(getattr(e, "_original_stack_trace", ""), deaths)
        if isinstance(e, deaths):
            text = str(e).strip()
            what = next((line.strip() for line in text.splitlines() if "class_name" in line), "")
            return f"{type(e).__name__}{': ' + what if what else ''}"
        return find(e.__cause__, depth + 1)

    return find(error)


def _died_as_text(trace: str, deaths: tuple[type, ...]) -> str | None:
    """A death named by the text of an exception (its traceback's innermost ``ray.exceptions.X:``
    line, the task wrappers aside), as ``died`` words it."""
    names = [m.group(1) for m in re.finditer(r"^ray\.exceptions\.(\w+):", trace, re.M)
             if m.group(1) != "RayTaskError"]
    if not names:
        return None
    cls = getattr(rx, names[-1], None)
    if not (isinstance(cls, type) and issubclass(cls, deaths)):
        return None
    what = next((line.strip() for line in trace.splitlines()[::-1] if "class_name" in line), "")
    return f"{names[-1]}{': ' + what if what else ''}"


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
