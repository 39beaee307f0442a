"""What a job prints: its own lines, a progress line for long work, and Ray's logs kept apart.

By default a job prints what each stage read, kept, skipped and wrote, one progress line with
rate and ETA every ``PROGRESS_EVERY_S`` for long work, and the training runs' log lines. Ray's
own output stays in Ray's log files (``<ray temp dir>/session_latest/logs``): worker output is
not forwarded to the driver, Ray and Ray Data log only errors to the console, and Ray Data's
progress bars show in a terminal only. ``--verbose`` (or ``MODE_LOG_LEVEL=DEBUG``) brings all of
it back (docs/cluster.md, "What a job prints").

Lines from code running in Ray workers (the training loop) reach the job's console through the
job's console actor (``relay``), which also sums the counts behind the progress lines
(``Tally``): worker output itself is not forwarded.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TextIO

import ray
from ray.data import DataContext
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0
ACTOR_NAME = "mode-console"
LEVEL_ENV = "MODE_LOG_LEVEL"


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def is_verbose() -> bool:
    return os.environ.get(LEVEL_ENV, "").upper() == "DEBUG"


CREDENTIAL_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "urllib3")


def setup(verbose: bool = False) -> None:
    """A job's process: our modules log at INFO (DEBUG when verbose), others at WARNING; the
    lines Ray's driver prints on behalf of the raylet go to Ray's log files unless verbose."""
    if verbose:
        os.environ[LEVEL_ENV] = "DEBUG"
    verbose = is_verbose()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    logging.getLogger("pipeline").setLevel(logging.DEBUG if verbose else logging.INFO)
    # Never at DEBUG, even verbose: botocore's and aiobotocore's debug lines print each request's
    # headers, whose Authorization names the access key (tests/test_multinode.py checks job logs).
    for name in CREDENTIAL_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    if not sys.stdout.isatty():
        # Ray colours the prefixes of forwarded lines: no escape codes in a log file.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if not verbose and not isinstance(sys.stdout, _RaySideLines):
        sys.stdout = _RaySideLines(sys.stdout)


def attach_ray_logs(log_dir: str) -> None:
    """Once Ray runs: the raylet's lines set aside by ``setup`` go to ``<log_dir>/mode-driver.out``."""
    if isinstance(sys.stdout, _RaySideLines):
        sys.stdout.attach(os.path.join(log_dir, "mode-driver.out"))


class _RaySideLines(io.TextIOBase):
    """The driver's stdout, minus the raylet's messages (worker-pool size warnings and the like).

    Ray's driver prints what the raylet reports to it, prefixed ``(raylet)``, whatever
    ``log_to_driver`` says; they are Ray's own logs, so they go to a file in Ray's log
    folder instead (kept in memory until ``attach`` names it). Everything else passes through.
    """

    PREFIX = "(raylet)"

    def __init__(self, out: TextIO) -> None:
        self._out, self._lock = out, threading.Lock()
        self._partial = ""
        self._held: list[str] = []
        self._file: TextIO | None = None

    def attach(self, path: str) -> None:
        with self._lock:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as stdout
            self._file.writelines(self._held)
            self._held.clear()
            self._file.flush()

    def write(self, text: str) -> int:
        with self._lock:
            self._partial += text
            while "\n" in self._partial:
                line, self._partial = self._partial.split("\n", 1)
                self._route(line + "\n")
        return len(text)

    def _route(self, line: str) -> None:
        if line.lstrip().startswith(self.PREFIX):
            if self._file is not None:
                self._file.write(line)
                self._file.flush()
            elif len(self._held) < 1000:
                self._held.append(line)
        else:
            self._out.write(line)

    def flush(self) -> None:
        with self._lock:
            if self._partial and not self._partial.lstrip().startswith(self.PREFIX):
                self._out.write(self._partial)
                self._partial = ""
            self._out.flush()

    def isatty(self) -> bool:
        return self._out.isatty()

    def fileno(self) -> int:
        return self._out.fileno()

    @property
    def encoding(self) -> str:
        return self._out.encoding


def quiet_ray_data() -> None:
    """Ray Data in this process: progress bars in a terminal only, its console log to errors
    only unless verbose (its full log stays in Ray's ``logs/ray-data``)."""
    verbose = is_verbose()
    DataContext.get_current().enable_progress_bars = verbose or sys.stderr.isatty()
    if not verbose:
        # Only the console handler streams; Ray's log file keeps everything.
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)


# ----------------------------------------------------------------------------- the job's actor
@ray.remote(num_cpus=0)
class _Console:
    """One small actor per job: counts that map tasks report (by scope), and lines that code in
    Ray workers sends for the driver to print. One process for every stage's progress and the
    training runs' lines: on a small machine each extra actor is a Python process to start."""

    def __init__(self) -> None:
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.once: dict[str, dict[str, dict[str, int]]] = collections.defaultdict(dict)
        self.lines: list[str] = []
        self.steps: dict[str, tuple[int, float]] = {}

    def add(self, scope: str, counts: dict[str, int], key: str | None = None) -> None:
        if key is None:
            self.counts[scope].update({k: int(v) for k, v in counts.items()})
        else:   # a retried task reports the same key again: its counts replace, not add
            self.once[scope][key] = {k: int(v) for k, v in counts.items()}

    def totals(self, scope: str) -> dict[str, int]:
        total = collections.Counter(self.counts.get(scope, {}))
        for counts in self.once.get(scope, {}).values():
            total.update(counts)
        return dict(total)

    def forget(self, scope: str) -> None:
        self.counts.pop(scope, None)
        self.once.pop(scope, None)

    def say(self, line: str) -> None:
        self.lines.append(line)

    def drain(self) -> list[str]:
        out, self.lines = self.lines, []
        return out

    def beat(self, name: str, step: int) -> None:
        self.steps[name] = (step, time.time())

    def beats(self) -> dict[str, tuple[int, float]]:
        now = time.time()   # ages on this actor's clock: the driver's may differ on a cluster
        return {name: (step, now - t) for name, (step, t) in self.steps.items()}


