"""The training runs of a MoDE system: their kinds, names and places on the schedule.

Schedule (all in samples seen, ``train.total_samples`` = T; docs/algorithm.md, "Schedule"):

- ``seed``: all data, from 0 to the seed's end f*T (``schedule.seed_end``);
- ``expert-<e>``: starts from the seed's final checkpoint (model, optimizer, step) and continues
  the same cosine schedule to T on expert e's samples plus a seeded ``train.ooc_ratio`` share of
  the others (MoDE's data experts);
- ``full-<i>``: the same continuation to T, on all data, each in a data order of its own. ``full-0``
  alone is the paper's dense baseline (MetaCLIP: one run of the ordinary length, seed plus one
  expert's budget); ``full-0`` .. ``full-<n-1>`` averaged is the paper's equal-cost control
  Full-n;
- ``random-split-<e>``: the experts' continuation on part e of a seeded random split with the
  experts' sizes (the value of ensembling without the clustering);
- ``dense-matched``: the seed continued on all data for as many samples as the m experts saw
  together, its cosine stretched to end there: MoDE's whole training cost in one model, a
  harder question than the paper asks;
- ``onestep-<e>``: an expert's continuation on cluster e of the paper's OneStep ablation (the
  fine clustering straight to m centres, ``pipeline.clustering.onestep``), with the experts' out-of-cluster
  share.

Every name is built here, from a kind and an index, and parsed back here: one spelling for the
run's checkpoint folder, its registry entry, its manifest and its report row.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Literal

from pipeline.core.config import TrainConfig
from pipeline.training.schedule import dense_end, seed_end

Kind = Literal["seed", "expert", "full", "random-split", "dense-matched", "onestep"]
KINDS: tuple[Kind, ...] = typing.get_args(Kind)
INDEXED: tuple[Kind, ...] = ("expert", "full", "random-split", "onestep")
# Runs that read every partition of training_data/ (a random part or a OneStep cluster is a
# filter over all of it).
ALL_DATA: tuple[Kind, ...] = ("seed", "full", "random-split", "dense-matched", "onestep")


def run_name(kind: Kind, index: int | None = None) -> str:
    """``seed``, ``expert-<e>``, ``full-<i>``, ``random-split-<e>``, ``dense-matched`` or
    ``onestep-<e>``."""
    return kind if index is None else f"{kind}-{index}"


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run of the plan."""
    kind: Kind
    index: int | None       # expert, full run or random part index; None for seed, dense-matched
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

    def order_seed(self, train_seed: int) -> int:
        """The seed of the order in which the run reads its data (the global file order, the
        shuffle buffer, the cached epochs' permutations): ``train.seed`` for the seed model,
        and for every other run an order of its own drawn from it. A continuation then does not
        replay the seed's passes, and the runs Full-n averages, which start from the same seed
        model on the same data, differ in their data order."""
        if self.kind == "seed":
            return train_seed
        return train_seed * 1_009 + 1 + 100 * KINDS.index(self.kind) + (self.index or 0)

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
    raise ValueError(f"not a run name: {name!r} (seed, expert-<e>, full-<i>, random-split-<e>, "
                     "dense-matched, onestep-<e>)")


def seed_job(cfg: TrainConfig) -> Job:
    return Job("seed", None, seed_end(cfg), cfg.total_samples)


BASELINES: tuple[Kind, ...] = ("full", "random-split", "dense-matched", "onestep")
# What a run trains besides its experts unless told otherwise: the paper's dense baseline.
DEFAULT_BASELINES = ("full-0",)
# Everything the paper's comparison and its extra questions need (``make experiment``; the
# OneStep runs need their own clustering, the ``onestep`` stage).
ALL_BASELINES = BASELINES


def baseline_names(spec: Sequence[str], num_experts: int) -> list[str]:
    """The run names a baseline spec stands for: a kind of ``BASELINES`` (an indexed kind
    means one run per expert, ``full`` is ``full-0`` .. ``full-<m-1>``) or one run's name
    (``full-0``); in ``BASELINES`` order, each once."""
    names: list[str] = []
    for item in spec:
        item = item.strip()
        if item in BASELINES:
            names += [run_name(item, i) for i in range(num_experts)] if item in INDEXED else [item]
            continue
        try:
            kind, index = parse_name(item)
        except ValueError:
            kind, index = None, None
        if kind not in BASELINES:
            raise ValueError(f"not a baseline: {item!r}; baselines: {list(BASELINES)} or one "
                             f"run of them, like full-0")
        if index is not None and not 0 <= index < num_experts:
            raise ValueError(f"{item}: the run has {num_experts} experts, so {kind} runs "
                             f"{kind}-0..{kind}-{num_experts - 1}")
        names.append(item)
    order = {kind: i for i, kind in enumerate(BASELINES)}
    unique = dict.fromkeys(names)
    return sorted(unique, key=lambda n: (order[parse_name(n)[0]], parse_name(n)[1] or 0))


def plan(cfg: TrainConfig, num_experts: int, experts: Sequence[int] | None = None,
         baselines: Sequence[str] = DEFAULT_BASELINES) -> list[Job]:
    """The runs after the seed: the chosen experts, then the baselines (``baseline_names``;
    empty for none)."""
    chosen = range(num_experts) if experts is None else experts
    for e in chosen:
        if not 0 <= e < num_experts:
            raise ValueError(f"expert {e} does not exist: the run has {num_experts} experts "
                             f"(0..{num_experts - 1})")
    t = cfg.total_samples
    jobs = [Job("expert", e, t, t) for e in chosen]
    for name in baseline_names(baselines, num_experts):
        kind, index = parse_name(name)
        if kind == "dense-matched":
            dense = dense_end(cfg, num_experts)
            jobs.append(Job(kind, None, dense, dense))
        else:
            jobs.append(Job(kind, index, t, t))
    return jobs
