"""A data stage whose Ray process died is run again by its job, up to ``ray.stage_retries``
times, each retry logged with its cause; an error of the stage's own code or data is raised at
once (pipeline/core/stages.py: ``run_stage``; pipeline/core/faults.py: ``died``)."""

import dataclasses
import os
import signal
import threading
import time

import pytest

from jobs.chaos import targets
from pipeline.core import stages
from pipeline.core.compare import differences
from pipeline.core.config import load_config
from tests.tiny import TINY, copy_run


def _config(*extra: str):
    overrides = [item for item in TINY if item != "--set"]
    return load_config("demo", [*overrides, *extra])


def _kill_first(mark: str, killed: list, stop: threading.Event) -> None:
    """SIGKILL the first process of this test run's Ray whose title holds ``mark`` (a real
    death: no exception, no cleanup)."""
    while not stop.is_set() and not killed:
        for kind in targets(os.getpid()).values():
            for pid, title in kind:
                if mark in title:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(title)
                    return
        time.sleep(0.02)


@pytest.mark.trains     # reads the trained seed's run directory (the `seeded` fixture)
def test_a_stage_whose_footer_reader_died_is_run_again_to_the_same_outputs(seeded, tmp_path):
    """training_data reads the assignments' parquet through Ray Data, whose footer reader is an
    actor of its own; killed, it fails the read (the death reaches the driver only as text).
    The stage is run again and ends with the outputs and counts of the undisturbed run."""
    run = copy_run(seeded, tmp_path / "run")
    cfg = _config()
    lines: list[str] = []
    killed: list[str] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first, args=("FooterReader", killed, stop), daemon=True)
    killer.start()
    try:
        manifest = stages.run_stage("training_data", cfg, run, force=True, log=lines.append)
    finally:
        stop.set()
        killer.join(timeout=5)
    text = "\n".join(lines)
    assert killed, f"no footer reader was seen alive:\n{text}"
    assert "[training_data] retry 1 of 2 (ray.stage_retries): ActorDiedError" in text, text
    assert "FooterReader" in text, text
    assert manifest["rows_in"] == manifest["rows_out"] + sum(manifest["rows_skipped"].values())
    assert differences(run.uri, seeded) == []


@pytest.mark.trains
def test_a_stage_that_fails_for_its_own_reasons_is_not_run_again(seeded, tmp_path, monkeypatch):
    """An error of the stage's code fails the job on its first run, and with
    ``ray.stage_retries=0`` a death fails it too, saying so."""
    import ray

    run = copy_run(seeded, tmp_path / "run")
    calls = []
    stage = stages.stage_of("training_data")

    def broken(*args, **kwargs):
        calls.append(1)
        raise ValueError("a bad row")

    monkeypatch.setitem(stages.STAGES, "training_data", dataclasses.replace(stage, run=broken))
    with pytest.raises(ValueError, match="a bad row"):
        stages.run_stage("training_data", _config(), run, force=True, log=lambda *_: None)
    assert len(calls) == 1

    @ray.remote(num_cpus=0)
    class Helper:
        def pid(self) -> int:
            return os.getpid()

    def dies(*args, **kwargs):
        calls.append(1)
        helper = Helper.remote()
        os.kill(ray.get(helper.pid.remote()), signal.SIGKILL)
        ray.get(helper.pid.remote())    # the helper is dead: ActorDiedError

    monkeypatch.setitem(stages.STAGES, "training_data", dataclasses.replace(stage, run=dies))
    lines: list[str] = []
    calls.clear()
    with pytest.raises(ray.exceptions.RayActorError):
        stages.run_stage("training_data", _config("ray.stage_retries=0"), run, force=True,
                         log=lines.append)
    assert len(calls) == 1
    assert any("after 0 retries (ray.stage_retries): failed" in line for line in lines), lines
