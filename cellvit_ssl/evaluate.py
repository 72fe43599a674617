"""``python -m cellvit_ssl.evaluate``: how well embeddings separate known labels.

Classifiers (scikit-learn): 1-NN and k-NN with cosine and L2 distance, and a linear probe
(standardised features, logistic regression). Scores: macro-F1 over the labels present in each
test set (as in the CHAMMI / MorphEm evaluation) and accuracy.

Protocols, chosen from the columns present:

- ``--split-key``: fit on the training rows (value ``--train-value``, default ``train`` /
  ``Train``), score every other split value as its own task.
- CHAMMI / MorphEm: when the split column holds ``Train`` and task names (``Task_one`` ...),
  a task's test rows are those whose boolean task column is true (else whose split equals the
  task). The task CHAMMI scores by leave-one-group-out (HPA ``Task_three`` by ``cell_type``,
  CP ``Task_four`` by ``Plate``, detected from a ``dataset`` column) or any ``--leave-out
  TASK=COLUMN`` is scored per group, fitting on ``Train`` plus the task's other groups.
- ``--group-key``: leave-one-group-out over all rows (fit on the other groups).
- none of these: stratified 5-fold cross-validation.

Baselines in the same run, so that a trained model's lift is visible: the same architecture
with random weights (``random-init``) and raw pixels (each crop normalised, resized to
``--pixel-size`` per channel, flattened, PCA to ``--pca`` dimensions; ``raw-pixels``). Both
re-read the crops named in ``obs`` (path and crop box) with the settings in ``uns``.

Examples:
    python -m cellvit_ssl.evaluate cells.h5ad --label-key label --split-key split
    python -m cellvit_ssl.evaluate chammi.h5ad --label-key label --split-key train_test_split
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellvit_ssl.errors import CellVitSSLError, DataError

#: CHAMMI tasks scored by leave-one-group-out, per sub-dataset (MorphEm's benchmark settings).
CHAMMI_LEAVE_OUT = {"hpa": ("Task_three", "cell_type"), "cp": ("Task_four", "Plate")}
_DATASET_ALIASES = {"hpa": "hpa", "cp": "cp", "cellpainting": "cp", "cell_painting": "cp", "allen": "allen",
                    "wtc": "allen", "wtc11": "allen", "wtc-11": "allen"}


# ----------------------------------------------------------------------------- classifiers
def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int = 1,
                metric: str = "cosine") -> np.ndarray:
    """k-nearest-neighbour majority vote (scikit-learn; a tie goes to the label that sorts first).

    Args:
        train_x: Training features ``(n, D)``.
        train_y: Training labels ``(n,)``.
        test_x: Features to classify ``(m, D)``.
        k: Neighbours (capped at ``n``).
        metric: ``cosine`` or ``l2``.
    """
    from sklearn.neighbors import KNeighborsClassifier

    if metric not in ("cosine", "l2"):
        raise DataError(f"k-NN metric {metric!r}; expected 'cosine' or 'l2'")
    k = min(k, len(train_x))
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine" if metric == "cosine" else "euclidean",
                               algorithm="brute")
    return clf.fit(train_x, train_y).predict(test_x)


def linear_probe_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Logistic regression on standardised features (a linear probe)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2:
        return np.full(len(test_x), train_y[0])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    return clf.fit(train_x, train_y).predict(test_x)


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Macro-F1 over the labels present in ``y_true``, and accuracy."""
    from sklearn.metrics import f1_score

    return {"macro_f1": float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0)),
            "accuracy": float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))}


def classifiers(k: int, seed: int = 0) -> dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]]:
    """The classifiers every feature set is scored with, by name."""
    out = {}
    for metric in ("cosine", "l2"):
        out[f"1nn_{metric}"] = lambda a, b, c, m=metric: knn_predict(a, b, c, 1, m)
        if k > 1:
            out[f"{k}nn_{metric}"] = lambda a, b, c, m=metric: knn_predict(a, b, c, k, m)
    out["linear"] = lambda a, b, c: linear_probe_predict(a, b, c, seed)
    return out


# ----------------------------------------------------------------------------- protocols
@dataclass
class Task:
    """One scored task: either a train/test split or leave-one-group-out folds.

    ``folds`` is a list of ``(train rows, test rows)``; predictions are pooled over folds.
    """

    name: str
    kind: str
    folds: list[tuple[np.ndarray, np.ndarray]]
    dataset: str = ""


def _truthy(values: pd.Series) -> np.ndarray:
    if values.dtype == bool:
        return values.to_numpy()
    return values.astype(str).str.strip().str.lower().isin(["true", "1", "yes"]).to_numpy()


