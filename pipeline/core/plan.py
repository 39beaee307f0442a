"""The plan of a config on a cluster, before anything starts: for every stage and training run,
what it reserves, on which node type, how many run at once, each GPU worker's memory and the
expected wall time; and whether it all fits (docs/plan.md).

Pure: node types come from a cluster file (Ray's cluster launcher YAML or a KubeRay
RayCluster), from ``ray.node_types``, or from the nodes a running Ray reports (passed in, as
``ray.nodes()`` gives them); the placement is ``pipeline.training.resources``', the memory
``pipeline.training.memory``'s. Nothing here imports Ray. ``jobs/plan.py`` prints a plan, and
every job runs the same check when it starts (``pipeline.core.cli.start``).

A plan that does not fit names its reasons and the changes (``--set section.field=value``)
that make it fit; each change is checked by planning again with it, so following one works.

With a row count, every step also says what it costs: the CPU- and GPU-hours it reserves (its
time x what its tasks, actors or workers reserve at once), the bytes it writes, and, where the
cluster file names instance types with a known price, what the nodes it holds cost on demand;
and the plan compares MoDE-n's training with the paper's dense baseline (docs/scale.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from pipeline.core.config import Config, ConfigError, load_config, parse_node_types, parse_resources
from pipeline.training import memory, resources
from pipeline.training.runs import plan as run_plan
from pipeline.training.runs import seed_job
from pipeline.training.schedule import seed_end

GIB = memory.GIB
# What one Ray Data task of the data stages reserves: Ray Data's default for map tasks (none of
# ingest, clusters, assignments and training_data sets its own).
TASK = {"CPU": 1.0}


# ----------------------------------------------------------------------------- hardware
@dataclasses.dataclass(frozen=True)
class Gpu:
    memory_gib: float       # what the driver reports (nvidia-smi's total)
    bf16_tflops: float      # dense tensor-core peak
    fp32_tflops: float


# NVIDIA's datasheets; NVIDIA publishes none for the A10G (AWS's variant of the A10), whose
# figures are those AWS and NVIDIA give to cloud users (Baseten's A10 vs A10G comparison): the
# A10's memory, a lower tensor-core peak.
GPUS = {
    "A10G": Gpu(23_028 / 1024, 70.0, 31.2),
    "L4": Gpu(23_034 / 1024, 121.0, 30.3),
    "A100-40G": Gpu(40_960 / 1024, 312.0, 19.5),
    "A100-80G": Gpu(81_920 / 1024, 312.0, 19.5),
    "H100": Gpu(81_559 / 1024, 989.0, 67.0),
    "H200": Gpu(143_771 / 1024, 989.0, 67.0),
}
# vCPUs and GPUs of the instance types a cluster file may name (AWS's published sizes); Ray's
# AWS provider and KubeRay give a node these as its CPU and GPU resources.
INSTANCES: dict[str, tuple[int, int, str | None]] = {
    **{f"m6i.{s}": (c, 0, None) for s, c in (("2xlarge", 8), ("4xlarge", 16), ("8xlarge", 32),
                                              ("16xlarge", 64))},
    **{f"g5.{s}": (c, g, "A10G") for s, c, g in (("xlarge", 4, 1), ("2xlarge", 8, 1), ("4xlarge", 16, 1),
                                                  ("8xlarge", 32, 1), ("12xlarge", 48, 4),
                                                  ("16xlarge", 64, 1), ("24xlarge", 96, 4),
                                                  ("48xlarge", 192, 8))},
    **{f"g6.{s}": (c, g, "L4") for s, c, g in (("xlarge", 4, 1), ("12xlarge", 48, 4), ("48xlarge", 192, 8))},
    "p4d.24xlarge": (96, 8, "A100-40G"), "p4de.24xlarge": (96, 8, "A100-80G"),
    "p5.48xlarge": (192, 8, "H100"), "p5e.48xlarge": (192, 8, "H200"),
}
# What a GPU worker may fill: the device less 1 GiB for the CUDA context, cuBLAS/cuDNN
# workspaces and NCCL's buffers, of which the caching allocator can use about 90% before
# fragmentation bites.
CUDA_RESERVED_GIB = 1.0
ALLOCATOR_SHARE = 0.9


# ----------------------------------------------------------------------------- measured rates
@dataclasses.dataclass(frozen=True)
class Rate:
    value: float
    unit: str
    source: str             # where it was measured (docs/benchmarks.md's tables)


# docs/benchmarks.md has each measurement, its command, commit and hardware; docs/plan.md says
# how each is scaled to other models and devices.
RATES = {
    "decode": Rate(1_033 / 16, "rows/s per CPU",
                   "Ray Data decoding 224 px images for ViT-B-32 on 16 cores (streamed input path)"),
    "embed_cpu": Rate(299 / 2, "captions/s per CPU",
                      "bench_embed: MiniLM-L6, batch 256, 2 threads"),
    "kmeans_fit": Rate(262_144 * 1024 * 384 * 2 * 20 / 32.5 / 2, "FLOP/s per CPU",
                       "bench_kmeans: fit of 262,144 rows x 1,024 centres x 384-d, 20 iterations, 32.5 s on 2 cores"),
    "cluster_sample": Rate(4_000_000 / 11.5 / 2, "rows/s per CPU at 64-d",
                           "bench_scale: the clusters stage's pass over 4,000,000 rows of 64-d vectors "
                           "that draws the fit sample, 11.5 s on 2 cores"),
    "assign": Rate(88.5e9 / 2, "FLOP/s per CPU",
                   "bench_kmeans: balanced assignment, 88.5 GFLOP/s on 2 cores"),
    "training_data": Rate(10_000 / 15 / 2, "rows/s per CPU",
                          "the demo's training data: 10,000 rows in 15 s on 2 cores"),
    "train_cpu_cached": Rate(970 / 2, "samples/s per torch thread",
                             "bench_train: mode-tiny, batch 128, cached inputs, 2 threads"),
    "train_cpu_streamed": Rate(647 / 2, "samples/s per torch thread",
                               "bench_train: mode-tiny, batch 128, decoded every epoch, 2 threads"),
    "train_gpu_share": Rate(111 / 989, "of the GPU's bf16 peak",
                            "bench_train on one H200: ViT-B-32, batch 256, bf16, 2,517 samples/s = 111 TFLOP/s"),
    "run_start": Rate(40, "s per training run", "Ray Train's start to a run's first batch, on 2 cores"),
}
# The caption length the embedding rates assume for a FLOP count (captions are short).
CAPTION_TOKENS = 32
# Sentence encoders by name: (layers, width, embedding dimension).
ENCODERS = {"minilm-offline": (6, 384, 384), "minilm-l6": (6, 384, 384), "mpnet-base": (12, 768, 768),
            "bert-base": (12, 768, 768), "bert-large": (24, 1024, 1024)}


# ----------------------------------------------------------------------------- prices and sizes
# On-demand Linux prices in us-east-1, $ an hour, of the instance types of ``INSTANCES``. Read
# (2026-12-06) from Karpenter's table of AWS's on-demand prices, which its maintainers generate
# from AWS's price list API (this version on 2026-02-09): not read from AWS's own pricing page.
# p5e.48xlarge is not in it, so it has no price here. Spot, which cluster.yaml's workers use,
# costs less and moves with demand.
PRICE_REGION = "us-east-1"
PRICE_SOURCE = ("https://github.com/aws/karpenter-provider-aws/blob/265ee0ba5b8e337dec6b82dde965b03021ccb418/"
                "pkg/providers/pricing/zz_generated.pricing_aws.go (generated 2026-02-09, read 2026-12-06)")
PRICES = {
    "m6i.2xlarge": 0.384, "m6i.4xlarge": 0.768, "m6i.8xlarge": 1.536, "m6i.16xlarge": 3.072,
    "g5.xlarge": 1.006, "g5.2xlarge": 1.212, "g5.4xlarge": 1.624, "g5.8xlarge": 2.448,
    "g5.12xlarge": 5.672, "g5.16xlarge": 4.096, "g5.24xlarge": 8.144, "g5.48xlarge": 16.288,
    "g6.xlarge": 0.8048, "g6.12xlarge": 4.6016, "g6.48xlarge": 13.3504,
    "p4d.24xlarge": 21.957642, "p4de.24xlarge": 27.44705, "p5.48xlarge": 55.04,
}
# Bytes a row of each artifact takes (parquet; float vectors and JPEG bytes do not compress).
KEY_BYTES = 13              # img2dataset's 9-digit key and parquet's 4-byte string offset
# An assumption: web alt-texts are short (LAION-400M kept those of 5 characters or more).
CAPTION_BYTES = 100
# img2dataset's LAION-400M example at 256 px (its default JPEG quality, 95) reports "The result
# is 10TB" for 400M samples: 25 KB a sample, its caption, JSON and tar headers included.
IMAGE_BYTES = 25_000
# A checkpoint holds the fp32 weights and AdamW's two fp32 moments (train_loop's state dicts): 12
# bytes a parameter; the scaler and counters are a few bytes.
CHECKPOINT_BYTES_PER_PARAM = 12


# ----------------------------------------------------------------------------- node types
@dataclasses.dataclass(frozen=True)
class NodeType:
    name: str
    count: int                      # nodes of this type: up now, or at most the autoscaler adds
    resources: Mapping[str, float]  # what one node offers tasks and actors: CPU, GPU, custom
    gpu: str | None = None          # the GPU model (a key of ``GPUS``), when known
    where: str = ""                 # the instance type, or where the type was read
    head: bool = False              # the head node: up for the whole run, whatever runs
    region: str = ""                # the cloud region the file names ("": none named)

    def text(self) -> str:
        res = "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(self.resources.items())) + "}"
        extra = ", ".join(x for x in (self.where, f"GPU {self.gpu}" if self.gpu else "") if x)
        return f"{self.name} {self.count} x {res}" + (f" ({extra})" if extra else "")


def _schedulable(resources: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items()
            if k not in ("memory", "object_store_memory") and not k.startswith(("node:", "accelerator_type:"))}


def _instance(name: str, instance: str | None, declared: Mapping[str, float]) -> tuple[dict[str, float], str | None]:
    """A node's resources: what the file declares, the rest from its instance type."""
    res: dict[str, float] = {}
    gpu = None
    if instance:
        if instance not in INSTANCES:
            raise ValueError(f"{name}: instance type {instance!r} is not one the plan knows "
                             f"({', '.join(sorted(INSTANCES))}): declare its CPU and GPU in the file")
        cpus, gpus, gpu = INSTANCES[instance]
        res = {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}
    return {**res, **_schedulable(declared)}, gpu


