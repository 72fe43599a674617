"""Class labels of an index for supervised fine-tuning, and the scores of a classifier's predictions.

Two kinds of label columns (``finetune.label_columns``):

- **single-label**: one column holding each row's class name (``label``);
- **multi-label**: one column holding each row's classes separated by ``;`` (HPA's
  ``Label`` is ``0|5``-style: set the separator), or one 0/1 column per class, named by the
  class (``nuclear``, ``mitochondrial``, ...).

Every mistake in the labels is a :class:`~cellvit_ssl.errors.DataError` naming the column,
the row and the value: a missing column, an empty (NaN) label, a value that is not 0/1 in an
indicator column, a label outside ``finetune.classes``, and a class that has evaluation rows
but no training rows.

The scores follow :mod:`cellvit_ssl.evaluate`: macro-F1 over the classes present in the
scored rows, accuracy, per-class F1 / precision / recall / support; multi-label adds the
average precision of each class and its mean (mAP), which needs no threshold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellvit_ssl.errors import DataError

_TRUE = {"1", "1.0", "true", "yes"}
_FALSE = {"0", "0.0", "false", "no"}


@dataclass
class Labels:
    """The targets of every row of an index.

    Attributes:
        classes: Class names, in the order of the classifier's outputs.
        multi_label: Several classes per row (sigmoid outputs, BCE) or one (softmax, CE).
        targets: ``(N,)`` int64 class indices (single-label) or ``(N, K)`` float32 0/1 (multi-label).
    """

    classes: list[str]
    multi_label: bool
    targets: np.ndarray

    def indicators(self, rows: np.ndarray | None = None) -> np.ndarray:
        """``(n, K)`` bool: which classes each row has."""
        t = self.targets if rows is None else self.targets[rows]
        if self.multi_label:
            return t > 0.5
        return np.eye(len(self.classes), dtype=bool)[t]

    def counts(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Rows per class ``(K,)``."""
        return self.indicators(rows).sum(axis=0)


def _row_name(table: pd.DataFrame, i: int) -> str:
    return f"row {table.index[i]}"


def _split_names(value: str, separator: str) -> list[str]:
    return [part.strip() for part in str(value).split(separator) if part.strip()]


def read_labels(table: pd.DataFrame, columns: Sequence[str], multi_label: bool, separator: str = ";",
                classes: Sequence[str] = (), source: str = "index") -> Labels:
    """The targets of every row of ``table``.

    Args:
        table: The index (its row labels name the rows in messages).
        columns: One label column, or (multi-label) one 0/1 column per class.
        multi_label: Whether a row may have several classes.
        separator: Multi-label, one column: what separates a row's classes.
        classes: The class order; default: the sorted classes found in the rows (for 0/1
            columns: the columns' order). :func:`require_trained_classes` then refuses a class
            that only evaluation rows have.
        source: Name of the index in messages.

    Raises:
        DataError: On a missing column, an empty (NaN) label, a value other than 0/1 in an
            indicator column, a label outside ``classes``, or no class at all.
    """
    columns = [str(c) for c in columns]
    if not columns:
        raise DataError("finetune.label_columns is empty; name the index column(s) holding the labels")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{source}: no label column {missing[0]!r} (finetune.label_columns={columns}); the index "
                        f"has columns {list(table.columns)}")
    if len(columns) > 1 and not multi_label:
        raise DataError(f"finetune.label_columns={columns} names several columns: one 0/1 column per class is a "
                        "multi-label index (finetune.task=multi_label); a single-label index has one column")
    for column in columns:
        empty = np.flatnonzero(table[column].isna().to_numpy())
        if empty.size:
            raise DataError(f"{source} {_row_name(table, int(empty[0]))}: label column {column!r} is empty (NaN)"
                            f"{f' in {empty.size} rows' if empty.size > 1 else ''}; every row needs a label: fill "
                            "or drop those rows")
    if len(columns) > 1:
        return _indicator_labels(table, columns, classes, source)
    values = table[columns[0]].astype(str).str.strip()
    if multi_label:
        per_row = [_split_names(v, separator) for v in values]
    else:
        per_row = [[v] for v in values]
    names = [str(c) for c in classes] or sorted({n for row in per_row for n in row})
    if len(set(names)) != len(names):
        raise DataError(f"finetune.classes={names} lists a class twice")
    if len(names) < (1 if multi_label else 2):
        raise DataError(f"{source}: column {columns[0]!r} holds {len(names)} class(es) {names}; a classifier needs "
                        f"{'at least one class' if multi_label else 'two classes or more'}")
    position = {n: k for k, n in enumerate(names)}
    for i, row in enumerate(per_row):
        unknown = [n for n in row if n not in position]
        if unknown:
            raise DataError(f"{source} {_row_name(table, i)}: label {unknown[0]!r} in column {columns[0]!r} is not "
                            f"one of finetune.classes={names}")
    if not multi_label:
        return Labels(names, False, np.array([position[r[0]] for r in per_row], np.int64))
    targets = np.zeros((len(table), len(names)), np.float32)
    for i, row in enumerate(per_row):
        targets[i, [position[n] for n in row]] = 1.0
    return Labels(names, True, targets)


