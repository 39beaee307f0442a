"""The stage graph, declared once, and the one wrapper that runs any stage (docs/stages.md).

Every stage has a name, which is also its folder in the run directory and (before any ``/``) the
name of its module (``pipeline/<package>/<name>.py``); the function that does its work; the
stages it reads; the config ``fields`` that decide its output; the ``knobs`` it reads that do not
(resources, file sizes); its ``external`` inputs (URIs outside the run directory); and the job
that runs it. The training runs are units below ``checkpoints/`` (``checkpoints/seed``,
``checkpoints/expert-<e>``, ...), one row per kind of run, all launched by
``pipeline/training/checkpoints.py``.

A unit's hash covers its declared fields, the hashes of the units it reads and its external
inputs, nothing else; its config is a ``ConfigView`` of those fields and knobs only, so reading
an undeclared field fails. ``StageRun`` does what every stage needs before and after its own
work: the upstream manifests exist and match the current config, the hash, skip when complete,
mark incomplete, and the manifest whose counts must add up.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.clustering import assignments, clusters, onestep
from pipeline.core import faults, registry
from pipeline.core.config import Config, ConfigView, field_names
from pipeline.core.rundir import RunDir, StageOutput, now
from pipeline.data import embeddings, ingest, training_data
from pipeline.evaluation import eval as evaluation
from pipeline.grow import growth
from pipeline.training.runs import ALL_BASELINES, parse_name, plan, seed_job

Log = Callable[[str], None]

DATA_FIELDS = ("data.format", "data.caption_column", "data.image_column", "data.key_column",
               "data.max_caption_chars", "data.max_image_pixels")
# What decides a trained model: architecture, optimiser, schedule, data order and precision.
TRAIN_FIELDS = ("train.model", "train.batch_size", "train.lr", "train.total_samples",
                "train.seed_fraction", "train.warmup_samples", "train.weight_decay", "train.seed",
                "train.precision", "train.augment", "train.shuffle_buffer", "train.cache_inputs")
# How a run uses the cluster and its devices: none changes the model it trains beyond float
# rounding (accumulation included: docs/training.md).
TRAIN_KNOBS = ("train.checkpoint_every_steps", "train.keep_checkpoints", "train.log_every_steps",
               "train.num_workers", "train.use_gpu", "train.cpus_per_worker",
               "train.threads_per_worker", "train.max_failures", "train.max_relaunches",
               "train.decode_in_worker",
               "train.data_cpus", "train.worker_resources", "train.stall_warning_s",
               "train.prefetch_batches", "train.compile", "train.channels_last",
               "train.grad_checkpointing", "train.accum_steps")
CLUSTER_FIT_FIELDS = ("cluster.fine_k", "cluster.num_experts", "cluster.balanced",
                      "cluster.capacity_slack", "cluster.iterations", "cluster.sample_per_centre",
                      "cluster.seed", "cluster.restarts", "cluster.fit_block_rows",
                      "cluster.balanced_coarse", "cluster.coarse_restarts")
ALL_RUNS = "checkpoints/*"


# The training runs' rows have no function of their own: this module launches them.
LAUNCHER = "pipeline.training.checkpoints"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str                       # run-directory folder (and, before any "/", its module's name)
    reads: tuple[str, ...]          # units whose manifests it needs; "checkpoints/*": every run
    fields: tuple[str, ...]         # config fields that decide its output (hashed)
    knobs: tuple[str, ...]          # config fields it reads that do not (not hashed)
    external: tuple[str, ...]       # inputs from outside the run directory, by keyword
    output: str                     # what it writes (docs/stages.md's table)
    job: str                        # the job that runs it
    # run(cfg, run, upstream, log, **external): the stage's own work; None for a training run,
    # which pipeline.training.checkpoints launches
    run: Callable[..., StageOutput] | None = None
    # check(cfg, run, upstream, **external): refuses bad external input before the unit's
    # manifest is dropped, so a refused rerun leaves the complete output it had
    check: Callable[..., None] | None = None

    @property
    def module(self) -> str:
        """The module that does the stage's work (dotted)."""
        return self.run.__module__ if self.run is not None else LAUNCHER


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("ingest", (), DATA_FIELDS, (), ("data",),
          "samples/ (key, caption, shard, pos of every good row), skipped/ (key, shard, pos, reason, detail)",
          "jobs/ingest.py", run=ingest.run),
    Stage("embeddings", ("ingest",), ("embed.model",),
          ("embed.batch_size", "embed.rows_per_call", "embed.num_actors", "embed.num_gpus_per_actor",
           "embed.num_cpus_per_actor", "embed.actor_resources", "embed.cache_size",
           "embed.rows_per_file"), ("source",),
          "key, unit-norm caption embedding", "jobs/embed.py", run=embeddings.run,
          check=embeddings.check_source),
    Stage("clusters", ("embeddings",), CLUSTER_FIT_FIELDS, (), (),
          "fine and coarse centroids, fine-to-expert map", "jobs/cluster.py", run=clusters.run),
    Stage("assignments", ("embeddings", "clusters"),
          ("cluster.balanced", "cluster.capacity_slack", "cluster.block_rows"),
          ("cluster.rows_per_file",), (),
          "key, fine_id, distance by expert_id; size plot", "jobs/assign.py", run=assignments.run),
    Stage("training_data", ("ingest", "assignments"), (*DATA_FIELDS, "train.data_seed"),
          ("train.ooc_ratio", "train.rows_per_file"), (),
          "key, caption, image, fine_id, random_id by expert_id", "jobs/train_seed.py",
          run=training_data.run),
    Stage("onestep", ("embeddings",),
          (*(f for f in CLUSTER_FIT_FIELDS if f != "cluster.fine_k"), "cluster.block_rows"),
          ("cluster.rows_per_file",), (),
          "OneStep ablation: m centres fitted on the embeddings directly; key, distance by expert_id",
          "jobs/experiment.py", run=onestep.run),
    Stage("checkpoints/seed", ("training_data",), TRAIN_FIELDS, TRAIN_KNOBS, (),
          "checkpoints of `seed`", "jobs/train_seed.py"),
    Stage("checkpoints/expert", ("training_data", "clusters", "checkpoints/seed"),
          (*TRAIN_FIELDS, "train.ooc_ratio", "train.data_seed"), TRAIN_KNOBS, (),
          "checkpoints of `expert-<e>`", "jobs/train_experts.py"),
    Stage("checkpoints/full", ("training_data", "checkpoints/seed"), TRAIN_FIELDS, TRAIN_KNOBS,
          (), "checkpoints of `full-<i>`", "jobs/train_experts.py"),
    Stage("checkpoints/random-split", ("training_data", "checkpoints/seed"), TRAIN_FIELDS,
          TRAIN_KNOBS, (), "checkpoints of `random-split-<e>`", "jobs/train_experts.py"),
    Stage("checkpoints/dense-matched", ("training_data", "checkpoints/seed"), TRAIN_FIELDS,
          TRAIN_KNOBS, (), "checkpoints of `dense-matched`", "jobs/train_experts.py"),
    Stage("checkpoints/onestep", ("training_data", "onestep", "checkpoints/seed"),
          (*TRAIN_FIELDS, "train.ooc_ratio", "train.data_seed"), TRAIN_KNOBS, (),
          "checkpoints of `onestep-<e>`", "jobs/experiment.py"),
    Stage("eval", ("clusters", "assignments", ALL_RUNS), ("embed.model",),
          ("embed.batch_size", "train.use_gpu"), ("tasks", "retrieval", "truth"),
          "report.json, report.md, plots, clip_benchmark/*.json", "jobs/evaluate.py",
          run=evaluation.run),
)}


