"""routing_weights against cases worked out by hand (docs/routing.md)."""

import math

import numpy as np
import pytest

from pipeline.evaluation.ensemble import routing_weights

# Four fine centres on the axes of R^4; fine clusters 0 and 1 belong to expert 0, 2 to expert 1,
# 3 to expert 2.
CENTRES = np.eye(4, dtype=np.float32)
F2E = np.array([0, 0, 1, 2])


def _classes(*rows):
    return np.array(rows, np.float64)


E0, E2, E3 = np.eye(4)[0], np.eye(4)[2], np.eye(4)[3]


def test_small_task_by_hand():
    # n = 2 < 10: a = exp(0.5 - sqrt(2)) = 0.400832, beta = 5 * log10(max(10, 2 - 200)) = 5.
    # Class 1 sits on centre 0 (d = 0, expert 0); class 2 is 0.6 * axis 2 (d = 0.4, centre 2,
    # expert 1). u = [exp(5 * 0.400832), exp(5 * 0.000832), 0] = [7.41985, 1.00417, 0];
    # expert 2 gets no class, u = 0, and still gets softmax mass.
    w = routing_weights(_classes(E0, 0.6 * E2), CENTRES, F2E, 3)
    assert w.dtype == np.float64 and w.shape == (3,)
    np.testing.assert_allclose(w, [0.542300, 0.243194, 0.214506], atol=2e-6)
    assert math.isclose(w.sum(), 1.0)


def test_large_task_by_hand():
    # n = 250 > 210: a = 0, beta = 5 * log10(50) = 8.494850. 10 classes on centre 0 give u_0 = 10;
    # 240 classes at 0.6 * axis 3 (d = 0.4, expert 2) give u_2 = 240 * exp(-3.39794) = 8.02610.
    classes = _classes(*([E0] * 10 + [0.6 * E3] * 240))
    w = routing_weights(classes, CENTRES, F2E, 3)
    np.testing.assert_allclose(w, [0.483594, 0.138552, 0.377854], atol=2e-6)


def test_top_k_keeps_the_largest_and_renormalises():
    classes = _classes(E0, 0.6 * E2)
    np.testing.assert_array_equal(routing_weights(classes, CENTRES, F2E, 3, mode="top_k", k=1),
                                  [1.0, 0.0, 0.0])
    np.testing.assert_allclose(routing_weights(classes, CENTRES, F2E, 3, mode="top_k", k=2),
                               [0.690394, 0.309606, 0.0], atol=2e-6)


def test_paper_variant_and_uniform():
    # exp(-d^2 / 0.2): 1 for class 1, exp(-0.8) = 0.449329 for class 2; temperature 1.
    w = routing_weights(_classes(E0, 0.6 * E2), CENTRES, F2E, 3, variant="paper", temperature=1.0)
    np.testing.assert_allclose(w, [0.514286, 0.296518, 0.189195], atol=2e-6)
    np.testing.assert_array_equal(routing_weights(_classes(E0), CENTRES, F2E, 3, mode="uniform"),
                                  [1 / 3] * 3)


def test_sharper_temperature_moves_mass_to_the_routed_expert():
    classes = _classes(E0, 0.6 * E2)
    assert routing_weights(classes, CENTRES, F2E, 3, temperature=1.0)[0] > \
        routing_weights(classes, CENTRES, F2E, 3)[0]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same d"):
        routing_weights(np.ones((2, 3)), CENTRES, F2E, 3)
    with pytest.raises(ValueError, match=r"fine_to_expert values must be in 0\.\.1"):
        routing_weights(_classes(E0), CENTRES, F2E, 2)
    with pytest.raises(ValueError, match="top_k needs"):
        routing_weights(_classes(E0), CENTRES, F2E, 3, mode="top_k", k=4)


def test_report_methods_are_data_that_label_what_they_compute():
    """Each method's label is checked against the parameters it computes with: a default of
    routing_weights changing cannot mislabel a row, because every method names its own."""
    import re

    from pipeline.evaluation.eval import DEFAULT_METHOD, METHODS

    rng = np.random.default_rng(0)
    classes = rng.standard_normal((6, 4))
    for label, params in METHODS.items():
        t = re.search(r"T=(\d+(?:\.\d+)?)", label)
        if t:
            assert params["temperature"] == float(t.group(1)), label
        k = re.search(r"top-(\d+)", label)
        if k:
            assert params["mode"] == "top_k" and params["k"] == int(k.group(1)), label
        if label == "uniform":
            assert params == {"mode": "uniform"}
        assert ("coarse centres" in label) == (params.get("centres") == "coarse"), label
        assert ("paper's formula" in label) == (params.get("variant") == "paper"), label
        w = routing_weights(classes, CENTRES, F2E, 3, **{k: v for k, v in params.items() if k != "centres"})
        assert math.isclose(w.sum(), 1.0)
    assert DEFAULT_METHOD in METHODS and METHODS[DEFAULT_METHOD] == {"temperature": 8.0}
