"""A real `ray start --head` + `ray job submit` round trip (the way clusters run our jobs)."""

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

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head node we own: its own ports, temp dir, token; stopped by killing its process group.
    Its environment holds distinctive random S3 keys, as a node's instance role would provide
    credentials: every job on it inherits them (moto accepts any key)."""
    tmp_path = tmp_path_factory.mktemp("head")
    gcs, dash, client, agent = _free_ports(4)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "AWS_ACCESS_KEY_ID": f"AKIA{secrets.token_hex(8).upper()}",
           "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30), "AWS_EC2_METADATA_DISABLED": "true",
           # the job's `python` must be this environment's, as on a cluster built from our image
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    temp = Path("/tmp") / f"mode-ray-{secrets.token_hex(3)}"  # unix socket paths must stay short
    cmd = [RAY, "start", "--head", "--block", "--port", str(gcs), "--num-cpus", "2",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--temp-dir", str(temp),
           "--disable-usage-stats"]
    log = open(tmp_path / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # any answer (401 without our token) means it is up
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray head did not start:\n{(tmp_path / 'head.log').read_text()}") from None
                time.sleep(1)
        yield address, env
    finally:
        for sig, wait in ((signal.SIGTERM, 8), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_round_trip(ray_head, tiny_world, tmp_path):
    address, env = ray_head
    workdir = tmp_path / "wd"
    for part in ("pipeline", "jobs"):
        shutil.copytree(REPO / part, workdir / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(workdir),
         "--submission-id", "mode-ingest-test", "--",
         "python", "jobs/ingest.py", "--run-dir", str(run_dir), "--data", str(tiny_world / "train")],
        env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    # Inside a job the helper joins the cluster instead of starting a private Ray.
    assert "joined ray cluster" in out.stdout
    manifest = json.loads((run_dir / "ingest" / "_manifest.json").read_text())
    assert manifest["rows_in"] == 600
    assert manifest["rows_in"] == manifest["rows_out"] + sum(manifest["rows_skipped"].values())


@pytest.mark.slow
def test_credentials_appear_in_no_artifact_or_log(ray_head, tiny_world, s3_endpoint, tmp_path):
    """Distinctive random S3 keys in the cluster's environment (the head's, as an instance role
    gives them) appear in none of what a job on S3 writes: manifests, config.yaml, the job's log."""
    import boto3

    address, env = ray_head
    key_id, secret = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for shard in sorted((tiny_world / "train").glob("*.tar")):
        s3.upload_file(str(shard), "mode", f"creds/data/{shard.name}")
    workdir = tmp_path / "wd"
    for part in ("pipeline", "jobs"):
        shutil.copytree(REPO / part, workdir / part, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(workdir),
         "--",
         "python", "jobs/ingest.py", "--run-dir", "s3://mode/creds/run", "--data", "s3://mode/creds/data",
         "--set", f"storage.s3_endpoint_url={s3_endpoint}", "--verbose"],
        env=env, capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    written = {o["Key"]: s3.get_object(Bucket="mode", Key=o["Key"])["Body"].read()
               for o in s3.list_objects_v2(Bucket="mode", Prefix="creds/run/")["Contents"]}
    assert "creds/run/config.yaml" in written and "creds/run/ingest/_manifest.json" in written
    assert json.loads(written["creds/run/ingest/_manifest.json"])["rows_in"] == 600
    for text in (log.encode(), *written.values()):
        for value in (key_id.encode(), secret.encode()):
            at = text.find(value)
            assert at < 0, text[max(0, at - 300):at + 60]