# A generation (data added later, docs/growth.md) is a run directory of its own below
# ``generations/<g>/``. Its units are named from the root (``generations/<g>/ingest``) so that a
# manifest's inputs always name units of one directory; ``{gen}`` below is that prefix, and a
# read without it is a unit of the original run.
GROW_FIELDS = ("grow.novelty_quantile", "grow.min_rows_per_centre", "grow.min_novel_rows")
GENERATION_STAGES: dict[str, Stage] = {s.name: s for s in (
    dataclasses.replace(STAGES["ingest"], external=("data", "key_prefix"), job="jobs/add_experts.py"),
    dataclasses.replace(STAGES["embeddings"], reads=("{gen}ingest",), job="jobs/add_experts.py"),
    Stage("novelty", ("{gen}embeddings", "clusters", "embeddings"),
          ("grow.novelty_quantile", "grow.min_rows_per_centre"), ("cluster.block_rows",), (),
          "key, nearest frozen fine_id, distance, threshold, novel, expert_id",
          "jobs/add_experts.py", run=growth.novelty),
    Stage("clusters", ("{gen}novelty", "clusters", "assignments"),
          (*CLUSTER_FIT_FIELDS, "grow.min_novel_rows"), (), ("new_experts",),
          "fine and coarse centroids of the novel samples, their expert ids",
          "jobs/add_experts.py", run=growth.new_clusters),
    Stage("assignments", ("{gen}embeddings", "{gen}novelty", "{gen}clusters"),
          ("cluster.balanced", "cluster.capacity_slack", "cluster.block_rows"),
          ("cluster.rows_per_file",), (), "novel samples: key, fine_id, distance by expert_id",
          "jobs/add_experts.py", run=growth.new_assignments),
    dataclasses.replace(STAGES["training_data"], reads=("{gen}ingest", "{gen}assignments"),
                        job="jobs/add_experts.py"),
    dataclasses.replace(STAGES["checkpoints/expert"],
                        reads=("{gen}training_data", "{gen}clusters", "training_data",
                               "checkpoints/seed"),
                        job="jobs/add_experts.py"),
)}


