"""The HTTP service (pipeline/serving) against the same ensemble called in-process.

    python bench/bench_serve.py --run-dir demo_out/run [--concurrency 1,4,16] [--requests 200]

Starts a private local Ray and Serve on 127.0.0.1 (loopback only), serves the run's experts
(one Serve application each) and sends POST /classify with the demo's shapes images and labels
from CONCURRENCY client threads, each level bounded by --requests and --seconds. The reference
is ``MoDEEnsemble.zero_shot`` on one image at a time in this process, jobs/predict.py's path,
with as many torch threads as a replica has (--threads), measured in the same run: the table
gives each level's throughput, p50/p99 latency, errors and the throughput ratio to the
reference. Also printed: the application's startup, the time one
more expert application takes to run (what growing the service costs), and each replica's
memory. Numbers depend on the machine's load: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pathlib
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
from benchlib import print_table

ROOT = pathlib.Path(__file__).resolve().parents[1]


def images(n: int) -> list[bytes]:
    from pipeline.data.demo_world import DOMAINS, render

    rng = np.random.default_rng(0)
    labels = DOMAINS["shapes"].classes
    return [render(rng, "shapes", labels[i % len(labels)], 64)[0] for i in range(n)]


def post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return -1


def load(url: str, bodies: list[bytes], concurrency: int, requests: int, seconds: float) -> dict:
    """``requests`` POSTs (at most ``seconds``) from ``concurrency`` threads."""
    lock, lat, errors, sent = threading.Lock(), [], [0], [0]
    deadline = time.monotonic() + seconds

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                if sent[0] >= requests:
                    return
                i = sent[0]
                sent[0] += 1
            t = time.perf_counter()
            code = post(url, bodies[i % len(bodies)])
            dt = time.perf_counter() - t
            with lock:
                lat.append(dt)
                errors[0] += code != 200

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    return {"n": len(lat), "errors": errors[0], "rps": len(lat) / wall,
            "p50": 1e3 * float(np.percentile(lat, 50)), "p99": 1e3 * float(np.percentile(lat, 99))}


def replica_memory() -> dict[str, tuple[float, float]]:
    """(RSS, PSS) in MB of every Serve replica process of this machine's Ray, by process title.
    PSS splits pages shared between processes (torch's libraries) among them: a replica's own
    cost; RSS counts them whole in each."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
            if not title.startswith("ray::ServeReplica:mode"):
                continue
            with open(f"/proc/{entry.name}/smaps_rollup") as f:
                kb = {line.split(":")[0]: int(line.split()[1]) for line in f if line.endswith("kB\n")}
        except OSError:
            continue
        out[title.removeprefix("ray::ServeReplica:")] = (kb["Rss"] / 1024, kb["Pss"] / 1024)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=str(ROOT / "demo_out" / "run"))
    p.add_argument("--concurrency", default="1,4,16", help="client threads per level")
    p.add_argument("--requests", type=int, default=200, help="requests per level (at most)")
    p.add_argument("--seconds", type=float, default=30.0, help="time per level (at most)")
    p.add_argument("--reference", type=int, default=200, help="in-process images")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the reference (1: as each replica, whose OMP_NUM_THREADS "
                        "Ray sets to its whole CPUs, at least 1)")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    if not (pathlib.Path(args.run_dir) / "config.yaml").exists() and "://" not in args.run_dir:
        print(f"bench_serve: skipped, no run directory at {args.run_dir} (make demo, or --run-dir)")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray
    from ray import serve

    from pipeline.data.demo_world import DOMAINS
    from pipeline.data.images import open_rgb
    from pipeline.evaluation.ensemble import MoDEEnsemble
    from pipeline.serving.app import APP_NAME, router
    from pipeline.serving.expert import Expert
    from pipeline.serving.fleet import Source, expert_app
    from pipeline.serving.options import DEFAULT_TEMPLATES, ServeOptions
    from pipeline.training.runs import run_name

    labels = list(DOMAINS["shapes"].classes)
    data = images(64)
    bodies = [json.dumps({"image": base64.b64encode(d).decode(), "labels": labels}).encode() for d in data]

    # The reference: the ensemble in this process, one image per call, as jobs/predict.py.
    import torch

    torch.set_num_threads(args.threads)
    ens = MoDEEnsemble(args.run_dir)
    pil = [open_rgb(d) for d in data]
    ens.zero_shot(pil[:1], labels, list(DEFAULT_TEMPLATES))      # models, heads and routing built
    lat = []
    for i in range(args.reference):
        t = time.perf_counter()
        ens.zero_shot([pil[i % len(pil)]], labels, list(DEFAULT_TEMPLATES))
        lat.append(time.perf_counter() - t)
    ref = {"n": len(lat), "errors": 0, "rps": len(lat) / sum(lat),
           "p50": 1e3 * float(np.percentile(lat, 50)), "p99": 1e3 * float(np.percentile(lat, 99))}

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             object_store_memory=300 * 1024**2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = ServeOptions(router_num_cpus=0.1, expert_num_cpus=0.1, router_max_replicas=1,
                        expert_max_replicas=1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        t = time.perf_counter()
        serve.run(router(Source("run", args.run_dir), opts), name=APP_NAME, route_prefix="/")
        startup = time.perf_counter() - t
        # One more expert application (a copy of expert-0): what a new expert costs to start.
        t = time.perf_counter()
        name = run_name("expert", 0)
        serve.run(Expert.options(**opts.expert_deployment()).bind(
            name, Source("run", args.run_dir).model_spec(ens, name), opts.to_dict()),
            name=expert_app(APP_NAME, "bench-extra"), route_prefix=None)
        one_more = time.perf_counter() - t
        url = f"http://127.0.0.1:{port}/classify"
        for b in bodies[:4]:
            post(url, b)                                               # warm caches
        rows = [("in-process", 1, ref["n"], 0, f"{ref['rps']:.1f}", f"{ref['p50']:.1f}",
                 f"{ref['p99']:.1f}", "1.00")]
        for c in levels:
            r = load(url, bodies, c, args.requests, args.seconds)
            rows.append(("http", c, r["n"], r["errors"], f"{r['rps']:.1f}", f"{r['p50']:.1f}",
                         f"{r['p99']:.1f}", f"{r['rps'] / ref['rps']:.2f}"))
        memory = replica_memory()
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"\nrun {args.run_dir}: {ens.num_experts} experts, {len(labels)} labels, "
          f"{os.cpu_count()} CPUs, reference on {args.threads} torch thread(s); application up in {startup:.1f} s, "
          f"one more expert application in {one_more:.1f} s")
    print_table(("path", "concurrency", "requests", "errors", "req/s", "p50 ms", "p99 ms", "vs in-process"), rows)
    print_table(("replica", "RSS MB", "PSS MB"),
                sorted((k, f"{rss:.0f}", f"{pss:.0f}") for k, (rss, pss) in memory.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
