"""What a job prints (pipeline/console.py): its own lines, readable in a file."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import console

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[")


@pytest.mark.slow
def test_a_short_pipeline_prints_its_own_lines_once_without_escape_codes(tmp_path):
    """The demo up to the clustering stages, stdout and stderr captured as in `make demo > log
    2>&1`: every stage's summary, no escape code, no line twice, no Ray internals."""
    out = subprocess.run(
        [sys.executable, "jobs/demo.py", "--out", str(tmp_path / "demo"), "--skip-training",
         "--set", "demo.samples=600", "--set", "demo.samples_per_shard=200",
         "--set", "demo.eval_per_class=2", "--set", "demo.new_domain_samples=100",
         "--set", "cluster.fine_k=8", "--set", "cluster.restarts=1"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    lines = [line for line in text.splitlines() if line.strip()]
    for stage in ("ingest", "embeddings", "clusters", "assignments"):
        assert any(line.startswith(f"[{stage}] read ") for line in lines), (stage, text)
    assert not ANSI.search(text)
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, repeated
    assert not [line for line in lines if line.startswith(("(raylet)", "(pid=", "(Map"))]
    assert not [line for line in lines if "logging_progress" in line or "streaming_executor" in line]
    assert len(lines) < 80, text
    session = re.search(r"Ray's logs: (\S+)", text).group(1)
    assert Path(session).is_dir()


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
