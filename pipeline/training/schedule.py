"""The training schedule in samples seen: the learning rate and where the seed stops.

Everything is counted in samples, not steps or epochs, over the whole MoDE budget T
(``train.total_samples``): the seed trains to ``seed_end`` (``train.seed_fraction`` of T) and
each expert continues the same schedule to T on its own data (docs/algorithm.md, "Schedule").
"""

from __future__ import annotations

import math

from pipeline.core.config import TrainConfig


def lr_at(samples_seen: int, peak_lr: float, warmup_samples: int, total_samples: int) -> float:
    """Learning rate of the step that brings the model to ``samples_seen`` samples.

    Linear warmup from 0 to ``peak_lr`` over ``warmup_samples``, then a cosine from ``peak_lr``
    to 0 at ``total_samples`` (and 0 beyond). It depends on nothing but the samples seen, so an
    expert started from the seed's checkpoint continues the seed's schedule exactly.
    """
    if samples_seen < warmup_samples:
        return peak_lr * samples_seen / warmup_samples
    if samples_seen >= total_samples:
        return 0.0
    progress = (samples_seen - warmup_samples) / (total_samples - warmup_samples)
    return 0.5 * peak_lr * (1.0 + math.cos(math.pi * progress))


def seed_end(cfg: TrainConfig) -> int:
    """Samples the seed trains: ``seed_fraction * total_samples`` rounded to whole global batches."""
    return max(1, round(cfg.seed_fraction * cfg.total_samples / cfg.batch_size)) * cfg.batch_size


def dense_end(cfg: TrainConfig, num_experts: int) -> int:
    """Samples the dense baseline ends at: the seed's plus what ``num_experts`` experts see."""
    return seed_end(cfg) + num_experts * (cfg.total_samples - seed_end(cfg))
