"""The launcher starts a run again when a process of the run died (its Ray Train controller, a
helper actor, its worker group), from its newest whole checkpoint, and never after an error of
the run's own (pipeline/core/faults.py: ``died``; pipeline/training/train.py:
``_fit_relaunching``)."""

import glob
import os
import re
import signal
import threading
import time

import pytest
import ray.exceptions as rx
from ray.train import ControllerError, WorkerGroupError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback, WorkerHealthCheckFailedError

from pipeline.core.faults import died
from pipeline.training.train import _fit_relaunching


def _user(e: BaseException) -> UserExceptionWithTraceback:
    return UserExceptionWithTraceback(e, "Traceback ...")


@pytest.mark.parametrize("error, death", [
    (rx.ActorDiedError(), True),                                      # fit's controller died
    (ControllerError(rx.ActorDiedError()), True),                     # a helper of the controller
    (WorkerGroupError("w", {0: WorkerHealthCheckFailedError("hc", rx.ActorDiedError())}), True),
    (WorkerGroupError("w", {0: _user(rx.ActorDiedError())}), True),   # the dataset manager, seen by the loop
    (WorkerGroupError("w", {0: _user(rx.RayTaskError("f", "tb", rx.ActorDiedError())
                                     .as_instanceof_cause())}), True),
    (WorkerGroupError("w", {0: _user(ValueError("bad batch"))}), False),   # the loop's own error
    (WorkerGroupError("w", {0: WorkerHealthCheckFailedError("hc", rx.ActorDiedError()),
                            1: _user(ValueError("bad batch"))}), False),
    (WorkerGroupError("w", {0: _user(rx.RayTaskError("f", "tb", OSError("unreadable"))
                                     .as_instanceof_cause())}), False),  # its data
    (ControllerError(RuntimeError("bad config")), False),
    (rx.ObjectLostError("0" * 56, "owner", "call site"), True),         # its node took an object
    (rx.UnserializableException(                                         # as Ray Data's reader
        "ray.exceptions.RayTaskError: ray::ListFiles()\n  File ...\n"
        "ray.exceptions.ActorDiedError: The actor died unexpectedly.\n\tclass_name: FooterReader"), True),
    (rx.UnserializableException("ray.exceptions.RayTaskError: ray::ListFiles()\n"
                                "ValueError: unreadable footer"), False),
    (ValueError("end_samples is past the schedule's end"), False),
])
def test_deaths_are_told_from_the_runs_own_errors(error, death):
    assert (died(error) is not None) == death


class _Trainer:
    def __init__(self, outcomes: list) -> None:
        self.outcomes = outcomes

    def fit(self):
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def test_a_run_is_relaunched_after_a_death_only_and_at_most_max_relaunches_times(ray_local):
    dead = ControllerError(rx.ActorDiedError())
    outcomes = [dead, dead, "result"]
    built = []

    def build(outcomes=outcomes):
        built.append(1)
        return _Trainer(outcomes)

    assert _fit_relaunching(build, 2, "x", lambda: None) == "result" and len(built) == 3
    built.clear()
    outcomes[:] = [dead, dead, dead]
    with pytest.raises(ControllerError):
        _fit_relaunching(build, 2, "x", lambda: None)
    assert len(built) == 3
    built.clear()
    outcomes[:] = [WorkerGroupError("w", {0: _user(ValueError("bad"))}), "result"]
    with pytest.raises(WorkerGroupError):
        _fit_relaunching(build, 2, "x", lambda: None)
    assert len(built) == 1


def _kill_controller_at_first_checkpoint(run_dir: str, killed: list) -> None:
    """SIGKILL the live Ray Train controller of this test's Ray once the expert has a checkpoint
    on disk (a real process death: no exception, no cleanup)."""
    from ray._private import state

    deadline = time.monotonic() + 300
    while not glob.glob(f"{run_dir}/checkpoints/expert-0/step_*") and time.monotonic() < deadline:
        time.sleep(0.1)
    for actor in state.actors().values():
        if actor["State"] == "ALIVE" and actor["ActorClassName"] == "TrainController":
            os.kill(actor["Pid"], signal.SIGKILL)
            killed.append(actor["Pid"])