def _indicator_labels(table: pd.DataFrame, columns: list[str], classes: Sequence[str], source: str) -> Labels:
    if classes and [str(c) for c in classes] != columns:
        raise DataError(f"finetune.classes={list(classes)} differs from the 0/1 label columns {columns}; with one "
                        "column per class the columns are the classes (leave finetune.classes empty)")
    targets = np.zeros((len(table), len(columns)), np.float32)
    for k, column in enumerate(columns):
        text = table[column].astype(str).str.strip()
        positive, negative = text.str.lower().isin(_TRUE).to_numpy(), text.str.lower().isin(_FALSE).to_numpy()
        bad = np.flatnonzero(~(positive | negative))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{source} {_row_name(table, i)}: column {column!r} holds {text.iloc[i]!r}; a "
                            "per-class label column holds 0 or 1 (or true / false)")
        targets[:, k] = positive
    return Labels(list(columns), True, targets)


def require_trained_classes(labels: Labels, train_rows: np.ndarray, others: Mapping[str, np.ndarray],
                            table: pd.DataFrame, source: str = "index") -> None:
    """Refuse classes that appear in evaluation rows (or in the class list) but in no training row.

    Args:
        labels: The targets.
        train_rows: Rows the classifier is fitted on.
        others: Split name → rows scored (``val``, ``test``).
        table: The index (for row names in messages).
        source: Name of the index in messages.

    Raises:
        DataError: Naming the class, the split and its first row.
    """
    trained = labels.counts(train_rows) > 0
    for split, rows in others.items():
        if len(rows) == 0:
            continue
        present = labels.indicators(rows)
        for k in np.flatnonzero(present.any(axis=0) & ~trained):
            first = int(rows[np.flatnonzero(present[:, k])[0]])
            raise DataError(f"{source}: class {labels.classes[k]!r} has {int(present[:, k].sum())} {split} row(s) "
                            f"(first: {_row_name(table, first)}) but no training row; the classifier cannot learn "
                            "it. Add training rows of it, or leave those rows out")
    untrained = [labels.classes[k] for k in np.flatnonzero(~trained)]
    if untrained:
        raise DataError(f"{source}: classes {untrained} have no training row; the classifier cannot learn them "
                        "(drop them from finetune.classes, or add training rows)")


def class_weights(labels: Labels, rows: np.ndarray) -> np.ndarray:
    """Balancing weights from the training rows' class counts, float32 ``(K,)``.

    Single-label: ``n / (K · n_k)`` per class (the loss weight of class ``k``). Multi-label:
    ``(n - n_k) / n_k``, the weight of a class's positive term (``BCEWithLogitsLoss``'s
    ``pos_weight``), so positives and negatives of each class weigh the same.
    """
    counts = labels.counts(rows).astype(np.float64)
    n = float(len(rows))
    if labels.multi_label:
        return ((n - counts) / np.maximum(counts, 1)).astype(np.float32)
    return (n / (len(labels.classes) * np.maximum(counts, 1))).astype(np.float32)


