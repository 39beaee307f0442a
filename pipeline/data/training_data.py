"""Stage ``training_data``: the training samples with their images, partitioned by expert.

Every trainer reads its data many times over (one epoch after another), so the expensive parts
run once, here: reading the shards' image bytes and joining each sample with its assignment.
Which samples are good was decided by ``ingest``, which decoded every image: this stage decodes
none. It re-reads the shards for the bytes and keeps the samples that were assigned, which are
exactly ingest's good rows (embeddings and assignments carry one row per good sample); its
manifest repeats ingest's skip counts, so its counts add up on their own. Output (docs/stages.md, "The run
directory")::

    training_data/expert_id=<e>/*.parquet   key: string, caption: string, image: binary,
                                            fine_id: int32, random_id: int32

``random_id`` is the sample's part in the random-split baseline: a seeded uniform partition with
the same expected sizes as the experts. Files hold about ``train.rows_per_file`` rows. Readers:
``rows_for`` (what one training run reads: the runs on every partition read them in a seeded
mixed order, ``pipeline.core.tables.read_mixed``). The manifest's ``stats.rows_per_run`` counts what
each run's reader yields (``run_rows``), so a trainer needs no counting pass of its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data import SaveMode

from pipeline.core.config import ConfigView
from pipeline.core.console import CountsLost, Tally
from pipeline.core.keys import key_rank, uniform
from pipeline.core.rundir import RunDir, StageOutput
from pipeline.core.storage import pyarrow_filesystem
from pipeline.core.tables import count_rows, read_by_expert, read_mixed
from pipeline.data import ingest
from pipeline.training.runs import ALL_DATA, Job, run_name

STAGE = "training_data"
COLUMNS = ["key", "caption", "image", "fine_id", "random_id"]
# Seeds of the two hash draws (train.data_seed), offset so that they never coincide.
_RANDOM_SPLIT_SALT = 7_919
_OOC_SALT = 104_729


def random_parts(keys: Any, fractions: np.ndarray, seed: int) -> np.ndarray:
    """A seeded uniform partition of keys into len(fractions) parts of those expected shares."""
    u = uniform(keys, seed + _RANDOM_SPLIT_SALT)
    cuts = np.cumsum(fractions)[:-1] / np.sum(fractions)
    return np.searchsorted(cuts, u, side="right").astype(np.int32)


def ooc_mask(keys: Any, expert: int, ratio: float, seed: int) -> np.ndarray:
    """Which of ``keys`` (samples of other experts) expert ``expert`` also trains on: a seeded
    ``ratio`` share, a different draw per expert."""
    return key_rank(keys, seed + expert + _OOC_SALT) < np.uint64(int(ratio * 2**64))


def _label(batch: pd.DataFrame, fractions: np.ndarray, seed: int, ratio: float,
           counter: Tally, count_runs: bool = True) -> pd.DataFrame:
    """The written columns of a joined batch; its rows (and, unless ``count_runs`` is False,
    its per-run counts) go to ``counter``."""
    out = batch.copy()
    out["random_id"] = random_parts(out["key"].to_numpy(), fractions, seed)
    out["fine_id"] = out["fine_id"].astype(np.int32)
    out["expert_id"] = out["expert_id"].astype(np.int32)
    runs = _run_sizes(out, len(fractions), ratio, seed) if count_runs else {}
    keys = out["key"]     # keyed by what the batch holds: a retried task counts once
    counter.add({"rows": len(out), **runs},
                key=f"{keys.iloc[0]}|{keys.iloc[-1]}|{len(keys)}" if len(keys) else None)
    return out[[*COLUMNS, "expert_id"]]


def _run_sizes(batch: pd.DataFrame, num_experts: int, ratio: float, seed: int) -> dict[str, int]:
    """The samples of this batch that each expert's and random part's reader yields."""
    keys, expert, part = (batch[c].to_numpy() for c in ("key", "expert_id", "random_id"))
    sizes = {}
    for e in range(num_experts):
        own = expert == e
        ooc = ooc_mask(keys[~own], e, ratio, seed).sum() if ratio > 0 else 0
        sizes[run_name("expert", e)] = int(own.sum() + ooc)
        sizes[run_name("random-split", e)] = int((part == e).sum())
    return sizes


def _run_sizes_frame(batch: pd.DataFrame, num_experts: int, ratio: float, seed: int) -> pd.DataFrame:
    return pd.DataFrame({k: [v] for k, v in _run_sizes(batch, num_experts, ratio, seed).items()})


def run(cfg: ConfigView, run: RunDir, upstream: dict[str, Any], log=print) -> StageOutput:
    """Join the shards' good samples (ingest's verdicts) with their assignment; write them by expert."""
    done_ingest, done_assign = upstream["ingest"], upstream["assignments"]
    external = done_ingest["inputs"]["external"]
    data_uri, prefix = external["data"], external.get("key_prefix", "")
    per_expert_rows = done_assign["stats"]["rows_per_expert"]
    ids = sorted(int(e) for e in per_expert_rows)      # 0..m-1; a generation's new ids after them
    new_experts = run.generation_name is not None  # a generation: no random split of its own
    sizes = np.ones(1) if new_experts else np.array([per_expert_rows[str(e)] for e in ids], np.float64)
    good = int(done_ingest["rows_out"])
    assigned = int(done_assign["rows_out"])     # every good row; a generation's novel rows only
    parts = max(1, int(np.ceil(assigned / cfg.train.rows_per_file)))
    samples = ingest.good_rows(ingest.read_samples(data_uri, cfg.data, cfg.storage, decode_images=False,
                                                   key_prefix=prefix))
    # The copies of a repeated key that ingest skipped (it keeps the first: docs/bad_input.md)
    samples = ingest.mark_duplicates(samples, ingest.skipped_duplicates(run))
    samples = ingest.good_rows(samples)
    # late import: assignments imports the clustering (faiss, scipy: 0.6 s), which the processes
    # that only unpickle this module's row filters (a run's worker, its dataset manager, the
    # read tasks) do not need
    from pipeline.clustering.assignments import read as read_assignments

    labels = read_assignments(run).select_columns(["key", "fine_id", "expert_id"])
    counter = Tally()
    ratio, seed = cfg.train.ooc_ratio, cfg.train.data_seed
    samples.select_columns(["key", "caption", "image"]) \
        .join(labels, join_type="inner", num_partitions=parts, on=("key",)) \
        .map_batches(_label, batch_format="pandas", fn_kwargs={
            "fractions": sizes, "seed": seed, "ratio": ratio, "counter": counter,
            "count_runs": not new_experts}) \
        .write_parquet(run.stage_path(STAGE), filesystem=pyarrow_filesystem(run.fs),
                       partition_cols=["expert_id"], mode=SaveMode.OVERWRITE)
    rows_out = count_rows(run.fs, run.stage_path(STAGE))
    if rows_out != assigned:
        raise RuntimeError(f"[training_data] the shards at {data_uri} hold {rows_out:,} of the "
                           f"{assigned:,} assigned samples: they changed since ingest ran; rerun "
                           "jobs/ingest.py (and the stages after it)")
    per_expert = {str(e): count_rows(run.fs, run.stage_path(STAGE, f"expert_id={e}")) for e in ids}
    try:
        per_run: dict[str, int] | None = counter.totals()
    except CountsLost as e:
        per_run = None
        if not new_experts:
            log(f"[training_data] the stage's counts are incomplete ({e}): counting the written "
                "files instead")
    counter.close()
    if new_experts:     # the launcher counts a new expert's rows (its out-of-cluster share too)
        per_run = {}
    elif per_run is None or per_run.pop("rows", 0) != rows_out:
        # the counter actor died, or a retried task counted twice: count the files
        per_run = _count_runs(run, len(sizes), ratio, seed)
    stats = {"rows_per_expert": per_expert, "rows_per_run": per_run,
             "ooc": {"ratio": ratio, "seed": seed}, "images_decoded": 0}
    log(f"[training_data] {rows_out:,} samples with images, by expert {per_expert} (no image "
        "decoded: ingest's verdicts)")
    skipped = dict(done_ingest["rows_skipped"])
    if good > assigned:     # a generation trains on its novel samples only (docs/growth.md);
        # a run on imported embeddings leaves out the samples that came without a usable vector
        skipped["familiar" if new_experts else "not_embedded"] = good - assigned
    return StageOutput(int(done_ingest["rows_in"]), rows_out, skipped, stats)


def _count_runs(run: RunDir, num_experts: int, ratio: float, seed: int) -> dict[str, int]:
    """``_run_sizes`` summed over the written files (three small columns of each are read)."""
    sizes = _read(run, None, ["key", "random_id", "expert_id"]).map_batches(
        _run_sizes_frame, batch_format="pandas",
        fn_kwargs={"num_experts": num_experts, "ratio": ratio, "seed": seed}).to_pandas()
    return {name: int(n) for name, n in sizes.sum().items()}


# ----------------------------------------------------------------------------- readers
def _read(run: RunDir, experts: list[int] | None = None, columns: list[str] | None = None,
          cpus: float | None = None) -> ray.data.Dataset:
    return read_by_expert(run.fs, run.stage_path(STAGE), run.scheme, experts, columns, cpus)


def _expert_filter(batch: pa.Table, expert: int, ratio: float, seed: int) -> pa.Table:
    keys = batch.column("key").to_numpy(zero_copy_only=False)
    own = batch.column("expert_id").to_numpy(zero_copy_only=False) == expert
    return batch.filter(pa.array(own | ooc_mask(keys, expert, ratio, seed)))


def _onestep_filter(batch: pa.Table, own: np.ndarray, expert: int, ratio: float, seed: int) -> pa.Table:
    """OneStep expert ``expert``'s rows of a batch: those of its cluster (``own``: their keys,
    sorted) and the seeded out-of-cluster share of the others, drawn as an expert's."""
    keys = batch.column("key").to_numpy(zero_copy_only=False)
    mine = np.isin(keys, own, assume_unique=False)
    return batch.filter(pa.array(mine | (~mine & ooc_mask(keys, expert, ratio, seed))))


