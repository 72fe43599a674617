"""Export the selected cells' features and embeddings to CSV or AnnData."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cellvit_ssl.errors import DataError
from cellvit_ssl.io import atomic_write_with


def export_selection(features: pd.DataFrame, ids: Sequence[int], path: str | Path) -> Path:
    """Write the rows of ``features`` whose ``index`` is in ``ids``.

    ``.csv`` writes the table as it is; ``.h5ad`` writes an AnnData with the
    ``embedding_*`` columns as ``X`` and the other columns as ``obs`` (indexed by label id).

    Returns:
        The path written.

    Raises:
        DataError: On an empty selection or an unsupported suffix.
    """
    path = Path(path)
    rows = features[features["index"].isin(np.asarray(list(ids)))]
    if rows.empty:
        raise DataError("nothing is selected: select cells in the map or Shift-click them in the image first")
    if path.suffix == ".csv":
        return atomic_write_with(path, lambda tmp: rows.to_csv(tmp, index=False))
    if path.suffix == ".h5ad":
        import anndata

        emb_cols = [c for c in rows.columns if c.startswith("embedding_")]
        obs = rows.drop(columns=emb_cols).copy()
        obs.index = obs["index"].astype(str).to_numpy()
        obs.columns = [str(c) for c in obs.columns]
        adata = anndata.AnnData(X=rows[emb_cols].to_numpy(np.float32), obs=obs)
        return atomic_write_with(path, adata.write_h5ad)
    raise DataError(f"cannot export to {path.name!r}: use a .csv or .h5ad file name")