def read_cluster(path: str | Path) -> list[NodeType]:
    """The node types of a cluster file: Ray's cluster launcher config (``available_node_types``,
    the head once and each worker type ``max_workers`` times) or a KubeRay RayCluster (its head
    group once, each worker group ``maxReplicas`` times)."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if isinstance(d, dict)]
    for doc in docs:
        if "available_node_types" in doc:
            return _launcher(doc)
        if doc.get("kind") == "RayCluster":
            return _kuberay(doc)
    raise ValueError(f"{path}: neither a Ray cluster launcher config (available_node_types) nor a "
                     "KubeRay RayCluster")


def _launcher(doc: dict) -> list[NodeType]:
    head = doc.get("head_node_type")
    region = str((doc.get("provider") or {}).get("region", ""))
    out = []
    for name, t in doc["available_node_types"].items():
        instance = (t.get("node_config") or {}).get("InstanceType")
        res, gpu = _instance(name, instance, t.get("resources") or {})
        count = 1 if name == head else int(t.get("max_workers", doc.get("max_workers", 0)))
        if count:
            out.append(NodeType(name, count, res, gpu, instance or "", name == head, region))
    return out


def _quantity(text: object) -> float:
    """A Kubernetes CPU quantity ("46", "500m") in CPUs."""
    s = str(text)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _kuberay(doc: dict) -> list[NodeType]:
    spec = doc["spec"]
    groups = [("head", 1, spec["headGroupSpec"])]
    groups += [(g["groupName"], int(g.get("maxReplicas", g.get("replicas", 0))), g)
               for g in spec.get("workerGroupSpecs", [])]
    out = []
    for i, (name, count, g) in enumerate(groups):
        pod = g["template"]["spec"]
        limits = pod["containers"][0].get("resources", {}).get("limits", {})
        params = g.get("rayStartParams") or {}
        instance = (pod.get("nodeSelector") or {}).get("node.kubernetes.io/instance-type")
        gpu = INSTANCES.get(instance, (0, 0, None))[2]
        res = {"CPU": float(params.get("num-cpus", math.floor(_quantity(limits.get("cpu", 0)))))}
        gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        if gpus:
            res["GPU"] = gpus
        res.update(_schedulable(json.loads(params["resources"].strip("'\"").replace('\\"', '"'))
                                if params.get("resources") else {}))
        if count:
            out.append(NodeType(name, count, res, gpu, instance or "", i == 0))
    return out


def declared_nodes(node_types: str) -> list[NodeType]:
    """``ray.node_types`` as node types (no GPU model: the plan then leaves memory unchecked)."""
    return [NodeType(f"type-{i}", count, res, None, "ray.node_types")
            for i, (count, res) in enumerate(parse_node_types("ray.node_types", node_types))]


def alive_nodes(ray_nodes: Sequence[Mapping]) -> list[NodeType]:
    """The nodes up now, from ``ray.nodes()``; a GPU's model from Ray's ``accelerator_type:``."""
    out = []
    for i, n in enumerate(x for x in ray_nodes if x.get("Alive")):
        models = [k.split(":", 1)[1] for k in n["Resources"] if k.startswith("accelerator_type:")]
        gpu = next((g for m in models for g in GPUS if g == m or g.startswith(m + "-")), None)
        out.append(NodeType(f"node-{i}", 1, _schedulable(n["Resources"]), gpu, "up now"))
    return out


def this_machine() -> list[NodeType]:
    """What a job run here gets: a local Ray of this machine's CPUs (``raycluster.init_ray``)."""
    return [NodeType("this machine", 1, {"CPU": float(os.cpu_count() or 1)}, None, "local Ray")]


