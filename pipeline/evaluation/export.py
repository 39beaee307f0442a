"""Export a run's experts as a bundle that open_clip loads directly, and load a bundle back as an
ensemble (docs/export.md).

A bundle is a folder, local or at any URL the storage layer reaches (``s3://``, ``gs://``...)::

    manifest.json                    what the bundle holds (experts, baselines, the source run,
                                     the evaluation's numbers) and the size and SHA-256 of
                                     every other file; written last, so a bundle without one
                                     is incomplete
    models/<run>/                    one trained run (expert-0, ..., and with ``baselines``
                                     full-0, seed...) in open_clip's ``local-dir:`` layout:
        open_clip_config.json        {"model_cfg": the architecture, "preprocess_cfg": ...}
        open_clip_model.safetensors  the weights (safetensors: nothing to unpickle)
    routing/fine_centroids.npy       (K, d) float32, the generations' centres appended
    routing/fine_to_expert.npy       (K,) int32, the expert of every fine centre
    routing/coarse_centroids.npy     (m, d) float32, the experts' centres
    routing/routing.json             the caption encoder, the defaults of ``routing_weights``,
                                     the evaluation's methods and the routing it chose on
                                     validation, the generations included and their levels
    routing/encoder.pt               only for an ``open_clip:ARCH@FILE`` caption encoder: FILE

``open_clip.create_model_and_transforms("local-dir:<bundle>/models/expert-0")`` loads a model
with no code of this project: the config carries the whole architecture, so one open_clip does
not ship (``mode-tiny``) loads too. ``load_bundle`` reads a bundle as a ``BundleEnsemble``, the
same interface as ``MoDEEnsemble``; a remote bundle is first copied to a local cache folder.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import re
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core import registry
from pipeline.core.config import Config, StorageConfig
from pipeline.core.rundir import RunDir, code_version, now
from pipeline.core.storage import filesystem, is_remote, join, write_bytes_atomic, write_json_atomic
from pipeline.data.encoders import OPEN_CLIP_PREFIX, CaptionEncoder
from pipeline.evaluation.ensemble import MoDEEnsemble, routing_weights
from pipeline.evaluation.eval import DEFAULT_METHOD, METHODS
from pipeline.training.checkpoint_io import read_checkpoint
from pipeline.training.runs import run_name

if TYPE_CHECKING:
    import torch

FORMAT = "mode-bundle"
VERSION = 1
MANIFEST = "manifest.json"
MODELS = "models"
# open_clip's names (open_clip.constants HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME): the first files
# its local-dir loader looks for.
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
ROUTING = "routing"
ROUTING_FILE = f"{ROUTING}/routing.json"
ENCODER_FILE = f"{ROUTING}/encoder.pt"
ROUTING_ARRAYS = ("fine_centroids", "fine_to_expert", "coarse_centroids")
# What the manifest keeps of a registry entry (the rest, such as the training log, stays in the run).
ENTRY_FIELDS = ("name", "kind", "expert_id", "generation", "part", "fine_clusters", "samples",
                "metrics", "cost", "started_at", "finished_at")
_SAFE_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ExportError(ValueError):
    """A run that cannot be exported as asked (no finished expert, an occupied destination...)."""


class DamagedBundle(ValueError):
    """A bundle file that is missing, or whose size or SHA-256 is not what its manifest says."""


# ----------------------------------------------------------------------------- export
def export(run_uri: str, out_uri: str, cfg: Config, *, baselines: bool = False, force: bool = False,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the bundle of a run's finished experts (and, with ``baselines``, of its other
    finished runs but the OneStep ablation's) to ``out_uri``; return its manifest.

    The experts are those ``MoDEEnsemble`` routes to: every expert of the clustering and of
    each generation whose experts have all finished. ``force`` replaces a bundle already at
    ``out_uri`` (any other non-empty destination is refused without it)."""
    run = RunDir(run_uri, cfg.storage)
    if not run.has_config():
        raise ExportError(f"{run.uri} has no config.yaml: is it a run directory?")
    entries = registry.finished(run)
    if not any(e["kind"] == "expert" for e in entries.values()):
        raise ExportError(f"{run.uri}: no finished expert in its registry ({registry.uri(run)}; "
                          f"runs: {sorted(entries) or 'none'}): train them first "
                          "(jobs/train_experts.py)")
    try:
        ens = MoDEEnsemble(run.uri, cfg)
    except (ValueError, FileNotFoundError) as e:
        raise ExportError(str(e)) from None
    experts = [run_name("expert", e) for e in range(ens.num_experts)]
    later = sorted(set(n for n, e in entries.items() if e["kind"] == "expert") - set(experts))
    if later:
        log(f"[export] left out {later}: their generation's experts have not all finished")
    others = [n for n, e in entries.items() if e["kind"] not in ("expert", "onestep")] if baselines else []

    fs, root = filesystem(out_uri, cfg.storage)
    old = _claim(fs, root, out_uri, force)
    files: dict[str, dict[str, Any]] = {}

    def put(rel: str, data: bytes) -> None:
        write_bytes_atomic(fs, join(root, rel), data)
        files[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    evaluation = _evaluation(run, ens, [entries[n] for n in [*experts, *others]], log)
    described = {}
    for name in [*experts, *others]:
        config, weights, arch = _model_files(entries[name], cfg.storage)
        put(f"{MODELS}/{name}/{CONFIG_FILE}", _json_bytes(config))
        put(f"{MODELS}/{name}/{WEIGHTS_FILE}", weights)
        described[name] = _describe(entries[name], arch, evaluation)
        log(f"[export] {name}: {arch}, {len(weights) / 2**20:.1f} MiB")
    for name in ROUTING_ARRAYS:
        buf = io.BytesIO()
        np.save(buf, getattr(ens, name))
        put(f"{ROUTING}/{name}.npy", buf.getvalue())
    encoder = {"model": cfg.embed.model, "batch_size": cfg.embed.batch_size, "file": None}
    arch, _, weights_file = cfg.embed.model.removeprefix(OPEN_CLIP_PREFIX).partition("@")
    if cfg.embed.model.startswith(OPEN_CLIP_PREFIX) and weights_file and os.path.isfile(weights_file):
        with open(weights_file, "rb") as f:
            put(ENCODER_FILE, f.read())
        encoder.update(model=f"{OPEN_CLIP_PREFIX}{arch}", file=ENCODER_FILE)
    elif os.path.exists(cfg.embed.model):
        log(f"[export] the caption encoder {cfg.embed.model} is a local folder, not in the bundle: "
            "a machine that loads the bundle needs it at the same path")
    put(ROUTING_FILE, _json_bytes(_routing(ens, encoder, evaluation)))
    manifest = {
        "format": FORMAT, "version": VERSION,
        "source": {"run": run.uri, "code_version": code_version(), "exported_at": now()},
        "experts": [described[n] for n in experts],
        "baselines": [described[n] for n in others],
        "evaluation": evaluation,
        "files": files,
    }
    write_json_atomic(fs, join(root, MANIFEST), manifest)   # last: the bundle is complete
    _remove_leftovers(fs, root, sorted(set(old) - set(files)))
    size = sum(f["size"] for f in files.values())
    log(f"[export] {out_uri}: {len(experts)} expert(s), {len(others)} baseline run(s), "
        f"{len(files) + 1} files, {size / 2**20:.1f} MiB")
    return manifest


def _claim(fs, root: str, out_uri: str, force: bool) -> dict[str, Any]:
    """Check that ``root`` may receive a bundle; with ``force``, mark the bundle there
    incomplete (its manifest goes first) and return the files it listed."""
    if not fs.exists(root) or not fs.ls(root, detail=False):
        return {}
    if not force:
        raise ExportError(f"{out_uri} exists and is not empty: choose another --out, or pass "
                          "--force to replace the bundle there")
    path = join(root, MANIFEST)
    if fs.exists(path):
        old = json.loads(fs.cat_file(path)).get("files", {})
        fs.rm(path)
        return old
    top = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    if not top <= {MODELS, ROUTING}:
        raise ExportError(f"{out_uri} is not empty and holds no bundle ({MANIFEST}): --force "
                          "only replaces a bundle; choose another --out")
    for folder in top:      # an export that stopped before its manifest: start again
        fs.rm(join(root, folder), recursive=True)
    return {}


def _remove_leftovers(fs, root: str, names: list[str]) -> None:
    """Delete a replaced bundle's files that the new one does not hold, and the local folders
    they leave empty (object stores have no folders)."""
    for rel in names:
        if fs.exists(join(root, rel)):
            fs.rm(join(root, rel))
    if "file" not in fs.protocol:
        return
    folders = {join(root, *rel.split("/")[:i]) for rel in names for i in range(1, rel.count("/") + 1)}
    for folder in sorted(folders, key=len, reverse=True):   # deepest first
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _model_files(entry: dict[str, Any], storage: StorageConfig) -> tuple[dict[str, Any], bytes, str]:
    """(open_clip_config.json, safetensors bytes, architecture) of a registered run.

    The model is built and loaded as ``load_model`` builds it, so the weights are known to fit
    the architecture and ``preprocess_cfg`` is the transform the project evaluated it with."""
    import open_clip  # late import: torch and open_clip, for the export only
    from safetensors.torch import save

    from pipeline.training.model import create, register_configs

    state = read_checkpoint(entry["checkpoint"], storage)
    arch = state["model_name"]
    register_configs()
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ExportError(f"{entry['name']}: its checkpoint's architecture {arch!r} is unknown here")
    model = create(arch)[0]
    model.load_state_dict(state["model"])
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    weights = save(tensors, metadata={"format": "pt"})
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, weights, arch


def _describe(entry: dict[str, Any], arch: str, evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """A run's line in the manifest: its registry entry's summary, the architecture, where it
    came from, and its own accuracy per task in the evaluation (when there is one)."""
    name = entry["name"]
    out = {k: entry.get(k) for k in ENTRY_FIELDS}
    out.update(architecture=arch, folder=f"{MODELS}/{name}",
               source={"checkpoint": entry["checkpoint"], "sha256": entry.get("sha256")})
    if evaluation is not None:
        out["eval"] = {task: r["accuracy"][name] for task, r in evaluation["zero_shot"].items()
                       if name in r["accuracy"]}
    return out


def _evaluation(run: RunDir, ens: MoDEEnsemble, exported: list[dict[str, Any]],
                log: Callable[[str], None]) -> dict[str, Any] | None:
    """The numbers of the run's eval report, where it evaluated these very models: the same
    experts and generations, and no exported run finished after it."""
    m = run.manifest("eval")
    if m is None:
        return None
    report = json.loads(run.fs.cat_file(run.stage_path("eval", "report.json")))
    newer = [e["name"] for e in exported if (e.get("finished_at") or "") > m["finished_at"]]
    if report["num_experts"] != ens.num_experts or report.get("generations", []) != ens.generations or newer:
        log(f"[export] the eval report ({m['finished_at']}) is of other models"
            f"{' (trained since: ' + ', '.join(newer) + ')' if newer else ''}: its numbers are "
            "left out; rerun jobs/evaluate.py, then export again")
        return None
    selection = report.get("routing_selection")
    return {
        "finished_at": m["finished_at"],
        "zero_shot": {task: {k: r[k] for k in ("classes", "images", "accuracy")}
                      for task, r in report["zero_shot"].items()},
        "retrieval": report.get("retrieval"),
        "routing_selection": {k: selection[k] for k in ("chosen", "params", "mean")} if selection else None,
    }


def _routing(ens: MoDEEnsemble, encoder: dict[str, Any], evaluation: dict[str, Any] | None) -> dict[str, Any]:
    defaults = {k: p.default for k, p in inspect.signature(routing_weights).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    selection = evaluation["routing_selection"] if evaluation else None
    return {
        "encoder": encoder,
        # ``routing_weights``' keyword defaults as exported: the bundle routes the same when
        # the code's defaults move.
        "defaults": defaults,
        "methods": METHODS, "default_method": DEFAULT_METHOD,
        "validated": dict(selection["params"]) if selection else None,
        "generations": ens.generations,
        # (fine centres, experts) before each generation: a prefix of the arrays
        "levels": [list(level) for level in ens.levels],
    }


# ----------------------------------------------------------------------------- loading
def file_problem(path: str, record: dict[str, Any]) -> str:
    """Why the local file ``path`` is not the one ``record`` ({size, sha256}) describes ("" if
    it is)."""
    if not os.path.isfile(path):
        return "missing"
    size = os.path.getsize(path)
    if size != record["size"]:
        return f"{size:,} bytes where the manifest says {record['size']:,}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != record["sha256"]:
        return "its SHA-256 is not the one in the manifest"
    return ""


def _check_name(rel: str, where: str) -> str:
    """A manifest's file name: relative, and no part of it leaves the bundle."""
    if not all(_SAFE_PART.fullmatch(p) for p in rel.split("/")):
        raise DamagedBundle(f"{where}/{MANIFEST}: file name {rel!r} is not a plain relative path")
    return rel


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedBundle(f"{where}/{MANIFEST}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{where}: {MANIFEST} is not a MoDE bundle's (format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{where}: bundle version {manifest.get('version')!r}; this code reads "
                         f"version {VERSION}")
    for rel in manifest["files"]:
        _check_name(rel, where)
    return manifest


def verify(folder: str, manifest: dict[str, Any], where: str | None = None) -> None:
    """Check every file of a local bundle against its manifest; ``DamagedBundle`` names the
    first file that is missing or differs."""
    for rel, record in sorted(manifest["files"].items()):
        problem = file_problem(os.path.join(folder, *rel.split("/")), record)
        if problem:
            raise DamagedBundle(f"{where or folder}/{rel}: {problem}: the bundle is damaged "
                                "(copy or export it again)")


def default_cache() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                        "mode", "bundles")


def localize(uri: str, storage: StorageConfig | None = None,
             cache_dir: str | None = None) -> tuple[str, dict[str, Any]]:
    """(local folder, manifest) of a bundle, every file checked against the manifest.

    A local bundle is read where it is. A remote one is copied into
    ``<cache_dir>/<manifest digest>/`` (default ``~/.cache/mode/bundles``); files already
    there and intact are not copied again."""
    storage = storage or StorageConfig()
    fs, root = filesystem(uri, storage)
    path = join(root, MANIFEST)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: no {MANIFEST}: not a bundle, or its export did not finish "
                                "(jobs/export.py writes it last)")
    data = fs.cat_file(path)
    manifest = parse_manifest(data, uri)
    if not is_remote(uri):
        verify(root, manifest, uri)
        return root, manifest
    folder = os.path.join(cache_dir or default_cache(), hashlib.sha256(data).hexdigest()[:16])
    for rel, record in sorted(manifest["files"].items()):
        local = os.path.join(folder, *rel.split("/"))
        if not file_problem(local, record):
            continue
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}.tmp-{uuid.uuid4().hex}"
        try:
            fs.get_file(join(root, rel), tmp)
        except FileNotFoundError:
            raise DamagedBundle(f"{uri}/{rel}: missing: the bundle is damaged (export it "
                                "again)") from None
        os.replace(tmp, local)
        problem = file_problem(local, record)
        if problem:
            os.remove(local)
            raise DamagedBundle(f"{uri}/{rel}: {problem}: the bundle is damaged (export it again)")
    with open(os.path.join(folder, MANIFEST), "wb") as f:
        f.write(data)
    return folder, manifest


