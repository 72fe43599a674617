"""``python -m cellvit_ssl.curate``: near-duplicates out, clusters balanced, rare content retrieved.

DINOv2-style curation of an index before pre-training, with the features a lab has: an
``embed`` output of the index, a checkpoint to embed it with, or raw pixels for a first round.

1. **Near-duplicates**: rows whose cosine similarity to an earlier kept row reaches
   ``curate.dedup.threshold`` are dropped; ``duplicate_of`` names the kept row.
2. **Hierarchical k-means** of the remaining rows (``curate.clusters``, finest level first;
   each level clusters the centroids of the level below): ``cluster_0`` ... columns.
3. **Balanced sampling** to ``curate.target_size`` rows: evenly across the top-level clusters,
   then evenly across their children, down to level 0 (rows drawn at random there).
4. **Retrieval** (optional): up to ``curate.retrieval.quota`` more rows nearest to seed rows
   (row numbers, a seed index, or ``column=value``), in turns across seeds.

Outputs, named after ``curate.out`` (``curated.csv`` → ``curated.*``):

- ``curated.csv``: the selected rows, ready for training / embedding (``path`` columns are
  rewritten relative to its folder when needed), with ``source_row`` (row number in the input
  index), ``cluster_<level>``, ``duplicate_of``, ``duplicate_similarity``, ``selected_by``
  (``balanced`` / ``retrieval`` / ``all``) and ``dropped_by``;
- ``curated.all.csv``: every input row with the same columns: dropped rows say why
  (``dropped_by`` = ``duplicate`` with ``duplicate_of`` the kept row's ``source_row``, or
  ``balance``) and carry their representative's clusters;
- ``curated.summary.json`` (counts, cluster sizes per level, per plate / label column, the
  nearest-neighbour similarity quantiles that show where the threshold cuts, timings, the
  config), ``curated.clusters.csv`` and ``curated.groups.csv``;
- with a checkpoint, ``curated.embeddings.h5ad``: the embeddings of every input row, as
  ``python -m cellvit_ssl.embed`` writes them (for ``evaluate`` or the napari inspector).

Every stage is cached in ``curated.csv.partial/`` under a fingerprint of its inputs and
settings, so an interrupted run continues where it stopped; a finished output is not
recomputed (``curate.overwrite=true`` replaces one made from other inputs).

Examples:
    python -m cellvit_ssl.curate data.index=cells.csv curate.features=cells.h5ad curate.out=cur.csv
    python -m cellvit_ssl.curate configs/curate.yaml curate.target_size=100000 curate.dedup.threshold=0.97
    python -m cellvit_ssl.curate --index cells.csv --features pixels --out round1.csv
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cellvit_ssl.cli import CommandLine, Flag
from cellvit_ssl.config import config_to_dict, dotlist, read_yaml
from cellvit_ssl.curate_features import (
    IDENTITY_COLUMNS,
    EmbeddingsFile,
    FeatureKind,
    PixelFeatures,
    check_alignment,
    embed_with_checkpoint,
    feature_kind,
)
from cellvit_ssl.curate_search import Backend, make_search
from cellvit_ssl.curate_select import (
    FeatureMatrix,
    Hierarchy,
    balanced_sample,
    find_duplicates,
    hierarchical_kmeans,
    retrieve,
)
from cellvit_ssl.errors import CellVitSSLError, ConfigError, DataError
from cellvit_ssl.io import atomic_write_bytes, atomic_write_text, atomic_write_with, check_writable, exclusive_lock


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class DedupConfig:
    """Near-duplicate removal."""

    enabled: bool = True  # remove near-duplicates before clustering and sampling
    threshold: float = 0.95  # cosine similarity at or above which a row duplicates an earlier kept row
    neighbors: int = 16  # neighbours looked at per row (bigger groups of copies may keep 2+ rows)
    partitions: int = 0  # k-means partitions the search runs in (0 = about 1000 rows each)
    probe: int = 2  # partitions each row is compared within (more = fewer misses, slower)


@dataclass(frozen=True)
class RetrievalConfig:
    """Rows nearest to a seed set (e.g. a rare phenotype), added after balanced sampling."""

    quota: int = 0  # rows to add (0 = off)
    seed_rows: list[int] = field(default_factory=list)  # seed rows by row number (0-based) in the index
    seed_index: str | None = None  # CSV / parquet of seed rows, matched to the index by path + crop columns
    seed_label: str | None = None  # "column=value": every index row with this value is a seed
    min_similarity: float = -1.0  # never add rows less similar than this to every seed


@dataclass(frozen=True)
class PixelConfig:
    """Raw-pixel features (``curate.features=pixels``)."""

    size: int = 16  # thumbnail side in pixels (features = channels x size x size)
    blur: float = 2.0  # Gaussian sigma in crop pixels before resizing (tolerance to 1-px shifts)
    channels: list[str] = field(default_factory=list)  # channels used, in order ([] = all, in file order)
    percentiles: list[float] = field(default_factory=lambda: [1.0, 99.8])  # per-channel normalisation
    chunk_rows: int = 2048  # rows per saved chunk (the unit of resuming)


@dataclass(frozen=True)
class EmbedRunConfig:
    """Embedding the index with a checkpoint (``curate.features=teacher.pt``)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    allow_missing: bool = False  # embed images that lack some of the model's channels
    pooling: str = "default"  # embedding pooling, as embed's: default | concat | mean | channel names (protein)