def _random_part(batch: pa.Table, part: int) -> pa.Table:
    return batch.filter(pc.equal(batch.column("random_id"), part))


def rows_for(run: RunDir, job: Job, num_experts: int, ooc_ratio: float, seed: int,
             columns: list[str] | None = None, cpus: float | None = None,
             order_seed: int = 0, cluster_keys: np.ndarray | None = None) -> ray.data.Dataset:
    """The rows a training run reads (a lazy Ray Dataset; ``columns`` must include ``key`` for an
    expert and ``random_id`` for a random part):

    - ``seed``, ``full-<i>``, ``dense-matched``: every sample, in the seeded mixed order of
      ``pipeline.core.tables.read_mixed`` (``order_seed``: the run's ``Job.order_seed``), so that
      every block, and so the first batches, hold every expert's samples in their proportions;
    - ``random-split-<e>``: part e of the random split, a filter over that same mixed read;
    - ``onestep-<e>``: cluster e of the OneStep ablation (``cluster_keys``: its keys, from
      ``pipeline.clustering.onestep.keys``) plus the seeded ``ooc_ratio`` share of the other rows, a filter
      over the mixed read (the keys go to every task: an ablation at the experiment's size);
    - ``expert-<e>``: expert e's samples plus a seeded ``ooc_ratio`` share of every other
      expert's, in one read of every partition and a filter (each read costs Ray Data a listing
      pass of its own, so not two reads and a union).

    ``cpus``: what each of its read and filter tasks reserves (``train.data_cpus``).
    """
    task = {} if cpus is None else {"num_cpus": cpus}
    if job.generation is not None:
        return _new_expert_rows(run, job, ooc_ratio, seed, columns, cpus)
    if job.kind in ALL_DATA:
        read_columns = None if columns is None or job.kind != "onestep" else \
            list(dict.fromkeys([*columns, "key"]))
        ds = read_mixed(run.fs, run.stage_path(STAGE), order_seed, read_columns, cpus)
        if job.kind == "random-split":
            return ds.map_batches(_random_part, batch_format="pyarrow",
                                  fn_kwargs={"part": job.index}, **task)
        if job.kind == "onestep":
            if cluster_keys is None:
                raise ValueError(f"{job.name} reads its OneStep cluster: pass its cluster_keys")
            return ds.map_batches(_onestep_filter, batch_format="pyarrow", fn_kwargs={
                "own": np.sort(cluster_keys), "expert": job.index, "ratio": ooc_ratio,
                "seed": seed}, **task)
        return ds
    if num_experts == 1 or ooc_ratio == 0:
        return _read(run, [job.index], columns, cpus)
    read_columns = None if columns is None else list(dict.fromkeys([*columns, "expert_id"]))
    ds = _read(run, None, read_columns, cpus).map_batches(_expert_filter, batch_format="pyarrow", fn_kwargs={
        "expert": job.index, "ratio": ooc_ratio, "seed": seed}, **task)
    return ds if columns is None or "expert_id" in columns else ds.drop_columns(["expert_id"])


