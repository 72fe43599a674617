"""k-means and nearest-neighbour search for curation, through faiss or scikit-learn.

Both backends work on L2-normalised float32 rows and score by inner product (= cosine
similarity). faiss (``faiss-cpu``) is used when installed; scikit-learn (``MiniBatchKMeans``,
``NearestNeighbors``) is the fallback, always available. Both give the same neighbours up to
ties and float rounding; their k-means differ (faiss: Lloyd on a sample; scikit-learn:
mini-batches), so cluster ids differ between them.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from enum import Enum

import numpy as np

from cellvit_ssl.errors import ConfigError


class Backend(str, Enum):
    """Which library does the k-means and the neighbour search."""

    auto = "auto"  # faiss when installed, else scikit-learn
    faiss = "faiss"
    sklearn = "sklearn"


def faiss_available() -> bool:
    """True when ``import faiss`` would succeed."""
    return importlib.util.find_spec("faiss") is not None


def make_search(backend: Backend | str, threads: int = 0) -> FaissSearch | SklearnSearch:
    """The search object for ``backend`` (``auto``: faiss when installed, else scikit-learn).

    Args:
        backend: ``auto``, ``faiss`` or ``sklearn``.
        threads: CPU threads (0: the library's default, usually every core).

    Raises:
        ConfigError: If faiss is asked for but not installed, or the name is unknown.
    """
    try:
        name = Backend(backend).value
    except ValueError:
        raise ConfigError(f"curate.backend={backend!r}; expected one of {[b.value for b in Backend]}") from None
    if name == "faiss" and not faiss_available():
        raise ConfigError("curate.backend=faiss but faiss is not installed: pip install faiss-cpu "
                          "(or use curate.backend=sklearn)")
    if name == "faiss" or (name == "auto" and faiss_available()):
        return FaissSearch(threads)
    return SklearnSearch(threads)


class FaissSearch:
    """k-means (``faiss.Kmeans``, spherical, k-means++ seeding) and exact inner-product search (``IndexFlatIP``)."""

    name = "faiss"

    def __init__(self, threads: int = 0) -> None:
        import faiss

        self._faiss = faiss
        self.threads = threads
        if threads > 0:
            faiss.omp_set_num_threads(threads)

    def kmeans(self, x: np.ndarray, k: int, iters: int = 20, seed: int = 0, restarts: int = 1) -> np.ndarray:
        """Unit-norm centroids ``(k, D)`` of spherical k-means on the unit rows ``x`` (best of ``restarts``)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        # k-means++ seeding, as scikit-learn's: faiss's default random seeding can merge
        # well-separated groups when few points are clustered (the upper levels of the hierarchy)
        init = getattr(self._faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS", None)
        extra = {} if init is None else {"init_method": init}
        km = self._faiss.Kmeans(x.shape[1], int(k), niter=int(iters), seed=int(seed), spherical=True,
                                max_points_per_centroid=max(len(x) // max(k, 1) + 1, 1), min_points_per_centroid=1,
                                nredo=int(restarts), verbose=False, **extra)
        km.train(x)
        return _unit(km.centroids)

    def nearest(self, database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` rows of ``database`` with the largest inner product with each query.

        Returns:
            ``(similarities (m, k) float32, row ids (m, k) int64)``, best first.
        """
        database = np.ascontiguousarray(database, dtype=np.float32)
        k = min(int(k), len(database))
        index = self._faiss.IndexFlatIP(database.shape[1])
        index.add(database)
        sims, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return sims, ids.astype(np.int64)


class SklearnSearch:
    """k-means (``MiniBatchKMeans`` on unit rows) and brute-force cosine search (``NearestNeighbors``)."""

    name = "sklearn"

    def __init__(self, threads: int = 0) -> None:
        self.threads = threads

    @contextmanager
    def _limits(self):
        import sklearn
        from threadpoolctl import threadpool_limits

        # scikit-learn computes distances block by block; 256 MB blocks keep its peak memory low
        with sklearn.config_context(working_memory=256), threadpool_limits(self.threads or None):
            yield

    def kmeans(self, x: np.ndarray, k: int, iters: int = 20, seed: int = 0, restarts: int = 1) -> np.ndarray:
        """Unit-norm centroids ``(k, D)`` of k-means on the unit rows ``x`` (best of ``restarts``).

        Mini-batch k-means on many rows; plain k-means when they fit in one batch.
        """
        from sklearn.cluster import KMeans, MiniBatchKMeans

        x = np.ascontiguousarray(x, dtype=np.float32)
        batch = int(min(len(x), max(4096, 4 * k)))
        if batch >= len(x):
            km = KMeans(n_clusters=int(k), max_iter=max(int(iters), 50), n_init=int(restarts), random_state=int(seed))
        else:
            km = MiniBatchKMeans(n_clusters=int(k), batch_size=batch, max_iter=int(iters), n_init=int(restarts),
                                 init_size=int(min(len(x), max(3 * k, batch))), random_state=int(seed))
        with self._limits():
            km.fit(x)
        return _unit(km.cluster_centers_)

    def nearest(self, database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Same contract as :meth:`FaissSearch.nearest`."""
        from sklearn.neighbors import NearestNeighbors

        k = min(int(k), len(database))
        nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine")
        with self._limits():
            dist, ids = nn.fit(np.asarray(database, np.float32)).kneighbors(np.asarray(queries, np.float32))
        return (1.0 - dist).astype(np.float32), ids.astype(np.int64)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
