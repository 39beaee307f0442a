"""Serve a run's routed experts over HTTP with Ray Serve (docs/serving.md).

    python jobs/serve.py --run-dir demo_out/run                  # http://127.0.0.1:8000
    python jobs/serve.py --bundle demo_out/bundle --port 8080 --option top_k=2

POST /classify {"image": <base64>, "labels": [...], "top_k": optional} answers the labels by
probability and the experts' weights; GET /experts, GET /healthz. With --run-dir, experts that
join the run's registry later (jobs/add_experts.py) are served within --option poll_s seconds,
the running ones untouched. Joins the cluster of ray.address or RAY_ADDRESS, else starts a local
Ray; there every replica reserves --option expert_num_cpus / router_num_cpus 0.1 unless set (one
machine, where a reservation only gates scheduling). Ctrl-C or SIGTERM shuts Serve down.
"""

import os
import signal
import sys
import time

import yaml

from pipeline.core import cli
from pipeline.serving.app import APP_NAME, router
from pipeline.serving.fleet import Source
from pipeline.serving.options import ServeOptions

LOCAL_CPUS = {"expert_num_cpus": 0.1, "router_num_cpus": 0.1}


def main(argv=None) -> int:
    p = cli.parser(__doc__, run_dir=False)
    p.add_argument("--run-dir", metavar="URI", help="a run directory (local path or URL)")
    p.add_argument("--bundle", metavar="URI", help="a bundle written by jobs/export.py, instead")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a serving option (repeatable; docs/serving.md lists them)")
    args = p.parse_args(argv)
    cfg, _ = cli.load(args, write_config=False)     # it only reads the run (ray.* decide where)
    if bool(args.run_dir) == bool(args.bundle):
        p.error("give one of --run-dir and --bundle")
    values = {}
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep:
            p.error(f"--option takes NAME=VALUE, got {item!r}")
        values[name.strip()] = yaml.safe_load(value)
    source = Source("run", args.run_dir) if args.run_dir else Source("bundle", args.bundle)
    local = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    try:
        opts = ServeOptions.from_dict({**(LOCAL_CPUS if local else {}), **values})
        ens = source.ensemble()      # refuses a bad run directory or bundle before Ray starts
    except (ValueError, FileNotFoundError, KeyError) as e:
        p.error(str(e))
    # Ray, and the run directory or bundle that every node must reach (no stage to plan)
    print(f"[serve] {cli.start(cfg, None, args.run_dir or args.bundle, steps=(), runs=[])}")

    from ray import serve

    serve.start(http_options={"host": args.host, "port": args.port})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))   # a container's stop: shut Serve down
    try:
        serve.run(router(source, opts), name=APP_NAME, route_prefix="/")
        print(f"[serve] {ens.num_experts} experts of {source.uri} at http://{args.host}:{args.port}"
              " (POST /classify, GET /experts, GET /healthz); Ctrl-C stops")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] stopping")
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