@pytest.mark.reliability
def test_a_run_whose_controller_dies_is_relaunched_and_ends_at_its_planned_samples(
        seeded, tmp_path, capsys):
    """One expert of the tiny run, its TrainController killed once the run has a checkpoint:
    the launcher relaunches it (train.max_relaunches), it resumes from that checkpoint, not
    from the seed, and ends at its planned step and samples; the job exits 0."""
    from jobs import train_experts
    from tests.tiny import copy_run, registry_of

    run = copy_run(seeded, tmp_path / "run")
    seed = registry_of(seeded)["seed"]["metrics"]
    killed: list[int] = []
    killer = threading.Thread(target=_kill_controller_at_first_checkpoint, args=(run.uri, killed),
                              daemon=True)
    killer.start()
    assert train_experts.main(["--run-dir", run.uri, "--experts", "0", "--no-baselines"]) == 0
    killer.join(timeout=5)
    out = capsys.readouterr().out
    assert len(killed) == 1, out
    relaunch = re.search(r"\[expert-0\] relaunch 1 of 2 \(train.max_relaunches\): "
                         r"ActorDiedError.*TrainController.*; resuming from step_(\d+)", out)
    assert relaunch, out
    # the relaunched worker group starts at the newest checkpoint, whether or not the controller
    # took in its report before it died (the old worker may have written one more meanwhile)
    resumed = re.search(r"\[expert-0\] (?:resumed from its latest checkpoint: step |"
                        r"resuming from step_0*)(\d+)", out)
    assert resumed, out
    step = int(resumed.group(1))
    assert step >= int(relaunch.group(1)) > seed["step"], out
    entry = registry_of(run.uri)["expert-0"]
    m = entry["metrics"]
    assert (m["start_step"], m["step"]) == (step, 2 * seed["step"]), out
    assert m["samples_seen"] == 2 * seed["samples_seen"], out
    assert entry["restarts"] == 1 and [s["step"] for s in entry["starts"]] == [seed["step"], step], \
        (entry["starts"], out)
    # the dead attempt's placement group was released: nothing of the run holds a CPU
    assert _held_placement_groups() == [], out


def _held_placement_groups() -> list[dict]:
    from ray.util.placement_group import placement_group_table

    return [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]


def test_a_dead_attempts_placement_group_is_released_once(ray_local):
    """What the launcher does before a relaunch: the placement groups a run's starts recorded
    that are still held are removed (Ray Train's own cleaner needs the dashboard's state API,
    which a local Ray lacks); removed ones and starts without one are passed over."""
    import ray
    from ray.util.placement_group import placement_group

    from pipeline.training.train import _release

    group = placement_group([{"CPU": 0.5}])
    ray.get(group.ready())
    starts = [{"placement_group": group.id.hex()}, {"placement_group": None}, {}]
    assert _held_placement_groups() != []
    assert _release(starts) == 1
    assert _held_placement_groups() == []
    assert _release(starts) == 0


def test_a_relaunched_run_resumes_from_checkpoints_ray_train_never_took_in(tmp_path):
    """A controller killed before it took in the run's first report leaves Ray Train with no
    checkpoint to hand the relaunched run: it resumes from the newest whole one in its folder
    all the same, not from its start; a folder with none starts the run as before."""
    import torch

    from pipeline.training.checkpoint_io import step_dir_name, write_dir
    from pipeline.training.train_loop import _own_checkpoints, _resume

    run = tmp_path / "run"
    config = {"run_uri": str(run), "storage": {}, "name": "r"}
    assert not _own_checkpoints(config)
    for step in (20, 40):
        (run / step_dir_name(step)).mkdir(parents=True)
        write_dir(str(run / step_dir_name(step)), {"step": step, "w": torch.ones(10) * step},
                  [{"step": step}])
    assert _own_checkpoints(config)
    state, history, registered = _resume(None, config, rank=1)
    assert state["step"] == 40 and history == [{"step": 40}] and not registered
