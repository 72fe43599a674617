"""Which rows each evaluation task fits on and scores: train/test splits, leave-one-group-out, CV.

A :class:`Task` is a list of ``(training rows, test rows)`` folds; predictions are pooled over
the folds before scoring. This module holds the generic protocols, chosen from the columns of
the embeddings' ``obs``; the CHAMMI benchmark's own rules are in :mod:`cellvit_ssl.chammi`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellvit_ssl.errors import DataError


@dataclass
class Task:
    """One scored task: either a train/test split or leave-one-group-out folds.

    Attributes:
        name: The task's name (a split value, ``leave-one-Plate-out``, ``5-fold-cv``).
        kind: How it is scored: ``train/test``, ``leave-one-<column>-out``, ``cross-validation``.
        folds: ``(training rows, test rows)`` index pairs; predictions are pooled over folds.
        dataset: The sub-dataset the task belongs to (``""`` when there is one).
    """

    name: str
    kind: str
    folds: list[tuple[np.ndarray, np.ndarray]]
    dataset: str = ""


def truthy(values: pd.Series) -> np.ndarray:
    """Boolean mask of a column holding booleans or their text (``True`` / ``1`` / ``yes``; NaN is false)."""
    if values.dtype == bool:
        return values.to_numpy()
    return values.astype(str).str.strip().str.lower().isin(["true", "1", "yes"]).to_numpy()


def leave_one_group_out(rows: np.ndarray, groups: np.ndarray, base_train: np.ndarray
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """One fold per group of ``rows``: that group held out, the fit on ``base_train`` plus the rest.

    Args:
        rows: The task's rows (indices into ``groups``).
        groups: Group of every row of the table.
        base_train: Rows always fitted on (e.g. a ``Train`` split); may be empty.
    """
    folds = []
    for g in pd.unique(groups[rows]):
        held = rows[groups[rows] == g]
        rest = rows[groups[rows] != g]
        folds.append((np.concatenate([base_train, rest]), held))
    return folds


def build_tasks(obs: pd.DataFrame, labels: np.ndarray, split_key: str | None = None, train_value: str | None = None,
                group_key: str | None = None, leave_out: Mapping[str, str] | None = None,
                dataset_key: str | None = None, folds: int = 5, seed: int = 0) -> list[Task]:
    """The tasks of the generic protocols, from the columns of ``obs``.

    - ``split_key``: fit on the rows whose split is ``train_value`` (default ``train`` /
      ``Train``) and score every other split value as its own task (rows whose split equals
      it), per sub-dataset of ``dataset_key``; a split named in ``leave_out`` is scored
      leave-one-group-out by its column, fitting on the training rows plus its other groups.
    - ``group_key``: leave-one-group-out over all rows.
    - neither: stratified ``folds``-fold cross-validation.

    Raises:
        DataError: If a named column is missing, a split has no training rows or nothing to
            test on, or cross-validation has too few rows per label.
    """
    for key in (split_key, group_key, dataset_key, *(leave_out or {}).values()):
        if key is not None and key not in obs.columns:
            raise DataError(f"column {key!r} is not in the embeddings' obs (columns: {list(obs.columns)})")
    tasks: list[Task] = []
    if split_key is not None:
        datasets = obs[dataset_key].astype(str).to_numpy() if dataset_key else np.full(len(obs), "")
        for ds in pd.unique(datasets):
            tasks += _split_tasks(obs, datasets == ds, ds, split_key, train_value, leave_out or {})
    if group_key is not None:
        groups = obs[group_key].astype(str).to_numpy()
        if len(np.unique(groups)) < 2:
            raise DataError(f"group column {group_key!r} has a single value; leave-one-group-out needs two or more")
        tasks.append(Task(f"leave-one-{group_key}-out", "leave-one-group-out",
                          leave_one_group_out(np.arange(len(obs)), groups, np.zeros(0, int))))
    if not tasks:
        from sklearn.model_selection import StratifiedKFold

        _, counts = np.unique(labels, return_counts=True)
        n = int(min(folds, counts.min()))
        if n < 2:
            raise DataError("every label needs at least 2 rows for cross-validation; give --split-key or --group-key")
        splitter = StratifiedKFold(n_splits=n, shuffle=True, random_state=seed)
        tasks.append(Task(f"{n}-fold-cv", "cross-validation",
                          [(tr, te) for tr, te in splitter.split(np.zeros(len(labels)), labels)]))
    return tasks


def find_train_value(values: list[str], split_key: str, train_value: str | None) -> str:
    """``train_value``, or the split value spelled ``train`` in any case.

    Raises:
        DataError: If no value is ``train`` and none was named.
    """
    if train_value is not None:
        return train_value
    found = [v for v in values if v.lower() == "train"]
    if not found:
        raise DataError(f"split column {split_key!r} has no 'train' value (values: {values}); "
                        "name it with --train-value")
    return found[0]


def _split_tasks(obs: pd.DataFrame, in_ds: np.ndarray, dataset: str, split_key: str, train_value: str | None,
                 leave_out: Mapping[str, str]) -> list[Task]:
    split = obs[split_key].astype(str).to_numpy()
    values = list(pd.unique(split[in_ds]))
    train_value = find_train_value(values, split_key, train_value)
    train = np.flatnonzero(in_ds & (split == train_value))
    if len(train) == 0:
        where = f" in dataset {dataset!r}" if dataset else ""
        raise DataError(f"no rows with {split_key} == {train_value!r}{where}")
    if len(values) < 2:
        raise DataError(f"split column {split_key!r} holds only {values}: nothing to test on")
    tasks = []
    for task in (v for v in values if v != train_value):
        rows = np.flatnonzero(in_ds & (split == task))
        if task in leave_out:
            groups = obs[leave_out[task]].astype(str).to_numpy()
            tasks.append(Task(task, f"leave-one-{leave_out[task]}-out",
                              leave_one_group_out(rows, groups, train), dataset))
        else:
            tasks.append(Task(task, "train/test", [(train, rows)], dataset))
    return tasks
