"""Decode-routing policies: ELDR (expert-locality-aware decode routing) and its baselines.

Owns the fitted ELDR model (selected layers, IDF, one centroid per decode worker; saved as
.npz), the `RoutingPolicy` interface the router calls once per request when its prefill is done,
and four policies: eldr, least_load, round_robin, random.

Shapes: L MoE layers, E routed experts, S selected layers, K decode workers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moebius.disagg.kmeans import balanced_kmeans
from moebius.disagg.signature import fit_idf, select_layers, signatures


@dataclass
class EldrModel:
    """What ELDR learns offline from calibration requests.

    layers: selected MoE layers, in the order greedy selection chose them.
    idf: (L, E) smooth IDF weights (see moebius.disagg.signature).
    centroids: (K, S*E) unit rows, one per decode worker (row k belongs to worker k).
    calib_spearman: Spearman of signature similarity vs decode overlap on calibration pairs.
    """

    layers: list[int]
    idf: np.ndarray
    centroids: np.ndarray
    calib_spearman: float = float("nan")

    def __post_init__(self) -> None:
        self.idf = np.asarray(self.idf, dtype=np.float64)
        self.centroids = np.asarray(self.centroids, dtype=np.float64)
        if self.idf.ndim != 2 or self.centroids.ndim != 2:
            raise ValueError("idf must be (L, E) and centroids (K, S*E)")
        if self.centroids.shape[1] != len(self.layers) * self.idf.shape[1]:
            raise ValueError("centroid size must be len(layers) * num_experts")

    @property
    def num_workers(self) -> int:
        return self.centroids.shape[0]

    @property
    def signature_size(self) -> int:
        return self.centroids.shape[1]

    @classmethod
    def fit(
        cls,
        counts: np.ndarray,
        decode_sets: np.ndarray,
        num_workers: int,
        *,
        seed: int = 0,
        max_layers: int | None = None,
        num_pairs: int = 20000,
        layers: Sequence[int] | None = None,
        groups: np.ndarray | None = None,
    ) -> EldrModel:
        """Fit on calibration prefill counts (N, L, E) and decode expert sets (N, L, E) bool.

        IDF over the N requests; layers by greedy selection (unless given); balanced spherical
        k-means of the signatures into num_workers centroids. groups (N,) restricts the pairs of
        layer selection to within-group ones (see select_layers).
        """
        idf = fit_idf(counts)
        score = float("nan")
        if layers is None:
            layers, score = select_layers(
                counts,
                decode_sets,
                idf,
                max_layers=max_layers,
                num_pairs=num_pairs,
                seed=seed,
                groups=groups,
            )
        centroids, _ = balanced_kmeans(signatures(counts, idf, layers), num_workers, seed=seed)
        return cls(list(layers), idf, centroids, score)

    def signature(self, counts: np.ndarray) -> np.ndarray:
        """(S*E,) unit signature of one request's (L, E) prefill counts (or (N, S*E) of N)."""
        return signatures(np.asarray(counts, dtype=np.float64), self.idf, self.layers)

    def save(self, path: str | Path) -> None:
        np.savez(
            path,
            layers=np.asarray(self.layers, dtype=np.int64),
            idf=self.idf,
            centroids=self.centroids,
            calib_spearman=np.float64(self.calib_spearman),
        )

    @classmethod
    def load(cls, path: str | Path) -> EldrModel:
        with np.load(path) as data:
            return cls(
                [int(x) for x in data["layers"]],
                data["idf"],
                data["centroids"],
                float(data["calib_spearman"]),
            )


class RoutingPolicy(ABC):
    """Chooses the decode worker of a request whose prefill just finished.

    Contract of choose(request, loads):
      - request: the request's (L, E) per-layer top-k prefill counts, or an already computed
        signature (1-D); policies that ignore locality ignore it.
      - loads: in-flight decode requests per worker, len(loads) == number of workers >= 1.
      - returns a worker index in [0, len(loads)).
      - the policy does not update loads; the caller adds the request to the chosen worker.
      - a policy may keep its own state (round robin's cursor, random's generator); given the
        same constructor arguments and the same call sequence it returns the same choices.
    """

    name: str = "policy"

    @abstractmethod
    def choose(self, request: np.ndarray | None, loads: Sequence[int]) -> int: ...


class RoundRobinPolicy(RoutingPolicy):
    """Workers in turn, ignoring load and locality."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: np.ndarray | None, loads: Sequence[int]) -> int:
        worker = self._next % len(loads)
        self._next = worker + 1
        return worker


class LeastLoadPolicy(RoutingPolicy):
    """The worker with the fewest in-flight requests; ties to the lowest index."""

    name = "least_load"

    def choose(self, request: np.ndarray | None, loads: Sequence[int]) -> int:
        return int(np.argmin(np.asarray(loads)))


class RandomPolicy(RoutingPolicy):
    """A uniformly random worker from a seeded generator."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    def choose(self, request: np.ndarray | None, loads: Sequence[int]) -> int:
        return int(self._rng.integers(len(loads)))


class EldrPolicy(RoutingPolicy):
    """ELDR's online rule.

    sim[k] = cosine(signature, centroid k). Candidates are the workers with
    sim[k] >= max(sim) - tau; among them the least loaded wins, ties to the lowest index.
    tau = 0 is pure locality (nearest centroid), a large tau is least_load.

    load_cap (optional, off by default): before the rule, drop the workers whose in-flight load
    is at least load_cap times the fair share ceil((sum(loads) + 1) / K); at least the least
    loaded worker always stays. It bounds the imbalance that locality alone allows (one busy
    topic, one busy worker), which is what raises tail latency.
    """

    name = "eldr"

    def __init__(self, model: EldrModel, tau: float = 0.1, load_cap: float | None = None) -> None:
        if tau < 0:
            raise ValueError("tau must be >= 0")
        if load_cap is not None and load_cap < 1:
            raise ValueError("load_cap must be >= 1 (a multiple of the fair share)")
        self.model, self.tau, self.load_cap = model, tau, load_cap

    def similarities(self, request: np.ndarray) -> np.ndarray:
        request = np.asarray(request, dtype=np.float64)
        sig = request if request.ndim == 1 else self.model.signature(request)
        if sig.shape != (self.model.signature_size,):
            raise ValueError(
                f"signature of shape {sig.shape}, model wants ({self.model.signature_size},)"
            )
        return self.model.centroids @ sig

    def choose(self, request: np.ndarray | None, loads: Sequence[int]) -> int:
        if len(loads) != self.model.num_workers:
            raise ValueError(f"{len(loads)} loads for {self.model.num_workers} centroids")
        sims = self.similarities(request)
        loads = np.asarray(loads)
        if self.load_cap is not None:
            share = -(-(int(loads.sum()) + 1) // len(loads))
            over = loads >= self.load_cap * share
            over[np.argmin(loads)] = False
            sims = np.where(over, -np.inf, sims)
        candidates = np.flatnonzero(sims >= sims.max() - self.tau)
        return int(candidates[np.argmin(loads[candidates])])


def make_policy(
    name: str,
    *,
    model: EldrModel | None = None,
    tau: float = 0.1,
    seed: int = 0,
    load_cap: float | None = None,
) -> RoutingPolicy:
    """A policy by name: eldr (needs model; load_cap optional), least_load, round_robin,
    random."""
    if name == "eldr":
        if model is None:
            raise ValueError("eldr needs a fitted EldrModel")
        return EldrPolicy(model, tau, load_cap)
    if name == "least_load":
        return LeastLoadPolicy()
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "random":
        return RandomPolicy(seed)
    raise ValueError(f"unknown policy {name!r}")
