"""Train the seed CLIP on all the data (stage `training_data`, then run `seed`).

    python jobs/train_seed.py --run-dir runs/demo --data demo_out/data/train

Writes training_data/ (the validated samples with images, by expert) once, then trains the seed
for train.seed_fraction of train.total_samples into checkpoints/seed/. Rerunning resumes from
the latest checkpoint; a finished seed (listed in experts.json) is skipped.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pipeline import cli, experts, shards  # noqa: E402
from pipeline.raycluster import init_ray  # noqa: E402


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    cli.add_data_flag(p)
    args = p.parse_args(argv)
    cfg, run = cli.load(args)
    data = cli.data_uri(p, args, cfg)
    print(init_ray(cfg.ray))
    m = shards.run_stage(cfg, run, data, force=args.force)
    print(f"[training_data] {m['rows_out']:,} samples by expert {m['stats']['rows_per_expert']}, "
          f"skipped {m['rows_skipped']}")
    experts.train_seed(cfg, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
