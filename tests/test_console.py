"""What a job prints (pipeline/core/console.py): its own lines, readable in a file. A whole job's
log is checked in tests/test_multinode.py (the 3-node run's pipeline job, as `ray job logs`
shows it)."""

import pytest

from pipeline.core import console


def test_progress_line_has_rate_and_eta():
    p = console.Progress("embeddings", lambda: 0, 1000, unit="captions", every=60)
    assert p.line(250, 10.0) == "[embeddings] 250/1,000 captions (25%), 25 captions/s, ETA 0m30s"
    assert console.Progress("x", lambda: 0, None).line(50, 10.0) == "[x] 50 rows, 5 rows/s"


def test_raylet_lines_go_to_a_file_and_the_rest_passes(tmp_path, capsys):
    import io

    buffer = io.StringIO()
    filtered = console._RaySideLines(buffer)
    filtered.write("[ingest] read 10 rows\n(raylet) WARNING: 16 PYTHON worker processes\n")
    filtered.write("partial ")
    filtered.write("line\n")
    filtered.attach(str(tmp_path / "mode-driver.out"))
    filtered.write("  (raylet) another\n")
    filtered.flush()
    assert buffer.getvalue() == "[ingest] read 10 rows\npartial line\n"
    assert (tmp_path / "mode-driver.out").read_text() == \
        "(raylet) WARNING: 16 PYTHON worker processes\n  (raylet) another\n"


def test_the_console_actor_outlives_each_use(ray_local):
    """Tallies and relays come and go; the job's console actor stays. A named actor whose last
    handle is dropped is destroyed, and a use during its destruction would get the dying one
    (it failed a CI run with ActorDiedError)."""
    import gc
    import time

    import ray

    ray.get(console._actor().say.remote("kept"))
    tally = console.Tally()
    tally.add({"rows": 2})
    assert tally.get("rows") == 2
    tally.close()
    del tally
    gc.collect()
    time.sleep(2)
    assert ray.get(console._actor().drain.remote()) == ["kept"]
    assert console.Tally().totals() == {}


def test_a_retried_task_counts_once(ray_local):
    """Counts reported with a key (a shard, a batch's keys) replace an earlier report under the
    same key: a task Ray retries after its worker died adds nothing twice."""
    tally = console.Tally()
    tally.add({"rows": 5, "encoded": 4}, key="a|z|5")
    tally.add({"rows": 5, "encoded": 5}, key="a|z|5")    # the retry, on an actor with a colder cache
    tally.add({"rows": 2}, key="b|c|2")
    tally.add({"rows": 1})
    tally.add({"rows": 1})                                # unkeyed counts add up, as before
    assert tally.totals() == {"rows": 9, "encoded": 5}
    tally.close()


def test_a_restarted_console_actor_loses_no_count_unsaid(ray_local):
    """The console actor's process dies (SIGKILL-like: Ray restarts it, empty): adding goes on,
    a progress count reads what the new actor holds, and the totals say they are incomplete."""
    import time

    import ray

    tally = console.Tally()
    tally.add({"rows": 5}, key="a|z|5")
    actor = console._actor()
    ray.kill(actor, no_restart=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:      # until it is back, empty
        try:
            if ray.get(actor.totals.remote(tally._scope)) == (False, {}):
                break
        except ray.exceptions.RayActorError:
            pass
        time.sleep(0.2)
    tally.add({"rows": 2}, key="b|c|2")
    assert tally.get("rows") == 2
    with pytest.raises(console.CountsLost):
        tally.totals()
    fresh = console.Tally()
    fresh.add({"rows": 1})
    assert fresh.totals() == {"rows": 1}
    tally.close()
    fresh.close()


@pytest.mark.parametrize("stage", ["training_data", "embeddings"])
def test_a_stage_whose_console_actor_dies_counts_from_its_data(seeded, tmp_path, monkeypatch, stage):
    """A stage again on a copy of the tiny run, its console actor killed for good (``ray.kill``)
    once the stage has opened its tally: every batch's count is dropped, the stage finishes,
    says its counts are incomplete and counts from its data instead, and its manifest equals
    the undisturbed run's (rows in = out + skipped; training_data: the rows of every run;
    embeddings: only ``captions_encoded``, which the encoders alone know, is unknown)."""
    import ray

    from pipeline.core import stages
    from pipeline.core.config import load_config
    from tests.tiny import copy_run

    run = copy_run(seeded, tmp_path / "run")
    before = run.manifest(stage)
    opened = console.Tally.__init__
    killed = []

    def open_and_kill(self) -> None:
        opened(self)
        if not killed:
            ray.kill(self._actor)
            killed.append(True)

    monkeypatch.setattr(console.Tally, "__init__", open_and_kill)
    lines: list[str] = []
    m = stages.run_stage(stage, load_config(str(tmp_path / "run" / "config.yaml")), run,
                         force=True, log=lines.append)
    assert killed and any("counts are incomplete" in line for line in lines), lines
    assert m["rows_in"] == m["rows_out"] + sum(m["rows_skipped"].values())
    for key in ("rows_in", "rows_out", "rows_skipped"):
        assert m[key] == before[key]
    if stage == "training_data":
        assert m["stats"] == before["stats"]
    else:
        assert m["stats"]["captions_encoded"] is None
        assert {k: v for k, v in m["stats"].items() if v is not None} == \
            {k: v for k, v in before["stats"].items()
             if k not in ("captions_encoded", "duplicate_captions_reused")}
    assert ray.get(console._actor().drain.remote()) is not None    # created again for the job