def _expand(types: Sequence[NodeType], limit: int) -> list[dict[str, float]]:
    """One resource dict per node, at most ``limit`` of a type (more could hold nothing more)."""
    return [dict(t.resources) for t in types for _ in range(min(t.count, limit))]


def _holding(types: Sequence[NodeType], bundle: Mapping[str, float]) -> list[NodeType]:
    return [t for t in types if resources.place([bundle], [t.resources], spread=False) is not None]


# ----------------------------------------------------------------------------- the plan
# The steps of a plan, in the order a whole run takes them ("runs": the training runs after the
# seed, the experts and baselines).
STEPS = ("ingest", "embeddings", "clusters", "assignments", "training_data", "seed", "runs", "eval")


@dataclasses.dataclass(frozen=True)
class Step:
    """One stage or group of training runs in the plan."""
    name: str                       # its key in ``STEPS``, or the runs' names
    job: str
    reserves: str                   # what one task, actor or worker asks of Ray
    on: tuple[str, ...]             # node types that can hold one
    at_once: str                    # how many run at once
    problems: tuple[str, ...] = ()  # why it does not fit (empty: it fits)
    memory: memory.Memory | None = None
    memory_limit: float | None = None   # bytes a GPU worker may fill; None: unchecked
    memory_note: str = ""
    seconds: float | None = None
    time_note: str = ""             # how the time was reckoned
    remedies: tuple[str, ...] = ()  # resource-level changes (checked by resources.check)
    cpu_hours: float | None = None  # its time x the CPUs its tasks, actors or workers reserve
    gpu_hours: float | None = None  # its time x the GPUs they reserve
    dollars: float | None = None    # the nodes it keeps busy, on demand; None: a price is not known
    price_note: str = ""            # which nodes, at what price, for how long
    written: float | None = None    # bytes it writes
    written_note: str = ""
    runs: int = 1                   # training runs in it, and one run's time
    run_seconds: float | None = None

    @property
    def fits(self) -> bool:
        return not self.problems


@dataclasses.dataclass(frozen=True)
class Versus:
    """MoDE-n's training (the seed, then its n experts) against the paper's dense baseline
    (``full-0``: the seed continued on all data for one expert's budget); each pair is (MoDE,
    dense), None where the plan has no estimate."""
    experts: int
    seed_fraction: float
    samples: tuple[int, int]
    gpu_hours: tuple[float, float] | None
    cpu_hours: tuple[float, float] | None
    dollars: tuple[float, float] | None
    seconds: tuple[float, float] | None
    at_once: int

    @property
    def ratio(self) -> float:
        return self.samples[0] / self.samples[1]

    def text(self) -> str:
        def pair(v: tuple[float, float], fmt) -> str:
            return f"{fmt(v[0])} against {fmt(v[1])} ({v[0] / v[1]:.2f}x)" if v[1] else \
                f"{fmt(v[0])} against {fmt(v[1])}"

        f = self.seed_fraction
        lines = [f"MoDE-{self.experts} against the dense baseline full-0 (the seed continued on all "
                 "data for one expert's budget):",
                 f"    samples: {pair(self.samples, lambda x: f'{x:,.0f}')}; "
                 f"f + n (1 - f) = {mode_over_dense(f, self.experts):.2f} at seed_fraction f = {f:g}"]
        if self.gpu_hours and self.gpu_hours[1]:
            lines.append(f"    GPU-hours: {pair(self.gpu_hours, _hours)}")
        if self.cpu_hours:
            lines.append(f"    CPU-hours: {pair(self.cpu_hours, _hours)}")
        if self.dollars:
            lines.append(f"    on demand: {pair(self.dollars, lambda x: f'${x:,.0f}')}")
        if self.seconds:
            lines.append(f"    wall time: {pair(self.seconds, _duration)} (the seed, then "
                         f"{self.experts} expert run(s) {self.at_once} at a time, against one run)")
        return "\n".join(lines)


