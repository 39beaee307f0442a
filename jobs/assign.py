"""Assign every embedded sample a fine cluster and an expert (stage `assignments`).

    python jobs/assign.py --run-dir runs/demo

Writes assignments/expert_id=<e>/*.parquet (key, fine_id, expert_id, distance), a size
histogram assignments/_sizes.png and assignments/_manifest.json (rows per expert and per fine
cluster). A rerun replaces the files; it never duplicates rows.
"""

import sys

from pipeline.core import cli


def main(argv=None) -> int:
    return cli.stage_job(__doc__, "assignments", argv)


if __name__ == "__main__":
    sys.exit(main())
