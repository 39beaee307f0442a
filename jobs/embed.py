"""Embed the caption of every good sample with the clustering encoder (stage `embeddings`), or
import caption embeddings computed elsewhere.

    python jobs/embed.py --run-dir runs/demo
    python jobs/embed.py --run-dir s3://bucket/run --config laion --set embed.num_actors=16
    python jobs/embed.py --run-dir s3://bucket/run --config laion \\
        --from s3://bucket/caption-embeddings/ --set embed.model=<the encoder that made them>

Reads the captions of ingest/samples (run jobs/ingest.py first), embeds them in a Ray Data actor
pool (embed.* in the config) and writes embeddings/*.parquet (key, embedding) and
embeddings/_manifest.json. With --from, nothing is encoded: the parquet files at URI (columns
`key` and `embedding`, one row per caption) become the stage's output, keyed by what ingest
kept; a good sample without a vector, or with a non-finite or zero one, is counted as skipped,
a key ingest did not keep is counted and left out, and vectors are normalised to unit length.
embed.model must name the encoder that made them: evaluation embeds class names with it to
route (docs/stages.md, "Bringing your own embeddings").
"""

import sys

from pipeline.core import cli

FROM = ("--from", "source", "import precomputed caption embeddings (parquet: key, embedding; "
        "a folder or file, local or s3://) instead of encoding the captions")


def main(argv=None) -> int:
    return cli.stage_job(__doc__, "embeddings", argv, data="ingested", inputs=[FROM])


if __name__ == "__main__":
    sys.exit(main())
