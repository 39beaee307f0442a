"""Embed the caption of every good sample with the clustering encoder (stage `embeddings`).

    python jobs/embed.py --run-dir runs/demo
    python jobs/embed.py --run-dir s3://bucket/run --config laion --set embed.num_actors=16

Reads the captions of ingest/samples (run jobs/ingest.py first), embeds them in a Ray Data actor
pool (embed.* in the config) and writes embeddings/*.parquet (key, embedding) and
embeddings/_manifest.json.
"""

import sys

from pipeline.core import cli


def main(argv=None) -> int:
    return cli.stage_job(__doc__, "embeddings", argv, data="ingested")


if __name__ == "__main__":
    sys.exit(main())
