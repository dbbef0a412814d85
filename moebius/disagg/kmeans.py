"""Balanced spherical k-means: one centroid per decode worker, each holding at most ceil(n/K).

Owns the exact capacitated assignment (n points to K clusters, at most `capacity` points per
cluster, minimum total cost) and the k-means loop around it (k-means++ seeding, cosine cost,
centroids renormalised to the unit sphere, deterministic by seed).

Shapes: n points, K clusters, d signature size.

Why an exact solver and not a greedy fill: a greedy "nearest cluster with room" assignment
depends on point order and can be arbitrarily worse than optimal; the exact one makes k-means
monotone (each step lowers the cost) and reproducible.

The solver is the successive-shortest-path min-cost flow of the transportation problem, the
Hungarian method specialised to K capacitated columns (the same optimum as Hungarian over
K*capacity slots, but each augmentation is a Bellman-Ford over K cluster nodes instead of a
search over K*capacity slots). Points are inserted one at a time; the assignment of the inserted
points stays optimal (no negative cycle in the residual graph). Inserting point p either takes
a cluster b with room (cost c[p, b]) or pushes a chain of points along clusters
b1 -> b2 -> ... -> bm, where bm has room; moving some q from a to b costs c[q, b] - c[q, a], so
the residual edge weight is w[a, b] = min over q in a of that. If p's cheapest cluster has room
the direct move is optimal (a cheaper chain would have improved the previous optimum).
"""

from __future__ import annotations

import math

import numpy as np

_EPS = 1e-12


class _Residual:
    """Cluster-to-cluster move costs w[a, b] and the point realising each, kept per cluster."""

    def __init__(self, cost: np.ndarray, labels: np.ndarray) -> None:
        self.cost, self.labels = cost, labels
        num_clusters = cost.shape[1]
        self.weight = np.full((num_clusters, num_clusters), np.inf)
        self.mover = np.full((num_clusters, num_clusters), -1, dtype=np.int64)

    def refresh(self, cluster: int) -> None:
        members = np.flatnonzero(self.labels == cluster)
        if len(members) == 0:
            self.weight[cluster] = np.inf
            self.mover[cluster] = -1
            return
        delta = self.cost[members] - self.cost[members, cluster][:, None]  # (m, K)
        best = np.argmin(delta, axis=0)
        self.weight[cluster] = delta[best, np.arange(delta.shape[1])]
        self.weight[cluster, cluster] = np.inf
        self.mover[cluster] = members[best]


def balanced_assign(cost: np.ndarray, capacity: int) -> np.ndarray:
    """Exact min-cost assignment of n points to K clusters, each taking at most `capacity`.

    cost: (n, K) finite; needs n <= K * capacity. Returns labels (n,) int64 minimising
    sum_i cost[i, labels[i]]. Deterministic (points inserted in index order, ties to the lower
    cluster index).
    """
    cost = np.asarray(cost, dtype=np.float64)
    num_points, num_clusters = cost.shape
    if num_points > num_clusters * capacity:
        raise ValueError(f"{num_points} points do not fit {num_clusters} x {capacity} slots")
    labels = np.full(num_points, -1, dtype=np.int64)
    sizes = np.zeros(num_clusters, dtype=np.int64)
    residual = _Residual(cost, labels)
    for p in range(num_points):
        direct = int(np.argmin(cost[p]))
        if sizes[direct] < capacity:
            labels[p] = direct
            sizes[direct] += 1
            residual.refresh(direct)
            continue
        # Bellman-Ford from p over the K cluster nodes (negative edges, no negative cycles).
        dist = cost[p].copy()
        pred = np.full(num_clusters, -1, dtype=np.int64)
        for _ in range(num_clusters):
            cand = dist[:, None] + residual.weight  # (K from, K to)
            src = np.argmin(cand, axis=0)
            new = cand[src, np.arange(num_clusters)]
            better = new < dist - _EPS
            if not better.any():
                break
            dist[better] = new[better]
            pred[better] = src[better]
        free = sizes < capacity
        target = int(np.flatnonzero(free)[np.argmin(dist[free])])
        touched = [target]
        node, steps = target, 0
        while pred[node] >= 0:  # walk the chain back, moving one point per edge
            src_cluster = int(pred[node])
            labels[residual.mover[src_cluster, node]] = node
            node = src_cluster
            touched.append(node)
            steps += 1
            if steps > num_clusters:
                raise RuntimeError("cycle in shortest-path tree (numerical trouble)")
        labels[p] = node
        sizes[target] += 1
        for cluster in touched:
            residual.refresh(cluster)
    return labels


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def kmeans_pp_init(x: np.ndarray, num_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeds (K, d) on unit rows x, with cosine distance 1 - <x, c> as the D."""
    n = x.shape[0]
    centers = [int(rng.integers(n))]
    closest = 1.0 - x @ x[centers[0]]
    for _ in range(1, num_clusters):
        weights = np.clip(closest, 0.0, None) ** 2
        total = weights.sum()
        nxt = int(rng.choice(n, p=weights / total)) if total > 0 else int(rng.integers(n))
        centers.append(nxt)
        closest = np.minimum(closest, 1.0 - x @ x[nxt])
    return x[centers].copy()


def balanced_kmeans(
    x: np.ndarray,
    num_clusters: int,
    *,
    seed: int = 0,
    max_iter: int = 50,
    capacity: int | None = None,
    balanced: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means with at most `capacity` (default ceil(n/K)) points per cluster.

    x: (n, d) rows (normalised here). Cost of a point in a cluster is 1 - cosine to its
    centroid; each step assigns exactly (balanced_assign), then sets each centroid to the
    normalised mean of its members (an empty cluster keeps its centroid). Stops when labels
    repeat. balanced=False gives plain spherical k-means (nearest centroid). Returns
    (centroids (K, d) unit rows, labels (n,)).
    """
    x = normalize_rows(np.asarray(x, dtype=np.float64))
    n = x.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"need 1 <= K <= n, got K={num_clusters}, n={n}")
    capacity = math.ceil(n / num_clusters) if capacity is None else capacity
    rng = np.random.default_rng(seed)
    centroids = kmeans_pp_init(x, num_clusters, rng)
    labels = np.full(n, -1, dtype=np.int64)
    for _ in range(max_iter):
        cost = 1.0 - x @ centroids.T
        new = balanced_assign(cost, capacity) if balanced else np.argmin(cost, axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, x)
        filled = np.bincount(labels, minlength=num_clusters) > 0
        centroids[filled] = normalize_rows(sums[filled])
    return centroids, labels