def _ooc_filter(batch: pa.Table, expert: int, ratio: float, seed: int) -> pa.Table:
    return batch.filter(pa.array(ooc_mask(batch.column("key").to_numpy(zero_copy_only=False),
                                          expert, ratio, seed)))


def _new_expert_rows(run: RunDir, job: Job, ooc_ratio: float, seed: int,
                     columns: list[str] | None, cpus: float | None = None) -> ray.data.Dataset:
    """An expert added by a generation (docs/growth.md): its own samples from the generation's
    ``training_data/``, plus the seeded out-of-cluster share of the original run's samples and
    of the earlier generations' (those whose experts have lower ids)."""
    gen = run.generation(job.generation)
    own = read_by_expert(gen.fs, gen.stage_path(STAGE), gen.scheme, [job.index], columns, cpus)
    if ooc_ratio == 0:
        return own
    others = [_read(run, None, columns, cpus)]
    for g in earlier_generations(run, job):
        part = run.generation(g)
        others.append(read_by_expert(part.fs, part.stage_path(STAGE), part.scheme, None, columns,
                                     cpus))
    kwargs = {"expert": job.index, "ratio": ooc_ratio, "seed": seed}
    task = {} if cpus is None else {"num_cpus": cpus}
    return own.union(*(ds.map_batches(_ooc_filter, batch_format="pyarrow", fn_kwargs=kwargs, **task)
                       for ds in others))


def earlier_generations(run: RunDir, job: Job) -> list[str]:
    """The generations whose training data an added expert draws its out-of-cluster share
    from: those that added experts before it (lower first expert id)."""
    found = []
    for name in run.generation_names():
        m = run.generation(name).manifest(STAGE)
        if name != job.generation and m is not None and m["stats"]["rows_per_expert"] and \
                max(int(e) for e in m["stats"]["rows_per_expert"]) < job.index:
            found.append(name)
    return found


def run_rows(manifest: dict[str, Any], job: Job, ooc_ratio: float, seed: int) -> int | None:
    """Samples a run's reader yields, from this stage's manifest; None where the manifest does
    not say (an expert under another ``train.ooc_ratio`` than the manifest's): count instead."""
    if job.kind == "onestep":      # its clustering is not training_data's: count
        return None
    if job.kind in ALL_DATA and job.kind != "random-split":
        return int(manifest["rows_out"])
    if job.kind == "expert" and manifest["stats"].get("ooc") != {"ratio": ooc_ratio, "seed": seed}:
        return None
    return manifest["stats"]["rows_per_run"].get(job.name)
