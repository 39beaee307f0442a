"""The whole pipeline in one job: ingest, embed, cluster, assign, training_data, the seed, the
experts and baselines, evaluate (or the parts up to --until).

    python jobs/run_pipeline.py --run-dir s3://bucket/run --data s3://bucket/shards --config laion \\
        --tasks s3://bucket/eval/imagenet
    python jobs/run_pipeline.py --run-dir s3://bucket/run --data s3://bucket/shards --until seed

What jobs/ingest.py, embed.py, cluster.py, assign.py, train_seed.py, train_experts.py and
evaluate.py do one after the other, in one driver: one `ray job submit` for the lot, Ray's
worker processes started once. Each part is skipped when complete, as its own job would skip
it, so a stopped or failed job submitted again goes on where it stopped; embeddings imported
with jobs/embed.py --from stay imported. --tasks and
--retrieval are evaluate.py's (without them, a run directory next to a demo world is evaluated
on the demo's tasks). Exits 1 if a training run failed, after the others finish, without
evaluating.
"""

import sys

from pipeline.core import cli, registry, stages
from pipeline.data import embeddings
from pipeline.evaluation import eval as evaluation
from pipeline.training import checkpoints
from pipeline.training.runs import DEFAULT_BASELINES

PARTS = ("ingest", "embed", "cluster", "assign", "training_data", "seed", "experts", "evaluate")
STAGE = {"ingest": "ingest", "embed": "embeddings", "cluster": "clusters", "assign": "assignments",
         "training_data": "training_data"}


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    cli.add_data_flag(p)
    p.add_argument("--until", choices=PARTS, default=PARTS[-1],
                   help="the last part to run (default: evaluate)")
    p.add_argument("--tasks", action="append", default=[], metavar="URI",
                   help="a clip_benchmark webdataset folder to evaluate on (repeatable)")
    p.add_argument("--retrieval", metavar="URI", help="held-out pairs (jpg + txt) for retrieval")
    p.add_argument("--baselines", default=",".join(DEFAULT_BASELINES), metavar="RUNS",
                   help="baselines to train besides the experts, comma-separated kinds (full, "
                        "random-split, dense-matched) or runs (full-0); default "
                        f"{','.join(DEFAULT_BASELINES)}, the paper's dense baseline; '' for none")
    args = p.parse_args(argv)
    cfg, run = cli.load(args, write_config=False)
    data = cli.data_uri(p, args, cfg)
    parts = PARTS[:PARTS.index(args.until) + 1]
    inputs = None
    if "evaluate" in parts:
        inputs = evaluation.inputs(run.uri, args.tasks, args.retrieval, None, cfg.storage)
        if inputs is None:
            p.error("nothing to evaluate: pass --tasks URI (or --retrieval URI), run next to a "
                    "demo world, or stop earlier with --until experts")
    print(cli.start(cfg, run, data, *(inputs[0] if inputs else ()), inputs and inputs[1]))
    for part in [p for p in parts if p in STAGE]:
        external = {"data": data} if part == "ingest" else {}
        source = embeddings.imported_source(run) if part == "embed" else None
        if source:      # made by jobs/embed.py --from: stays imported
            external["source"] = source
        stages.run_stage(STAGE[part], cfg, run, force=args.force, **external)
    if "seed" in parts:
        checkpoints.train_seed(cfg, run, force=args.force)
    if "experts" in parts:
        jobs = cli.planned(p, cfg, checkpoints.num_experts(run), None, args.baselines)
        done, failed = checkpoints.launch(cfg, run, jobs, cfg.train.max_concurrent, force=args.force)
        print(f"finished now: {[e['name'] for e in done]}; failed: {sorted(failed) or 'none'}; "
              f"registry: {registry.uri(run)}")
        if failed:
            return 1
    if inputs is not None:
        tasks, retrieval, truth = inputs
        stages.run_stage("eval", cfg, run, force=args.force, tasks=tasks, retrieval=retrieval,
                         truth=truth)
        print()
        print(evaluation.markdown(evaluation.load_report(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
