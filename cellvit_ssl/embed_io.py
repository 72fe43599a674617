"""Embedding files: chunked, resumable, locked output of ``embed`` and ``predict``, and reading them back.

:class:`ResumableWriter` stores finished chunks of embeddings in ``OUT.partial/`` so an
interrupted run resumes where it stopped, then writes the AnnData ``.h5ad`` or Zarr store
atomically. Rows come from :class:`~cellvit_ssl.data.samples.SampleReader`, the one reader of
index rows; the ``obs`` table keeps every index column and adds the region each sample was read
from (:data:`SAMPLE_COLUMNS`).
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cellvit_ssl.errors import DataError
from cellvit_ssl.io import atomic_write_bytes, atomic_write_with, remove_path

#: obs columns of the region each row's sample was read from (``y1``/``x1`` exclusive; may
#: reach past the image border, where the sample is zero-padded) and how it was sampled.
SAMPLE_COLUMNS = ("sample_y0", "sample_x0", "sample_y1", "sample_x1")


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def table_sha256(table: pd.DataFrame) -> str:
    """SHA-256 of a table's content (columns and values)."""
    return hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()


def obs_table(table: pd.DataFrame, boxes: np.ndarray, kinds: Sequence[str]) -> pd.DataFrame:
    """The AnnData ``obs`` for an index: its columns, h5ad-safe, plus the sample regions and kinds."""
    obs = table.reset_index(drop=True).copy()
    for col in obs.columns:
        if obs[col].dtype == object:
            obs[col] = obs[col].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    for k, col in enumerate(SAMPLE_COLUMNS):
        obs[col] = boxes[:, k].astype(np.int64)
    obs["sample_kind"] = list(kinds)
    obs.index = obs.index.astype(str)
    return obs


