"""Export a run's trained experts as a bundle that open_clip loads directly (docs/export.md).

    python jobs/export.py --run-dir demo_out/run --out demo_out/bundle
    python jobs/export.py --run-dir s3://bucket/run --out s3://bucket/bundles/run-1 --baselines

Writes one open_clip ``local-dir:`` folder per finished expert (models/expert-<e>/: config and
safetensors weights), the routing data (routing/: centres, fine-to-expert map, caption encoder,
routing defaults), and manifest.json last (experts, source run, evaluation numbers, size and
SHA-256 of every file). Load it with ``pipeline.evaluation.export.load_bundle``, or one expert
with ``open_clip.create_model_and_transforms("local-dir:<bundle>/models/expert-0")``.
"""

import sys

from pipeline.core import cli
from pipeline.evaluation.export import ExportError, export


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True, metavar="URI",
                   help="where to write the bundle: a local path or a URL (s3://, gs://...)")
    p.add_argument("--baselines", action="store_true",
                   help="also export the run's baseline runs (seed, full-i, random-split-i, "
                        "dense-matched) that have finished")
    args = p.parse_args(argv)
    cfg, run = cli.load(args, write_config=False)     # it only reads the run
    try:
        export(run.uri, args.out, cfg, baselines=args.baselines, force=args.force)
    except ExportError as e:
        raise SystemExit(f"export: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