def generation_of(unit: str) -> tuple[str | None, str]:
    """(generation, unit inside it) of a unit: ``generations/g/ingest`` -> ("g", "ingest")."""
    if unit.startswith("generations/"):
        _, g, rest = unit.split("/", 2)
        return g, rest
    return None, unit


def gen_unit(generation: str, unit: str) -> str:
    """The root name of a generation's unit."""
    return f"generations/{generation}/{unit}"


class MissingUpstream(FileNotFoundError):
    """A stage needs another stage's output, which is not complete."""


class StaleUpstream(RuntimeError):
    """A stage's input was made with another config than the current one."""


def stage_of(unit: str) -> Stage:
    """The stage a unit belongs to: itself, or for ``checkpoints/<run>`` the row of its kind;
    a generation's units (``generations/<g>/...``) belong to ``GENERATION_STAGES``."""
    generation, local = generation_of(unit)
    table = STAGES if generation is None else GENERATION_STAGES
    if local.startswith("checkpoints/"):
        kind, _ = parse_name(local.split("/", 1)[1])
        local = f"checkpoints/{kind}"
    if local not in table:
        raise ValueError(f"unknown stage {unit!r}; stages: {[s for s in table if '/' not in s]}")
    return table[local]


def view(cfg: Config, unit: str) -> ConfigView:
    """The part of ``cfg`` a unit may read: its stage's fields and knobs."""
    stage = stage_of(unit)
    return cfg.view(stage.fields, stage.knobs, owner=unit)


def reads(unit: str, runs: Iterable[str] = ()) -> tuple[str, ...]:
    """The units ``unit`` reads; ``runs`` are the training-run units for a ``checkpoints/*`` read."""
    generation, _ = generation_of(unit)
    prefix = f"generations/{generation}/" if generation else ""
    out: list[str] = []
    for r in stage_of(unit).reads:
        out += sorted(runs) if r == ALL_RUNS else [r.format(gen=prefix)]
    return tuple(out)


