"""ELDR offline core on synthetic data: exact balanced assignment, balanced k-means, signatures
and IDF, the online tau rule, baselines, and the model's save/load."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from moebius.disagg.eldr import (
    EldrModel,
    EldrPolicy,
    LeastLoadPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    make_policy,
)
from moebius.disagg.kmeans import balanced_assign, balanced_kmeans
from moebius.disagg.signature import (
    fit_idf,
    rankdata,
    select_layers,
    signatures,
    spearman,
    topk_counts,
)


def _brute_force(cost: np.ndarray, capacity: int) -> float:
    n, k = cost.shape
    return min(
        cost[np.arange(n), list(lab)].sum()
        for lab in itertools.product(range(k), repeat=n)
        if np.bincount(lab, minlength=k).max() <= capacity
    )


def test_balanced_assign_is_exact_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(120):
        n, k = int(rng.integers(2, 8)), int(rng.integers(1, 4))
        capacity = math.ceil(n / k) + int(rng.integers(0, 2))
        # Integer costs make ties, which a careless solver gets wrong.
        cost = rng.random((n, k)) if trial % 2 else rng.integers(0, 3, (n, k)).astype(float)
        labels = balanced_assign(cost, capacity)
        assert np.bincount(labels, minlength=k).max() <= capacity
        assert cost[np.arange(n), labels].sum() == pytest.approx(_brute_force(cost, capacity))


def test_balanced_assign_needs_room_and_beats_greedy():
    with pytest.raises(ValueError):
        balanced_assign(np.zeros((5, 2)), 2)
    # Greedy in index order puts point 0 in cluster 0, forcing point 1 (which needs it more) out.
    cost = np.array([[0.0, 0.1], [0.0, 10.0]])
    assert balanced_assign(cost, 1).tolist() == [1, 0]


@pytest.mark.parametrize("n,k", [(10, 3), (16, 4), (100, 7), (97, 16), (1000, 16)])
def test_balanced_kmeans_respects_cap(n, k):
    x = np.random.default_rng(n).standard_normal((n, 12))
    centroids, labels = balanced_kmeans(x, k, seed=1)
    assert np.bincount(labels, minlength=k).max() <= math.ceil(n / k)
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0)
    assert labels.min() >= 0 and labels.max() < k


def test_balanced_kmeans_deterministic_by_seed():
    x = np.random.default_rng(3).standard_normal((200, 8))
    c1, l1 = balanced_kmeans(x, 5, seed=7)
    c2, l2 = balanced_kmeans(x, 5, seed=7)
    assert np.array_equal(l1, l2) and np.array_equal(c1, c2)
    _, l3 = balanced_kmeans(x, 5, seed=8)
    assert not np.array_equal(l1, l3)  # the seed matters


def test_balanced_kmeans_recovers_planted_clusters():
    rng = np.random.default_rng(5)
    k, per, d = 4, 30, 16
    centers = np.eye(d)[:k] * 5
    x = np.concatenate([centers[c] + rng.standard_normal((per, d)) * 0.3 for c in range(k)])
    truth = np.repeat(np.arange(k), per)
    _, labels = balanced_kmeans(x, k, seed=0)
    # Same partition up to renaming: each planted cluster maps to exactly one label.
    pairs = {(int(t), int(lab)) for t, lab in zip(truth, labels, strict=True)}
    assert len(pairs) == k and len({lab for _, lab in pairs}) == k


def test_topk_counts_and_idf_on_a_hand_example():
    # 2 tokens, 1 layer, top-2 over 3 experts.
    counts = topk_counts(np.array([[[0, 1]], [[0, 2]]], dtype=np.uint8), 3)
    assert counts.tolist() == [[2, 1, 1]]
    # 3 requests; expert 0 used by all, expert 1 by one, expert 2 by none.
    calib = np.array([[[1, 0, 0]], [[2, 0, 0]], [[1, 3, 0]]], dtype=float)
    idf = fit_idf(calib)
    expected = [math.log(4 / 4) + 1, math.log(4 / 2) + 1, math.log(4 / 1) + 1]
    assert np.allclose(idf[0], expected)


def test_signature_weights_selects_and_normalises():
    idf = np.array([[1.0, 2.0], [3.0, 1.0], [1.0, 1.0]])
    counts = np.array([[1.0, 1.0], [5.0, 5.0], [2.0, 0.0]])
    sig = signatures(counts, idf, [0, 2])
    raw = np.array([1.0, 2.0, 2.0, 0.0])
    assert np.allclose(sig, raw / np.linalg.norm(raw))
    assert np.linalg.norm(sig) == pytest.approx(1.0)
    batch = signatures(np.stack([counts, np.zeros_like(counts)]), idf, [1])
    assert np.allclose(np.linalg.norm(batch, axis=1), [1.0, 0.0])


def test_rankdata_and_spearman():
    assert rankdata(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    x = np.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_select_layers_finds_the_informative_layer():
    rng = np.random.default_rng(2)
    n, num_layers, e = 60, 4, 8
    group = rng.integers(0, 2, n)
    counts = rng.integers(0, 3, (n, num_layers, e)).astype(float)
    counts[:, 2] = 0
    counts[np.arange(n), 2, group * 4] = 5  # layer 2 tells the group
    decode = np.zeros((n, num_layers, e), dtype=bool)
    decode[np.arange(n), :, group * 4] = True
    decode[np.arange(n), :, group * 4 + 1] = True
    layers, score = select_layers(counts, decode, fit_idf(counts), num_pairs=2000)
    assert layers[0] == 2 and score > 0.5


def _model(num_workers: int = 3) -> EldrModel:
    idf = np.ones((2, 3))
    centroids = np.eye(num_workers, 6)
    return EldrModel([0, 1], idf, centroids)


def test_eldr_policy_tau_and_least_load_rule():
    policy = EldrPolicy(_model(), tau=0.1)
    sig = np.array([0.7, 0.65, 0.0, 0.0, 0.0, 0.0])
    sig /= np.linalg.norm(sig)
    # Workers 0 and 1 are within tau; the less loaded of them wins, worker 2 never does.
    assert policy.choose(sig, [5, 2, 0]) == 1
    assert policy.choose(sig, [2, 5, 0]) == 0
    assert policy.choose(sig, [3, 3, 0]) == 0  # tie -> lowest index
    assert EldrPolicy(_model(), tau=0.0).choose(sig, [9, 0, 0]) == 0  # pure locality
    assert EldrPolicy(_model(), tau=2.0).choose(sig, [9, 1, 0]) == 2  # pure least load
    counts = np.array([[0.0, 4.0, 0.0], [0.0, 0.0, 0.0]])  # (L, E) input gives worker 1
    assert policy.choose(counts, [0, 0, 0]) == 1
    with pytest.raises(ValueError):
        policy.choose(sig, [0, 0])


def test_eldr_load_cap_drops_overloaded_workers_only():
    sig = np.array([0.7, 0.65, 0.0, 0.0, 0.0, 0.0])
    sig /= np.linalg.norm(sig)
    capped = EldrPolicy(_model(), tau=0.0, load_cap=1.5)
    # fair share ceil((8 + 1) / 3) = 3, cap 4.5: worker 0 (5 in flight) is dropped, worker 1
    # is the most similar left; under the cap the rule is the plain one.
    assert capped.choose(sig, [5, 2, 1]) == 1
    assert capped.choose(sig, [4, 2, 1]) == 0
    assert EldrPolicy(_model(), tau=0.0).choose(sig, [5, 2, 1]) == 0
    tight = EldrPolicy(_model(), tau=0.0, load_cap=1.0)  # share ceil(18 / 3) = 6
    assert tight.choose(sig, [9, 8, 0]) == 2  # only the least loaded is left
    assert tight.choose(sig, [6, 6, 6]) == 0  # none over the cap: the plain rule
    assert capped.choose(sig, [0, 0, 0]) == 0  # an idle pool: locality
    with pytest.raises(ValueError):
        EldrPolicy(_model(), load_cap=0.5)


def test_baseline_policies():
    rr = RoundRobinPolicy()
    assert [rr.choose(None, [0, 0, 0]) for _ in range(4)] == [0, 1, 2, 0]
    assert LeastLoadPolicy().choose(None, [3, 1, 1]) == 1
    a = [RandomPolicy(4).choose(None, [0] * 5) for _ in range(20)]
    b = [RandomPolicy(4).choose(None, [0] * 5) for _ in range(20)]
    assert a != [0] * 20 and min(a) >= 0 and max(a) < 5
    assert [make_policy("random", seed=4).choose(None, [0] * 5) for _ in range(3)] == b[:3]
    with pytest.raises(ValueError):
        make_policy("eldr")


def test_model_fit_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4, (40, 3, 8)).astype(float)
    decode = rng.random((40, 3, 8)) < 0.3
    model = EldrModel.fit(counts, decode, 4, seed=0, num_pairs=500)
    assert model.num_workers == 4 and np.allclose(np.linalg.norm(model.centroids, axis=1), 1)
    path = tmp_path / "eldr.npz"
    model.save(path)
    back = EldrModel.load(path)
    assert back.layers == model.layers
    assert np.array_equal(back.idf, model.idf) and np.array_equal(back.centroids, model.centroids)
    sig = model.signature(counts[0])
    assert EldrPolicy(back).choose(sig, [0] * 4) == EldrPolicy(model).choose(sig, [0] * 4)
