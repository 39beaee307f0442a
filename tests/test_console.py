"""What a job prints (pipeline/core/console.py): its own lines, readable in a file. A whole job's
log is checked in tests/test_multinode.py (the 3-node run's pipeline job, as `ray job logs`
shows it)."""

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
