"""The k-means maths without Ray: each case runs in milliseconds."""

import numpy as np
import pytest

from pipeline.clustering import kmeans


def _blobs(seed=0, n=200):
    rng = np.random.default_rng(seed)
    a = rng.normal([0, 0], 0.1, (n, 2))
    b = rng.normal([5, 5], 0.1, (n, 2))
    return np.vstack([a, b]).astype(np.float32)


def test_two_blobs_are_found():
    x = _blobs()
    centroids, history = kmeans.lloyd(x, 2, iterations=10, seed=0, balanced=False)
    centres = sorted(map(tuple, np.round(centroids, 1)))
    assert np.allclose(centres, [(0, 0), (5, 5)], atol=0.1)
    assert history[-1] <= history[0]
    d, labels = kmeans.nearest(x, centroids)
    assert len(set(labels[:200, 0])) == 1 and len(set(labels[200:, 0])) == 1
    assert labels[0, 0] != labels[-1, 0]


def test_empty_cluster_is_reseeded_not_left_empty():
    x = _blobs()
    previous = np.array([[0, 0], [5, 5], [100, 100]], np.float32)   # third centre owns nothing
    d, i = kmeans.nearest(x, previous)
    stats = kmeans.block_stats(x, i[:, 0], d[:, 0], 3)
    assert stats.counts[2] == 0
    new, reseeded = kmeans.update_centroids(stats, previous, seed=1)
    assert reseeded == 1
    assert np.linalg.norm(new[2] - [100, 100]) > 50        # moved next to a populated cluster
    d2, i2 = kmeans.nearest(x, new)
    assert np.bincount(i2[:, 0], minlength=3).min() > 0    # and it owns points now


def test_lloyd_never_ends_with_an_empty_cluster():
    rng = np.random.default_rng(3)
    x = np.vstack([rng.normal(0, 0.01, (300, 4)), rng.normal(3, 0.01, (5, 4))]).astype(np.float32)
    centroids, _ = kmeans.lloyd(x, 8, iterations=15, seed=0, balanced=False)
    _, i = kmeans.nearest(x, centroids)
    assert np.bincount(i[:, 0], minlength=8).min() > 0


@pytest.mark.parametrize("n,k", [(1000, 7), (999, 10), (64, 64)])
def test_balanced_assignment_respects_capacities(n, k):
    rng = np.random.default_rng(n)
    # Skewed data: 80% of the points near one centre, which plain assignment would overfill.
    centroids = rng.normal(size=(k, 8)).astype(np.float32)
    x = (centroids[rng.choice(k, n, p=[0.8] + [0.2 / (k - 1)] * (k - 1))]
         + rng.normal(0, 0.3, (n, 8))).astype(np.float32)
    caps = kmeans.capacities(n, k)
    labels, dist = kmeans.balanced_assign(x, centroids, caps, candidates=4)
    sizes = np.bincount(labels, minlength=k)
    assert (labels >= 0).all() and (sizes <= caps).all() and sizes.sum() == n
    assert caps.max() - caps.min() <= 1
    exact = ((x - centroids[labels]) ** 2).sum(1)
    assert np.allclose(dist, exact, rtol=1e-4, atol=1e-4)
    _, plain = kmeans.nearest(x, centroids)
    assert np.bincount(plain[:, 0], minlength=k).max() > caps.max()   # the constraint did bind


def test_capacities_sum_and_rotate():
    caps = [kmeans.capacities(10, 4, b) for b in range(4)]
    assert all(c.sum() == 10 for c in caps)
    assert np.ptp(np.sum(caps, axis=0)) <= 1          # remainders spread over the centres


def test_capacity_slack_caps_each_centre_and_only_lowers_the_objective():
    caps = kmeans.capacities(1000, 10, slack=0.02)
    assert caps.sum() == 1020 and caps.max() == 102
    with pytest.raises(ValueError, match="slack"):
        kmeans.capacities(1000, 10, slack=-0.1)
    rng = np.random.default_rng(2)
    centroids = rng.normal(size=(10, 8)).astype(np.float32)
    x = (centroids[rng.choice(10, 1000, p=[0.3] + [0.7 / 9] * 9)]
         + rng.normal(0, 0.5, (1000, 8))).astype(np.float32)
    exact, d0 = kmeans.assign_block(x, centroids, True, 0)
    loose, d1 = kmeans.assign_block(x, centroids, True, 0, slack=0.02)
    assert np.bincount(exact, minlength=10).max() == 100
    assert np.bincount(loose, minlength=10).max() == 102     # the popular centre keeps 2 more
    assert d1.sum() < d0.sum()