def load_model_dir(folder: str) -> tuple[torch.nn.Module, Callable, Callable]:
    """(model in eval mode, validation transform, tokenizer) of a ``models/<run>`` folder,
    through open_clip's ``local-dir:`` loader alone."""
    import open_clip  # late import: torch and open_clip, not needed to route

    spec = f"local-dir:{folder}"
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    return model.eval(), preprocess, open_clip.get_tokenizer(spec)


class BundleEnsemble(MoDEEnsemble):
    """A bundle's experts, routed per task: ``MoDEEnsemble``'s interface (``num_experts``,
    ``levels``, ``generations``, ``registry``, ``encoder``, ``weights``/``route``,
    ``model(name)``, ``image_features``, ``classifier``, ``logits``, ``zero_shot``) over a
    local bundle folder (``localize``). Models load through open_clip's ``local-dir:`` loader;
    routing uses the defaults the bundle recorded (``routing["defaults"]``), under the
    parameters a call gives. ``routing["validated"]`` holds the parameters the run's evaluation
    chose on validation (None without one): ``ens.zero_shot(..., **(ens.routing["validated"] or {}))``.
    """

    def __init__(self, folder: str, manifest: dict[str, Any], device: str = "cpu",
                 uri: str | None = None) -> None:
        import torch  # late import: routing alone needs no torch

        self.folder, self.manifest, self.uri = folder, manifest, uri or folder
        self.device = torch.device(device)
        with open(os.path.join(folder, *ROUTING_FILE.split("/"))) as f:
            self.routing: dict[str, Any] = json.load(f)
        arrays = {n: np.load(os.path.join(folder, ROUTING, f"{n}.npy")) for n in ROUTING_ARRAYS}
        self.fine_centroids = arrays["fine_centroids"]
        self.fine_to_expert = arrays["fine_to_expert"]
        self.coarse_centroids = arrays["coarse_centroids"]
        self.num_experts = int(len(self.coarse_centroids))
        self.generations = list(self.routing["generations"])
        self.levels = [tuple(level) for level in self.routing["levels"]]
        # registry-shaped entries: ``model`` is the architecture, as in the run's registry
        self.registry = {e["name"]: {**e, "model": e["architecture"]}
                         for e in [*manifest["experts"], *manifest["baselines"]]}
        self.onestep_runs: list[str] = []
        missing = [e for e in range(self.num_experts) if run_name("expert", e) not in self.registry]
        if missing:
            raise DamagedBundle(f"{self.uri}: routes to {self.num_experts} experts but holds no "
                                f"model for experts {missing}")
        self._start_caches()

    @property
    def encoder(self):
        if self._encoder is None:
            enc = self.routing["encoder"]
            name = enc["model"]
            if enc.get("file"):
                name = f"{name}@{os.path.join(self.folder, *enc['file'].split('/'))}"
            self._encoder = CaptionEncoder(name, batch_size=enc["batch_size"])
        return self._encoder

    def path(self, name: str) -> str:
        """The local ``local-dir:`` folder of a run of the bundle."""
        if name not in self.registry:
            raise KeyError(f"no run {name!r} in the bundle; runs: {sorted(self.registry)}")
        return os.path.join(self.folder, *self.registry[name]["folder"].split("/"))

    def model(self, name: str) -> tuple:
        """(model, preprocess, tokenizer) of a run of the bundle, in eval mode on the device."""
        if name not in self._models:
            model, preprocess, tokenizer = load_model_dir(self.path(name))
            self._models[name] = (model.to(self.device), preprocess, tokenizer)
        return self._models[name]

    def route(self, class_embeddings: np.ndarray, level: int = -1, centres: str = "fine",
              **params) -> np.ndarray:
        if centres == "onestep":
            raise ValueError("a bundle holds no OneStep experts; centres: 'fine', 'coarse'")
        return super().route(class_embeddings, level, centres, **{**self.routing["defaults"], **params})


def load_bundle(uri: str, device: str = "cpu", storage: StorageConfig | None = None,
                cache_dir: str | None = None) -> BundleEnsemble:
    """A bundle (local path or URL; written by ``export``) as a routed ensemble. Every file is
    checked against the manifest first (``DamagedBundle`` names a damaged one)."""
    folder, manifest = localize(uri, storage, cache_dir)
    return BundleEnsemble(folder, manifest, device, uri)

