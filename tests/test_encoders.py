import numpy as np
import pytest

from pipeline.encoders import CaptionEncoder


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