class ResumableWriter:
    """Chunked, resumable output of an embedding run.

    Finished chunks are saved as ``OUT.partial/chunk_<start>.npz`` (embeddings, sample regions
    and kinds), each written atomically, next to a ``manifest.json`` holding the run's
    fingerprint. A rerun with the same fingerprint skips the saved chunks (a chunk that does not
    load is recomputed); :meth:`finish` writes the final file atomically and removes the partial
    folder.

    Args:
        out: ``*.h5ad`` or ``*.zarr``.
        fingerprint: What identifies the run (checkpoint hash, index hash, settings).
        overwrite: Replace an existing output / partial run made with another fingerprint.
        section: The command writing (``embed``, ``predict``): its ``uns`` entry holds the
            fingerprint, and messages name its keys.

    Raises:
        DataError: On an unknown output suffix.
    """

    def __init__(self, out: str | Path, fingerprint: dict, overwrite: bool = False, section: str = "embed") -> None:
        self.out = Path(out).expanduser()
        if self.out.suffix not in (".h5ad", ".zarr"):
            raise DataError(f"output {str(self.out)!r}: expected a .h5ad or .zarr path")
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.overwrite = overwrite
        self.section = section
        self.partial = self.out.with_name(self.out.name + ".partial")

    def up_to_date(self) -> bool:
        """True when ``out`` already holds this run's complete result (nothing to do).

        Raises:
            DataError: If ``out`` exists but is not an embeddings file of this run (without
                ``overwrite``), or is not an embeddings file at all.
        """
        if not self.out.exists():
            return False
        try:
            uns_fp = json.loads(str(read_embeddings(self.out).uns[self.section]["fingerprint"]))
        except DataError:
            raise DataError(f"{self.out} exists and is not an AnnData file; refusing to replace it. Choose "
                            f"another output ({self.section}.out=...)") from None
        except (KeyError, TypeError, ValueError):
            uns_fp = None
        if uns_fp == self.fingerprint:
            return True
        if not self.overwrite:
            raise DataError(f"{self.out} exists and was made from other inputs or settings; choose another output "
                            f"({self.section}.out=...) or replace it ({self.section}.overwrite=true, or --overwrite)")
        return False

    def begin(self) -> list[str]:
        """Create (or reuse, when the fingerprint matches) the partial folder.

        Returns:
            Notes for the user (e.g. a damaged chunk that will be recomputed).

        Raises:
            DataError: If a partial run made with other inputs or settings is there (without
                ``overwrite``).
        """
        manifest = self.partial / "manifest.json"
        notes: list[str] = []
        if self.partial.exists():
            try:
                old = json.loads(manifest.read_text()) if manifest.is_file() else None
            except (OSError, ValueError):
                old = None
            chunks = sorted(self.partial.glob("chunk_*.npz"))
            if not chunks:
                remove_path(self.partial)  # a run that failed before its first chunk: nothing to keep
            elif old != self.fingerprint:
                if not self.overwrite:
                    raise DataError(f"{self.partial} holds a partial run made with other inputs or settings; "
                                    f"delete it, or replace it ({self.section}.overwrite=true, or --overwrite)")
                remove_path(self.partial)
            for chunk in chunks if old == self.fingerprint else []:
                if not _loads(chunk):
                    chunk.unlink()
                    notes.append(f"{chunk.name} was damaged and is recomputed")
        atomic_write_bytes(manifest, json.dumps(self.fingerprint).encode())
        return notes

    def _chunk(self, start: int) -> Path:
        return self.partial / f"chunk_{start:010d}.npz"

    def done(self, start: int) -> bool:
        return self._chunk(start).is_file()

    def _resume_hint(self) -> str:
        return (f"the finished chunks are kept in {self.partial}: free space (or fix the folder) and run the same "
                "command again to continue from them")

    def save(self, start: int, embeddings: np.ndarray, boxes: np.ndarray, kinds: Sequence[str]) -> None:
        """Write the chunk of rows from ``start`` (atomically).

        Raises:
            DataError: If it cannot be written, saying what is kept and how to continue.
        """
        buffer = io.BytesIO()
        np.savez(buffer, X=embeddings.astype(np.float32), boxes=boxes.astype(np.int64),
                 kinds=np.asarray(list(kinds), dtype=str))
        try:
            atomic_write_bytes(self._chunk(start), buffer.getvalue())
        except DataError as exc:
            raise DataError(f"{exc}; {self._resume_hint()}") from exc

    def load(self, starts: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        parts = [np.load(self._chunk(s), allow_pickle=False) for s in starts]
        kinds = [str(k) for p in parts for k in p["kinds"]]
        return np.concatenate([p["X"] for p in parts]), np.concatenate([p["boxes"] for p in parts]), kinds

    def finish(self, table: pd.DataFrame, starts: Sequence[int], uns: dict,
               columns: Callable[[np.ndarray], pd.DataFrame] | None = None,
               var_names: Sequence[str] | None = None) -> Path:
        """Assemble the chunks into the final AnnData file (atomic) and drop the partial folder.

        Args:
            table: The index rows.
            starts: First row of every chunk.
            uns: Provenance; the fingerprint is added under ``uns[section]``.
            columns: ``X -> DataFrame`` of obs columns derived from the saved values (e.g. a
                classifier's probabilities and labels), row-aligned with ``X``.
            var_names: Names of ``X``'s columns.

        Raises:
            DataError: If rows are missing, or ``columns`` would replace index columns.
        """
        import anndata

        x, boxes, kinds = self.load(starts)
        if len(x) != len(table):
            raise DataError(f"{self.partial}: {len(x)} rows saved for {len(table)} index rows")
        uns = dict(uns)
        uns.setdefault(self.section, {})["fingerprint"] = json.dumps(self.fingerprint, sort_keys=True)
        obs = obs_table(table, boxes, kinds)
        if columns is not None:
            extra = columns(x)
            clash = [c for c in extra.columns if c in obs.columns]
            if clash:
                raise DataError(f"the index already has columns {clash}; rename them so that the "
                                f"{self.section} output can add its own")
            extra.index = obs.index
            obs = pd.concat([obs, extra], axis=1)
        adata = anndata.AnnData(X=x, obs=obs, uns=uns)
        if var_names is not None:
            adata.var_names = [str(v) for v in var_names]
        try:
            if self.out.suffix == ".h5ad":
                atomic_write_with(self.out, lambda tmp: adata.write_h5ad(tmp))
            else:
                def write_zarr(tmp: Path) -> None:
                    # Zarr v3, the format the package reads and writes, in plain chunks: an embeddings table is
                    # small, and saying so explicitly keeps anndata from warning about its future sharding default.
                    settings = {"zarr_write_format": 3}
                    if hasattr(anndata.settings, "auto_shard_zarr_v3"):
                        settings["auto_shard_zarr_v3"] = False
                    with anndata.settings.override(**settings), warnings.catch_warnings():
                        # anndata consolidates the store's metadata on purpose; zarr notes that v3 has no such spec
                        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
                        adata.write_zarr(tmp)

                atomic_write_with(self.out, write_zarr, directory=True)
        except DataError as exc:
            raise DataError(f"{exc}; {self._resume_hint()}") from exc
        remove_path(self.partial)
        return self.out


def _loads(chunk: Path) -> bool:
    try:
        with np.load(chunk, allow_pickle=False) as data:
            return {"X", "boxes", "kinds"} <= set(data.files) and len(data["X"]) == len(data["boxes"])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False


def read_embeddings(path: str | Path):
    """Open an embeddings file written by ``python -m cellvit_ssl.embed`` (.h5ad or .zarr) as AnnData.

    Raises:
        DataError: If it is missing or not an AnnData file.
    """
    import anndata

    p = Path(path)
    if not p.exists():
        raise DataError(f"embeddings file {str(p)!r} does not exist")
    try:
        return anndata.read_zarr(p) if p.suffix == ".zarr" else anndata.read_h5ad(p)
    except Exception as exc:
        raise DataError(f"embeddings file {str(p)!r} could not be read as AnnData ({type(exc).__name__}: {exc})") \
            from exc
