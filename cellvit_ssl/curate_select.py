"""Curation steps on unit-norm features: near-duplicates, hierarchical k-means, balanced sampling, retrieval.

Every step reads the features a block of rows at a time through :class:`FeatureMatrix` (a
memory-mapped ``(n, D)`` array), so the rows never need to fit in memory at once; k-means
trains on a sample and then assigns every row block by block. The search itself goes through
:mod:`cellvit_ssl.curate_search` (faiss or scikit-learn).

- :func:`find_duplicates`: rows are split into k-means partitions; each row is compared with
  the rows of its ``probe`` nearest partitions (as faiss's IVF search does). Rows are then
  visited in index order: a row whose similarity to an earlier *kept* row reaches the
  threshold is dropped and records that row as its representative, so every dropped row is
  within the threshold of the row it names (no chaining through dropped rows).
- :func:`hierarchical_kmeans`: level 0 clusters the rows (with the chosen backend); each next
  level clusters the centroids of the level below (Vo et al. 2024, the curation behind
  DINOv2-style data), always with scikit-learn's exact k-means and 10 restarts (few points).
- :func:`balanced_sample`: the target size is split as evenly as possible across the
  top-level clusters (a small cluster gives all it has, the rest goes to the others), then
  within each cluster across its children, down to level 0, where rows are drawn at random.
- :func:`retrieve`: rows nearest to a seed set, taken in turns across seeds up to a quota.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from cellvit_ssl.curate_search import SklearnSearch
from cellvit_ssl.errors import DataError


class FeatureMatrix:
    """Unit-norm features on disk, read by row blocks, with optional poses.

    Args:
        x: ``(n, D)`` float32 array of unit rows (usually a ``np.memmap``).
        poses: ``(G, D)`` permutations of the feature dimensions under which two rows count as
            the same content (e.g. the flips of a pixel thumbnail), pose 0 the identity; None
            for features that are already invariant (model embeddings).
    """

    def __init__(self, x: np.ndarray, poses: np.ndarray | None = None) -> None:
        self.x = x
        self.poses = None if poses is None or len(poses) <= 1 else np.asarray(poses, np.int64)
        self.n, self.dim = (int(v) for v in x.shape)

    @property
    def n_poses(self) -> int:
        return 1 if self.poses is None else len(self.poses)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (pose 0) as float32."""
        return np.asarray(self.x[np.asarray(ids)], dtype=np.float32)

    def posed(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` in every pose: ``(G, len(ids), D)``."""
        x = self.rows(ids)
        return x[None] if self.poses is None else np.stack([x[:, perm] for perm in self.poses])

    def invariant(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` averaged over the poses and renormalised (the features clusters are made of)."""
        if self.poses is None:
            return self.rows(ids)
        return _unit(self.posed(ids).mean(axis=0))


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32, copy=False)


def _blocks(n: int, size: int):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _sample(ids: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    if size >= len(ids):
        return ids
    return np.sort(rng.choice(ids, size=size, replace=False))


def _assign(search, centroids: np.ndarray, feats: FeatureMatrix, ids: np.ndarray, k: int, block: int,
            invariant: bool, desc: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest centroids of rows ``ids``: ``(sims (m, k), cluster ids (m, k))``."""
    sims = np.empty((len(ids), k), np.float32)
    labels = np.empty((len(ids), k), np.int64)
    for start, stop in tqdm(_blocks(len(ids), block), desc=desc, unit="block", disable=not progress, leave=False):
        x = feats.invariant(ids[start:stop]) if invariant else feats.rows(ids[start:stop])
        sims[start:stop], labels[start:stop] = search.nearest(centroids, x, k)
    return sims, labels


# ----------------------------------------------------------------------------- duplicates
@dataclass
class Duplicates:
    """Result of :func:`find_duplicates` (arrays over all ``n`` rows).

    Attributes:
        duplicate_of: Row kept in place of each row, -1 for kept rows.
        similarity: Cosine similarity to that row (NaN for kept rows).
        nearest: Highest similarity to any other row found by the search (NaN when none was
            compared): its quantiles show where a threshold cuts.
        partitions: Number of search partitions used.
    """

    duplicate_of: np.ndarray
    similarity: np.ndarray
    nearest: np.ndarray
    partitions: int


def find_duplicates(feats: FeatureMatrix, search, threshold: float, neighbors: int = 16, partitions: int = 0,
                    probe: int = 2, iters: int = 10, sample_per_partition: int = 64, seed: int = 0,
                    block: int = 65536, progress: bool = False) -> Duplicates:
    """Near-duplicate rows by cosine similarity (best pose when the features have poses).

    Args:
        feats: The features.
        search: A :mod:`~cellvit_ssl.curate_search` backend.
        threshold: Rows at least this similar are duplicates.
        neighbors: Neighbours looked at per row and pose (a group of more near-identical rows
            than this may keep more than one representative).
        partitions: Search partitions (0: about 1000 rows each).
        probe: Partitions each row is compared within.
        iters: k-means iterations for the partitions.
        sample_per_partition: Rows per partition the partition k-means trains on.
        seed: Random seed.
        block: Rows read at a time.
        progress: Show progress bars.
    """
    n = feats.n
    n_parts = int(partitions) if partitions > 0 else max(1, round(n / 1000))
    n_parts = min(n_parts, n)
    probe = min(int(probe), n_parts)
    rng = np.random.default_rng(seed)
    everything = np.arange(n)
    if n_parts > 1:
        sample = _sample(everything, n_parts * sample_per_partition, rng)
        centroids = search.kmeans(feats.rows(sample), n_parts, iters, seed)
        # each (row, pose) looks into the partitions nearest to that pose; a row lives in the
        # partition nearest to its pose 0
        probes = []
        for start, stop in tqdm(_blocks(n, block), desc="dedup: partitions", unit="block", disable=not progress,
                                leave=False):
            posed = feats.posed(everything[start:stop])
            probes.append(np.stack([search.nearest(centroids, p, probe)[1] for p in posed], axis=1))
        probes = np.concatenate(probes)  # (n, G, probe)
        home = probes[:, 0, 0].copy()
    else:
        home = np.zeros(n, np.int64)
        probes = np.zeros((n, feats.n_poses, 1), np.int64)
    members = _group(home, n_parts)
    flat_parts = probes.reshape(-1)
    flat_rows = np.repeat(everything, probes.shape[1] * probes.shape[2])
    flat_poses = np.tile(np.repeat(np.arange(probes.shape[1]), probes.shape[2]), n)
    order = np.argsort(flat_parts, kind="stable")
    bounds = np.searchsorted(flat_parts[order], np.arange(n_parts + 1))
    nearest = np.full(n, -np.inf, np.float32)
    pairs_a, pairs_b, pairs_s = [], [], []
    for p in tqdm(range(n_parts), desc="dedup: search", unit="part", disable=not progress, leave=False):
        db_ids = members[p]
        q = order[bounds[p] : bounds[p + 1]]
        if len(db_ids) == 0 or len(q) == 0:
            continue
        q_rows, q_poses = flat_rows[q], flat_poses[q]
        q_pairs = np.unique(np.stack([q_rows, q_poses], 1), axis=0)
        q_rows, q_poses = q_pairs[:, 0], q_pairs[:, 1]
        x = feats.rows(q_rows)
        if feats.poses is not None:
            x = np.take_along_axis(x, feats.poses[q_poses], axis=1)
        sims, hits = search.nearest(feats.rows(db_ids), x, neighbors + 1)
        hits = db_ids[hits]
        other = hits != q_rows[:, None]
        np.maximum.at(nearest, q_rows, np.where(other, sims, -np.inf).max(axis=1))
        close = other & (sims >= threshold)
        qi, hi = np.nonzero(close)
        a, b = q_rows[qi], hits[qi, hi]
        pairs_a.append(np.minimum(a, b))
        pairs_b.append(np.maximum(a, b))
        pairs_s.append(sims[qi, hi])
    duplicate_of, similarity = _greedy_representatives(n, pairs_a, pairs_b, pairs_s)
    nearest = np.where(np.isfinite(nearest), nearest, np.nan).astype(np.float32)
    return Duplicates(duplicate_of, similarity, nearest, n_parts)


def _group(labels: np.ndarray, k: int) -> list[np.ndarray]:
    """Row ids of each label 0..k-1, ascending."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(k)]


def _greedy_representatives(n: int, pairs_a: list, pairs_b: list, pairs_s: list) -> tuple[np.ndarray, np.ndarray]:
    """Visit rows in order; drop a row close to an earlier kept row, naming the most similar one."""
    duplicate_of = np.full(n, -1, np.int64)
    similarity = np.full(n, np.nan, np.float32)
    if not pairs_a or not sum(len(p) for p in pairs_a):
        return duplicate_of, similarity
    a, b, s = np.concatenate(pairs_a), np.concatenate(pairs_b), np.concatenate(pairs_s)
    order = np.lexsort((a, -s, b))  # by later row, then most similar earlier row first
    kept = np.ones(n, bool)
    for later, earlier, sim in zip(b[order].tolist(), a[order].tolist(), s[order].tolist()):
        if kept[later] and kept[earlier]:
            kept[later] = False
            duplicate_of[later] = earlier
            similarity[later] = sim
    return duplicate_of, similarity


# ----------------------------------------------------------------------------- hierarchy
@dataclass
class Hierarchy:
    """Result of :func:`hierarchical_kmeans`.

    Attributes:
        labels: Per level, the cluster of each clustered row (level 0 is the finest).
        parents: Per level but the top, the cluster one level up of each cluster.
        sizes: Per level, the number of clusters.
        centroids: Per level, the unit-norm centroids (None when not kept).
    """

    labels: list[np.ndarray]
    parents: list[np.ndarray]
    sizes: list[int]
    centroids: list[np.ndarray] | None = None


def hierarchical_kmeans(feats: FeatureMatrix, ids: np.ndarray, clusters: Sequence[int], search, iters: int = 20,
                        sample_per_cluster: int = 256, seed: int = 0, block: int = 65536,
                        progress: bool = False) -> Hierarchy:
    """k-means of the rows ``ids`` (level 0), then of each level's centroids (levels 1, 2, ...).

    Args:
        feats: The features (clustered pose-averaged).
        ids: Rows to cluster (e.g. those left after removing duplicates).
        clusters: Clusters per level, finest first; each level is capped at the number of
            points it clusters.
        search: A :mod:`~cellvit_ssl.curate_search` backend.
        iters: k-means iterations.
        sample_per_cluster: Level 0 trains on at most this many rows per cluster.
        seed: Random seed.
        block: Rows read at a time when assigning.
        progress: Show progress bars.

    Raises:
        DataError: If there are fewer than 2 rows to cluster.
    """
    ids = np.asarray(ids)
    if len(ids) < 2:
        raise DataError(f"only {len(ids)} rows left to cluster; k-means needs at least 2")
    rng = np.random.default_rng(seed)
    k = min(int(clusters[0]), len(ids))
    sample = _sample(ids, k * sample_per_cluster, rng)
    centroids = [search.kmeans(feats.invariant(sample), k, iters, seed)]
    _, labels0 = _assign(search, centroids[0], feats, ids, 1, block, True, "k-means: level 0", progress)
    labels, parents = [labels0[:, 0]], []
    upper = SklearnSearch(getattr(search, "threads", 0))
    for level, wanted in enumerate(clusters[1:], start=1):
        below = centroids[-1]
        k = min(int(wanted), len(below))
        # the upper levels cluster few points (centroids): scikit-learn's exact k-means with
        # 10 restarts is cheap there and finds better optima than one run, whatever the backend
        top = upper.kmeans(below, k, max(iters, 50), seed + level, restarts=10)
        parent = search.nearest(top, below, 1)[1][:, 0]
        centroids.append(top)
        parents.append(parent)
        labels.append(parent[labels[-1]])
    return Hierarchy(labels, parents, [len(c) for c in centroids], centroids)


def even_split(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over groups of ``sizes`` as evenly as possible, no group above its size.

    Groups are filled smallest first with an equal share of what is left, so a small group
    gives all it has and the rest is shared by the larger ones.

    Examples:
        >>> even_split(np.array([2, 50, 50]), 30).tolist()
        [2, 14, 14]
    """
    sizes = np.asarray(sizes, np.int64)
    out = np.zeros(len(sizes), np.int64)
    left = int(min(total, sizes.sum()))
    for rank, g in enumerate(np.argsort(sizes, kind="stable")):
        take = min(int(sizes[g]), left // (len(sizes) - rank))
        out[g] = take
        left -= take
    return out


def balanced_sample(hierarchy: Hierarchy, target: int, seed: int = 0) -> np.ndarray:
    """Positions (into the clustered rows) of a sample of ``target`` rows balanced over the hierarchy.

    Returns:
        Sorted int64 positions; every clustered row when ``target`` is at least their number.
    """
    labels = hierarchy.labels
    n = len(labels[0])
    if target >= n:
        return np.arange(n)
    top = len(labels) - 1
    quota = even_split(np.bincount(labels[top], minlength=hierarchy.sizes[top]), target)
    for level in range(top - 1, -1, -1):
        sizes = np.bincount(labels[level], minlength=hierarchy.sizes[level])
        parent = hierarchy.parents[level]
        below = np.zeros(len(sizes), np.int64)
        for c, children in enumerate(_group(parent, hierarchy.sizes[level + 1])):
            if quota[c] and len(children):
                below[children] = even_split(sizes[children], int(quota[c]))
        quota = below
    rng = np.random.default_rng(seed)
    picked = [rng.choice(members, size=int(quota[c]), replace=False)
              for c, members in enumerate(_group(labels[0], hierarchy.sizes[0])) if quota[c]]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------- retrieval
def retrieve(feats: FeatureMatrix, candidates: np.ndarray, seeds: np.ndarray, quota: int, search,
             min_similarity: float = -1.0, block: int = 65536, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``quota`` candidate rows nearest to the seed rows, taken in turns across seeds.

    Each candidate belongs to its most similar seed; the best candidate of every seed is taken
    first, then every seed's second best, and so on (within a turn, most similar first), so
    that one seed with a dense neighbourhood does not take the whole quota.

    Returns:
        ``(rows, similarity to their seed)``, in the order taken.
    """
    candidates = np.asarray(candidates)
    if quota <= 0 or len(candidates) == 0 or len(seeds) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    seed_x = feats.invariant(np.sort(np.asarray(seeds)))
    sims = np.empty(len(candidates), np.float32)
    owner = np.empty(len(candidates), np.int64)
    for start, stop in tqdm(_blocks(len(candidates), block), desc="retrieval", unit="block", disable=not progress,
                            leave=False):
        s, o = search.nearest(seed_x, feats.invariant(candidates[start:stop]), 1)
        sims[start:stop], owner[start:stop] = s[:, 0], o[:, 0]
    ok = sims >= min_similarity
    candidates, sims, owner = candidates[ok], sims[ok], owner[ok]
    by_seed = np.lexsort((-sims, owner))
    first = np.searchsorted(owner[by_seed], owner[by_seed], side="left")
    turn = np.empty(len(by_seed), np.int64)
    turn[by_seed] = np.arange(len(by_seed)) - first
    taken = np.lexsort((-sims, turn))[:quota]
    return candidates[taken], sims[taken]