def mode_over_dense(seed_fraction: float, experts: int) -> float:
    """MoDE-n's training samples over the dense baseline's: (f T + n (1 - f) T) / T; the
    paper's (27 + 5 n) / 32, 1.47 for n = 4."""
    return seed_fraction + experts * (1 - seed_fraction)


def reserved_hours(seconds: float, units: float) -> float:
    """What a step reserves, in unit-hours: its time x the CPUs (or GPUs) it holds at once."""
    return seconds * units / 3600


@dataclasses.dataclass(frozen=True)
class Plan:
    title: str
    nodes: tuple[NodeType, ...]
    steps: tuple[Step, ...]
    remedies: tuple[tuple[str, ...], ...] = ()   # each a set of --set changes that makes it fit
    versus: Versus | None = None

    @property
    def seconds(self) -> float:
        return sum(s.seconds or 0 for s in self.steps)

    @property
    def head(self) -> tuple[NodeType, float | None] | None:
        """The head node and what it costs on demand for the plan's whole time."""
        head = next((t for t in self.nodes if t.head), None)
        if head is None:
            return None
        price = price_of(head)
        return head, None if price is None else price * self.seconds / 3600

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.steps)

    @property
    def problems(self) -> list[str]:
        return [f"{s.name}: {p}" for s in self.steps for p in s.problems]

    def text(self) -> str:
        lines = [f"plan: {self.title}", "nodes: " + "; ".join(t.text() for t in self.nodes), ""]
        for s in self.steps:
            lines.append(f"[{s.name}] {s.job}: {s.reserves}, on {', '.join(s.on) or 'no node type'}; "
                         f"{s.at_once}")
            if s.memory is not None:
                limit = (f" of {s.memory_limit / GIB:.1f} GiB a GPU worker may fill" if s.memory_limit
                         else "")
                lines.append(f"    memory per worker: {s.memory.text()}{limit}"
                             + (f"; {s.memory_note}" if s.memory_note else ""))
            when = _duration(s.seconds) if s.seconds is not None else "not estimated"
            lines.append(f"    time: {when}" + (f" ({s.time_note})" if s.time_note else ""))
            if s.cpu_hours is not None:
                lines.append(f"    reserves: {_hours(s.gpu_hours or 0)} GPU-hours, {_hours(s.cpu_hours)} CPU-hours; "
                             + (f"${s.dollars:,.0f} on demand" if s.dollars is not None else "$ not known")
                             + (f" ({s.price_note})" if s.price_note else ""))
            if s.written is not None:
                lines.append(f"    writes: {_bytes(s.written)} ({s.written_note})")
            lines += [f"    DOES NOT FIT: {p}" for p in s.problems]
        total = self.seconds
        lines += ["", f"total of the estimated times: {_duration(total)}"]
        lines += self._totals()
        if self.versus is not None:
            lines.append(self.versus.text())
        if self.fits:
            lines.append("fits: every stage and training run")
        else:
            lines.append("does not fit: " + " | ".join(self.problems))
            lines += [f"  fix: --set {' --set '.join(r)}" for r in self.remedies] or \
                     ["  no change of the config found that makes it fit: add nodes or larger ones"]
        return "\n".join(lines)

    def _totals(self) -> list[str]:
        costed = [s for s in self.steps if s.cpu_hours is not None]
        if not costed:
            return []
        longest = max(costed, key=lambda s: s.seconds or 0)
        share = (longest.seconds or 0) / self.seconds if self.seconds else 0.0
        lines = [f"longest step: {longest.name}, {_duration(longest.seconds or 0)} "
                 f"({share:.0%} of the estimated time)",
                 f"total reserved: {_hours(sum(s.gpu_hours or 0 for s in costed))} GPU-hours, "
                 f"{_hours(sum(s.cpu_hours or 0 for s in costed))} CPU-hours; written: "
                 f"{_bytes(sum(s.written or 0 for s in self.steps))}"]
        dollars = [s.dollars for s in costed]
        head = self.head
        if None in dollars or (head is not None and head[1] is None):
            lines.append("on demand: not known for every node type (prices: plan.PRICES)")
        else:
            steps = sum(d or 0 for d in dollars)
            up = (head[1] or 0.0) if head else 0.0
            extra = (f" + ${up:,.0f} for the head ({head[0].where}, up for all {_duration(self.seconds)})"
                     if head else "")
            lines += [f"on demand: ${steps:,.0f} for the steps{extra} = ${steps + up:,.0f}",
                      f"prices: {PRICE_REGION} on demand, {PRICE_SOURCE}"]
        return lines


def price_of(node: NodeType) -> float | None:
    """A node's on-demand $ an hour: its instance type's in ``PRICES``, in ``PRICE_REGION``."""
    if node.region not in ("", PRICE_REGION):
        return None
    return PRICES.get(node.where)


