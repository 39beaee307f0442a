"""Embed every good caption with the clustering encoder (stage `embeddings`).

    python jobs/embed.py --run-dir runs/demo --data demo_out/data/train
    python jobs/embed.py --run-dir s3://bucket/run --data s3://bucket/shards --config laion \\
        --set embed.num_actors=16

Reads the shards captions-only, embeds them in a Ray Data actor pool (embed.* in the config)
and writes embeddings/*.parquet (key, embedding) and embeddings/_manifest.json.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pipeline import cli, embed  # noqa: E402
from pipeline.raycluster import init_ray  # noqa: E402


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    cli.add_data_flag(p)
    args = p.parse_args(argv)
    cfg, run = cli.load(args)
    data = cli.data_uri(p, args, cfg)
    print(init_ray(cfg.ray))
    m = embed.run_stage(cfg, run, data, force=args.force)
    print(json.dumps({k: m[k] for k in ("rows_in", "rows_out", "rows_skipped", "stats")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
