"""Expert signatures of requests: what a prefill tells the router about a request's decode.

Owns the offline maths of ELDR's signature: per-layer top-k count matrices from routing logs,
IDF weights fitted on a calibration set, the stacked L2-normalised signature over a subset of
layers, Spearman correlation (numpy ranks), decode expert-set Jaccard of request pairs, and the
greedy forward selection of layers; and the locality figure of a set of requests (how much
more a request's counts correlate with its own later ones than with another request's).

Shapes: N requests, L MoE layers, E routed experts, T tokens, k top-k, P sampled pairs,
S selected layers (signature length S*E).

IDF (the "smooth" form, as in scikit-learn's TfidfTransformer):
    df[l, e]  = number of calibration requests whose prompt picked expert e in layer l at least once
    idf[l, e] = log((1 + N) / (1 + df[l, e])) + 1
so an expert every request uses keeps weight 1 (never 0), and a rarely used one weighs more.
signature(counts) = normalise(concat_{l in layers}(counts[l] * idf[l])), an (S*E,) unit vector
(the zero vector stays zero).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def topk_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Per-layer pick counts (L, E) from top-k expert ids (T, L, k) of one request's tokens."""
    num_tokens, num_layers, _ = experts.shape
    counts = np.zeros((num_layers, num_experts), dtype=np.int64)
    layer_idx = np.broadcast_to(np.arange(num_layers)[None, :, None], experts.shape)
    np.add.at(counts, (layer_idx.ravel(), experts.ravel().astype(np.int64)), 1)
    return counts


def fit_idf(counts: np.ndarray) -> np.ndarray:
    """Smooth IDF (L, E) over calibration counts (N, L, E); see the module docstring."""
    num_requests = counts.shape[0]
    df = (counts > 0).sum(axis=0)
    return np.log((1.0 + num_requests) / (1.0 + df)) + 1.0