# The handle stays referenced for the whole job: a named actor that loses its last reference is
# destroyed, and one created again under the same name meanwhile would be the dying one.
_handles: dict[str, ray.actor.ActorHandle] = {}


def on_this_node() -> NodeAffinitySchedulingStrategy:
    """Schedule on the caller's node, and nowhere else. For what must outlive the worker nodes
    of a cluster whose workers come and go (spot): the job's console actor and the training
    runs' launcher tasks, whose Ray Train controllers Ray attaches to their node. Under ``ray
    job submit`` that is the driver's node, the head."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _actor() -> ray.actor.ActorHandle:
    job = ray.get_runtime_context().get_job_id()
    if job not in _handles:
        # On the driver's node (the head under `ray job submit`): a lost worker node must not
        # take the job's console with it.
        _handles[job] = _Console.options(name=ACTOR_NAME, get_if_exists=True,
                                         scheduling_strategy=on_this_node()).remote()
    return _handles[job]


class Tally:
    """Counts that tasks and actors add, batch by batch, summed in the job's console actor.

    Picklable: hand it to map tasks (``fn_kwargs``); each use gets its own scope.
    """

    def __init__(self) -> None:
        self._actor, self._scope = _actor(), uuid.uuid4().hex

    def add(self, counts: dict[str, int], key: str | None = None) -> None:
        """Add counts and wait until they are in (a batch's counts are not lost with its task).
        With ``key`` (what the counts are of: a shard, a batch's first and last keys) a task
        that Ray retries after its worker died counts once: the same key replaces its counts."""
        ray.get(self._actor.add.remote(self._scope, counts, key))

    def totals(self) -> dict[str, int]:
        return ray.get(self._actor.totals.remote(self._scope))

    def get(self, name: str) -> int:
        return self.totals().get(name, 0)

    def close(self) -> None:
        self._actor.forget.remote(self._scope)


class Progress:
    """A line every ``every`` seconds while some long work runs: done/total, rate and ETA.

    ``done`` is polled from a background thread (e.g. a ``Tally``'s totals); nothing is printed
    for work that ends before the first interval.
    """

    def __init__(self, label: str, done: Callable[[], int], total: int | None, unit: str = "rows",
                 every: float = PROGRESS_EVERY_S, say: Callable[[str], None] = print) -> None:
        self.label, self.done, self.total, self.unit = label, done, total, unit
        self.every, self.say = every, say
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"progress-{label}")

    def __enter__(self) -> Progress:
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def line(self, done: int, elapsed: float) -> str:
        rate = done / elapsed if elapsed > 0 else 0.0
        text = f"[{self.label}] {done:,}"
        if self.total:
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            text += f"/{self.total:,} {self.unit} ({done / self.total:.0%}), {rate:,.0f} {self.unit}/s, " \
                    f"ETA {format_seconds(max(eta, 0.0))}"
        else:
            text += f" {self.unit}, {rate:,.0f} {self.unit}/s"
        return text

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                done = int(self.done())
            except Exception as e:  # noqa: BLE001 - a progress line must never fail the stage
                log.debug("progress poll failed: %s", e)
                continue
            if done:    # nothing to measure a rate or an ETA from before the first unit is done
                self.say(self.line(done, time.perf_counter() - self._start))


# ----------------------------------------------------------------------------- worker lines
@contextlib.contextmanager
def relay(say: Callable[[str], None] = print, every: float = 1.0) -> Iterator[None]:
    """Print, in this driver, the lines that Ray workers send with ``say`` while the block runs."""
    actor = _actor()
    stop = threading.Event()

    def pump() -> None:
        while True:
            stopping = stop.wait(every)
            try:
                for line in ray.get(actor.drain.remote()):
                    say(line)
            except Exception as e:  # noqa: BLE001 - the console must never fail a run
                log.debug("console relay failed: %s", e)
            if stopping:
                return

    thread = threading.Thread(target=pump, daemon=True, name="console-relay")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


class Heartbeat:
    """From a training worker: its step, sent to the job's console actor without waiting, so
    the launcher can tell a run that trains from one that waits (``beats``). At most one beat
    per ``every_s`` seconds (the first at once): the watchdog counts stalls in minutes, and a
    call per step cost the console actor about 1.5% of a core with two small runs training."""

    def __init__(self, name: str, every_s: float = 2.0) -> None:
        self.name, self.every_s, self.sent = name, every_s, -math.inf
        try:
            self.actor = ray.get_actor(ACTOR_NAME)
        except ValueError:      # not under a job's launcher (a direct call of train.train)
            self.actor = None

    def __call__(self, step: int) -> None:
        now = time.monotonic()
        if self.actor is not None and now - self.sent >= self.every_s:
            self.sent = now
            self.actor.beat.remote(self.name, step)


def beats() -> dict[str, tuple[int, float]]:
    """In the driver: each run's last step and how many seconds ago it was taken."""
    return ray.get(_actor().beats.remote())


def say(line: str) -> None:
    """From a Ray worker: a line for the job's console (printed locally when there is none)."""
    try:
        actor = ray.get_actor(ACTOR_NAME)
    except ValueError:
        print(line, flush=True)
        return
    actor.say.remote(line)
