"""Run the whole pipeline on the generated demo world, on a local Ray, offline.

    python jobs/demo.py --out demo_out        # what `make demo` runs

Generates the world under <out>/data (once), then runs every stage into <out>/run and prints
what each stage produced. Completed stages are skipped on rerun.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pipeline import cli, demo_world, ingest  # noqa: E402
from pipeline.raycluster import init_ray  # noqa: E402
from pipeline.storage import filesystem, join  # noqa: E402


def main(argv=None) -> int:
    p = cli.parser(__doc__, run_dir=False)
    p.add_argument("--out", default="demo_out", metavar="URI", help="where data and run go")
    args = p.parse_args(argv)
    args.run_dir = join(args.out, "run")
    cfg, run = cli.load(args)
    data = join(args.out, "data")
    fs, path = filesystem(data, cfg.storage)
    if fs.exists(join(path, "world.json")):
        print(f"[data] demo world already at {data}: reused")
    else:
        print(f"[data] generating the demo world at {data}")
        demo_world.generate(data, cfg.demo, cfg.storage)
    print(init_ray(cfg.ray))
    m = ingest.run_stage(cfg, run, join(data, "train"), force=args.force)
    print(f"[ingest] {m['rows_in']} samples read, {m['rows_out']} kept, skipped "
          f"{m['rows_skipped']} from {m['stats']['shards']} shards")
    print(f"\nrun directory: {run.uri}")
    for stage in ("ingest",):
        print(f"  {stage + '/':14s} {run.stage_uri(stage)}  (manifest: _manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
