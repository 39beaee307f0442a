"""Assign every embedded sample a fine cluster and an expert (stage `assignments`).

    python jobs/assign.py --run-dir runs/demo

Writes assignments/expert_id=<e>/*.parquet (key, fine_id, expert_id, distance), a size
histogram assignments/_sizes.png and assignments/_manifest.json (rows per expert and per fine
cluster). A rerun replaces the files; it never duplicates rows.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pipeline import assign, cli  # noqa: E402
from pipeline.raycluster import init_ray  # noqa: E402


def main(argv=None) -> int:
    args = cli.parser(__doc__).parse_args(argv)
    cfg, run = cli.load(args)
    print(init_ray(cfg.ray))
    m = assign.run_stage(cfg, run, force=args.force)
    print(json.dumps({"rows": m["rows_out"], "rows_per_expert": m["stats"]["rows_per_expert"],
                      "fine_sizes": m["stats"]["fine_sizes"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
