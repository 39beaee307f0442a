"""Run the whole pipeline on the generated demo world, on a local Ray, offline.

    python jobs/demo.py --out demo_out        # what `make demo` runs

Generates the world under <out>/data (once), then runs every stage into <out>/run and prints
what each stage produced, then the wall time of each part. Complete stages are skipped on rerun.

The world's held-out domain (arrows, <out>/data/new_domain) is added to the run as generation
`arrows` once the seed is trained (what jobs/add_experts.py does): its novel samples make a new
expert, which trains next to the original experts and baselines; the report ends with the
ensemble's accuracy before and after it (docs/growth.md).
"""

import io
import sys
import time

import pandas as pd

from pipeline.clustering import assignments
from pipeline.core import cli, registry, stages
from pipeline.core.console import format_seconds
from pipeline.core.rundir import FOLDERS
from pipeline.core.storage import filesystem, join
from pipeline.data import demo_world
from pipeline.evaluation import eval as evaluation
from pipeline.grow import generations
from pipeline.training import checkpoints
from pipeline.training.runs import plan

NEW = "arrows"      # the generation the demo adds: the world's held-out domain


class Clock:
    """Wall time of each part of the demo, printed at the end (the 15-minute budget)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.parts: list[tuple[str, float]] = []

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.parts.append((part, now - self.last))
        self.last = now

    def summary(self) -> str:
        parts = ", ".join(f"{p} {format_seconds(s)}" for p, s in self.parts)
        return f"demo wall time {format_seconds(time.perf_counter() - self.start)}: {parts}"


def main(argv=None) -> int:
    p = cli.parser(__doc__, run_dir=False)
    p.add_argument("--out", default="demo_out", metavar="URI", help="where data and run go")
    p.add_argument("--skip-training", action="store_true",
                   help="stop after the clustering stages (no seed, experts or baselines)")
    args = p.parse_args(argv)
    args.run_dir = join(args.out, "run")
    cfg, run = cli.load(args, write_config=False)
    clock = Clock()
    data = join(args.out, "data")
    print(cli.start(cfg, run, data))
    fs, path = filesystem(data, cfg.storage)
    if fs.exists(join(path, "world.json")):
        print(f"[data] demo world already at {data}: reused")
    else:
        print(f"[data] generating the demo world at {data}")
        demo_world.generate(data, cfg.demo, cfg.storage)
    clock.lap("world and ray")
    for stage, extra in (("ingest", {"data": join(data, "train")}), ("embeddings", {}),
                         ("clusters", {}), ("assignments", {})):
        stages.run_stage(stage, cfg, run, force=args.force, **extra)
        clock.lap(stage)
    summary = assignments.expert_summary(run)
    if fs.exists(join(path, "truth.parquet")):
        truth = pd.read_parquet(io.BytesIO(fs.cat_file(join(path, "truth.parquet"))))
        summary = summary.merge(_domain_mix(run, truth), on="expert_id", how="left")
    print("\nexperts (what each one is about):")
    print(summary.to_string(index=False))
    print()
    clock.lap("expert table")
    if not args.skip_training:
        stages.run_stage("training_data", cfg, run, force=args.force)
        clock.lap("training data")
        checkpoints.train_seed(cfg, run, force=args.force)
        clock.lap("seed")
        grew, new_jobs = generations.prepare(cfg, run, join(data, "new_domain"), NEW)
        print(f"[add_experts] generation {NEW}: {grew['novel']:,} novel, {grew['familiar']:,} "
              f"familiar samples; {grew['why']}")
        clock.lap("new data (arrows)")
        jobs = plan(cfg.train, checkpoints.num_experts(run)) + new_jobs
        _, failed = checkpoints.launch(cfg, run, jobs, cfg.train.max_concurrent, force=args.force)
        clock.lap("experts, new expert and baselines")
        if failed:
            print(f"failed runs: {failed}")
            return 1
        print(f"\nruns ({registry.uri(run)}):")
        print(_runs_table(registry.entries(run)).to_string(index=False))
        print()
        tasks, retrieval, truth_uri = evaluation.demo_inputs(data, cfg.storage)
        stages.run_stage("eval", cfg, run, force=args.force, tasks=tasks, retrieval=retrieval,
                         truth=truth_uri)
        print()
        print(evaluation.markdown(evaluation.load_report(run)))
        clock.lap("evaluate")
    print(f"\nrun directory: {run.uri}")
    for folder in FOLDERS:
        print(f"  {folder + '/':14s} {run.stage_uri(folder)}")
    print(clock.summary())
    return 0


def _runs_table(entries: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"run": e["name"], "samples": e["samples"],
                          "steps": f"{e['metrics']['start_step']}->{e['metrics']['step']}",
                          "loss": f"{e['metrics']['first_loss']:.3f}->{e['metrics']['final_loss']:.3f}",
                          "seconds": e["wall"]["seconds"]} for e in entries])


def _domain_mix(run, truth: pd.DataFrame) -> pd.DataFrame:
    """The demo world knows each sample's true domain: the share of each domain per expert."""
    a = assignments.read(run).select_columns(["key", "expert_id"]).to_pandas()
    train = truth.loc[truth["split"] == "train", ["key", "domain"]]
    merged = a.merge(train, on="key", how="left")
    share = pd.crosstab(merged["expert_id"], merged["domain"], normalize="index")
    return pd.DataFrame({"expert_id": share.index,
                         "domains": [", ".join(f"{d} {v:.0%}" for d, v in row.sort_values(
                             ascending=False).items() if v >= 0.05) for _, row in share.iterrows()]})


if __name__ == "__main__":
    sys.exit(main())