def test_same_seed_gives_bit_identical_centroids():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    a, ha = kmeans.lloyd(x, 16, iterations=5, seed=7, balanced=True, blocks=4)
    b, hb = kmeans.lloyd(x, 16, iterations=5, seed=7, balanced=True, blocks=4)
    c, _ = kmeans.lloyd(x, 16, iterations=5, seed=8, balanced=True, blocks=4)
    assert a.tobytes() == b.tobytes() and ha == hb
    assert a.tobytes() != c.tobytes()


def test_balanced_fit_gives_equal_sizes_on_skewed_data():
    rng = np.random.default_rng(11)
    topics = rng.normal(size=(5, 32))
    x = topics[rng.choice(5, 4000, p=[0.6, 0.2, 0.1, 0.05, 0.05])] + rng.normal(0, 0.5, (4000, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    centroids, _ = kmeans.lloyd(x, 20, iterations=8, seed=0, balanced=True, blocks=3)
    labels, _ = kmeans.balanced_assign(x, centroids, kmeans.capacities(len(x), 20))
    sizes = np.bincount(labels, minlength=20)
    assert sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("balanced,slack", [(False, 0.0), (True, 0.0), (True, 0.05)])
def test_ray_fit_is_bit_identical_to_the_single_process_reference(ray_local, balanced, slack):
    from pipeline.clustering import kmeans_ray

    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 24)).astype(np.float32)
    reference, history = kmeans.lloyd(x, 32, iterations=4, seed=9, balanced=balanced, blocks=5,
                                      slack=slack)
    blocks = [ray_local.put(x[rows]) for rows in np.array_split(np.arange(len(x)), 5)]
    centroids, records = kmeans_ray.fit(blocks, kmeans.init_centroids(x, 32, 9), 4, 9, balanced,
                                        slack)
    assert centroids.tobytes() == reference.tobytes()
    assert [r["objective"] for r in records] == history


def test_weighted_coarse_level_follows_the_weights_and_leaves_no_expert_empty():
    rng = np.random.default_rng(0)
    centres = np.array([[1, 0], [-1, 0], [0, 1]], np.float32)
    x = np.concatenate([c + 0.05 * rng.standard_normal((10, 2)) for c in centres]).astype(np.float32)
    w = np.ones(len(x))
    _, labels, _ = kmeans.weighted_kmeans(x, w, 3, seed=0)
    assert sorted(np.bincount(labels).tolist()) == [10, 10, 10]
    assert all(len(set(labels[i:i + 10])) == 1 for i in (0, 10, 20))
    # One heavy row pulls its centre onto itself.
    w2 = w.copy()
    w2[0] = 1e6
    c2, labels2, _ = kmeans.weighted_kmeans(x, w2, 3, seed=0)
    assert np.allclose(c2[labels2[0]], x[0], atol=1e-3)
    # More experts than natural groups: still none empty; balanced: equal counts.
    _, labels3, _ = kmeans.weighted_kmeans(x, w, 6, seed=0)
    assert np.bincount(labels3, minlength=6).min() >= 1
    _, labels4, _ = kmeans.weighted_kmeans(x[:28], w[:28], 4, seed=0, balanced=True)
    assert np.bincount(labels4).tolist() == [7, 7, 7, 7]


def test_the_coarse_level_groups_fine_centres_by_direction_not_length():
    """Two topics, each with tight (long) and diffuse (short) fine centres: on the raw centres
    k-means groups long with long and short with short, across topics; the coarse level,
    on the unit sphere, groups by topic (docs/clustering.md)."""
    from pipeline.clustering.kmeans_ray import coarse_level

    rng = np.random.default_rng(0)
    rows, topic = [], []
    for t, angle in enumerate((0.0, np.pi / 6)):
        for length in (0.3, 1.0):
            for _ in range(8):
                a = angle + 0.01 * rng.standard_normal()
                rows.append(length * np.array([np.cos(a), np.sin(a)]))
                topic.append(t)
    fine, topic = np.array(rows, np.float32), np.array(topic)
    sizes = np.full(len(fine), 100)
    _, raw, _ = kmeans.weighted_kmeans(fine, sizes.astype(float), 2, seed=0)
    assert len(set(zip(raw, topic, strict=True))) == 4          # raw centres: each group holds both topics
    _, fine_to_expert, _ = coarse_level(fine, sizes, 2, seed=0)
    assert len(set(zip(fine_to_expert, topic, strict=True))) == 2


def test_restarts_of_neighbouring_seeds_never_share_a_draw():
    seeds = [kmeans.restart_seed(s, r) for s in range(5) for r in range(10)]
    assert len(set(seeds)) == len(seeds)
    assert [kmeans.restart_seed(s, 0) for s in range(5)] == list(range(5))
