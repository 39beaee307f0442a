"""Add data to a trained run and train new data experts on what in it is novel.

    python jobs/add_experts.py --run-dir demo_out/run --data demo_out/data/new_domain
    python jobs/add_experts.py --run-dir s3://bucket/run --data s3://bucket/new --name 2026-12 \
        --new-experts 2

The shards become generation NAME of the run directory (generations/NAME/: its own ingest,
embeddings, novelty, clusters, assignments, training_data and checkpoints; keys namespaced
NAME/). Each new sample goes to the run's nearest fine centre; it is novel when it lies farther
than grow.novelty_quantile of that centre's training samples. Familiar samples are counted by
expert and not trained on. With at least grow.min_novel_rows novel samples, they are clustered
into new fine centres and N new experts (--new-experts N, or auto: the original rows per expert
decide), which train from the seed's checkpoint on the original schedule and join the registry;
fewer, and the job says so and adds no expert. Nothing the run held before is rewritten; the
seed, the existing experts and other jobs training on the same run are not touched, so this
can run while jobs/train_experts.py still trains. Rerunning with the same --data and --name
skips what is complete and resumes interrupted training; --force reruns the generation's
stages and retrains its experts (nothing outside generations/NAME/ is touched). Then rerun jobs/evaluate.py: its report
compares the ensemble before and after. See docs/growth.md.
"""

import sys

from pipeline.core import cli, registry
from pipeline.grow import generations


def _count(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise SystemExit(f"--new-experts takes a positive number or 'auto', got {text!r}")
    return n


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--data", required=True, metavar="URI",
                   help="the new shards: folder, prefix or glob, local or s3://")
    p.add_argument("--name", metavar="NAME",
                   help="the generation's name (default: the last part of --data)")
    p.add_argument("--new-experts", type=_count, default="auto", metavar="N|auto",
                   help="experts to make of the novel samples (default: auto)")
    args = p.parse_args(argv)
    name = args.name or args.data.rstrip("/").rsplit("/", 1)[-1]
    cfg, run = cli.load(args, write_config=False)
    try:
        generations.check(cfg, run, name, args.data)
    except generations.GrowError as e:
        raise SystemExit(f"add_experts: {e}") from None
    print(cli.start(cfg, run, args.data))
    out = generations.add_experts(cfg, run, args.data, name, args.new_experts, force=args.force)
    print(f"[add_experts] generation {name}: {out['novel']:,} novel and {out['familiar']:,} "
          f"familiar samples; {out['why']}")
    if out["familiar"]:
        print(f"[add_experts] familiar samples by nearest expert (counted, not trained on): "
              f"{out['familiar_by_expert']}")
    if out["experts"]:
        print(f"[add_experts] new experts {out['experts']}; failed: {sorted(out['failed']) or 'none'}; "
              f"registry: {registry.uri(run)}; next: jobs/evaluate.py --run-dir {run.uri}")
    return 1 if out["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
