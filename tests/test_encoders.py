import numpy as np
import pytest

from pipeline.data.encoders import CaptionEncoder


@pytest.fixture(scope="module")
def encoder():
    return CaptionEncoder("minilm-offline", batch_size=8)


def test_offline_minilm_gives_unit_norm_float32(encoder):
    out = encoder({"key": np.array(["a", "b", "c"]),
                   "caption": np.array(["a red circle", "a red circle", "the number seven"])})
    emb = out["embedding"]
    assert emb.shape == (3, encoder.dim) == (3, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(emb[0], emb[1])
    assert out["key"].tolist() == ["a", "b", "c"]


def test_captions_of_one_domain_are_closer_than_across_domains(encoder):
    e = encoder.encode(["a red circle", "a blue square icon", "the number seven", "digit 3 sticker"])
    sims = e @ e.T
    assert sims[0, 1] > sims[0, 2] and sims[2, 3] > sims[1, 3]


def test_repeated_captions_go_through_the_model_once():
    enc = CaptionEncoder("minilm-offline", batch_size=8, cache_size=100)
    a = enc.encode(["a red circle", "a red circle", "the number seven"])
    assert enc.encoded == 2
    b = enc.encode(["the number seven", "a blue square icon"])       # one cached, one new
    assert enc.encoded == 3
    assert np.array_equal(a[2], b[0])
    no_cache = CaptionEncoder("minilm-offline", batch_size=8, cache_size=0)
    no_cache.encode(["x y", "x y"])
    no_cache.encode(["x y"])
    assert no_cache.encoded == 2                     # de-duplicated within a batch only


def test_the_cache_evicts_the_least_recently_used_caption():
    """The LRU cache keeps cache_size captions in one matrix: a hit refreshes a caption and hands
    back the very row it stored (bit for bit), a miss past the size takes the oldest one's row,
    and an evicted caption goes through the model again. A recomputation runs in a batch of
    other rows, so its matrix products may sum in another order (a batch of one and a batch of
    two take different kernel paths on some CPUs): it is compared to float rounding, 1e-5 on
    unit vectors (compare.differences' bound for re-embedded rows), four orders of magnitude
    below the gap between two captions' vectors."""
    enc = CaptionEncoder("open_clip:mode-tiny", batch_size=4, cache_size=2)
    first = dict(zip("ab", enc.encode(["a", "b"]), strict=True))
    assert np.abs(first["a"] - first["b"]).max() > 1e-2    # another caption's row cannot pass
    enc.encode(["a"])                                  # a hit: "a" is now the newest
    enc.encode(["c"])                                  # evicts "b"
    assert enc.encoded == 3
    hit = enc.encode(["a"])[0]
    assert enc.encoded == 3 and np.array_equal(hit, enc._vectors[enc._cache["a"]])
    assert np.array_equal(hit, first["a"])             # the row stored when "a" was computed
    again = enc.encode(["b"])[0]                       # evicted: computed again, alone
    assert enc.encoded == 4 and np.allclose(again, first["b"], rtol=0, atol=1e-5)
    fresh = enc.encode(["p", "q", "r", "s"])            # more than the cache: the last two stay
    assert list(enc._cache) == ["r", "s"] and enc.encoded == 8
    assert np.array_equal(enc.encode(["s", "r"]), fresh[[3, 2]]) and enc.encoded == 8


def test_open_clip_text_tower_is_pluggable(tmp_path):
    import open_clip
    import torch

    enc = CaptionEncoder("open_clip:mode-tiny", batch_size=4)
    e = enc.encode(["a red circle", "the number seven", "a red circle"])
    assert e.shape == (3, enc.dim) == (3, 64) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    # A checkpoint file: the same weights give the same embeddings.
    torch.manual_seed(1)
    model = open_clip.create_model("mode-tiny")
    torch.save({"model": model.state_dict()}, tmp_path / "ck.pt")
    one = CaptionEncoder(f"open_clip:mode-tiny@{tmp_path / 'ck.pt'}").encode(["a red circle"])
    two = CaptionEncoder(f"open_clip:mode-tiny@{tmp_path / 'ck.pt'}").encode(["a red circle"])
    assert np.array_equal(one, two) and not np.allclose(one, e[:1])
