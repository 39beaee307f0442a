"""Seeded hashes of sample keys: the one source of every per-sample random draw.

A draw decided by a hash of the key (rather than by a random generator walking the rows) does not
depend on file layout, block boundaries or scheduling, so a rerun, a repartitioned copy or a
distributed reader makes the same choice for every sample. Used by the clustering sample, the
assignment blocks, the random split and the out-of-cluster share.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def key_rank(keys: Any, seed: int) -> np.ndarray:
    """A seeded 64-bit hash per key (uint64): uniform, stable across runs, machines and layouts."""
    return pd.util.hash_array(np.asarray(keys, dtype=object), hash_key=f"mode{seed % 10**12:012d}")


def below(keys: Any, share: float, seed: int) -> np.ndarray:
    """A seeded Bernoulli(``share``) draw per key: True for about ``share`` of the keys."""
    if share >= 1:
        return np.ones(len(keys), bool)
    return key_rank(keys, seed) < np.uint64(int(share * 2**64))


def uniform(keys: Any, seed: int) -> np.ndarray:
    """A seeded uniform number in [0, 1) per key (float64)."""
    return key_rank(keys, seed).astype(np.float64) / 2.0**64


def digest(keys: Any) -> str:
    """An order-free fingerprint of a set of keys: the 64-bit sum (wrapping) of their hashes,
    16 hex digits. Two collections of distinct keys with the same digest and count are, but
    for a 2**-64 chance, the same keys; a trainer reports the digest of the keys it was fed
    (``pipeline.training.train_loop``) and a test compares it with the rows it should have read."""
    return f"{int(np.sum(key_rank(keys, 0), dtype=np.uint64)):016x}"


def add_digests(*parts: str) -> str:
    """The digest of the union of disjoint key sets, from their digests."""
    return f"{sum(int(p, 16) for p in parts) % 2**64:016x}"
