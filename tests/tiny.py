"""The tiny run the training tests share (fixtures ``seeded`` and ``trained`` in conftest.py)."""

import shutil
from pathlib import Path

from pipeline.core import registry
from pipeline.core.config import load_config
from pipeline.core.rundir import RunDir

# Four experts, as the demo: the world's four known domains (about 125 samples each).
EXPERTS = 4
TINY = ["--set", "cluster.fine_k=8", "--set", f"cluster.num_experts={EXPERTS}", "--set", "cluster.restarts=1",
        "--set", "train.batch_size=32", "--set", "train.total_samples=768",
        "--set", "train.seed_fraction=0.5", "--set", "train.warmup_samples=64",
        "--set", "train.checkpoint_every_steps=4", "--set", "train.log_every_steps=4",
        "--set", "train.cpus_per_worker=0.5", "--set", "train.augment=false",
        "--set", "train.shuffle_buffer=0", "--set", "train.rows_per_file=100",
        "--set", "cluster.rows_per_file=100",
        # sentence-transformers pads a batch to its longest caption: the hostile shards' 2,000-
        # character caption would pad 256 short ones to 256 tokens (72 s of embedding, not 23)
        "--set", "embed.batch_size=32"]


# The baselines the ``trained`` fixture trains: one run of every kind, and two full runs so that
# the report's Full-n row exists (two random parts stand for the split: its parts' sizes are
# checked from the training_data manifest, without training them all).
BASELINES = ["full-0", "full-1", "random-split-0", "random-split-1", "dense-matched"]


def copy_run(src: Path, dst: Path) -> RunDir:
    shutil.copytree(src, dst)
    return RunDir(str(dst), load_config("demo").storage)


def registry_of(run_dir: Path) -> dict:
    """The registry of a local run directory, by run name."""
    return registry.finished(RunDir(str(run_dir), load_config("demo").storage))