@dataclass(frozen=True)
class CurateConfig:
    """One curation run. Keys on the command line: ``curate.<field>=value``."""

    features: str | None = None  # embeddings of the index (.h5ad / .zarr), a checkpoint (.pt), or "pixels"
    out: str | None = None  # curated index to write (.csv / .parquet); the other outputs are named after it
    target_size: int = 0  # rows wanted from balanced sampling (0 = every row left after deduplication)
    clusters: list[int] = field(default_factory=list)  # clusters per k-means level, finest first ([] = auto)
    kmeans_iters: int = 20  # k-means iterations per level
    kmeans_sample: int = 256  # level 0 trains on at most this many rows per cluster
    backend: Backend = Backend.auto  # auto (faiss when installed) | faiss | sklearn
    threads: int = 0  # CPU threads for k-means and search (0 = the library's default)
    block_rows: int = 65536  # feature rows in memory at a time
    summary_columns: list[str] = field(default_factory=list)  # columns counted before / after ([] = plate / label)
    seed: int = 0  # random seed (k-means, sampling)
    progress: bool = True  # progress bars on stderr (the summary is printed either way)
    overwrite: bool = False  # replace an output made from other inputs or settings
    keep_cache: bool = False  # keep OUT.partial/ after finishing: reruns with other settings reuse its stages
    dedup: DedupConfig = field(default_factory=DedupConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    pixels: PixelConfig = field(default_factory=PixelConfig)
    embed: EmbedRunConfig = field(default_factory=EmbedRunConfig)


@dataclass(frozen=True)
class CurateData:
    """Which rows and how they are read (training's key names)."""

    index: str | None = None  # CSV / parquet index to curate (one row per image or cell)
    root: str | None = None  # base folder of relative index paths (default: the index's folder)
    sample_size: int | None = None  # side of cell crops (checkpoint: its own data.sample_size; pixels: 64)
    num_workers: int = 0  # processes reading samples (checkpoint / pixels)
    batch_size: int = 64  # images per forward pass (checkpoint)


@dataclass(frozen=True)
class CurateCommand:
    """``python -m cellvit_ssl.curate``: the ``data`` and ``curate`` sections."""

    data: CurateData = field(default_factory=CurateData)
    curate: CurateConfig = field(default_factory=CurateConfig)


#: Columns looked for when ``curate.summary_columns`` is empty.
SUMMARY_COLUMNS = ("plate", "Plate", "plate_id", "well", "label", "Label", "dataset", "cell_type")
COMMAND_LINE = CommandLine(
    prog="python -m cellvit_ssl.curate",
    description="Curate an index before pre-training: near-duplicates out, clusters balanced, rare content "
                "retrieved.",
    schema=CurateCommand,
    flags=(
        Flag(("--index",), "data.index"), Flag(("--root",), "data.root"), Flag(("--workers",), "data.num_workers"),
        Flag(("--crop-size",), "data.sample_size"), Flag(("--batch-size",), "data.batch_size"),
        Flag(("--features",), "curate.features"), Flag(("--out",), "curate.out"),
        Flag(("--target-size",), "curate.target_size"), Flag(("--clusters",), "curate.clusters"),
        Flag(("--backend",), "curate.backend"), Flag(("--threshold",), "curate.dedup.threshold"),
        Flag(("--quota",), "curate.retrieval.quota"), Flag(("--seed-label",), "curate.retrieval.seed_label"),
        Flag(("--seed-index",), "curate.retrieval.seed_index"), Flag(("--threads",), "curate.threads"),
        Flag(("--seed",), "curate.seed"), Flag(("--overwrite",), "curate.overwrite", True),
        Flag(("--no-progress",), "curate.progress", False), Flag(("--keep-cache",), "curate.keep_cache", True),
        Flag(("--no-dedup",), "curate.dedup.enabled", False),
    ),
    examples=(
        "python -m cellvit_ssl.curate data.index=cells.csv curate.features=cells.h5ad curate.out=curated.csv",
        "python -m cellvit_ssl.curate configs/curate.yaml curate.target_size=100000 curate.dedup.threshold=0.97",
        "python -m cellvit_ssl.curate --index cells.csv --features pixels --out round1.csv",
    ),
)


def load_curate_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> CurateCommand:
    """Code defaults, then a YAML file (``data:`` / ``curate:`` sections), then ``key=value`` overrides.

    Raises:
        ConfigError: On a missing or non-YAML file, an unknown key (with the nearest valid
            one), a value of the wrong type, or inconsistent values.

    Examples:
        >>> cfg = load_curate_config(None, ["data.index=a.csv", "curate.features=pixels", "curate.out=b.csv"])
        >>> cfg.curate.features, cfg.curate.backend.value
        ('pixels', 'auto')
    """
    sources: list = [] if path is None else [(str(path), read_yaml(path))]
    cmd = COMMAND_LINE.load([*sources, ("command-line override", dotlist(overrides))])
    validate(cmd)
    return cmd


def validate(cmd: CurateCommand) -> None:
    """Check values a type cannot: required keys, ranges, consistency.

    Raises:
        ConfigError: Naming the key, its value and what was expected.
    """
    cfg, data = cmd.curate, cmd.data
    if not data.index:
        raise ConfigError("data.index is required (the index to curate; --index)")
    for key in ("features", "out"):
        if not getattr(cfg, key):
            raise ConfigError(f"curate.{key} is required (e.g. curate.{key}=...)")
    if Path(cfg.out).suffix not in (".csv", ".parquet"):
        raise ConfigError(f"curate.out={cfg.out!r}; expected a .csv or .parquet path")
    if Path(cfg.out).expanduser().resolve() == Path(data.index).expanduser().resolve():
        raise ConfigError(f"curate.out={cfg.out!r} is the input index; write the curated index elsewhere")
    checks = [("target_size", cfg.target_size, 0), ("kmeans_iters", cfg.kmeans_iters, 1),
              ("kmeans_sample", cfg.kmeans_sample, 1), ("block_rows", cfg.block_rows, 1),
              ("threads", cfg.threads, 0), ("dedup.neighbors", cfg.dedup.neighbors, 1),
              ("dedup.partitions", cfg.dedup.partitions, 0), ("dedup.probe", cfg.dedup.probe, 1),
              ("retrieval.quota", cfg.retrieval.quota, 0), ("pixels.size", cfg.pixels.size, 1),
              ("pixels.chunk_rows", cfg.pixels.chunk_rows, 1)]
    for key, value, low in checks:
        if value < low:
            raise ConfigError(f"curate.{key}={value}; expected >= {low}")
    if data.sample_size is not None and data.sample_size < 1:
        raise ConfigError(f"data.sample_size={data.sample_size}; expected >= 1 (or null for the default)")
    if data.num_workers < 0 or data.batch_size < 1:
        raise ConfigError(f"data.num_workers={data.num_workers} must be >= 0 and data.batch_size={data.batch_size} "
                          ">= 1")
    if any(k < 1 for k in cfg.clusters) or any(b >= a for a, b in zip(cfg.clusters, cfg.clusters[1:])):
        raise ConfigError(f"curate.clusters={list(cfg.clusters)}; expected positive counts, finest level first and "
                          "each level smaller than the one before (e.g. [1000, 100, 10])")
    if not 0 < cfg.dedup.threshold <= 1:
        raise ConfigError(f"curate.dedup.threshold={cfg.dedup.threshold}; expected 0 < threshold <= 1")
    if cfg.pixels.blur < 0:
        raise ConfigError(f"curate.pixels.blur={cfg.pixels.blur}; expected >= 0")
    lo_hi = list(cfg.pixels.percentiles)
    if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 100:
        raise ConfigError(f"curate.pixels.percentiles={lo_hi}; expected [low, high] with 0 <= low < high <= 100")
    r = cfg.retrieval
    if r.quota and not (r.seed_rows or r.seed_index or r.seed_label):
        raise ConfigError("curate.retrieval.quota is set but no seeds are: give curate.retrieval.seed_rows, "
                          "seed_index or seed_label")
    if r.seed_label is not None and "=" not in r.seed_label:
        raise ConfigError(f"curate.retrieval.seed_label={r.seed_label!r}; expected column=value")
    feature_kind(cfg.features)


def auto_clusters(n_rows: int) -> list[int]:
    """Default levels: about sqrt(rows) clusters at level 0, then a fifth per level while that leaves 8 or more.

    Examples:
        >>> auto_clusters(1_000_000)
        [1000, 200, 40, 8]
    """
    levels = [max(2, round(math.sqrt(n_rows)))]
    while levels[-1] // 5 >= 8:
        levels.append(round(levels[-1] / 5))
    return levels


# ----------------------------------------------------------------------------- stage cache
def _fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class StageCache:
    """Finished stages of a run in ``OUT.partial/``, each under the fingerprint of what it depends on.

    ``manifest.json`` maps a stage name to its fingerprint (and, for arrays filled block by
    block, how many rows are done); a stage whose fingerprint changed is recomputed.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "manifest.json"
        self.manifest: dict = json.loads(path.read_text()) if path.is_file() else {}

    def _save_manifest(self) -> None:
        atomic_write_text(self.folder / "manifest.json", json.dumps(self.manifest, indent=1))

    def load(self, name: str, fingerprint: str) -> dict[str, np.ndarray] | None:
        entry = self.manifest.get(name)
        path = self.folder / f"{name}.npz"
        if not entry or entry.get("fingerprint") != fingerprint or not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def save(self, name: str, fingerprint: str, **arrays: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(self.folder / f"{name}.npz", buffer.getvalue())
        self.manifest[name] = {"fingerprint": fingerprint}
        self._save_manifest()

    def matrix(self, name: str, fingerprint: str, n: int, dim: int) -> tuple[np.memmap, int]:
        """A float32 ``(n, dim)`` array on disk and how many of its rows are already filled."""
        path = self.folder / f"{name}.npy"
        entry = self.manifest.get(name) or {}
        if entry.get("fingerprint") == fingerprint and path.is_file():
            x = np.load(path, mmap_mode="r+")
            if x.shape == (n, dim):
                return x, int(entry.get("rows_done", 0))
        x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
        self.manifest[name] = {"fingerprint": fingerprint, "rows_done": 0}
        self._save_manifest()
        return x, 0

    def advance(self, name: str, x: np.memmap, rows_done: int) -> None:
        x.flush()
        self.manifest[name]["rows_done"] = int(rows_done)
        self._save_manifest()


# ----------------------------------------------------------------------------- features
def _file_identity(path: Path) -> dict:
    """What identifies an input file cheaply: its resolved path, size and modification time."""
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return {"path": str(path.resolve()), "size": size, "mtime_ns": path.stat().st_mtime_ns}


def _fill(cache: StageCache, name: str, fingerprint: str, n: int, dim: int, read, block: int, progress: bool,
          desc: str) -> np.memmap:
    """Fill ``name`` block by block with ``read(start, stop)``; resumes after the last saved block."""
    x, done = cache.matrix(name, fingerprint, n, dim)
    starts = range(done, n, block)
    with tqdm(total=n, initial=done, desc=desc, unit="row", disable=not progress, leave=False) as bar:
        for start in starts:
            stop = min(start + block, n)
            x[start:stop] = read(start, stop)
            cache.advance(name, x, stop)
            bar.update(stop - start)
    return x


def _unit_rows(x: np.ndarray, first_row: int, source: str) -> np.ndarray:
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise DataError(f"{source}: row {first_row + int(np.flatnonzero(bad)[0])} has NaN / Inf features")
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


@dataclass
class _Features:
    matrix: FeatureMatrix
    fingerprint: str
    matched_by: str
    sidecar: Path | None = None


@dataclass(frozen=True)
class RootRule:
    """Where the index's relative paths start: ``data.root`` over the rows' ``root`` column over the index's folder.

    The rule of :class:`~cellvit_ssl.data.samples.SampleReader`, which applies it; kept here
    to pass it on (to the pixel reader, to embed) and to fingerprint it.
    """

    override: Path | None
    index_folder: Path

    def fingerprint(self) -> dict:
        return {"root": str(self.override.resolve()) if self.override is not None else None,
                "default": str(self.index_folder.resolve())}


def _features(cmd: CurateCommand, table: pd.DataFrame, root: RootRule, index_sha: str, cache: StageCache,
              outputs: dict[str, Path]) -> _Features:
    cfg, data = cmd.curate, cmd.data
    kind = feature_kind(cfg.features)
    block = cfg.block_rows
    if kind is FeatureKind.pixels:
        crop = data.sample_size or 64
        px = PixelFeatures(table, root.override, crop, cfg.pixels.channels, cfg.pixels.size, cfg.pixels.blur,
                           cfg.pixels.percentiles, data.num_workers, default_root=root.index_folder)
        base = {"index_sha256": index_sha, "root": root.fingerprint(), "kind": "pixels", "crop_size": crop,
                "pixels": {k: v for k, v in vars(cfg.pixels).items() if k != "chunk_rows"}}
        fp = _fingerprint(base)
        thumbs = _fill(cache, "pixels", fp, len(table), px.dim, px.read, cfg.pixels.chunk_rows, cfg.progress,
                       "features: pixels")
        poses = px.poses()
        mean_stage = cache.load("pixel_mean", fp)
        if mean_stage is None:
            total = np.zeros(px.dim, np.float64)
            for start in range(0, len(table), block):
                total += thumbs[start : start + block].sum(axis=0, dtype=np.float64)
            # centre on the pose-averaged mean, so that the poses (permutations) commute with the centring
            mean_stage = {"mean": np.mean([(total / len(table))[p] for p in poses], axis=0).astype(np.float32)}
            cache.save("pixel_mean", fp, **mean_stage)
        mean = mean_stage["mean"]
        _fill(cache, "features", fp, len(table), px.dim,
              lambda s, e: _unit_rows(np.asarray(thumbs[s:e]) - mean, s, "pixel features"), block, cfg.progress,
              "features: normalise")
        return _Features(FeatureMatrix(np.load(cache.folder / "features.npy", mmap_mode="r"), poses), fp,
                         "computed from the index")
    sidecar = None
    path = Path(cfg.features).expanduser()
    if kind is FeatureKind.checkpoint:
        from cellvit_ssl.embed_io import file_sha256

        if not path.is_file():
            raise DataError(f"curate.features={cfg.features!r}: checkpoint not found")
        sidecar = outputs["embeddings"]
        embed_with_checkpoint(path, data.index, sidecar, root=root.override, crop_size=data.sample_size,
                              batch_size=data.batch_size, workers=data.num_workers, device=cfg.embed.device,
                              allow_missing=cfg.embed.allow_missing, pooling=cfg.embed.pooling,
                              overwrite=cfg.overwrite, progress=cfg.progress)
        base = {"index_sha256": index_sha, "kind": "checkpoint", "checkpoint_sha256": file_sha256(path),
                "crop_size": data.sample_size, "allow_missing": cfg.embed.allow_missing,
                "pooling": cfg.embed.pooling, "root": root.fingerprint()}
        path = sidecar
    with EmbeddingsFile(path) as emb:
        matched_by = check_alignment(table, data.index, emb, index_sha)
        if kind is FeatureKind.embeddings:
            base = {"index_sha256": index_sha, "kind": "embeddings", "file": _file_identity(path)}
        fp = _fingerprint(base)
        _fill(cache, "features", fp, emb.n_rows, emb.dim, lambda s, e: _unit_rows(emb.read(s, e), s, str(path)),
              block, cfg.progress, "features: read")
    return _Features(FeatureMatrix(np.load(cache.folder / "features.npy", mmap_mode="r")), fp, matched_by, sidecar)


# ----------------------------------------------------------------------------- seeds
def _seed_rows(cfg: RetrievalConfig, table: pd.DataFrame) -> np.ndarray:
    """Row numbers of the seed set (union of rows, a seed index and a label value).

    Raises:
        DataError: On a row number out of range, a label column that is missing or matches
            nothing, or seed-index rows not found in the index.
    """
    seeds = set()
    n = len(table)
    for r in cfg.seed_rows:
        if not 0 <= r < n:
            raise DataError(f"curate.retrieval.seed_rows: row {r} is outside the index (0..{n - 1})")
        seeds.add(int(r))
    if cfg.seed_label:
        column, value = cfg.seed_label.split("=", 1)
        if column not in table.columns:
            raise DataError(f"curate.retrieval.seed_label: column {column!r} is not in the index "
                            f"(columns: {list(table.columns)})")
        hits = np.flatnonzero(table[column].astype(str).to_numpy() == value)
        if not len(hits):
            raise DataError(f"curate.retrieval.seed_label: no index row has {column} == {value!r}")
        seeds.update(hits.tolist())
    if cfg.seed_index:
        from cellvit_ssl.data.dataset import read_index

        seed_table = read_index(cfg.seed_index)
        columns = [c for c in IDENTITY_COLUMNS if c in table.columns and c in seed_table.columns]
        keys = {k: i for i, k in enumerate(_row_keys(table, columns))}
        missing = []
        for i, k in enumerate(_row_keys(seed_table, columns)):
            if k in keys:
                seeds.add(keys[k])
            else:
                missing.append(i)
        if missing:
            raise DataError(f"curate.retrieval.seed_index: {len(missing)} of its rows (first: row {missing[0]}) are "
                            f"not in the index, matched by {columns}")
    return np.array(sorted(seeds), np.int64)


def _row_keys(table: pd.DataFrame, columns: Sequence[str]) -> list[tuple]:
    parts = []
    for c in columns:
        values = table[c]
        numeric = pd.to_numeric(values, errors="coerce")
        parts.append(numeric.round(3).astype(str).tolist() if numeric.notna().all() else values.astype(str).tolist())
    return list(zip(*parts))


# ----------------------------------------------------------------------------- outputs
@dataclass
class CurateResult:
    """What :func:`run` produced.

    Attributes:
        out: The curated index (selected rows).
        files: Every file written, by role.
        rows: Row counts (input, duplicates, deduplicated, balanced, retrieved, selected).
        summary: The content of the summary JSON.
        up_to_date: True when the output already existed for these inputs and nothing ran.
    """

    out: Path
    files: dict[str, Path]
    rows: dict[str, int]
    summary: dict
    up_to_date: bool = False


def output_paths(out: str | Path) -> dict[str, Path]:
    """Where a run writes, named after the curated index ``out``."""
    out = Path(out).expanduser()
    stem, suffix = out.name[: -len(out.suffix)], out.suffix
    return {"index": out, "all_rows": out.with_name(f"{stem}.all{suffix}"),
            "summary": out.with_name(f"{stem}.summary.json"), "clusters": out.with_name(f"{stem}.clusters.csv"),
            "groups": out.with_name(f"{stem}.groups.csv"), "embeddings": out.with_name(f"{stem}.embeddings.h5ad"),
            "partial": out.with_name(out.name + ".partial")}


def _rebase_paths(table: pd.DataFrame, root: RootRule, out_dir: Path) -> bool:
    """Keep the output index's relative paths pointing at the files they were read from.

    An index with a ``root`` column keeps its paths and gets, in that column, the folder each
    row was read from (so the output works from any folder, as the input did). Without one,
    relative ``path`` / ``labels_path`` values are rewritten relative to ``out_dir``.
    """
    from cellvit_ssl.data.samples import ROOT_COLUMN, SampleReader

    if ROOT_COLUMN in table.columns:
        bases = SampleReader(table, root=root.override, default_root=root.index_folder).row_bases().to_numpy()
        changed = bool((table[ROOT_COLUMN].astype(str).to_numpy() != bases).any())
        table[ROOT_COLUMN] = bases
        return changed
    base = root.override if root.override is not None else root.index_folder
    if base.resolve() == out_dir.resolve():
        return False
    changed = False
    for column in ("path", "labels_path"):
        if column not in table.columns:
            continue

        def rebase(v):
            if not isinstance(v, str) or not v or Path(v).expanduser().is_absolute():
                return v
            return os.path.relpath((base / v).resolve(), out_dir.resolve())

        table[column] = table[column].map(rebase)
        changed = True
    return changed


def _write_table(table: pd.DataFrame, path: Path) -> None:
    from cellvit_ssl.data.index import write_index

    write_index(table, path)


def _size_stats(counts: np.ndarray) -> dict:
    return {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())}


def _summaries(table: pd.DataFrame, n_levels: int, sizes: list[int], parents: list[np.ndarray],
               columns: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cluster sizes per level and counts per summary column: input, after dedup, selected."""
    kept = table["duplicate_of"].to_numpy() < 0
    selected = table["selected_by"].to_numpy() != ""
    rows = []
    for level in range(n_levels):
        labels = table[f"cluster_{level}"].to_numpy()
        counts = [np.bincount(labels[m], minlength=sizes[level]) for m in (np.ones(len(table), bool), kept, selected)]
        parent = parents[level] if level < len(parents) else np.full(sizes[level], -1)
        rows += [{"level": level, "cluster": c, "parent": int(parent[c]), "input": int(counts[0][c]),
                  "deduplicated": int(counts[1][c]), "selected": int(counts[2][c])} for c in range(sizes[level])]
    groups = []
    for column in columns:
        values = table[column].astype(str)
        for value, idx in values.groupby(values, sort=True).indices.items():
            groups.append({"column": column, "value": value, "input": len(idx), "deduplicated": int(kept[idx].sum()),
                           "selected": int(selected[idx].sum())})
    return pd.DataFrame(rows), pd.DataFrame(groups, columns=["column", "value", "input", "deduplicated", "selected"])


def _print_summary(summary: dict, clusters: pd.DataFrame, groups: pd.DataFrame) -> None:
    rows = summary["rows"]
    levels = summary["levels"]
    print(f"curated {rows['selected']:,} of {rows['input']:,} rows: {rows['duplicates']:,} near-duplicates removed, "
          f"{rows['balanced']:,} by balanced sampling over k-means levels {[lv['clusters'] for lv in levels]}, "
          f"{rows['retrieved']:,} by retrieval", file=sys.stderr)
    top = levels[-1]["level"]
    table = clusters[clusters.level == top].drop(columns=["level", "parent"])
    shown = table if len(table) <= 20 else pd.concat([table.nlargest(10, "input"), table.nsmallest(10, "input")])
    note = "" if len(table) <= 20 else " (the 10 largest and 10 smallest)"
    print(f"top-level clusters (cluster_{top}){note}:\n{shown.to_string(index=False)}", file=sys.stderr)
    for lv in levels:
        print(f"level {lv['level']}: {lv['clusters']} clusters, rows per cluster min / median / max: input "
              f"{lv['input']['min']} / {lv['input']['median']:g} / {lv['input']['max']}, selected "
              f"{lv['selected']['min']} / {lv['selected']['median']:g} / {lv['selected']['max']}", file=sys.stderr)
    for column, part in groups.groupby("column", sort=False):
        part = part.drop(columns=["column"])
        part = part if len(part) <= 30 else part.nlargest(30, "input")
        print(f"per {column!r}:\n{part.to_string(index=False)}", file=sys.stderr)


# ----------------------------------------------------------------------------- run
def run(cmd: CurateCommand) -> CurateResult:
    """Curate ``data.index`` and write the outputs (see the module docstring).

    Raises:
        ConfigError: On invalid settings.
        DataError: On unreadable inputs, features not aligned with the index
            (:class:`~cellvit_ssl.curate_features.FeaturesMismatchError`), bad seeds, an
            existing output made from other inputs (without ``overwrite``), an output that would
            replace an input, an output folder that cannot be written, or another run writing
            the same output (naming its process).
    """
    validate(cmd)
    started = time.perf_counter()
    paths = output_paths(cmd.curate.out)
    _refuse_outputs_over_inputs(cmd, paths)
    check_writable(paths["index"], what="curate.out")
    # one run per output: a second one would mix its stages into OUT.partial and its rows into OUT
    with exclusive_lock(paths["index"]):
        return _curate(cmd, paths, started)


def _refuse_outputs_over_inputs(cmd: CurateCommand, paths: dict[str, Path]) -> None:
    inputs = [Path(cmd.data.index)]
    if feature_kind(cmd.curate.features) is not FeatureKind.pixels:
        inputs.append(Path(cmd.curate.features))
    for key, out in paths.items():
        if key == "embeddings":
            continue  # written only from a checkpoint's features; an embeddings file of that name is reused
        resolved = out.expanduser().resolve()
        for path in inputs:
            p = path.expanduser().resolve()
            if resolved == p or p in resolved.parents or resolved in p.parents:
                raise DataError(f"curate.out={cmd.curate.out!r} would write {out} over the input {str(path)!r}; "
                                "choose another curate.out")


def _curate(cmd: CurateCommand, paths: dict[str, Path], started: float) -> CurateResult:
    """:func:`run`'s work, under the output's lock."""
    from cellvit_ssl.data.dataset import read_index
    from cellvit_ssl.embed_io import table_sha256

    cfg, data = cmd.curate, cmd.data
    table = read_index(data.index)
    root = RootRule(Path(data.root).expanduser() if data.root else None, Path(data.index).expanduser().parent)
    index_sha = table_sha256(table)
    settings = {"dedup": vars(cfg.dedup), "clusters": list(cfg.clusters), "kmeans_iters": cfg.kmeans_iters,
                "kmeans_sample": cfg.kmeans_sample, "seed": cfg.seed, "target_size": cfg.target_size,
                "retrieval": vars(cfg.retrieval), "summary_columns": list(cfg.summary_columns),
                "backend": Backend(cfg.backend).value}
    up_to_date = _finished(paths, cmd, index_sha, settings)
    if up_to_date is not None:
        return up_to_date
    search = make_search(cfg.backend, cfg.threads)
    cache = StageCache(paths["partial"])
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    feats = _features(cmd, table, root, index_sha, cache, paths)
    seconds["features"] = time.perf_counter() - t
    n = feats.matrix.n

    t = time.perf_counter()
    d = cfg.dedup
    fp_dedup = _fingerprint({"features": feats.fingerprint, "dedup": vars(d), "backend": search.name,
                             "seed": cfg.seed})
    stage = cache.load("duplicates", fp_dedup)
    if stage is None:
        if d.enabled:
            dup = find_duplicates(feats.matrix, search, d.threshold, d.neighbors, d.partitions, d.probe,
                                  seed=cfg.seed, block=cfg.block_rows, progress=cfg.progress)
            stage = {"duplicate_of": dup.duplicate_of, "similarity": dup.similarity, "nearest": dup.nearest,
                     "partitions": np.array(dup.partitions)}
        else:
            stage = {"duplicate_of": np.full(n, -1, np.int64), "similarity": np.full(n, np.nan, np.float32),
                     "nearest": np.full(n, np.nan, np.float32), "partitions": np.array(0)}
        cache.save("duplicates", fp_dedup, **stage)
    duplicate_of = stage["duplicate_of"]
    seconds["dedup"] = time.perf_counter() - t

    t = time.perf_counter()
    kept = np.flatnonzero(duplicate_of < 0)
    clusters = list(cfg.clusters) or auto_clusters(len(kept))
    fp_clusters = _fingerprint({"dedup": fp_dedup, "clusters": clusters, "iters": cfg.kmeans_iters,
                                "sample": cfg.kmeans_sample})
    hstage = cache.load("clusters", fp_clusters)
    if hstage is None:
        h = hierarchical_kmeans(feats.matrix, kept, clusters, search, cfg.kmeans_iters, cfg.kmeans_sample, cfg.seed,
                                cfg.block_rows, cfg.progress)
        hstage = {f"labels_{i}": lab for i, lab in enumerate(h.labels)}
        hstage.update({f"parents_{i}": p for i, p in enumerate(h.parents)})
        hstage["sizes"] = np.array(h.sizes)
        cache.save("clusters", fp_clusters, **hstage)
    sizes = [int(s) for s in hstage["sizes"]]
    hierarchy = Hierarchy([hstage[f"labels_{i}"] for i in range(len(sizes))],
                          [hstage[f"parents_{i}"] for i in range(len(sizes) - 1)], sizes)
    seconds["kmeans"] = time.perf_counter() - t

    t = time.perf_counter()
    sampling = 0 < cfg.target_size < len(kept)
    chosen = kept[balanced_sample(hierarchy, cfg.target_size, cfg.seed)] if sampling else kept
    retrieved = np.zeros(0, np.int64)
    if cfg.retrieval.quota:
        r = cfg.retrieval
        seeds = _seed_rows(r, table)
        fp_retrieval = _fingerprint({"clusters": fp_clusters, "target": cfg.target_size, "retrieval": vars(r)})
        rstage = cache.load("retrieval", fp_retrieval)
        if rstage is None:
            candidates = np.setdiff1d(kept, chosen)
            rows, sims = retrieve(feats.matrix, candidates, seeds, r.quota, search, r.min_similarity, cfg.block_rows,
                                  cfg.progress)
            rstage = {"rows": rows, "similarity": sims}
            cache.save("retrieval", fp_retrieval, **rstage)
        retrieved = rstage["rows"]
    seconds["selection"] = time.perf_counter() - t

    # --- tables
    t = time.perf_counter()
    result = table.copy()
    ours = ["source_row", *[f"cluster_{i}" for i in range(len(sizes))], "duplicate_of", "duplicate_similarity",
            "selected_by", "dropped_by"]
    replaced = [c for c in ours if c in result.columns]
    result = result.drop(columns=replaced)
    result["source_row"] = np.arange(n)
    rep = np.where(duplicate_of < 0, np.arange(n), duplicate_of)
    position = np.full(n, -1, np.int64)
    position[kept] = np.arange(len(kept))
    for i, labels in enumerate(hierarchy.labels):
        result[f"cluster_{i}"] = labels[position[rep]]
    result["duplicate_of"] = duplicate_of
    result["duplicate_similarity"] = stage["similarity"]
    selected_by = np.full(n, "", dtype=object)
    selected_by[chosen] = "balanced" if sampling else "all"
    selected_by[retrieved] = "retrieval"
    dropped_by = np.where(duplicate_of >= 0, "duplicate", np.where(selected_by == "", "balance", ""))
    result["selected_by"] = selected_by
    result["dropped_by"] = dropped_by
    rebased = _rebase_paths(result, root, paths["index"].parent)
    summary_columns = list(cfg.summary_columns) or [c for c in SUMMARY_COLUMNS if c in table.columns]
    missing = [c for c in summary_columns if c not in table.columns]
    if missing:
        raise DataError(f"curate.summary_columns {missing} are not in the index (columns: {list(table.columns)})")
    cluster_table, group_table = _summaries(result, len(sizes), sizes, hierarchy.parents, summary_columns)
    nearest = stage["nearest"]
    finite = nearest[np.isfinite(nearest)]
    counts = {"input": n, "duplicates": int((duplicate_of >= 0).sum()), "deduplicated": len(kept),
              "balanced": len(chosen) if sampling else 0, "retrieved": len(retrieved),
              "selected": int((selected_by != "").sum())}
    levels = []
    for level in range(len(sizes)):
        part = cluster_table[cluster_table.level == level]
        levels.append({"level": level, "clusters": sizes[level], "clusters_asked": clusters[level],
                       **{k: _size_stats(part[k].to_numpy()) for k in ("input", "deduplicated", "selected")}})
    files = {k: v for k, v in paths.items() if k in ("index", "all_rows", "summary", "clusters", "groups")}
    if feats.sidecar is not None:
        files["embeddings"] = feats.sidecar
    summary = {
        "fingerprint": _output_fingerprint(cmd, index_sha, settings),
        "index": str(Path(data.index).resolve()), "features": cfg.features, "rows_matched_by": feats.matched_by,
        "backend": search.name, "rows": counts,
        "dedup": {"enabled": d.enabled, "threshold": d.threshold, "partitions": int(stage["partitions"]),
                  "nearest_similarity_quantiles": {str(q): float(np.quantile(finite, q)) for q in
                                                   (0.5, 0.9, 0.99, 0.999)} if len(finite) else {}},
        "levels": levels, "groups": group_table.to_dict(orient="records"), "paths_rebased": rebased,
        "replaced_columns": replaced, "seconds": seconds, "files": {k: str(v) for k, v in files.items()},
        "config": _plain(cmd),
    }
    _write_table(result[result.selected_by != ""].reset_index(drop=True), paths["index"])
    _write_table(result, paths["all_rows"])
    atomic_write_with(paths["clusters"], lambda p: cluster_table.to_csv(p, index=False))
    atomic_write_with(paths["groups"], lambda p: group_table.to_csv(p, index=False))
    seconds["write"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    # the summary is written last: its fingerprint marks the output as complete
    atomic_write_text(paths["summary"], json.dumps(summary, indent=1, default=str))
    if not cfg.keep_cache:
        shutil.rmtree(paths["partial"], ignore_errors=True)
    _print_summary(summary, cluster_table, group_table)
    if replaced:
        print(f"note: replaced the input's columns {replaced}", file=sys.stderr)
    return CurateResult(paths["index"], files, counts, summary)


def _plain(cmd: CurateCommand) -> dict:
    return config_to_dict(cmd)


def _output_fingerprint(cmd: CurateCommand, index_sha: str, settings: dict) -> str:
    cfg = cmd.curate
    kind = feature_kind(cfg.features)
    features: dict = {"spec": cfg.features}
    if kind is not FeatureKind.pixels:
        path = Path(cfg.features).expanduser()
        features["file"] = _file_identity(path) if path.exists() else None
    else:
        features["pixels"] = {k: v for k, v in vars(cfg.pixels).items() if k != "chunk_rows"}
    return _fingerprint({"index_sha256": index_sha, "root": cmd.data.root, "features": features,
                         "crop_size": cmd.data.sample_size, "settings": settings})


def _finished(paths: dict[str, Path], cmd: CurateCommand, index_sha: str, settings: dict) -> CurateResult | None:
    """The previous result when it was made from the same inputs and settings; None to (re)compute.

    Raises:
        DataError: If the output exists, was made otherwise, and ``overwrite`` is off.
    """
    out, summary_path = paths["index"], paths["summary"]
    if not out.exists() or (not summary_path.exists() and paths["partial"].is_dir()):
        return None  # nothing yet, or a run of ours stopped before its summary: (re)compute
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        summary = {}
    if summary.get("fingerprint") == _output_fingerprint(cmd, index_sha, settings):
        print(f"{out} is complete ({summary['rows']['selected']} rows); nothing to do", file=sys.stderr)
        files = {k: Path(v) for k, v in summary.get("files", {}).items()}
        return CurateResult(out, files, summary["rows"], summary, up_to_date=True)
    if not cmd.curate.overwrite:
        raise DataError(f"{out} exists and was made from other inputs or settings; choose another curate.out or "
                        "pass curate.overwrite=true")
    return None


# ----------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = None
    try:
        cmd = COMMAND_LINE.load(COMMAND_LINE.parse(argv))
        out = cmd.curate.out
        result = run(cmd)
    except CellVitSSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f" in {out}.partial" if out else ""
        print(f"interrupted; finished stages are kept{where}. Run the same command again to resume.", file=sys.stderr)
        return 130
    if not result.up_to_date:
        print("wrote " + ", ".join(str(p) for p in result.files.values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
