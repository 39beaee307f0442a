"""Generate the demo world: webdataset shards, zero-shot tasks and a truth table (offline).

    python jobs/make_demo_data.py --out demo_data --samples 10000 --seed 0
"""

import sys

from pipeline import cli, demo_world


def main(argv=None) -> int:
    p = cli.parser(__doc__, run_dir=False)
    p.add_argument("--out", required=True, metavar="URI", help="folder or s3:// prefix to write")
    p.add_argument("--samples", type=int, help="training pairs (default: demo.samples)")
    p.add_argument("--seed", type=int, help="world seed (default: demo.seed)")
    args = p.parse_args(argv)
    if args.samples is not None:
        args.overrides.append(f"demo.samples={args.samples}")
    if args.seed is not None:
        args.overrides.append(f"demo.seed={args.seed}")
    cfg, _ = cli.load(args)
    print(f"writing the demo world to {args.out}")
    world = demo_world.generate(args.out, cfg.demo, cfg.storage)
    print(f"done: {world['splits']['train']['pairs']} training pairs, "
          f"{len(world['tasks'])} eval tasks, seed {world['seed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
