"""Generate the demo world: webdataset shards, zero-shot tasks and a truth table (offline).

    python jobs/make_demo_data.py --out demo_data --samples 10000 --seed 0
    python jobs/make_demo_data.py --out mixed --samples 2000 --seed 5 \
        --web-only "shapes=0.125,digits=0.125,textures=0.125,scenes=0.125,arrows=0.5"

--web-only writes only web shards (and their truth.parquet) over the given domain shares, in
the same shards: new data to try jobs/add_experts.py on (docs/growth.md).
"""

import sys

from pipeline.core import cli
from pipeline.data import demo_world


def main(argv=None) -> int:
    p = cli.parser(__doc__, run_dir=False)
    p.add_argument("--out", required=True, metavar="URI", help="folder or s3:// prefix to write")
    p.add_argument("--samples", type=int, help="training pairs (default: demo.samples)")
    p.add_argument("--seed", type=int, help="world seed (default: demo.seed)")
    p.add_argument("--web-only", metavar="DOMAIN=SHARE,...",
                   help="only web shards over these domains (e.g. shapes=0.5,arrows=0.5)")
    args = p.parse_args(argv)
    if args.samples is not None:
        args.overrides.append(f"demo.samples={args.samples}")
    if args.seed is not None:
        args.overrides.append(f"demo.seed={args.seed}")
    cfg, _ = cli.load(args)
    if args.web_only:
        try:
            shares = {d.strip(): float(v) for d, v in (x.split("=") for x in args.web_only.split(","))}
        except ValueError:
            p.error(f"--web-only takes DOMAIN=SHARE,... (e.g. shapes=0.5,arrows=0.5), got {args.web_only!r}")
        demo_world.generate_web(args.out, cfg.demo, cfg.storage, shares, cfg.demo.seed)
        return 0
    print(f"writing the demo world to {args.out}")
    world = demo_world.generate(args.out, cfg.demo, cfg.storage)
    print(f"done: {world['splits']['train']['pairs']} training pairs, "
          f"{len(world['tasks'])} eval tasks, seed {world['seed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
