"""Write the training data, then train the seed CLIP on all of it (stage `training_data`, run
`checkpoints/seed`).

    python jobs/train_seed.py --run-dir runs/demo

Writes training_data/ (the samples ingest kept, with their images, by expert) once, then trains
the seed for train.seed_fraction of train.total_samples into checkpoints/seed/. Rerunning resumes
from the latest checkpoint; a complete seed (its manifest matches the config) is skipped.
"""

import sys

from pipeline.core import cli, stages
from pipeline.training import checkpoints


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    cli.add_ingested_data_flag(p)
    args = p.parse_args(argv)
    cfg, run = cli.load(args, write_config=False)
    cli.check_ingested_data(p, args, run)
    print(cli.start(cfg, run, steps=("training_data", "seed")))
    stages.run_stage("training_data", cfg, run, force=args.force)
    checkpoints.train_seed(cfg, run, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