def unit_hash(cfg: ConfigView, unit: str, upstream: Mapping[str, str],
              external: Mapping[str, Any]) -> str:
    """What decides a unit's output: its declared fields, its inputs' hashes, its external inputs."""
    blob = json.dumps({"unit": unit, "fields": cfg.values(), "upstream": dict(upstream),
                       "external": dict(external)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def planned_units(cfg: Config) -> list[str]:
    """Every unit of a full run of ``cfg`` (all experts and baselines), inputs first."""
    runs = [seed_job(cfg.train), *plan(cfg.train, cfg.cluster.num_experts, baselines=ALL_BASELINES)]
    data = [name for name in STAGES if "/" not in name and name != "eval"]
    return [*data, *(job.unit for job in runs), "eval"]


def planned_hashes(cfg: Config, external: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The hash every unit of a full run gets under ``cfg`` (``external`` by stage name): a pure
    function of the config, the same the wrapper computes from the manifests on disk."""
    units = planned_units(cfg)
    runs = [u for u in units if u.startswith("checkpoints/")]
    hashes: dict[str, str] = {}
    for unit in units:
        upstream = {u: hashes[u] for u in reads(unit, runs)}
        hashes[unit] = unit_hash(view(cfg, unit), unit, upstream,
                                 external.get(stage_of(unit).name, {}))
    return hashes


def downstream(units: Iterable[str], all_units: list[str]) -> set[str]:
    """``units`` and every unit that reads one of them, directly or not."""
    runs = [u for u in all_units if u.startswith("checkpoints/")]
    out = set(units)
    for unit in all_units:            # inputs come first, so one pass in order suffices
        if out & set(reads(unit, runs)):
            out.add(unit)
    return out


# ----------------------------------------------------------------------------- the wrapper
class StageRun:
    """One unit about to run: its view of the config, its current inputs and its hash.

    Building it checks that every unit it reads is complete and was made with the current config
    (recursively), so a stage never silently consumes an output of another config.
    """

    def __init__(self, unit: str, cfg: Config, run: RunDir, external: Mapping[str, Any] | None = None,
                 runs: Iterable[str] = ()) -> None:
        self.unit, self.stage, self.run = unit, stage_of(unit), run
        self.cfg = view(cfg, unit)
        self.external = dict(external or {})
        self._full = cfg
        self._checked: dict[str, dict[str, Any]] = {}
        self.upstream = {u: self._current(u, unit) for u in reads(unit, runs)}
        self.config_hash = unit_hash(self.cfg, unit, {u: m["config_hash"] for u, m in self.upstream.items()},
                                     self.external)

    def _current(self, unit: str, reader: str) -> dict[str, Any]:
        """``unit``'s manifest, after checking that it (and what it read) matches the config."""
        if unit in self._checked:
            return self._checked[unit]
        m = self.run.manifest(unit)
        if m is None:
            raise MissingUpstream(f"{reader} reads {self.run.stage_uri(unit)}, which is not complete "
                                  f"(no manifest): run {stage_of(unit).job} first")
        recorded = m.get("inputs", {})
        upstream = {u: self._current(u, unit)["config_hash"] for u in recorded.get("upstream", {})}
        expected = unit_hash(view(self._full, unit), unit, upstream, recorded.get("external", {}))
        if m.get("config_hash") != expected:
            known = set(field_names())
            changed = {k: (v, self._full.value(k)) for k, v in m.get("fields", {}).items()
                       if k in known and self._full.value(k) != v}
            what = ", ".join(f"{k}={a!r} (the config now has {b!r})" for k, (a, b) in changed.items())
            raise StaleUpstream(f"{reader} reads {self.run.stage_uri(unit)}, which was made "
                                f"{'with ' + what if what else 'by another version of this code'}: "
                                f"rerun {stage_of(unit).job} first (or --force it)")
        self._checked[unit] = m
        return m

    def completed(self) -> dict[str, Any] | None:
        """The unit's manifest if it finished with this hash, else None."""
        m = self.run.manifest(self.unit)
        return m if m is not None and m.get("config_hash") == self.config_hash else None

    def begin(self) -> str:
        """Mark the unit incomplete before its outputs are rewritten; returns the start time."""
        self.run.drop_manifest(self.unit)
        return now()

    def finish(self, output: StageOutput, started_at: str) -> dict[str, Any]:
        """Write the manifest (refused when the counts do not add up)."""
        faults.before_manifest(self.unit)
        inputs = {"upstream": {u: m["config_hash"] for u, m in self.upstream.items()},
                  "external": self.external}
        return self.run.write_manifest(self.unit, config_hash=self.config_hash,
                                       fields=self.cfg.values(), knobs=self.cfg.knob_values(),
                                       inputs=inputs, output=output, started_at=started_at)


def summary(unit: str, m: Mapping[str, Any], seconds: float | None = None) -> str:
    """One line: what a unit read, kept, skipped and wrote."""
    skipped = m["rows_skipped"]
    text = (f"[{unit}] read {m['rows_in']:,} rows, wrote {m['rows_out']:,}, skipped "
            f"{sum(skipped.values()):,}" + (f" {skipped}" if skipped else ""))
    return text + (f" in {seconds:.1f} s" if seconds is not None else "")


def run_stage(name: str, cfg: Config, run: RunDir, *, force: bool = False, log: Log = print,
              **external: Any) -> dict[str, Any]:
    """Run one stage (not a training run) under the manifest contract; returns its manifest.

    Skipped when its manifest matches the current hash (unless ``force``); otherwise its
    manifest is dropped, its ``run`` function does the work and the new manifest is written.
    When the work fails because a Ray process it depended on died (``faults.died``), it is
    done again, up to ``ray.stage_retries`` times, each retry logged with its cause.
    """
    stage = stage_of(name)
    if name.startswith("checkpoints"):
        raise ValueError("training runs are launched by pipeline.training.checkpoints, not run_stage")
    if not set(external) <= set(stage.external):
        raise TypeError(f"stage {name} takes {sorted(stage.external)}, got {sorted(external)}")
    # An input may be left out where the stage function has a default for it (embeddings'
    # `source`: without it the captions are encoded); its signature says which are required.
    runs = run_units(run) if ALL_RUNS in stage.reads else []
    sr = StageRun(name, cfg, run, external, runs)
    done = sr.completed()
    if done is not None and not force:
        log(f"[{name}] complete for this config: skipped ({run.stage_uri(name)})")
        return done
    generation, _ = generation_of(name)
    where, upstream = run, sr.upstream
    if generation is not None:      # the stage code works inside the generation's directory
        where = run.generation(generation)
        upstream = {relative(u, generation): m for u, m in sr.upstream.items()}
    if stage.check is not None:
        stage.check(sr.cfg, where, upstream, **external)
    started, t0 = sr.begin(), time.perf_counter()
    retries = cfg.ray.stage_retries
    for attempt in range(retries + 1):
        try:
            output = stage.run(sr.cfg, where, upstream, log=log, **external)
            break
        except Exception as e:
            cause = faults.died(e)
            if cause is None or attempt == retries:
                if cause is not None:
                    log(f"[{name}] {cause}, after {retries} retries (ray.stage_retries): failed")
                raise
            # The stage's manifest is still dropped and its code rewrites its outputs: a
            # second run is the rerun a person would have submitted.
            log(f"[{name}] retry {attempt + 1} of {retries} (ray.stage_retries): {cause}")
    manifest = sr.finish(output, started)
    log(summary(name, manifest, time.perf_counter() - t0) + f" -> {run.stage_uri(name)}")
    return manifest


def relative(unit: str, generation: str) -> str:
    """How a generation's stage code names a unit: its own without the prefix, the original
    run's with ``../`` (``generations/g/ingest`` -> ``ingest``, ``clusters`` -> ``../clusters``)."""
    g, local = generation_of(unit)
    return local if g == generation else f"../{unit}"


def run_units(run: RunDir) -> list[str]:
    """The unit of every registered training run (``checkpoints/<run>``, or a generation's)."""
    return [e.get("unit") or f"checkpoints/{name}" for name, e in registry.finished(run).items()]


def _fields_text(fields: Iterable[str]) -> str:
    by_section: dict[str, list[str]] = {}
    for path in fields:
        section, name = path.split(".")
        by_section.setdefault(section, []).append(name)
    return "; ".join(f"`{s}`: {', '.join(names)}" for s, names in by_section.items()) or "none"


def markdown_table() -> str:
    """The stage table as markdown (docs/stages.md)."""
    lines = ["| stage (folder) | module | reads | fields (rerun when changed) | knobs (never rerun) | writes | job |",
             "|---|---|---|---|---|---|---|"]
    for s in STAGES.values():
        reads = ", ".join(f"`{r}`" for r in s.reads) or "the shards"
        external = f" + {', '.join(s.external)}" if s.external and s.reads else ""
        lines.append(f"| `{s.name}` | `{s.module.replace('.', '/')}.py` | {reads}{external} | "
                     f"{_fields_text(s.fields)} | {_fields_text(s.knobs)} | {s.output} | `{s.job}` |")
    return "\n".join(lines)


PACKAGES = ("core", "data", "clustering", "training", "evaluation", "grow", "serving")


def markdown_tree() -> str:
    """The package tree as markdown (the README's architecture, checked by tests/test_repo.py):
    each sub-package of ``pipeline/``, what it holds (its docstring) and its modules, read from
    the files, none imported."""
    root = Path(__file__).resolve().parents[1]
    lines = ["| package | what it holds | modules |", "|---|---|---|"]
    for name in PACKAGES:
        folder = root / name
        doc = " ".join((ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or "").split())
        modules = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
        lines.append(f"| `pipeline/{name}/` | {doc} | {', '.join(f'`{m}`' for m in modules)} |")
    return "\n".join(lines)