def _logo_folds(rows: np.ndarray, groups: np.ndarray, base_train: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    folds = []
    for g in pd.unique(groups[rows]):
        held = rows[groups[rows] == g]
        rest = rows[groups[rows] != g]
        folds.append((np.concatenate([base_train, rest]), held))
    return folds


def build_tasks(obs: pd.DataFrame, labels: np.ndarray, split_key: str | None = None, train_value: str | None = None,
                group_key: str | None = None, leave_out: dict[str, str] | None = None,
                dataset_key: str | None = None, folds: int = 5, seed: int = 0) -> list[Task]:
    """The tasks to score, from the columns of ``obs`` (see the module docstring).

    Raises:
        DataError: If a named column is missing or a split has no training rows.
    """
    for key in (split_key, group_key, dataset_key, *(leave_out or {}).values()):
        if key is not None and key not in obs.columns:
            raise DataError(f"column {key!r} is not in the embeddings' obs (columns: {list(obs.columns)})")
    tasks: list[Task] = []
    if split_key is not None:
        datasets = obs[dataset_key].astype(str).to_numpy() if dataset_key else np.full(len(obs), "")
        for ds in pd.unique(datasets):
            tasks += _split_tasks(obs, datasets == ds, ds, split_key, train_value, leave_out)
    if group_key is not None:
        groups = obs[group_key].astype(str).to_numpy()
        if len(np.unique(groups)) < 2:
            raise DataError(f"--group-key {group_key!r} has a single value; leave-one-group-out needs two or more")
        tasks.append(Task(f"leave-one-{group_key}-out", "leave-one-group-out",
                          _logo_folds(np.arange(len(obs)), groups, np.zeros(0, int))))
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


def _split_tasks(obs: pd.DataFrame, in_ds: np.ndarray, dataset: str, split_key: str, train_value: str | None,
                 leave_out: dict[str, str] | None) -> list[Task]:
    split = obs[split_key].astype(str).to_numpy()
    values = list(pd.unique(split[in_ds]))
    if train_value is None:
        found = [v for v in values if v.lower() == "train"]
        if not found:
            raise DataError(f"split column {split_key!r} has no 'train' value (values: {values}); "
                            "name it with --train-value")
        train_value = found[0]
    train = np.flatnonzero(in_ds & (split == train_value))
    if len(train) == 0:
        where = f" in dataset {dataset!r}" if dataset else ""
        raise DataError(f"no rows with {split_key} == {train_value!r}{where}")
    if len(values) < 2:
        raise DataError(f"split column {split_key!r} holds only {values}: nothing to test on")
    chammi_leave = CHAMMI_LEAVE_OUT.get(_DATASET_ALIASES.get(dataset.strip().lower(), ""), None)
    leave = dict(leave_out or {})
    if chammi_leave and chammi_leave[0] not in leave and chammi_leave[1] in obs.columns:
        leave[chammi_leave[0]] = chammi_leave[1]
    tasks = []
    for task in (v for v in values if v != train_value):
        if task in obs.columns:  # CHAMMI: a boolean column per task marks its test rows
            rows = np.flatnonzero(in_ds & _truthy(obs[task]))
        else:
            rows = np.flatnonzero(in_ds & (split == task))
        if task in leave:
            groups = obs[leave[task]].astype(str).to_numpy()
            tasks.append(Task(task, f"leave-one-{leave[task]}-out", _logo_folds(rows, groups, train), dataset))
        else:
            tasks.append(Task(task, "train/test", [(train, rows)], dataset))
    return tasks


@dataclass
class Result:
    """One row of the results table (``n_train``: the largest fold's training rows)."""

    features: str
    dataset: str
    task: str
    protocol: str
    classifier: str
    macro_f1: float
    accuracy: float
    n_train: int
    n_test: int


def evaluate_features(name: str, x: np.ndarray, labels: np.ndarray, tasks: Sequence[Task], k: int = 10,
                      seed: int = 0) -> list[Result]:
    """Score one feature matrix on every task with every classifier."""
    results = []
    for task in tasks:
        for cname, predict in classifiers(k, seed).items():
            truth, pred, n_train = [], [], 0
            for train, test in task.folds:
                if len(test) == 0:
                    continue
                truth.append(labels[test])
                pred.append(predict(x[train], labels[train], x[test]))
                n_train = max(n_train, len(train))
            if not truth:
                continue
            s = scores(np.concatenate(truth), np.concatenate(pred))
            results.append(Result(name, task.dataset, task.name, task.kind, cname, s["macro_f1"], s["accuracy"],
                                  n_train, int(sum(len(t) for t in truth))))
    return results


# ----------------------------------------------------------------------------- baselines
def _check_index_unchanged(adata) -> None:
    """Refuse baselines when the embeddings' index file has changed since they were written.

    Regenerated data, say: the baselines would then re-read other crops than ``X`` describes.
    """
    from cellvit_ssl.data.dataset import read_index
    from cellvit_ssl.embed_io import table_sha256

    embed = adata.uns.get("embed", {})
    index = str(embed.get("index", ""))
    try:
        recorded = json.loads(str(embed["fingerprint"]))["index_sha256"]
    except (KeyError, TypeError, ValueError):
        return
    if not index or not Path(index).is_file():
        return
    if table_sha256(read_index(index)) != recorded:
        raise DataError(f"{index} has changed since these embeddings were written, so the baselines would "
                        "read other crops; embed again (python -m cellvit_ssl.embed ... --overwrite) "
                        "or pass --no-baselines")


def _baseline_inputs(adata, root: str | None, seed: int, device: str | None):
    """The embed run's reader of ``obs`` and a randomly initialised encoder with its contract.

    Rows are read exactly as ``embed`` read them: the same reader, the same settings (from ``uns``).
    """
    import dataclasses

    import torch

    from cellvit_ssl.config import config_from_dict
    from cellvit_ssl.embed import READ_SETTINGS, sample_reader
    from cellvit_ssl.encoder import Encoder, resolve_device
    from cellvit_ssl.models.channels import build_model
    from cellvit_ssl.preprocess import Preprocess

    try:
        config = config_from_dict(json.loads(adata.uns["config"]))
        embed = dict(adata.uns["embed"])
        contract = json.loads(adata.uns["preprocess"]) if "preprocess" in adata.uns else None
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError("the embeddings file has no run config / embed settings in uns (not written by "
                        "python -m cellvit_ssl.embed?); pass --no-baselines") from exc
    preprocess = Preprocess.from_dict(contract) if contract else Preprocess.from_config(config)
    torch.manual_seed(seed)
    model = build_model(config.model, list(config.data.channels), load_pretrained=False)
    encoder = Encoder(model, config, resolve_device(device), preprocess=preprocess)
    settings = {k: embed[k] for k in READ_SETTINGS if k in embed}
    data = dataclasses.replace(config.data, **{k: type(getattr(config.data, k))(v) for k, v in settings.items()})
    reader = sample_reader(adata.obs.reset_index(drop=True), Path(root or embed["root"]), data, encoder,
                           allow_missing=bool(embed.get("allow_missing", False)),
                           mask_background=bool(embed.get("mask_background", False)), source="embeddings obs")
    return reader, encoder, str(embed.get("pooling", "default"))


def random_init_features(adata, root: str | None = None, seed: int = 0, batch_size: int = 64,
                         device: str | None = None, workers: int = 0) -> np.ndarray:
    """Embeddings of the same samples by the same architecture with random weights (seeded)."""
    from cellvit_ssl.embed import encoder_featurizer, featurize_rows

    reader, encoder, pooling = _baseline_inputs(adata, root, seed, device)
    featurize = encoder_featurizer(encoder, pooling, batch_size, reader.source)
    return featurize_rows(reader, list(range(len(reader))), featurize, workers)[0]


def raw_pixel_features(adata, root: str | None = None, pixel_size: int = 8, pca: int = 64,
                       seed: int = 0, workers: int = 0) -> np.ndarray:
    """Raw-pixel baseline: samples through the preprocessing contract, area-resized, flattened, PCA.

    Each sample is what the model gets before its view resize, shrunk to ``pixel_size``² per channel.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.decomposition import PCA

    from cellvit_ssl.embed import featurize_rows

    if pixel_size < 1 or pca < 1:
        raise DataError(f"--pixel-size={pixel_size} and --pca={pca} must be >= 1")
    reader, encoder, _ = _baseline_inputs(adata, root, seed, "cpu")

    def pixels(samples) -> np.ndarray:
        x = torch.stack([encoder.preprocess.to_sample(r.pixels, r.names, r.present, image_sample=r.is_image,
                                                      source=r.source) for r in samples])
        return F.interpolate(x, size=(pixel_size, pixel_size), mode="area").flatten(1).numpy()

    x = featurize_rows(reader, list(range(len(reader))), pixels, workers)[0]
    n = min(pca, x.shape[0], x.shape[1])
    return PCA(n_components=n, random_state=seed).fit_transform(x).astype(np.float32)


# ----------------------------------------------------------------------------- report
def format_table(results: Sequence[Result]) -> str:
    """A plain-text results table."""
    header = ("features", "dataset", "task", "protocol", "classifier", "macro-F1", "accuracy", "train", "test")
    rows = [(r.features, r.dataset or "-", r.task, r.protocol, r.classifier, f"{r.macro_f1:.3f}",
             f"{r.accuracy:.3f}", str(r.n_train), str(r.n_test)) for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def summarize(results: Sequence[Result], classifier: str) -> dict:
    """Macro-F1 of one classifier per task and feature set: the trained model's lift at a glance."""
    table: dict[str, dict[str, float]] = {}
    for r in results:
        if r.classifier == classifier:
            table.setdefault(f"{r.dataset}/{r.task}" if r.dataset else r.task, {})[r.features] = r.macro_f1
    lines = [f"{classifier} macro-F1, {task}: " + " | ".join(f"{name} {f1:.3f}" for name, f1 in row.items())
             for task, row in table.items()]
    return {"classifier": classifier, "macro_f1": table, "lines": lines}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m cellvit_ssl.evaluate``."""
    p = argparse.ArgumentParser(prog="python -m cellvit_ssl.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("embeddings", help="OUT.h5ad or OUT.zarr written by python -m cellvit_ssl.embed")
    p.add_argument("--label-key", required=True, help="obs column with the class labels")
    p.add_argument("--split-key", help="obs column with train / test (or CHAMMI Train / Task_*) splits")
    p.add_argument("--train-value", help="value of --split-key marking training rows (default: train / Train)")
    p.add_argument("--group-key", help="obs column for leave-one-group-out (e.g. Plate)")
    p.add_argument("--leave-out", action="append", default=[], metavar="TASK=COLUMN",
                   help="score split TASK by leave-one-COLUMN-out (CHAMMI defaults are added automatically)")
    p.add_argument("--dataset-key", help="obs column naming sub-datasets scored separately "
                                         "(default: 'dataset' when present)")
    p.add_argument("--k", type=int, default=10, help="k of the k-NN classifiers (1-NN is always scored)")
    p.add_argument("--no-baselines", action="store_true", help="skip the random-init and raw-pixel baselines")
    p.add_argument("--root", help="base folder of relative obs paths (default: the one recorded at embedding)")
    p.add_argument("--pixel-size", type=int, default=8, help="raw-pixel baseline: side per channel before PCA")
    p.add_argument("--pca", type=int, default=64, help="raw-pixel baseline: PCA dimensions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="device of the random-init baseline (default: CUDA when available)")
    p.add_argument("--workers", type=int, default=0, help="processes reading crops for the baselines")
    p.add_argument("--json", help="results JSON path (default: next to the embeddings, *.eval.json)")
    return p


def run(args: argparse.Namespace) -> dict:
    """Evaluate the trained features and the baselines; print the table, write the JSON."""
    from cellvit_ssl.embed_io import read_embeddings

    adata = read_embeddings(args.embeddings)
    obs = adata.obs.reset_index(drop=True)
    if args.label_key not in obs.columns:
        raise DataError(f"--label-key {args.label_key!r} is not in obs (columns: {list(obs.columns)})")
    labels = obs[args.label_key].astype(str).to_numpy()
    leave_out = {}
    for item in args.leave_out:
        if "=" not in item:
            raise DataError(f"--leave-out {item!r}: expected TASK=COLUMN")
        task, col = item.split("=", 1)
        leave_out[task] = col
    dataset_key = args.dataset_key or ("dataset" if "dataset" in obs.columns else None)
    tasks = build_tasks(obs, labels, args.split_key, args.train_value, args.group_key, leave_out, dataset_key,
                        seed=args.seed)
    feature_sets = {"trained": np.asarray(adata.X, dtype=np.float32)}
    if not args.no_baselines:
        _check_index_unchanged(adata)
        print("computing baselines: random-init encoder, raw pixels ...", file=sys.stderr)
        feature_sets["random-init"] = random_init_features(adata, args.root, args.seed, device=args.device,
                                                           workers=args.workers)
        feature_sets["raw-pixels"] = raw_pixel_features(adata, args.root, args.pixel_size, args.pca, args.seed,
                                                        args.workers)
    results = []
    for name, x in feature_sets.items():
        results += evaluate_features(name, x, labels, tasks, args.k, args.seed)
    print(format_table(results))
    summary = summarize(results, f"{args.k}nn_cosine" if args.k > 1 else "1nn_cosine")
    for line in summary["lines"]:
        print(line)
    model = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in dict(adata.uns.get("model", {})).items()}
    report = {"embeddings": str(Path(args.embeddings).resolve()), "label_key": args.label_key,
              "split_key": args.split_key, "group_key": args.group_key, "k": args.k, "model": model,
              "tasks": [{"dataset": t.dataset, "task": t.name, "protocol": t.kind, "folds": len(t.folds)}
                        for t in tasks],
              "summary": summary["macro_f1"], "results": [asdict(r) for r in results]}
    out = Path(args.json) if args.json else Path(args.embeddings).with_suffix(".eval.json")
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 user error)."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except CellVitSSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
