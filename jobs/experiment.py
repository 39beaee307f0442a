"""Train several training seeds of every run on one clustering, evaluate each, and write the
spread and the paired differences (what `make experiment` runs on the demo).

    python jobs/experiment.py --run-dir demo_out/run                # 3 seeds, the demo's tasks
    python jobs/experiment.py --run-dir R --seeds 5 --tasks s3://bucket/eval/cifar10

The run directory needs its data stages up to assignments (jobs/run_pipeline.py --until
assign, `jobs/demo.py --skip-training`, or `make demo`); training_data is made here if missing.
Seed s trains the seed model, every expert and every baseline of the paper's comparison (full-0
.. full-<m-1>, the random split, dense-matched, and OneStep's experts on their own clustering,
the onestep stage, fitted here first) with train.seed = s (the
run's own train.seed, then the next ones; the random split and the out-of-cluster draws stay
fixed by train.data_seed) in experiment/seed-<s>/, which reads the run's data stages; the runs
of the run's own seed are taken from the run where complete. All seeds' runs share one queue
(the seed models first; each seed's other runs, longest first, as soon as its own seed model
has finished; train.max_concurrent at once), so seeds do not wait for each other. Each seed is
then evaluated like jobs/evaluate.py (a task's val/ split chooses the routing), and
experiment/results.md, results.json and seeds.png are written.
Rerunning skips what is complete and resumes interrupted runs; on a cluster it runs like any
other job (`ray job submit`).
"""

import io
import sys

import pandas as pd

from pipeline.clustering import assignments
from pipeline.core import cli, registry, stages
from pipeline.core.storage import filesystem
from pipeline.evaluation import eval as evaluation
from pipeline.evaluation import experiment
from pipeline.training import checkpoints, runs
from pipeline.training.runs import ALL_BASELINES


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--seeds", type=int, default=3, metavar="S",
                   help="training seeds: the run's train.seed and the S-1 after it (default 3)")
    p.add_argument("--baselines", default=",".join(ALL_BASELINES), metavar="RUNS",
                   help="baselines each seed trains besides its experts (jobs/train_experts.py's "
                        f"--baselines; default {','.join(ALL_BASELINES)}: the paper's whole "
                        "comparison and the compute-matched dense)")
    cli.add_eval_flags(p)
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    cfg, run = cli.load(args, write_config=False)
    inputs = evaluation.inputs(run.uri, args.tasks, args.retrieval, args.demo_data, cfg.storage)
    if inputs is None or not inputs[0]:
        p.error("no zero-shot task: pass --tasks URI, or run next to a demo world")
    if run.manifest("assignments") is None:
        p.error(f"{run.stage_uri('assignments')} is not complete: run jobs/run_pipeline.py "
                "--until assign (or `make demo`) first")
    tasks, retrieval, truth = inputs
    print(cli.start(cfg, run, *tasks, retrieval))
    stages.run_stage("training_data", cfg, run)
    seeds = [cfg.train.seed + i for i in range(args.seeds)]
    headline = experiment.headline_tasks(tasks, truth, cfg)
    print(f"\n[experiment] training seeds {', '.join(map(str, seeds))}: "
          f"{run.uri}/experiment/seed-<s>")
    baselines = [b for b in args.baselines.split(",") if b.strip()]
    try:
        planned = runs.plan(cfg.train, checkpoints.num_experts(run), baselines=baselines)
    except ValueError as e:
        p.error(str(e))
    if any(job.kind == "onestep" for job in planned):
        stages.run_stage("onestep", cfg, run)
    reps = experiment.train_seeds(cfg, run, seeds, baselines)
    reports = {}
    for s, (scfg, replica) in reps.items():
        print(f"\n[experiment] evaluating seed {s}: {replica.uri}")
        reports[s] = experiment.evaluate(
            scfg, replica, {"tasks": tasks, "retrieval": retrieval, "truth": truth})
    print()
    summary = experiment.summarise(reports, headline)
    summary["diagnostics"] = experiment.diagnostics(
        reports, registry.finished(run.replica(f"seed-{seeds[0]}")))
    if truth and summary["diagnostics"]:
        fs, path = filesystem(truth, cfg.storage)
        world = pd.read_parquet(io.BytesIO(fs.cat_file(path)))
        if "caption_label" in world.columns:
            assigned = assignments.read(run).select_columns(["key", "expert_id"]).to_pandas()
            summary["diagnostics"]["same_content_negatives"] = experiment.negatives(world, assigned)
    print(experiment.write(run, summary))
    print(f"written: {run.stage_uri('experiment')}/results.md, results.json, seeds.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
