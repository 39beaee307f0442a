"""Train the data experts (and the baselines) from the seed, concurrently.

    python jobs/train_experts.py --run-dir runs/demo                  # every expert + full-0
    python jobs/train_experts.py --run-dir runs/demo --experts 0,2     # these experts only
    python jobs/train_experts.py --run-dir runs/demo --baselines full,random-split,dense-matched

One Ray Train run per expert, each from the seed's final checkpoint, at most
train.max_concurrent at once (the rest queue and start as runs finish). Baselines
(docs/algorithm.md, "Baselines"): `full-0` is the paper's dense baseline (the seed continued on
all data for one expert's budget) and trains by default; `full` is full-0 .. full-<m-1> (their
average is the paper's Full-m), `random-split` the random split's m parts, `dense-matched` one
run for MoDE's whole budget, `onestep` the experts of the paper's OneStep ablation (their own
clustering, the onestep stage, runs first). A complete run (its manifest matches the config) is
never rerun; an interrupted one resumes from its latest checkpoint; a failed one does not stop
the others and makes the job exit with status 1 after the rest finish.
"""

import sys

from pipeline.core import cli, registry, stages
from pipeline.training import checkpoints
from pipeline.training.runs import DEFAULT_BASELINES


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--experts takes comma-separated expert ids like 0,2; got {text!r}") from None


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--experts", type=_ids, default=None, metavar="0,2",
                   help="only these experts (default: all of the run's experts)")
    p.add_argument("--baselines", default=",".join(DEFAULT_BASELINES), metavar="RUNS",
                   help="baselines to train besides the experts, comma-separated kinds (full, "
                        "random-split, dense-matched) or runs (full-0); default "
                        f"{','.join(DEFAULT_BASELINES)}, the paper's dense baseline; '' for none; "
                        "ignored with --experts")
    p.add_argument("--no-baselines", dest="baselines", action="store_const", const="",
                   help="train no baseline (the same as --baselines '')")
    args = p.parse_args(argv)
    cfg, run = cli.load(args, write_config=False)
    jobs = cli.planned(p, cfg, checkpoints.num_experts(run), args.experts, args.baselines)
    print(cli.start(cfg, run, steps=("runs",), runs=jobs))
    if any(job.kind == "onestep" for job in jobs):
        stages.run_stage("onestep", cfg, run)
    done, failed = checkpoints.launch(cfg, run, jobs, cfg.train.max_concurrent, force=args.force)
    print(f"finished now: {[e['name'] for e in done]}; failed: {sorted(failed) or 'none'}; "
          f"registry: {registry.uri(run)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
