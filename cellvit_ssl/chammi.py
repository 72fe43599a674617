"""The CHAMMI benchmark: its tasks, the rows each task fits and scores, and the CHAMMI score.

CHAMMI (Chen et al., NeurIPS 2023, scored with the authors' MorphEm code) has three
sub-datasets, each with its own ``Train`` split and tasks; the ``dataset`` values are the
download's folder names:

======  =========  ====================================================================
paper   dataset    tasks (out-of-distribution ones count in the CHAMMI score)
======  =========  ====================================================================
WTC     ``Allen``  T1, T2 (OOD)
HPA     ``HPA``    T1, T2 (OOD), T3 (OOD, leave one ``cell_type`` out)
CP      ``CP``     T1, T2 (OOD), T3 (OOD), T4 (OOD, leave one ``Plate`` out)
======  =========  ====================================================================

The protocol, as MorphEm scores it: the classifier is fitted on the sub-dataset's ``Train``
rows; a task's test rows are those whose boolean column named after the task
(``Task_one`` ...) is true; HPA ``Task_three`` and CP ``Task_four`` are scored group by group
(one cell type / plate held out, the classifier fitted on ``Train`` plus the task's other
groups, the predictions pooled), so that their novel classes can be predicted at all; macro-F1
is taken over the labels present in the task's test rows.

The CHAMMI score (as the CHAMMI-75 benchmark defines it) is the mean over the three
sub-datasets of the mean macro-F1 of their out-of-distribution tasks:
``WTC2/3 + (HPA2 + HPA3)/6 + (CP2 + CP3 + CP4)/9``. Some papers average WTC and HPA only:
``(WTC2 + (HPA2 + HPA3)/2) / 2``. Both are computed here and named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellvit_ssl.errors import DataError
from cellvit_ssl.protocols import Task, leave_one_group_out, truthy

SPLIT_KEY = "train_test_split"
DATASET_KEY = "dataset"
TRAIN = "Train"

#: ``dataset`` value → the sub-dataset's name in papers.
SUBSETS: dict[str, str] = {"Allen": "WTC", "HPA": "HPA", "CP": "CP"}
_SUBSET_ALIASES = {"allen": "Allen", "wtc": "Allen", "wtc11": "Allen", "wtc-11": "Allen", "wtc_11": "Allen",
                   "hpa": "HPA", "cp": "CP", "cellpainting": "CP", "cell_painting": "CP", "cell painting": "CP"}


@dataclass(frozen=True)
class ChammiTask:
    """One task of the benchmark.

    Attributes:
        dataset: The sub-dataset's ``dataset`` value (``Allen``, ``HPA``, ``CP``).
        task: The split value and the name of the boolean column marking its test rows.
        label: The task as papers print it (``HPA T3``).
        ood: Whether it is out-of-distribution, i.e. counted in the CHAMMI score.
        leave_out: The column it is scored leave-one-group-out by, if any.
    """

    dataset: str
    task: str
    label: str
    ood: bool
    leave_out: str | None = None


#: The benchmark's tasks in the order papers print them.
TASKS: tuple[ChammiTask, ...] = (
    ChammiTask("Allen", "Task_one", "WTC T1", False),
    ChammiTask("Allen", "Task_two", "WTC T2", True),
    ChammiTask("HPA", "Task_one", "HPA T1", False),
    ChammiTask("HPA", "Task_two", "HPA T2", True),
    ChammiTask("HPA", "Task_three", "HPA T3", True, "cell_type"),
    ChammiTask("CP", "Task_one", "CP T1", False),
    ChammiTask("CP", "Task_two", "CP T2", True),
    ChammiTask("CP", "Task_three", "CP T3", True),
    ChammiTask("CP", "Task_four", "CP T4", True, "Plate"),
)
_BY_KEY = {(t.dataset, t.task): t for t in TASKS}
TASK_NAMES = tuple(dict.fromkeys(t.task for t in TASKS))

SCORE_DEFINITION = "CHAMMI = WTC T2/3 + (HPA T2 + HPA T3)/6 + (CP T2 + CP T3 + CP T4)/9 (CHAMMI-75)"
WTC_HPA_DEFINITION = "WTC+HPA = (WTC T2 + (HPA T2 + HPA T3)/2)/2"


def subset_name(value: str) -> str | None:
    """The ``dataset`` value's sub-dataset (``Allen``, ``HPA``, ``CP``), or None if not CHAMMI's."""
    text = str(value).strip()
    return text if text in SUBSETS else _SUBSET_ALIASES.get(text.lower())


def task_label(dataset: str, task: str) -> str | None:
    """``WTC T1`` ... for a benchmark task, None for any other."""
    spec = _BY_KEY.get((subset_name(dataset) or "", task))
    return spec.label if spec else None


def looks_like_chammi(obs: pd.DataFrame, split_key: str = SPLIT_KEY) -> bool:
    """Whether ``obs[split_key]`` holds ``Train`` and at least one CHAMMI task name."""
    if split_key not in obs.columns:
        return False
    values = set(obs[split_key].astype(str).unique())
    return TRAIN in values and bool(values.intersection(TASK_NAMES))


def build_chammi_tasks(obs: pd.DataFrame, split_key: str = SPLIT_KEY, dataset_key: str = DATASET_KEY,
                       leave_out: Mapping[str, str] | None = None) -> list[Task]:
    """The CHAMMI tasks present in ``obs``, sub-dataset by sub-dataset, in the benchmark's order.

    Split values other than the benchmark's tasks are scored the same way (fit on ``Train``,
    test rows from their boolean column) after the benchmark's tasks of their sub-dataset.

    Args:
        obs: The embeddings' rows (a CHAMMI index keeps every ``enriched_meta.csv`` column).
        split_key: Column with ``Train`` / ``Task_*``.
        dataset_key: Column naming the sub-dataset of each row (``Allen``, ``HPA``, ``CP``).
        leave_out: Task name → group column, replacing the benchmark's (``Task_three`` →
            ``cell_type`` for HPA, ``Task_four`` → ``Plate`` for CP) or adding others.

    Raises:
        DataError: If the split or dataset column is missing, a dataset value is not a CHAMMI
            sub-dataset, a sub-dataset has no ``Train`` rows, a task has no boolean column or
            no rows, or a leave-out task's group column is missing (never scored against
            ``Train`` alone instead: its novel classes could not be predicted).
    """
    leave_out = dict(leave_out or {})
    if split_key not in obs.columns:
        raise DataError(f"CHAMMI protocol: split column {split_key!r} is not in the embeddings' obs "
                        f"(columns: {list(obs.columns)}); name it with --split-key")
    split = obs[split_key].astype(str).to_numpy()
    if dataset_key not in obs.columns:
        found = [v for v in pd.unique(split) if v != TRAIN]
        raise DataError(
            f"split column {split_key!r} has the CHAMMI layout (Train, {', '.join(map(str, found))}) but the "
            f"embeddings' obs has no {dataset_key!r} column. CHAMMI scores each sub-dataset (Allen/WTC, HPA, CP) "
            "on its own Train rows, with HPA Task_three by leave-one-cell_type-out and CP Task_four by "
            "leave-one-Plate-out. Build the index with `python -m cellvit_ssl.data.index chammi` (it writes "
            "'dataset') and embed again, name the column with --dataset-key, or score the split without the "
            "CHAMMI rules with --protocol generic")
    raw = obs[dataset_key].astype(str).to_numpy()
    names = {v: subset_name(v) for v in pd.unique(raw)}
    unknown = [v for v, n in names.items() if n is None]
    if unknown:
        raise DataError(f"column {dataset_key!r} holds {unknown}, not CHAMMI sub-datasets; expected "
                        f"{sorted(SUBSETS)} (or {sorted(_SUBSET_ALIASES)})")
    datasets = np.array([names[v] for v in raw], dtype=object)
    tasks: list[Task] = []
    for ds in (d for d in SUBSETS if d in set(names.values())):
        tasks += _subset_tasks(obs, split, datasets == ds, ds, split_key, leave_out)
    return tasks


def _subset_tasks(obs: pd.DataFrame, split: np.ndarray, in_ds: np.ndarray, ds: str, split_key: str,
                  leave_out: Mapping[str, str]) -> list[Task]:
    train = np.flatnonzero(in_ds & (split == TRAIN))
    if len(train) == 0:
        raise DataError(f"CHAMMI {ds}: no rows with {split_key} == {TRAIN!r}")
    present = [v for v in pd.unique(split[in_ds]) if v != TRAIN]
    order = [t.task for t in TASKS if t.dataset == ds and t.task in present]
    order += [v for v in present if v not in order]
    tasks = []
    for name in order:
        spec = _BY_KEY.get((ds, name))
        where = f"CHAMMI {spec.label if spec else ds} ({ds} {name})"
        if name not in obs.columns:
            raise DataError(f"{where}: the embeddings' obs has no boolean column {name!r}; MorphEm takes a task's "
                            "test rows from it. Build the index with `python -m cellvit_ssl.data.index chammi` "
                            "(it keeps every enriched_meta.csv column) and embed again")
        rows = np.flatnonzero(in_ds & truthy(obs[name]))
        if len(rows) == 0:
            raise DataError(f"{where}: {split_key} names the task but no {ds} row has {name} == True")
        column = leave_out.get(name, spec.leave_out if spec else None)
        if column is None:
            tasks.append(Task(name, "train/test", [(train, rows)], ds))
            continue
        if column not in obs.columns:
            raise DataError(
                f"{where} is scored leave-one-{column}-out, but the embeddings' obs has no {column!r} column "
                f"(columns: {list(obs.columns)}). Scored against Train alone its novel classes could never be "
                "predicted and its score would collapse, so it is not. Build the index with "
                "`python -m cellvit_ssl.data.index chammi` (it keeps every enriched_meta.csv column) and embed "
                f"again, or name the group column with --leave-out {name}=COLUMN")
        groups = obs[column].astype(str).to_numpy()
        tasks.append(Task(name, f"leave-one-{column}-out", leave_one_group_out(rows, groups, train), ds))
    return tasks


def describe_layout(obs: pd.DataFrame, tasks: Sequence[Task], split_key: str = SPLIT_KEY,
                    dataset_key: str = DATASET_KEY) -> str:
    """One line saying what was found: columns, sub-datasets and how each task is scored."""
    counts = obs[dataset_key].astype(str).map(subset_name).value_counts()
    subsets = ", ".join(f"{ds} ({int(counts[ds])} rows)" for ds in SUBSETS if ds in counts)
    per_ds: dict[str, list[str]] = {}
    for t in tasks:
        per_ds.setdefault(t.dataset, []).append(t.name + ("" if t.kind == "train/test" else f" {t.kind}"))
    scored = "; ".join(f"{ds}: {', '.join(names)}" for ds, names in per_ds.items())
    return (f"detected CHAMMI layout: split column {split_key!r} (Train, Task_*), dataset column {dataset_key!r} "
            f"with {subsets}, test rows from the boolean task columns; tasks {scored}")


@dataclass(frozen=True)
class ChammiScore:
    """The benchmark's aggregates of one classifier on one feature set.

    Attributes:
        chammi: The CHAMMI score, ``WTC2/3 + (HPA2 + HPA3)/6 + (CP2 + CP3 + CP4)/9``, or None
            when an out-of-distribution task is missing.
        wtc_hpa: ``(WTC2 + (HPA2 + HPA3)/2) / 2``, or None when one of its tasks is missing.
        subsets: Mean macro-F1 of each sub-dataset's out-of-distribution tasks (``WTC``,
            ``HPA``, ``CP``), None where one is missing.
        missing: Out-of-distribution task labels without a score.
    """

    chammi: float | None
    wtc_hpa: float | None
    subsets: dict[str, float | None]
    missing: tuple[str, ...]


def chammi_score(macro_f1: Mapping[str, float]) -> ChammiScore:
    """The CHAMMI score and its WTC+HPA variant from per-task macro-F1 keyed by ``WTC T2`` ...

    Examples:
        >>> s = chammi_score({"WTC T2": 0.6, "HPA T2": 0.5, "HPA T3": 0.3, "CP T2": 0.3, "CP T3": 0.2, "CP T4": 0.1})
        >>> round(s.chammi, 4), round(s.wtc_hpa, 4)
        (0.4, 0.5)
    """
    ood = [t for t in TASKS if t.ood]
    missing = tuple(t.label for t in ood if t.label not in macro_f1)
    subsets: dict[str, float | None] = {}
    for ds, name in SUBSETS.items():
        labels = [t.label for t in ood if t.dataset == ds]
        subsets[name] = None if any(x in missing for x in labels) else sum(macro_f1[x] for x in labels) / len(labels)
    f = macro_f1
    chammi = None
    if not missing:
        chammi = f["WTC T2"] / 3 + (f["HPA T2"] + f["HPA T3"]) / 6 + (f["CP T2"] + f["CP T3"] + f["CP T4"]) / 9
    wtc_hpa = None
    if subsets["WTC"] is not None and subsets["HPA"] is not None:
        wtc_hpa = (f["WTC T2"] + (f["HPA T2"] + f["HPA T3"]) / 2) / 2
    return ChammiScore(chammi, wtc_hpa, subsets, missing)


@dataclass(frozen=True)
class BenchmarkRow:
    """One row of the benchmark table: a feature set scored by one classifier.

    Attributes:
        features: ``trained``, ``random-init``, ``raw-pixels``.
        classifier: The classifier's name (``1nn_l2`` ...).
        macro_f1: Macro-F1 by task label (``WTC T1`` ...); absent tasks are printed as ``-``.
    """

    features: str
    classifier: str
    macro_f1: Mapping[str, float]

    @property
    def score(self) -> ChammiScore:
        return chammi_score(self.macro_f1)


def format_benchmark_table(rows: Sequence[BenchmarkRow], marked: str | None = None, footnote: str = "") -> str:
    """The table as papers print it: macro-F1 in percent per task in order, then both scores.

    Args:
        rows: Feature set × classifier rows.
        marked: Classifier whose rows get a ``*`` (the benchmark's choice).
        footnote: Text of the ``*`` note.
    """
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    header = ["features", "classifier", *(t.label for t in TASKS), "CHAMMI", "WTC+HPA"]
    body = []
    for r in rows:
        s = r.score
        name = r.classifier + (" *" if r.classifier == marked else "")
        body.append([r.features, name, *(pct(r.macro_f1.get(t.label)) for t in TASKS), pct(s.chammi), pct(s.wtc_hpa)])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = ["CHAMMI benchmark: macro-F1 (%) per task, and the CHAMMI score",
             line(header), "  ".join("-" * w for w in widths), *(line(b) for b in body),
             f"{SCORE_DEFINITION}; {WTC_HPA_DEFINITION}; only out-of-distribution tasks count."]
    missing = sorted({m for r in rows for m in r.score.missing}, key=[t.label for t in TASKS].index)
    if missing:
        lines.append(f"no CHAMMI score: no scores for {', '.join(missing)} (the embeddings lack those tasks' rows)")
    if marked and footnote:
        lines.append(f"* {footnote}")
    return "\n".join(lines)