def signatures(counts: np.ndarray, idf: np.ndarray, layers: Sequence[int]) -> np.ndarray:
    """Signatures (N, S*E) of counts (N, L, E), or one (S*E,) of counts (L, E)."""
    single = counts.ndim == 2
    batch = counts[None] if single else counts
    layers = list(layers)
    weighted = (batch[:, layers, :] * idf[layers][None]).reshape(batch.shape[0], -1)
    norms = np.linalg.norm(weighted, axis=1, keepdims=True)
    sig = weighted / np.where(norms > 0, norms, 1.0)
    return sig[0] if single else sig


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank (as scipy's 'average')."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Group equal values; each group gets the mean of the ranks it spans.
    starts = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(x)] - 1
    avg = (first + last) / 2.0 + 1.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = avg[group]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation; 0.0 where either side is constant."""
    rx, ry = rankdata(np.asarray(x, float)), rankdata(np.asarray(y, float))
    rx -= rx.mean()
    ry -= ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else 0.0


def sample_pairs(
    num_requests: int, num_pairs: int, seed: int, groups: np.ndarray | None = None
) -> np.ndarray:
    """(P, 2) distinct unordered request pairs i < j drawn uniformly without replacement (all of
    them if fewer exist). With groups (N,), only pairs inside one group (e.g. a length bucket)."""
    i, j = np.triu_indices(num_requests, k=1)
    if groups is not None:
        keep = groups[i] == groups[j]
        i, j = i[keep], j[keep]
    if len(i) > num_pairs:
        pick = np.sort(np.random.default_rng(seed).choice(len(i), size=num_pairs, replace=False))
        i, j = i[pick], j[pick]
    return np.stack([i, j], axis=1)


def length_buckets(lengths: np.ndarray) -> np.ndarray:
    """Bucket id floor(log2(length)) per request: pairs in one bucket differ at most 2x."""
    return np.floor(np.log2(np.maximum(np.asarray(lengths), 1))).astype(np.int64)


def pair_jaccard(sets: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Jaccard (P,) of boolean sets (N, ...) flattened; two empty sets give 0."""
    flat = sets.reshape(sets.shape[0], -1).astype(np.float32)
    a, b = flat[pairs[:, 0]], flat[pairs[:, 1]]
    inter = (a * b).sum(axis=1)
    union = a.sum(axis=1) + b.sum(axis=1) - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def pair_cosines_by_layer_set(
    counts: np.ndarray, idf: np.ndarray, pairs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-layer pieces to get any layer subset's pair cosine cheaply.

    Returns dots (P, L) = <w_i[l], w_j[l]> and squared norms sq_i, sq_j (P, L) of the
    IDF-weighted counts w; the cosine over layers S is sum_S dots / sqrt(sum_S sq_i * sum_S sq_j).
    """
    weighted = counts * idf[None]
    out = np.empty((3, len(pairs), counts.shape[1]))
    for start in range(0, len(pairs), 4096):  # chunks keep (chunk, L, E) temporaries small
        a = weighted[pairs[start : start + 4096, 0]]
        b = weighted[pairs[start : start + 4096, 1]]
        out[:, start : start + 4096] = (a * b).sum(-1), (a * a).sum(-1), (b * b).sum(-1)
    return out[0], out[1], out[2]


def layer_set_cosine(
    dots: np.ndarray, sq_a: np.ndarray, sq_b: np.ndarray, layers: list[int]
) -> np.ndarray:
    """Pair cosine (P,) over a layer subset from pair_cosines_by_layer_set's pieces."""
    denom = np.sqrt(sq_a[:, layers].sum(1) * sq_b[:, layers].sum(1))
    return np.where(denom > 0, dots[:, layers].sum(1) / np.where(denom > 0, denom, 1.0), 0.0)


def select_layers(
    counts: np.ndarray,
    decode_sets: np.ndarray,
    idf: np.ndarray,
    *,
    max_layers: int | None = None,
    num_pairs: int = 20000,
    min_gain: float = 1e-3,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[list[int], float]:
    """Greedy forward selection of layers for the signature.

    Starting from no layer, repeatedly add the layer that most raises the Spearman correlation
    between the pair cosine similarity of signatures (over the chosen layers) and the Jaccard
    overlap of the pair's decode expert sets (decode_sets (N, L, E) bool, all layers); stop when
    the best addition gains less than min_gain or max_layers are chosen. (Maximising the
    correlation with similarity is the same as minimising it with cosine distance = 1 - cos.)
    Returns the layers in the order chosen and the final Spearman.

    Decode-set Jaccard grows with both requests' decode lengths, so over all pairs the objective
    partly rewards layers that encode length. groups (N,) (e.g. length_buckets of the prompt
    lengths) restricts the pairs to within-group ones, which controls for that.
    """
    num_layers = counts.shape[1]
    max_layers = num_layers if max_layers is None else max_layers
    pairs = sample_pairs(counts.shape[0], num_pairs, seed, groups)
    target = pair_jaccard(decode_sets, pairs)
    dots, sq_a, sq_b = pair_cosines_by_layer_set(counts.astype(np.float64), idf, pairs)
    chosen: list[int] = []
    best = -np.inf
    while len(chosen) < max_layers:
        trials = [
            (spearman(layer_set_cosine(dots, sq_a, sq_b, chosen + [l]), target), l)
            for l in range(num_layers)
            if l not in chosen
        ]
        score, layer = max(trials, key=lambda t: (t[0], -t[1]))
        if chosen and score - best < min_gain:
            break
        chosen.append(layer)
        best = score
    return chosen, float(best)


def signature_spearman(
    counts: np.ndarray,
    decode_sets: np.ndarray,
    idf: np.ndarray,
    layers: Sequence[int],
    pairs: np.ndarray,
) -> float:
    """Spearman between signature cosine over `layers` and decode Jaccard on given pairs."""
    dots, sq_a, sq_b = pair_cosines_by_layer_set(counts.astype(np.float64), idf, pairs)
    return spearman(
        layer_set_cosine(dots, sq_a, sq_b, list(layers)), pair_jaccard(decode_sets, pairs)
    )


def locality(first: list[np.ndarray], second: list[np.ndarray], seed: int = 0) -> dict:
    """Mean Pearson correlation, over prompts and layers, of the (L, E) counts of a prompt's
    first half with its own second half (``within``) and with another prompt's (``across``,
    a seeded derangement): within - across is the part a router can use; across alone is
    experts popular with every prompt. Layers where either side is constant are skipped."""
    n = len(first)
    other = (np.arange(n) + 1 + np.random.default_rng(seed).integers(n - 1, size=n)) % n
    out = {}
    for name, pairs in (("within", range(n)), ("across", other)):
        corrs = [
            np.corrcoef(first[i][l], second[j][l])[0, 1]
            for i, j in zip(range(n), pairs, strict=True)
            for l in range(first[i].shape[0])
            if first[i][l].std() > 0 and second[j][l].std() > 0
        ]
        out[name] = float(np.mean(corrs)) if corrs else float("nan")
    return out