def _hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 10 or h == 0 else f"{h:.2g}"


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _res(bundle: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def make(cfg: Config, nodes: Sequence[NodeType], *, runs: int | None = None,
         rows: int | None = None, title: str = "", steps: Sequence[str] = STEPS,
         image_bytes: int = IMAGE_BYTES) -> Plan:
    """The plan of ``cfg`` on ``nodes``: the data stages, the seed, the runs after it and the
    evaluation, as ``jobs/run_pipeline.py`` runs them.

    Args:
        runs: training runs after the seed to train (default: every expert and the default
            baselines); at most ``train.max_concurrent`` of them at once.
        rows: samples in the shards, for the data stages' times (None: not estimated).
        steps: the steps to plan (``STEPS``), the others left out.
        image_bytes: an image's encoded bytes, for what ``training_data`` writes.
    """
    plan = _make(cfg, nodes, runs, rows, title, image_bytes)
    keep = [s for key, s in zip(STEPS, plan.steps, strict=True) if key in steps]
    return dataclasses.replace(plan, steps=tuple(keep))


def _make(cfg: Config, nodes: Sequence[NodeType], runs: int | None, rows: int | None,
          title: str, image_bytes: int) -> Plan:
    cpus = sum(t.count * t.resources.get("CPU", 0.0) for t in nodes)
    per_row = {"ingest": KEY_BYTES + CAPTION_BYTES + 8 + 2,
               "training_data": KEY_BYTES + CAPTION_BYTES + image_bytes + 8}
    steps = [_tasks("ingest", "jobs/ingest.py", nodes, _per_cpu("decode", rows, cpus,
                    "each image opened as training's decoding does"),
                    _rows_written(rows, per_row["ingest"], "key, caption, shard, pos"))]
    steps.append(_embeddings(cfg, nodes, rows))
    dim = _encoder(cfg.embed.model)[2] if _encoder(cfg.embed.model) else None
    c = cfg.cluster
    if rows is not None and dim is not None:
        steps.append(_clusters(cfg, nodes, rows, dim))
        steps.append(_tasks("assignments", "jobs/assign.py", nodes,
                            _flops("assign", rows * c.fine_k * dim * 2, cpus,
                                   f"{rows:,} rows x {c.fine_k} centres x {dim}-d"),
                            _rows_written(rows, KEY_BYTES + 8, "key, fine_id, distance")))
    else:
        why = (None, "pass --rows" if rows is None else f"no dimension known for {cfg.embed.model}")
        steps += [_tasks("clusters", "jobs/cluster.py", nodes, why),
                  _tasks("assignments", "jobs/assign.py", nodes, why)]
    steps.append(_tasks("training_data", "jobs/train_seed.py", nodes,
                        _per_cpu("training_data", rows, cpus, ""),
                        _rows_written(rows, per_row["training_data"],
                                      f"key, caption, an image of {image_bytes / 1e3:g} KB, fine_id, random_id")))
    after = run_plan(cfg.train, cfg.cluster.num_experts)
    n = len(after) if runs is None else runs
    seed = _training(cfg, nodes, "seed", "jobs/train_seed.py", 1, 1, seed_job(cfg.train).end_samples)
    steps.append(seed)
    names = ", ".join(j.name for j in after) if runs is None else f"{n} run(s)"
    continuation = after[0].end_samples - seed_end(cfg.train)
    later = _training(cfg, nodes, names, "jobs/train_experts.py", n, min(cfg.train.max_concurrent, n),
                      continuation) if n else \
        Step("runs", "jobs/train_experts.py", "nothing", (), "no run left to train")
    steps.append(later)
    steps.append(_tasks("eval", "jobs/evaluate.py", nodes,
                        (None, "depends on the tasks; the models run in a pool of scoring actors, "
                               "one CPU or one GPU each")))
    versus = _versus(cfg, seed, later, continuation) if runs is None and n else None
    return Plan(title, tuple(nodes), tuple(steps), versus=versus)


def _versus(cfg: Config, seed: Step, later: Step, continuation: int) -> Versus:
    """MoDE-n (the seed and n expert runs) against full-0 (the seed and one run), from the
    seed's figures and one run's of the runs after it (every run is as long)."""
    m = cfg.cluster.num_experts
    at_once = min(cfg.train.max_concurrent, m)
    start = seed_end(cfg.train)

    def pair(a: float | None, b: float | None) -> tuple[float, float] | None:
        if a is None or b is None:
            return None
        return a + m * b / later.runs, a + b / later.runs

    seconds = None
    if seed.seconds is not None and later.run_seconds is not None:
        seconds = (seed.seconds + math.ceil(m / at_once) * later.run_seconds, seed.seconds + later.run_seconds)
    return Versus(m, cfg.train.seed_fraction, (start + m * continuation, start + continuation),
                  pair(seed.gpu_hours, later.gpu_hours), pair(seed.cpu_hours, later.cpu_hours),
                  pair(seed.dollars, later.dollars), seconds, at_once)


def _rows_written(rows: int | None, per_row: int, what: str) -> tuple[float, str] | None:
    if rows is None:
        return None
    return rows * per_row, f"{rows:,} rows x {per_row:,} bytes: {what}"


def _per_cpu(rate: str, rows: int | None, cpus: float, note: str) -> tuple[float | None, str]:
    if rows is None:
        return None, "pass --rows"
    r = RATES[rate]
    return rows / (r.value * cpus), f"{rows:,} rows at {r.value:,.0f} {r.unit} x {cpus:g} CPUs" + \
        (f"; {note}" if note else "")


def _flops(rate: str, flops: float, cpus: float, what: str) -> tuple[float, str]:
    r = RATES[rate]
    return flops / (r.value * cpus), f"{what} at {r.value / 1e9:.0f} GFLOP/s per CPU x {cpus:g} CPUs"


def _clusters(cfg: Config, nodes: Sequence[NodeType], rows: int, dim: int) -> Step:
    """A pass over every row draws the fit sample, spread over every CPU; the fit then runs
    its iterations over that sample, one task a block of ``cluster.fit_block_rows``: however
    many CPUs the cluster has, no more of them than the sample has blocks."""
    c = cfg.cluster
    cpus = sum(t.count * t.resources.get("CPU", 0.0) for t in _holding(nodes, TASK))
    sample = rows if c.sample_per_centre == 0 else min(rows, c.fine_k * c.sample_per_centre)
    blocks = math.ceil(sample / c.fit_block_rows)
    busy = max(1.0, min(cpus, blocks))
    r = RATES["cluster_sample"]
    per_cpu = r.value * 64 / dim
    passing = rows / (per_cpu * max(cpus, 1.0))
    fit_rate = RATES["kmeans_fit"].value
    fitting = c.restarts * c.iterations * sample * c.fine_k * dim * 2 / (fit_rate * busy)
    note = (f"the sample pass: {rows:,} rows at {per_cpu:,.0f} rows/s per CPU (bench_scale's at 64-d, "
            f"scaled by the vector's size) x {cpus:g} CPUs, {_duration(passing)}; the fit: "
            f"{c.restarts} x {c.iterations} iterations over {sample:,} rows, {c.fine_k} centres, {dim}-d, "
            f"at {fit_rate / 1e9:.0f} GFLOP/s per CPU x {busy:g} CPUs (its {blocks} block(s) of "
            f"{c.fit_block_rows:,} rows), {_duration(fitting)}")
    written = ((c.fine_k + c.num_experts) * dim * 4 + c.fine_k * 12,
               f"{c.fine_k} fine and {c.num_experts} coarse {dim}-d float32 centres, the fine clusters' "
               "experts and sizes")
    return _tasks("clusters", "jobs/cluster.py", nodes, (passing + fitting, note), written,
                  cpu_seconds=passing * cpus + fitting * busy)


def _tasks(name: str, job: str, nodes: Sequence[NodeType], timed: tuple[float | None, str],
           written: tuple[float, str] | None = None, cpu_seconds: float | None = None) -> Step:
    """A data stage: Ray Data (and k-means) tasks of one CPU, as many as the CPUs allow; it
    holds every node that can run one for its time (``cpu_seconds``: the CPU-seconds its tasks
    reserve, when they do not fill every CPU all along)."""
    on = _holding(nodes, TASK)
    cpus = sum(t.count * t.resources.get("CPU", 0.0) for t in on)
    problems = () if on else (f"no node type has the whole CPU a Ray Data task asks for "
                              f"({_describe(nodes)}): add a node type with CPUs",)
    seconds = timed[0]
    cost: dict = {}
    if seconds is not None:
        held = [(t, t.count) for t in on]
        dollars, note = _priced(held, seconds)
        cost = dict(cpu_hours=cpu_seconds / 3600 if cpu_seconds is not None else reserved_hours(seconds, cpus),
                    gpu_hours=0.0, dollars=dollars, price_note=note)
    if written is not None:
        cost.update(written=written[0], written_note=written[1])
    return Step(name, job, f"Ray Data tasks of {_res(TASK)}", tuple(t.name for t in on),
                f"up to {int(cpus)} task(s) at once", problems, seconds=seconds, time_note=timed[1], **cost)


def _packed(nodes: Sequence[NodeType], bundles: Sequence[Mapping[str, float]]) -> list[tuple[NodeType, int]]:
    """The nodes of each type that ``bundles`` land on, packed as Ray packs them (empty: they
    do not fit)."""
    flat = [t for t in nodes for _ in range(min(t.count, len(bundles)))]
    before = [dict(t.resources) for t in flat]
    after = resources.place(bundles, before, spread=False)
    if after is None:
        return []
    used = [t.name for t, b, a in zip(flat, before, after, strict=True) if a != b]
    return [(t, used.count(t.name)) for t in nodes if t.name in used]


def _priced(held: Sequence[tuple[NodeType, int]], seconds: float) -> tuple[float | None, str]:
    """What ``held`` (node type, nodes) costs on demand for ``seconds`` each, and how."""
    if not held:
        return None, "holds no node"
    parts, total = [], 0.0
    for t, k in held:
        price = price_of(t)
        if price is None:
            why = f"in {t.region}" if t.where in PRICES else f"of {t.where or t.name}"
            return None, f"no on-demand price known {why}"
        total += k * price * seconds / 3600
        parts.append(f"{k} x {t.name} ({t.where}, ${price:g}/h)")
    return total, f"{', '.join(parts)} for {_duration(seconds)} each"


def _describe(nodes: Sequence[NodeType]) -> str:
    return "; ".join(t.text() for t in nodes) or "no node"


def _encoder(model: str) -> tuple[int, int, int] | None:
    """(layers, width, dimension) of a caption encoder, from its name."""
    if model.startswith("open_clip:"):
        try:
            arch = memory.architecture(model.split(":", 1)[1].split("@", 1)[0])
        except ValueError:
            return None
        return arch.text.layers, arch.text.width, arch.embed_dim
    low = model.lower()
    return next((v for k, v in ENCODERS.items() if k in low), None)


def _embeddings(cfg: Config, nodes: Sequence[NodeType], rows: int | None) -> Step:
    e = cfg.embed
    actor = {"CPU": e.num_cpus_per_actor, **({"GPU": e.num_gpus_per_actor} if e.num_gpus_per_actor else {}),
             **_custom(e.actor_resources)}
    flat = _expand(nodes, e.num_actors + 1)
    # The pool starts at one actor and grows to num_actors; a read task must still fit beside.
    at_once = next((k for k in range(e.num_actors, 0, -1)
                    if resources.check(flat, actor, k, 1, 1.0, knobs="embed").fits), 0)
    on = _holding(nodes, actor)
    problems: tuple[str, ...] = ()
    if not at_once:
        problems = (f"one encoder actor of {_res(actor)} leaves no node the whole CPU a read task "
                    f"asks for beside it ({_describe(nodes)})" if on else
                    f"no node holds one encoder actor of {_res(actor)} ({_describe(nodes)})",)
    seconds, note = None, f"no rate known for {e.model}"
    enc = _encoder(e.model)
    if rows is None:
        note = "pass --rows"
    elif enc is not None and at_once:
        per_caption = 2 * CAPTION_TOKENS * enc[0] * 12 * enc[1] ** 2
        minilm = 2 * CAPTION_TOKENS * 6 * 12 * 384 ** 2
        gpu = _gpu_of(on) if e.num_gpus_per_actor else None
        if gpu is not None:
            share = RATES["train_gpu_share"].value
            rate = share * GPUS[gpu].fp32_tflops * 1e12 * e.num_gpus_per_actor / per_caption
            how = (f"{share:.1%} of the {gpu}'s fp32 peak (the share bench_train reached on an H200) "
                   f"over {per_caption / 1e9:.1f} GFLOP a caption: scaled, not measured")
        else:
            rate = RATES["embed_cpu"].value * e.num_cpus_per_actor * minilm / per_caption
            how = "MiniLM's measured captions/s per CPU" + ("" if per_caption == minilm else
                                                             ", scaled by the encoder's FLOPs")
        seconds = rows / (rate * at_once)
        note = f"{rows:,} captions at {rate:,.0f}/s per actor x {at_once}: {how}"
    cost: dict = {}
    if seconds is not None:
        held = _packed(nodes, [actor] * at_once)
        dollars, price_note = _priced(held, seconds)
        cost = dict(cpu_hours=reserved_hours(seconds, at_once * e.num_cpus_per_actor + TASK["CPU"]),
                    gpu_hours=reserved_hours(seconds, at_once * e.num_gpus_per_actor),
                    dollars=dollars, price_note=price_note)
    if rows is not None and enc is not None:
        per_row = KEY_BYTES + 4 * enc[2]
        cost.update(written=rows * per_row,
                    written_note=f"{rows:,} rows x {per_row:,} bytes: key, {enc[2]}-d float32 embedding")
    return Step("embeddings", "jobs/embed.py", f"encoder actors of {_res(actor)} and read tasks of "
                f"{_res(TASK)}", tuple(t.name for t in on),
                f"{at_once} of {e.num_actors} actor(s) at once", problems,
                seconds=seconds, time_note=note, **cost)


def _custom(text: str) -> dict[str, float]:
    return parse_resources("resources", text)


def _gpu_of(types: Sequence[NodeType]) -> str | None:
    """The GPU model work lands on: the smallest known among ``types`` with GPUs."""
    known = [t.gpu for t in types if t.gpu and t.resources.get("GPU")]
    return min(known, key=lambda g: GPUS[g].memory_gib) if known else None


def _training(cfg: Config, nodes: Sequence[NodeType], name: str, job: str, runs: int,
              at_once: int, samples: int) -> Step:
    t = cfg.train
    worker = {"CPU": t.cpus_per_worker, **({"GPU": 1.0} if t.use_gpu else {}), **_custom(t.worker_resources)}
    flat = _expand(nodes, at_once * t.num_workers + 1)

    def divides(n: int) -> bool:
        return t.batch_size % n == 0 and (t.batch_size // n) % t.accum_steps == 0

    fit = resources.check(flat, worker, t.num_workers, at_once, t.data_cpus, valid_workers=divides)
    on = _holding(nodes, worker)
    problems = [] if fit.fits else [fit.problem]
    try:
        arch = memory.architecture(t.model)
    except ValueError as e:     # an unknown or unmodelled architecture: no estimate, said so
        arch, unmodelled = None, str(e)
    local = t.batch_size // t.num_workers
    estimate, limit, note = None, None, ""
    gpu = _gpu_of(on) if t.use_gpu else None
    if arch is not None:
        low = t.use_gpu and t.precision != "fp32"
        estimate = memory.estimate(arch, local_batch=local, global_batch=t.batch_size,
                                   accum_steps=t.accum_steps, low_precision=low,
                                   grad_checkpointing=t.grad_checkpointing,
                                   prefetch_batches=t.prefetch_batches)
        if gpu is not None:
            limit = (GPUS[gpu].memory_gib - CUDA_RESERVED_GIB) * ALLOCATOR_SHARE * GIB
            if estimate.total > limit:
                problems.append(f"each GPU worker needs about {estimate.total / GIB:.1f} GiB at a local "
                                f"batch of {local} ({t.accum_steps} micro-batch(es)), over the "
                                f"{limit / GIB:.1f} GiB an {gpu} leaves it")
        elif t.use_gpu:
            note = "no GPU model known for these nodes (pass --cluster): not checked"
        else:
            note = "CPU workers (host memory, not checked)"
    else:
        note = unmodelled
    per_run, how = _train_time(cfg, nodes, arch, gpu, name, runs, at_once, samples)
    runs_text = f"{at_once} run(s) at once" + (f" of {runs}" if runs > at_once else "")
    seconds = None if per_run is None else math.ceil(runs / at_once) * per_run
    cost: dict = {}
    if per_run is not None:
        # Each run holds its workers, and the nodes they pack onto, for its own time.
        held = _packed(nodes, [worker] * t.num_workers)
        dollars, price_note = _priced(held, runs * per_run)
        cost = dict(cpu_hours=runs * reserved_hours(per_run, t.num_workers * t.cpus_per_worker + t.data_cpus),
                    gpu_hours=runs * reserved_hours(per_run, t.num_workers if t.use_gpu else 0),
                    dollars=dollars, price_note=price_note, runs=runs, run_seconds=per_run)
    if arch is not None:
        each = arch.params * CHECKPOINT_BYTES_PER_PARAM
        cost.update(written=runs * t.keep_checkpoints * each,
                    written_note=f"{runs} run(s) x {t.keep_checkpoints} checkpoint(s) kept x {_bytes(each)}: "
                                 f"{arch.params:,} parameters' fp32 weights and AdamW moments")
    return Step(name, job, f"{t.num_workers} worker(s) of {_res(worker)} per run, data tasks of "
                f"{t.data_cpus:g} CPU", tuple(x.name for x in on), runs_text, tuple(problems),
                estimate, limit, note, seconds, how, fit.remedies, **cost)


def _train_time(cfg: Config, nodes: Sequence[NodeType], arch: memory.Architecture | None,
                gpu: str | None, name: str, runs: int, at_once: int,
                samples: int) -> tuple[float | None, str]:
    """One run's time, start included, and how it was reckoned (``runs`` go ``at_once`` at a
    time, in rounds)."""
    t = cfg.train
    if arch is None:
        return None, "no FLOP count for this architecture"
    flops = memory.train_flops(arch, t.grad_checkpointing, t.accum_steps)
    start = RATES["run_start"].value
    if t.use_gpu:
        if gpu is None:
            return None, "no GPU model known for these nodes (pass --cluster)"
        share = RATES["train_gpu_share"].value
        peak = GPUS[gpu].bf16_tflops if t.precision != "fp32" else GPUS[gpu].fp32_tflops
        compute = share * peak * 1e12 / flops * t.num_workers
        how = (f"{compute:,.0f} samples/s a run: {t.num_workers} x {gpu} at {share:.1%} of its "
               f"{peak:g} TFLOP/s peak (the share measured on an H200) over {flops / 1e9:.0f} GFLOP "
               "a sample: scaled, not measured")
        if not (t.cache_inputs or t.decode_in_worker):
            free = sum(n.count * n.resources.get("CPU", 0.0) for n in nodes) - \
                at_once * t.num_workers * t.cpus_per_worker
            decode = RATES["decode"].value * max(free, t.data_cpus) / at_once
            if decode < compute:
                compute, how = decode, how + f"; decoding bounds it at {decode:,.0f} samples/s"
        rate = compute
    else:
        node_cpus = max((n.resources.get("CPU", 0.0) for n in nodes), default=0.0)
        if name == "seed" and t.threads_per_worker:
            # the seed alone gets the threads of max_concurrent runs (checkpoints.seed_threads)
            threads = min(t.threads_per_worker * t.max_concurrent, int(node_cpus)) if node_cpus >= 1 \
                else t.threads_per_worker * t.max_concurrent
        else:
            threads = t.threads_per_worker or max(1, int(t.cpus_per_worker))
        key = "train_cpu_cached" if t.cache_inputs else "train_cpu_streamed"
        tiny = memory.train_flops(memory.architecture("mode-tiny"))
        rate = RATES[key].value * threads * t.num_workers * tiny / flops
        how = (f"{rate:,.0f} samples/s a run: {threads} torch thread(s) x {t.num_workers} worker(s) "
               f"at mode-tiny's measured {RATES[key].value:.0f} samples/s a thread"
               + ("" if arch.name == "mode-tiny" else ", scaled by FLOPs"))
    each = f"{samples:,} samples" + (f" a run, {math.ceil(runs / at_once)} round(s) of runs" if runs > 1 else "")
    return samples / rate + start, f"{each}; {how}; +{start:.0f} s a start"


# ----------------------------------------------------------------------------- remedies
def _candidates(cfg: Config, plan: Plan) -> list[tuple[str, ...]]:
    """Changes that may make ``plan`` fit, mildest first: the resource-level ones the checks
    found, and for memory checkpointing, accumulation and more workers; then each resource
    change with each memory change, for a plan short of both."""
    t = cfg.train
    placing: list[tuple[str, ...]] = [(r,) for s in plan.steps for r in s.remedies]
    fitting: list[tuple[str, ...]] = []
    if any(s.memory_limit and s.memory and s.memory.total > s.memory_limit for s in plan.steps):
        local = t.batch_size // t.num_workers
        accums = [k for k in range(t.accum_steps + 1, local + 1) if local % k == 0]
        if not t.grad_checkpointing:
            fitting.append(("train.grad_checkpointing=true",))
        fitting += [(f"train.accum_steps={k}",) for k in accums]
        if not t.grad_checkpointing:
            fitting += [("train.grad_checkpointing=true", f"train.accum_steps={k}") for k in accums]
        fitting += [(f"train.num_workers={n}",) for n in range(t.num_workers + 1, t.batch_size + 1)
                    if t.batch_size % n == 0]
    embed = next((s for s in plan.steps if s.name == "embeddings" and not s.fits), None)
    if embed is not None:
        e = cfg.embed
        placing += [(f"embed.num_cpus_per_actor={q / 4:g}",)
                    for q in range(int(e.num_cpus_per_actor * 4) - 1, 0, -1)]
        if e.num_gpus_per_actor:
            placing += [(f"embed.num_gpus_per_actor={g:g}",) for g in (0.5, 0.25, 0) if g < e.num_gpus_per_actor]
        if e.actor_resources:
            placing.append(("embed.actor_resources=",))
    both = [a + b for a in dict.fromkeys(placing) for b in fitting
            if not {c.split("=")[0] for c in a} & {c.split("=")[0] for c in b}]
    return list(dict.fromkeys(placing + fitting + both))


def checked(cfg: Config, nodes: Sequence[NodeType], *, runs: int | None = None,
            rows: int | None = None, title: str = "", steps: Sequence[str] = STEPS,
            most: int = 4, image_bytes: int = IMAGE_BYTES) -> Plan:
    """``make``, and for a plan that does not fit, up to ``most`` changes of the config that
    make it fit: each is loaded (so it passes the config's own checks) and planned again. Of
    the changes to one set of fields, only the first that works (the mildest) is kept."""
    plan = make(cfg, nodes, runs=runs, rows=rows, title=title, steps=steps, image_bytes=image_bytes)
    if plan.fits:
        return plan
    works: list[tuple[str, ...]] = []
    kinds: set[str] = set()
    for change in _candidates(cfg, plan):
        fields = " ".join(c.split("=", 1)[0] for c in change)
        if fields in kinds:
            continue
        try:
            changed = load_config(cfg.to_dict(), list(change))
        except ConfigError:
            continue
        if make(changed, nodes, runs=runs, rows=rows, steps=steps).fits:
            works.append(change)
            kinds.add(fields)
            if len(works) == most:
                break
    return dataclasses.replace(plan, remedies=tuple(works))


class Refused(SystemExit):
    """A config that does not fit its cluster, refused before anything starts."""


def at_start(cfg: Config, ray_nodes: Sequence[Mapping], steps: Sequence[str] = STEPS,
             runs: int | None = None) -> str:
    """What every job checks before its work: its ``steps`` (those it may run) on the nodes up
    now (``ray.nodes()``) and, if they are too few, with the node types the autoscaler can add
    (``ray.node_types``); ``runs``: the training runs after the seed it has left to train. The
    plan's line, or ``Refused`` with its reasons and the changes that fit."""
    if not steps:
        return "[plan] nothing left to check: every stage of this job is complete"
    alive = alive_nodes(ray_nodes)
    plan = checked(cfg, alive, runs=runs, steps=steps)
    what = ", ".join(steps) if tuple(steps) != STEPS else "every stage and training run"
    if plan.fits:
        return f"[plan] {what} fits on the {len(alive)} node(s) up now"
    extra = declared_nodes(cfg.ray.node_types)
    if extra:
        grown = checked(cfg, alive + extra, runs=runs, steps=steps)
        if grown.fits:
            return f"[plan] {what} fits, once the autoscaler adds nodes (ray.node_types)"
        plan, where = grown, "even with the nodes of ray.node_types"
    else:
        where = "on the nodes up now (on an autoscaling cluster, declare the node types it can add: " \
                "--set ray.node_types=...)"
    fixes = "; ".join("--set " + " --set ".join(r) for r in plan.remedies) or "add nodes or larger ones"
    raise Refused(f"[plan] refused, {where}: {' | '.join(plan.problems)}. Changes that fit: {fixes} "
                  "(python jobs/plan.py prints the whole plan)")