def select_thresholds(probabilities: np.ndarray, truth: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per-class decision thresholds that maximise each class's F1 on held-out rows (multi-label).

    For class ``k`` the rows are ranked by probability; predicting the top ``j`` rows positive
    is scored for every ``j`` at which the probability changes, and the threshold is put half
    way between the last row taken and the next. A class without positive rows keeps ``default``.

    Args:
        probabilities: ``(n, K)`` sigmoid outputs.
        truth: ``(n, K)`` bool (or 0/1) targets.
        default: Threshold of classes that cannot be tuned.

    Returns:
        float32 ``(K,)``.
    """
    probabilities = np.asarray(probabilities, np.float64)
    truth = np.asarray(truth) > 0.5
    out = np.full(probabilities.shape[1], default, np.float32)
    for k in range(probabilities.shape[1]):
        positives = int(truth[:, k].sum())
        if positives == 0:
            continue
        order = np.argsort(-probabilities[:, k], kind="stable")
        p, t = probabilities[order, k], truth[order, k]
        tp = np.cumsum(t)
        taken = np.arange(1, len(p) + 1)
        f1 = 2 * tp / (taken + positives)
        last_of_tie = np.append(p[1:] < p[:-1], True)  # a cut can only fall between different values
        f1 = np.where(last_of_tie, f1, -1.0)
        j = int(np.argmax(f1))
        out[k] = (p[j] + p[j + 1]) / 2 if j + 1 < len(p) else p[j] / 2
    return out


def decide(probabilities: np.ndarray, multi_label: bool, thresholds: np.ndarray | None = None) -> np.ndarray:
    """``(n, K)`` bool: the classes predicted from probabilities (argmax, or each class over its threshold)."""
    probabilities = np.asarray(probabilities)
    if not multi_label:
        return np.eye(probabilities.shape[1], dtype=bool)[np.argmax(probabilities, axis=1)]
    thresholds = np.full(probabilities.shape[1], 0.5) if thresholds is None else np.asarray(thresholds)
    return probabilities >= thresholds


def scores(labels: Labels, rows: np.ndarray, probabilities: np.ndarray, thresholds: np.ndarray | None = None
           ) -> dict:
    """Scores of predictions on some rows, in ``evaluate``'s terms.

    Returns:
        ``macro_f1`` (over the classes present in the rows), ``accuracy`` (exact match for
        multi-label), ``n`` and ``per_class`` (``f1``, ``precision``, ``recall``, ``support``; for
        multi-label also ``average_precision`` and the ``threshold`` used); multi-label adds
        ``mAP`` (mean average precision over the classes present) and ``micro_f1``.
    """
    from sklearn.metrics import average_precision_score, f1_score, precision_recall_fscore_support

    from cellvit_ssl.evaluate import per_class_report
    from cellvit_ssl.evaluate import scores as single_label_scores

    probabilities = np.asarray(probabilities, np.float64)
    predicted = decide(probabilities, labels.multi_label, thresholds)
    if not labels.multi_label:
        names = np.asarray(labels.classes)
        y_true, y_pred = names[labels.targets[rows]], names[np.argmax(probabilities, axis=1)]
        return {**single_label_scores(y_true, y_pred), "n": int(len(rows)),
                "per_class": per_class_report(y_true, y_pred)}
    truth = labels.indicators(rows)
    present = np.flatnonzero(truth.any(axis=0))
    p, r, f, n = precision_recall_fscore_support(truth, predicted, zero_division=0)
    per_class = {}
    ap = {}
    for k, name in enumerate(labels.classes):
        per_class[name] = {"f1": float(f[k]), "precision": float(p[k]), "recall": float(r[k]), "support": int(n[k]),
                           "threshold": float(thresholds[k]) if thresholds is not None else 0.5}
        if truth[:, k].any():
            ap[name] = float(average_precision_score(truth[:, k], probabilities[:, k]))
            per_class[name]["average_precision"] = ap[name]
    return {"macro_f1": float(np.mean(f[present])) if present.size else 0.0,
            "mAP": float(np.mean(list(ap.values()))) if ap else 0.0,
            "micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0)),
            "accuracy": float(np.mean((truth == predicted).all(axis=1))), "n": int(len(rows)),
            "per_class": per_class}
