"""Validate every image-caption sample and write the run's sample index (stage `ingest`).

    python jobs/ingest.py --run-dir runs/demo --data demo_data/train
    python jobs/ingest.py --run-dir s3://bucket/run --data s3://bucket/shards --config laion

Writes ingest/samples/ (good rows), ingest/skipped/ (bad records with their reason) and
ingest/_manifest.json; a rerun with the same config and data is skipped.
"""

import sys

from pipeline.core import cli


def main(argv=None) -> int:
    return cli.stage_job(__doc__, "ingest", argv, data="shards")


if __name__ == "__main__":
    sys.exit(main())
