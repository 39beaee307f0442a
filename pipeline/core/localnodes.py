"""Ray clusters of several nodes on this machine: for `make chaos-node` (jobs/chaos.py
--node-crash) and the tests that submit jobs to them.

Every node is a `ray start --block` in a process group of its own, started by the test; stopping
a node (or the cluster) kills that group only, never `ray stop`, which would kill every Ray
process on the machine (docs/development.md). Nodes start one at a time: two `ray start` at once
timed out on 2 cores.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def kill_group(proc: subprocess.Popen, grace: float = 3) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session``), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def processes_naming(*texts: str) -> list[int]:
    """Ids of this machine's processes (other than this one) whose command line or environment
    contains one of ``texts``: a cluster's own temp dir names its raylets and agents on their
    command lines, and its token (``RAY_AUTH_TOKEN``) is in the environment of every process
    the cluster started, Ray's workers included (their command lines are just ``ray::...``)."""
    wanted = [t.encode() for t in texts]
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            try:
                data = (entry / part).read_bytes()
            except OSError:     # gone meanwhile, or not ours to read
                continue
            if any(t in data for t in wanted):
                pids.append(int(entry.name))
                break
    return pids


class LocalCluster:
    """A head (no task CPUs unless ``head_cpus``) plus worker nodes, on 127.0.0.1.

    ``env`` is every node's environment, and so every job's: token auth on, this Python's
    ``bin`` first on PATH (the image's Python on a real cluster), plus ``extra_env``.
    """

    def __init__(self, workdir: Path, head_cpus: int = 0, extra_env: dict | None = None,
                 head_args: tuple[str, ...] = (), ports: tuple[int, int, int, int] | None = None):
        """``ports``: GCS, dashboard, client server, dashboard agent (default: free ones), for a
        head whose arguments must name its GCS port (an autoscaling config's provider)."""
        self.workdir = workdir
        self.temp = Path("/tmp") / f"mode-ray-{secrets.token_hex(3)}"  # short: unix socket paths
        self.gcs, self.dash, client, agent = ports or free_ports(4)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    **(extra_env or {})}
        self.address = f"http://127.0.0.1:{self.dash}"
        self.workers: dict[str, subprocess.Popen] = {}
        self._logs = []
        self.head = self._start("head", [
            "--head", "--port", str(self.gcs), "--num-cpus", str(head_cpus),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dash), "--ray-client-server-port", str(client),
            "--dashboard-agent-listen-port", str(agent), "--temp-dir", str(self.temp),
            *head_args])
        self._wait_dashboard()

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")
        self._logs.append(log)
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text()

    def _wait_dashboard(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:  # any answer (401 without our token) means it is up
                return
            except OSError:
                if self.head.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray head did not start:\n{self.log('head')}") from None
                time.sleep(1)

    def add_worker(self, name: str, cpus: float = 1, resources: dict | None = None,
                   timeout: float = 120) -> None:
        """Start worker node ``name`` and wait until the cluster counts it alive."""
        args = ["--address", f"127.0.0.1:{self.gcs}", "--num-cpus", f"{cpus:g}",
                "--node-name", name]
        if resources:
            args += ["--resources", json.dumps(resources)]
        self.workers[name] = self._start(name, args)
        deadline = time.time() + timeout
        while name not in {n.get("node_name") for n in self.alive_nodes()}:
            if self.workers[name].poll() is not None or time.time() > deadline:
                raise RuntimeError(f"worker node {name} did not join:\n{self.log(name)}")
            time.sleep(1)

    def kill_worker(self, name: str) -> None:
        """The node is lost: SIGKILL its whole process group (raylet, workers), no goodbye."""
        kill_group(self.workers.pop(name), grace=0)

    def ray(self, *args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
        """``ray <args>`` against this cluster's dashboard, with its token."""
        out = subprocess.run([RAY, *args], env={**self.env, "RAY_ADDRESS": self.address},
                             capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    def api(self, path: str) -> dict:
        """GET the dashboard's REST API (jobs, state) with the cluster's token: no CLI process
        per poll on 2 cores."""
        req = urllib.request.Request(f"{self.address}{path}",
                                     headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def submit(self, job_id: str, working_dir: Path, *entrypoint: str) -> None:
        """``ray job submit --no-wait`` of ``entrypoint`` with ``working_dir`` shipped."""
        self.ray("job", "submit", "--no-wait", "--submission-id", job_id, "--working-dir",
                 str(working_dir), "--", *entrypoint, check=True)

    def status(self, job_id: str) -> str:
        return self.api(f"/api/jobs/{job_id}")["status"]

    def job_log(self, job_id: str) -> str:
        return self.api(f"/api/jobs/{job_id}/logs")["logs"]

    def wait(self, job_id: str, timeout: float = 480) -> str:
        """The job's status once it ended; past ``timeout`` it is stopped and TimeoutError
        raised with its log."""
        deadline = time.time() + timeout
        while (state := self.status(job_id)) in ("RUNNING", "PENDING"):
            if time.time() > deadline:
                self.ray("job", "stop", job_id)
                raise TimeoutError(f"{job_id} still {state} after {timeout:.0f} s:\n{self.job_log(job_id)}")
            time.sleep(1)
        return state

    def alive_nodes(self) -> list[dict]:
        try:
            nodes = self.api("/api/v0/nodes?detail=1&limit=1000")["data"]["result"]["result"]
        except (OSError, KeyError):     # the state API answers once the head has registered
            return []
        return [n for n in nodes if n["state"] == "ALIVE"]

    def stop(self) -> None:
        for name in list(self.workers):
            kill_group(self.workers.pop(name))
        kill_group(self.head)
        for log in self._logs:
            log.close()
        shutil.rmtree(self.temp, ignore_errors=True)
