"""Validate every image-caption sample and write the run's sample index (stage `ingest`).

    python jobs/ingest.py --run-dir runs/demo --data demo_data/train
    python jobs/ingest.py --run-dir s3://bucket/run --data s3://bucket/shards --config laion

Writes ingest/samples/ (good rows), ingest/skipped/ (bad records with their reason) and
ingest/_manifest.json; a rerun with the same config and data is skipped.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pipeline import cli, ingest  # noqa: E402
from pipeline.raycluster import init_ray  # noqa: E402


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    cli.add_data_flag(p)
    args = p.parse_args(argv)
    cfg, run = cli.load(args)
    data = cli.data_uri(p, args, cfg)
    print(init_ray(cfg.ray))
    manifest = ingest.run_stage(cfg, run, data, force=args.force)
    print(json.dumps({k: manifest[k] for k in ("rows_in", "rows_out", "rows_skipped")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
