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

Everything that goes through the console actor only reports, so it is best effort: a call that
fails (the actor died, or the driver's call did not answer in ``CALL_TIMEOUT_S``) is dropped and
counted (``dropped``), the driver creates the actor again, and the work goes on. A ``Tally``'s
totals are the one exception: a stage may write them into its manifest, so ``Tally.totals``
raises ``CountsLost`` when the actor that summed them died since the tally opened, and the stage
counts from its data instead (docs/reliability.md).
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
# A console call that waits for its answer in the driver (a progress poll, the relay, the
# watchdog's heartbeats, a tally's totals) gives up after this long: a stuck actor must not hold
# up the job. A tally's totals then say CountsLost.
CALL_TIMEOUT_S = 30.0


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
class CountsLost(RuntimeError):
    """A ``Tally``'s totals are incomplete: the console actor that summed them died (and was
    started again, empty) after the tally opened."""


_dropped: collections.Counter[str] = collections.Counter()


def dropped() -> dict[str, int]:
    """Console calls this process dropped because they failed, by kind (``add``, ``totals``,
    ``drain``, ``beats``, ``beat``, ``say``, ``open``, ``spoil``, ``forget``)."""
    return dict(_dropped)


def _drop(kind: str, error: BaseException) -> None:
    first = not _dropped
    _dropped[kind] += 1
    (log.warning if first else log.debug)(
        "console: a %s call failed (%s: %s); dropped, the work goes on", kind,
        type(error).__name__, str(error).strip().splitlines()[0][:200] if str(error).strip() else "")


# Restarted by Ray when its process dies (its owner, the driver, is alive): the handles that
# tasks and workers hold stay valid. Its state is lost then, which ``Tally.totals`` detects.
@ray.remote(num_cpus=0, max_restarts=-1)
class _Console:
    """One small actor per job: counts that map tasks report (by scope), and lines that code in
    Ray workers sends for the driver to print. One process for every stage's progress and the
    training runs' lines: on a small machine each extra actor is a Python process to start."""

    def __init__(self) -> None:
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.once: dict[str, dict[str, dict[str, int]]] = collections.defaultdict(dict)
        self.opened: set[str] = set()
        self.lines: list[str] = []
        self.steps: dict[str, tuple[int, float]] = {}

    def open(self, scope: str) -> None:
        self.opened.add(scope)

    def spoil(self, scope: str) -> None:
        """Some counts of ``scope`` were dropped: its totals are incomplete."""
        self.opened.discard(scope)

    def add(self, scope: str, counts: dict[str, int], key: str | None = None) -> None:
        if key is None:
            self.counts[scope].update({k: int(v) for k, v in counts.items()})
        else:   # a retried task reports the same key again: its counts replace, not add
            self.once[scope][key] = {k: int(v) for k, v in counts.items()}

    def totals(self, scope: str) -> tuple[bool, dict[str, int]]:
        """(whether this actor saw the scope opened, so holds all of its counts; its totals)."""
        total = collections.Counter(self.counts.get(scope, {}))
        for counts in self.once.get(scope, {}).values():
            total.update(counts)
        return scope in self.opened, dict(total)

    def forget(self, scope: str) -> None:
        self.counts.pop(scope, None)
        self.once.pop(scope, None)
        self.opened.discard(scope)

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


def _actor(renew: bool = False) -> ray.actor.ActorHandle:
    """The job's console actor, created by the first call (in the driver, which owns it).
    ``renew``: after a call to it failed, look it up again, and create it again if it is gone
    for good (``ray.kill`` does not restart an actor)."""
    job = ray.get_runtime_context().get_job_id()
    if renew:
        _handles.pop(job, None)
    if job not in _handles:
        # On the driver's node (the head under `ray job submit`): a lost worker node must not
        # take the job's console with it.
        _handles[job] = _Console.options(name=ACTOR_NAME, get_if_exists=True,
                                         scheduling_strategy=on_this_node()).remote()
    return _handles[job]


def _find() -> ray.actor.ActorHandle | None:
    """In a Ray worker: the job's console actor, if there is one now. Workers never create it:
    an actor is owned by the process that creates it, and a map task's process may go."""
    try:
        return ray.get_actor(ACTOR_NAME)
    except ValueError:
        return None


class Tally:
    """Counts that tasks and actors add, batch by batch, summed in the job's console actor.

    Picklable: hand it to map tasks (``fn_kwargs``); each use gets its own scope. Adding is best
    effort (a failed call is dropped); ``totals`` says whether anything was lost.
    """

    def __init__(self) -> None:
        self._scope, self._owner = uuid.uuid4().hex, os.getpid()
        self._actor = _actor()
        for attempt in range(2):    # a dead actor's handle first: open the tally on a new one
            try:
                ray.get(self._actor.open.remote(self._scope), timeout=CALL_TIMEOUT_S)
                break
            except Exception as e:  # noqa: BLE001 - an unopened tally's totals say CountsLost
                _drop("open", e)
                if attempt == 0:
                    self._actor = _actor(renew=True)

    def _renew(self) -> None:
        if os.getpid() == self._owner:
            self._actor = _actor(renew=True)
        else:
            self._actor = _find() or self._actor

    def add(self, counts: dict[str, int], key: str | None = None) -> None:
        """Add counts and wait until they are in (a batch's counts are not lost with its task).
        With ``key`` (what the counts are of: a shard, a batch's first and last keys) a task
        that Ray retries after its worker died counts once: the same key replaces its counts.
        A failed call (the actor died, or was out of reach) is sent once more when keyed (the
        same key replaces: the counts cannot add up twice), and then dropped: the work goes on,
        and ``totals`` raises ``CountsLost``. No time limit here: a call that timed out could
        still arrive after the stage read its totals, which would be short without saying so."""
        for _ in range(2 if key is not None else 1):
            try:
                ray.get(self._actor.add.remote(self._scope, counts, key))
                return
            except Exception as e:  # noqa: BLE001 - counting must never fail the work it counts
                _drop("add", e)
                self._renew()
        try:    # the actor may be alive (it was out of reach): its totals must not look whole
            ray.get(self._actor.spoil.remote(self._scope), timeout=CALL_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - dead or restarted: it has lost the scope already
            _drop("spoil", e)

    def _read(self) -> tuple[bool, dict[str, int]]:
        try:
            return ray.get(self._actor.totals.remote(self._scope), timeout=CALL_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - said as CountsLost or as a missing progress line
            _drop("totals", e)
            self._renew()
            raise CountsLost(f"the job's console actor did not answer ({type(e).__name__})") from e

    def totals(self) -> dict[str, int]:
        """Every count added, or ``CountsLost`` when some may be missing: the console actor
        died (and so restarted empty) since this tally opened, or does not answer."""
        whole, totals = self._read()
        if not whole:
            raise CountsLost("the job's console actor was restarted while the counts were added")
        return totals

    def get(self, name: str) -> int:
        """One count as far as it goes, for a progress line: after a loss, what the restarted
        actor has been told since; 0 while it does not answer."""
        try:
            return self._read()[1].get(name, 0)
        except CountsLost:
            return 0

    def close(self) -> None:
        try:
            self._actor.forget.remote(self._scope)
        except Exception as e:  # noqa: BLE001 - a scope left behind in a dead actor is gone anyway
            _drop("forget", e)


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
        nonlocal actor
        while True:
            stopping = stop.wait(every)
            try:
                for line in ray.get(actor.drain.remote(), timeout=CALL_TIMEOUT_S):
                    say(line)
            except Exception as e:  # noqa: BLE001 - the console must never fail a run
                _drop("drain", e)
                try:
                    actor = _actor(renew=True)
                except Exception as again:  # noqa: BLE001 - tried again at the next line
                    log.debug("console actor not created again: %s", again)
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
        # None: not under a job's launcher (a direct call of train.train)
        self.actor = _find()
        self.last: ray.ObjectRef | None = None

    def __call__(self, step: int) -> None:
        now = time.monotonic()
        if self.actor is None or now - self.sent < self.every_s:
            return
        self.sent = now
        if self.last is not None and ray.wait([self.last], timeout=0)[0]:
            try:    # the previous beat, long answered: a failure means the actor died for good
                ray.get(self.last)
            except Exception as e:  # noqa: BLE001 - a heartbeat must never fail a run
                _drop("beat", e)
                self.actor = _find() or self.actor
        try:
            self.last = self.actor.beat.remote(self.name, step)
        except Exception as e:  # noqa: BLE001 - as above
            _drop("beat", e)


def beats() -> dict[str, tuple[int, float]]:
    """In the driver: each run's last step and how many seconds ago it was taken (the
    watchdog's input: a failure is the caller's to drop, and the actor is created again)."""
    try:
        return ray.get(_actor().beats.remote(), timeout=CALL_TIMEOUT_S)
    except Exception as e:
        _drop("beats", e)
        _actor(renew=True)
        raise


def say(line: str) -> None:
    """From a Ray worker: a line for the job's console (printed locally when there is none)."""
    actor = _find()
    if actor is None:
        print(line, flush=True)
        return
    try:
        actor.say.remote(line)
    except Exception as e:  # noqa: BLE001 - a log line must never fail the work it reports
        _drop("say", e)
