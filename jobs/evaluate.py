"""Evaluate MoDE against every baseline: zero-shot tasks, retrieval, the clustering's confusion
(stage `eval`).

    python jobs/evaluate.py --run-dir demo_out/run                  # the demo world's tasks
    python jobs/evaluate.py --run-dir R --tasks s3://bucket/eval/cifar10 --tasks /data/eval/pets

Tasks are clip_benchmark-format webdataset folders (classnames.txt,
zeroshot_classification_templates.txt, test/*.tar). Without --tasks, a run directory that sits
next to a demo world (<out>/run beside <out>/data, as `make demo` lays it out) is evaluated on
the demo's zero-shot tasks, its held-out retrieval pairs and its true domains. Task images
stream through Ray Data into a pool of scoring actors that hold the run's models (one per CPU
but one, or one per GPU with train.use_gpu); the driver only adds up their per-class counts.
Writes eval/report.json, eval/report.md, PNG plots, eval/clip_benchmark/*.json (clip_benchmark's
result format, per task and method) and eval/_manifest.json into the run directory, and prints
the summary. A rerun with the same runs, tasks and config is skipped.
"""

import sys

from pipeline.core import cli, stages
from pipeline.evaluation import eval as evaluation


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    cli.add_eval_flags(p)
    args = p.parse_args(argv)
    cfg, run = cli.load(args, write_config=False)
    inputs = evaluation.inputs(run.uri, args.tasks, args.retrieval, args.demo_data, cfg.storage)
    if inputs is None:
        p.error("nothing to evaluate: pass --tasks URI (or --retrieval URI), or run next to a "
                "demo world")
    tasks, retrieval, truth = inputs
    print(cli.start(cfg, run, *tasks, retrieval, steps=("eval",)))
    stages.run_stage("eval", cfg, run, force=args.force, tasks=tasks, retrieval=retrieval,
                     truth=truth)
    print()
    print(evaluation.markdown(evaluation.load_report(run)))
    print(f"written: {run.stage_uri('eval')}/report.md, report.json, accuracy.png, routing.png, "
          "sizes.png, clip_benchmark/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
