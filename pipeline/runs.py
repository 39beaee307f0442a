"""The training runs of a MoDE system: their kinds, names and places on the schedule.

Schedule (all in samples seen, ``train.total_samples`` = T; docs/algorithm.md, "Schedule"):

- ``seed``: all data, from 0 to the seed's end f*T (``schedule.seed_end``);
- ``expert-<e>``: starts from the seed's final checkpoint (model, optimizer, step) and continues
  the same cosine schedule to T on expert e's samples plus a seeded ``train.ooc_ratio`` share of
  the others (MoDE's data experts);
- ``random-split-<e>``: the same, on part e of a seeded random split with the experts' sizes (the
  value of ensembling without the clustering);
- ``dense``: the seed continued on all data for as many samples as the m experts saw together,
  its cosine stretched to end there (the "same training cost" baseline).

Every name is built here, from a kind and an index, and parsed back here: one spelling for the
run's checkpoint folder, its registry entry, its manifest and its report row.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Literal

from pipeline.config import TrainConfig
from pipeline.schedule import dense_end, seed_end

Kind = Literal["seed", "expert", "random-split", "dense"]
KINDS: tuple[Kind, ...] = typing.get_args(Kind)
INDEXED: tuple[Kind, ...] = ("expert", "random-split")


def run_name(kind: Kind, index: int | None = None) -> str:
    """``seed``, ``expert-<e>``, ``random-split-<e>`` or ``dense``."""
    return kind if index is None else f"{kind}-{index}"


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run of the plan."""
    kind: Kind
    index: int | None       # expert or random part index; None for seed and dense
    end_samples: int        # absolute samples_seen at which the run stops
    schedule_total: int     # samples over which its cosine schedule runs
    generation: str | None = None   # the generation that added this expert (docs/growth.md)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown run kind {self.kind!r}; kinds: {list(KINDS)}")
        if (self.index is None) == (self.kind in INDEXED):
            raise ValueError(f"a {self.kind!r} run {'needs' if self.kind in INDEXED else 'takes no'} "
                             f"index, got {self.index!r}")
        if self.generation is not None and self.kind != "expert":
            raise ValueError(f"only experts are added by a generation, not a {self.kind!r} run")

    @property
    def name(self) -> str:
        return run_name(self.kind, self.index)

    @property
    def folder(self) -> str:
        """Where its checkpoints go: ``checkpoints``, or its generation's."""
        return "checkpoints" if self.generation is None else f"generations/{self.generation}/checkpoints"

    @property
    def unit(self) -> str:
        """Its folder and manifest unit in the run directory: ``checkpoints/<name>`` (below
        ``generations/<g>/`` for an expert added later)."""
        return f"{self.folder}/{self.name}"


def parse_name(name: str) -> tuple[Kind, int | None]:
    """The kind and index of a run name (the inverse of ``Job.name``)."""
    for kind in INDEXED:
        prefix = f"{kind}-"
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return kind, int(name[len(prefix):])
    if name in KINDS and name not in INDEXED:
        return typing.cast(Kind, name), None
    raise ValueError(f"not a run name: {name!r} (seed, expert-<e>, random-split-<e>, dense)")


def seed_job(cfg: TrainConfig) -> Job:
    return Job("seed", None, seed_end(cfg), cfg.total_samples)


BASELINES: tuple[Kind, ...] = ("random-split", "dense")


def plan(cfg: TrainConfig, num_experts: int, experts: Sequence[int] | None = None,
         baselines: bool | Sequence[Kind] = True) -> list[Job]:
    """The runs after the seed: the chosen experts, then the baselines (True: both kinds of
    ``BASELINES``; False: none; or the kinds to plan)."""
    chosen = range(num_experts) if experts is None else experts
    for e in chosen:
        if not 0 <= e < num_experts:
            raise ValueError(f"expert {e} does not exist: the run has {num_experts} experts "
                             f"(0..{num_experts - 1})")
    t = cfg.total_samples
    jobs = [Job("expert", e, t, t) for e in chosen]
    kinds = BASELINES if baselines is True else (baselines or ())
    unknown = set(kinds) - set(BASELINES)
    if unknown:
        raise ValueError(f"not a baseline: {sorted(unknown)}; baselines: {list(BASELINES)}")
    if "random-split" in kinds:
        jobs += [Job("random-split", e, t, t) for e in range(num_experts)]
    if "dense" in kinds:
        dense = dense_end(cfg, num_experts)
        jobs.append(Job("dense", None, dense, dense))
    return jobs
