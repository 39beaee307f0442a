"""Train the data experts (and the baselines) from the seed, concurrently.

    python jobs/train_experts.py --run-dir runs/demo                 # every expert + baselines
    python jobs/train_experts.py --run-dir runs/demo --experts 0,2 --no-baselines
    python jobs/train_experts.py --run-dir runs/demo --baselines dense  # experts + dense only

One Ray Train run per expert, each from the seed's final checkpoint, at most
train.max_concurrent at once (the rest queue and start as runs finish). A complete run (its
manifest matches the config) is never rerun; an interrupted one resumes from its latest
checkpoint; a failed one does not stop the others and makes the job exit with status 1 after
the rest finish.
"""

import sys

from pipeline import checkpoints, cli, registry
from pipeline.runs import BASELINES, plan


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--experts takes comma-separated expert ids like 0,2; got {text!r}") from None


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--experts", type=_ids, default=None, metavar="0,2",
                   help="only these experts (default: all of the run's experts)")
    p.add_argument("--baselines", default="random-split,dense", metavar="KINDS",
                   help="baselines to train besides the experts, comma-separated (default "
                        "random-split,dense; ignored with --experts)")
    p.add_argument("--no-baselines", dest="baselines", action="store_const", const="",
                   help="skip the random-split and dense baselines")
    args = p.parse_args(argv)
    cfg, run = cli.load(args, write_config=False)
    kinds = [k.strip() for k in args.baselines.split(",") if k.strip()]
    if set(kinds) - set(BASELINES):
        p.error(f"--baselines takes {','.join(BASELINES)} (or a part of it); got {args.baselines!r}")
    baselines = kinds if args.experts is None else []
    jobs = plan(cfg.train, checkpoints.num_experts(run), args.experts, baselines=baselines)
    print(cli.start(cfg, run))
    done, failed = checkpoints.launch(cfg, run, jobs, cfg.train.max_concurrent, force=args.force)
    print(f"finished now: {[e['name'] for e in done]}; failed: {sorted(failed) or 'none'}; "
          f"registry: {registry.uri(run)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
