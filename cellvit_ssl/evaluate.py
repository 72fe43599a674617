"""``python -m cellvit_ssl.evaluate``: how well embeddings separate known labels.

Classifiers (scikit-learn), each named in the output: 1-NN and k-NN with cosine and L2
distance (``1nn_cosine``, ``1nn_l2``, ``10nn_cosine`` ...), ``logreg`` (logistic regression on
standardised features, a linear probe) and ``sgd`` (MorphEm's linear classifier,
``SGDClassifier(alpha=0.001, max_iter=100)`` on the raw features). Scores: macro-F1 over the
labels present in each test set (as in the CHAMMI / MorphEm evaluation), accuracy, and per
class F1 / precision / recall / support (in the JSON).

Protocols (``--protocol``; ``auto`` picks ``chammi`` when the split column holds ``Train`` and
``Task_*`` values, and says so):

- ``chammi``: the benchmark's rules (:mod:`cellvit_ssl.chammi`): each sub-dataset of the
  ``dataset`` column fits on its ``Train`` rows; a task's test rows are those whose boolean
  task column is true; HPA ``Task_three`` by leave-one-``cell_type``-out and CP ``Task_four``
  by leave-one-``Plate``-out. A missing ``dataset`` or group column is an error. The benchmark
  table (tasks in order, macro-F1) and the CHAMMI score (CHAMMI-75's and the WTC+HPA variant)
  are printed first, for the trained model and each baseline.
- ``generic`` (:mod:`cellvit_ssl.protocols`): ``--split-key`` fits on the training rows
  (``--train-value``, default ``train`` / ``Train``) and scores every other split value;
  ``--leave-out TASK=COLUMN`` scores a split by leave-one-group-out; ``--group-key``:
  leave-one-group-out over all rows; none of these: stratified 5-fold cross-validation.

The headline (``--headline`` classifier, ``--headline-metric``) is printed with its numbers and
named in the JSON ``summary``: by default 1-NN with L2 distance for CHAMMI (MorphEm's default,
i.e. the benchmark's number; cosine is printed beside it) and k-NN with cosine distance
(``--k``, default 10) otherwise, by macro-F1.

Baselines in the same run, so that a trained model's lift is visible: the same architecture
with random weights (``random-init``) and raw pixels (each crop normalised, resized to
``--pixel-size`` per channel, flattened, PCA to ``--pca`` dimensions; ``raw-pixels``). Both
re-read the crops named in ``obs`` (path and crop box) with the settings in ``uns``.

Examples:
    python -m cellvit_ssl.evaluate cells.h5ad --label-key label --split-key split
    python -m cellvit_ssl.evaluate chammi.h5ad --label-key label --protocol chammi
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cellvit_ssl import chammi
from cellvit_ssl.cli import CommandLine, Flag
from cellvit_ssl.errors import CellVitSSLError, ConfigError, DataError
from cellvit_ssl.io import atomic_write_text, check_writable
from cellvit_ssl.protocols import Task, build_tasks

__all__ = ["Task", "build_tasks", "classifiers", "describe_classifier", "evaluate_features", "main", "run"]

METRICS = {"macro_f1": "macro-F1", "accuracy": "accuracy"}
#: The CHAMMI benchmark's classifier: MorphEm's ``run_benchmark`` defaults to 1-NN, L2 distance.
CHAMMI_CLASSIFIER = "1nn_l2"


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
    """Logistic regression on standardised features (a linear probe; not MorphEm's classifier)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2:
        return np.full(len(test_x), train_y[0])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    return clf.fit(train_x, train_y).predict(test_x)


def sgd_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 0) -> np.ndarray:
    """MorphEm's linear classifier: ``SGDClassifier(alpha=0.001, max_iter=100)`` on the raw features.

    As in MorphEm's evaluation (hinge loss, no standardisation), except that it is seeded.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import SGDClassifier

    if len(np.unique(train_y)) < 2:
        return np.full(len(test_x), train_y[0])
    with warnings.catch_warnings():
        # 100 epochs is MorphEm's setting; it often stops short of convergence there too
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = SGDClassifier(alpha=0.001, max_iter=100, random_state=seed)
        return clf.fit(train_x, train_y).predict(test_x)


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Macro-F1 over the labels present in ``y_true``, and accuracy."""
    from sklearn.metrics import f1_score

    return {"macro_f1": float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0)),
            "accuracy": float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))}


def per_class_report(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, dict[str, float]]:
    """F1, precision, recall and support of every label present in ``y_true`` (macro-F1's terms)."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = np.unique(y_true)
    p, r, f, n = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {str(c): {"f1": float(fi), "precision": float(pi), "recall": float(ri), "support": int(ni)}
            for c, pi, ri, fi, ni in zip(labels, p, r, f, n)}


def classifiers(k: int, seed: int = 0) -> dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]]:
    """The classifiers every feature set is scored with, by name (see :func:`describe_classifier`)."""
    out = {}
    for metric in ("cosine", "l2"):
        out[f"1nn_{metric}"] = lambda a, b, c, m=metric: knn_predict(a, b, c, 1, m)
        if k > 1:
            out[f"{k}nn_{metric}"] = lambda a, b, c, m=metric: knn_predict(a, b, c, k, m)
    out["logreg"] = lambda a, b, c: linear_probe_predict(a, b, c, seed)
    out["sgd"] = lambda a, b, c: sgd_predict(a, b, c, seed)
    return out


def describe_classifier(name: str) -> str:
    """What a classifier name of :func:`classifiers` stands for, in words.

    Raises:
        ConfigError: On a name that is not one of them.
    """
    if name == "logreg":
        return ("logistic regression on standardised features (scikit-learn LogisticRegression), a linear probe; "
                "not MorphEm's SGD classifier")
    if name == "sgd":
        return ("MorphEm's linear classifier: scikit-learn SGDClassifier(alpha=0.001, max_iter=100, hinge loss) "
                "on the raw features, seeded")
    k, _, metric = name.partition("nn_")
    if k.isdigit() and int(k) >= 1 and metric in ("cosine", "l2"):
        distance = "cosine distance" if metric == "cosine" else "L2 distance"
        return f"1-nearest neighbour, {distance}" if k == "1" else f"{k}-nearest neighbours (majority vote), {distance}"
    raise ConfigError(f"unknown classifier {name!r}; expected 1nn_cosine, 1nn_l2, <k>nn_cosine, <k>nn_l2, "
                      "logreg or sgd")


# ----------------------------------------------------------------------------- scoring
@dataclass
class Result:
    """One row of the results table (``n_train``: the largest fold's training rows).

    ``per_class`` maps each label present in the test rows to its ``f1``, ``precision``,
    ``recall`` and ``support``.
    """

    features: str
    dataset: str
    task: str
    protocol: str
    classifier: str
    macro_f1: float
    accuracy: float
    n_train: int
    n_test: int
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)


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
            y_true, y_pred = np.concatenate(truth), np.concatenate(pred)
            s = scores(y_true, y_pred)
            results.append(Result(name, task.dataset, task.name, task.kind, cname, s["macro_f1"], s["accuracy"],
                                  n_train, len(y_true), per_class_report(y_true, y_pred)))
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
    # embed records data.root as "root" (empty when the rows' root column or the index's folder served)
    explicit = root or embed.get("root") or None
    reader = sample_reader(adata.obs.reset_index(drop=True), Path(explicit) if explicit else None, data, encoder,
                           default_root=Path(embed.get("default_root") or "."),
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


def select_protocol(requested: str, obs: pd.DataFrame, split_key: str | None = None, group_key: str | None = None,
                    train_value: str | None = None) -> tuple[str, str | None]:
    """The protocol to score by, and its split column.

    Args:
        requested: ``auto`` (``chammi`` when the split column, ``--split-key`` or else
            ``train_test_split`` without a group key, holds ``Train`` and ``Task_*``;
            ``generic`` otherwise), ``chammi`` or ``generic``.
        obs: The embeddings' rows.
        split_key: The split column named by the user, if any.
        group_key: The leave-one-group-out column named by the user, if any.
        train_value: The training split value named by the user, if any (CHAMMI's is ``Train``).

    Returns:
        ``("chammi" | "generic", split column or None)``.

    Raises:
        ConfigError: On an unknown protocol, or a group key or a training value other than
            ``Train`` with the CHAMMI protocol.
        DataError: If ``chammi`` is requested and the split column is missing or not CHAMMI's.
    """
    if requested not in ("auto", "chammi", "generic"):
        raise ConfigError(f"protocol {requested!r}; expected auto, chammi or generic")
    if requested == "generic":
        return "generic", split_key
    candidate = split_key or chammi.SPLIT_KEY
    if requested == "auto" and ((split_key is None and group_key is not None)
                                or not chammi.looks_like_chammi(obs, candidate)):
        return "generic", split_key
    if requested == "chammi" and not chammi.looks_like_chammi(obs, candidate):
        held = list(obs[candidate].astype(str).unique()[:10]) if candidate in obs.columns else None
        raise DataError(f"--protocol chammi: split column {candidate!r} "
                        + (f"holds {held}, not Train and Task_*" if held is not None else
                           f"is not in the embeddings' obs (columns: {list(obs.columns)})")
                        + "; name the CHAMMI split column with --split-key")
    if group_key is not None:
        raise ConfigError(f"--group-key {group_key!r} does not apply to the CHAMMI protocol (split column "
                          f"{candidate!r} holds Train and Task_*; its leave-out tasks are fixed); drop it, or score "
                          "without the CHAMMI rules with --protocol generic")
    if train_value not in (None, chammi.TRAIN):
        raise ConfigError(f"--train-value {train_value!r}: the CHAMMI protocol fits on {chammi.TRAIN!r} rows; drop "
                          "it, or score without the CHAMMI rules with --protocol generic")
    return "chammi", candidate


def default_headline(protocol: str, k: int) -> str:
    """The headline classifier when none is named: the benchmark's for CHAMMI, else k-NN cosine."""
    if protocol == "chammi":
        return CHAMMI_CLASSIFIER
    return f"{k}nn_cosine" if k > 1 else "1nn_cosine"


def check_headline(protocol: str, classifier: str, metric: str, k: int) -> None:
    """Refuse a headline that is not scored in this run, or a CHAMMI headline not in macro-F1.

    Raises:
        ConfigError: Naming the classifiers / metrics there are.
    """
    names = list(classifiers(k))
    if classifier not in names:
        raise ConfigError(f"--headline {classifier!r} is not scored in this run; choose one of {names} "
                          "(k-NN names follow --k)")
    if metric not in METRICS:
        raise ConfigError(f"--headline-metric {metric!r}; expected one of {list(METRICS)}")
    if protocol == "chammi" and metric != "macro_f1":
        raise ConfigError(f"--headline-metric {metric!r}: the CHAMMI table and score are macro-F1, the benchmark's "
                          "metric; accuracy is in the full table and the JSON")


def summarize(results: Sequence[Result], classifier: str, metric: str = "macro_f1") -> dict:
    """One classifier's metric per task and feature set: the trained model's lift at a glance.

    Returns:
        ``classifier``, ``description``, ``metric``, ``scores`` (``{task: {features: value}}``,
        tasks as ``dataset/task`` where there are sub-datasets) and the printed ``lines``.
    """
    table: dict[str, dict[str, float]] = {}
    for r in results:
        if r.classifier == classifier:
            table.setdefault(f"{r.dataset}/{r.task}" if r.dataset else r.task, {})[r.features] = getattr(r, metric)
    what = f"{METRICS[metric]}, {classifier} ({describe_classifier(classifier)})"
    lines = [f"headline {what}, {task}: " + " | ".join(f"{name} {v:.3f}" for name, v in row.items())
             for task, row in table.items()]
    return {"classifier": classifier, "description": describe_classifier(classifier), "metric": metric,
            "scores": table, "lines": lines}


def chammi_rows(results: Sequence[Result], shown: Sequence[str]) -> list[chammi.BenchmarkRow]:
    """Benchmark-table rows (macro-F1 by ``WTC T1`` ... label), per feature set, for the ``shown`` classifiers."""
    table: dict[tuple[str, str], dict[str, float]] = {}
    for r in results:
        label = chammi.task_label(r.dataset, r.task)
        if r.classifier in shown and label is not None:
            table.setdefault((r.features, r.classifier), {})[label] = r.macro_f1
    features = list(dict.fromkeys(r.features for r in results))
    return [chammi.BenchmarkRow(f, c, table[(f, c)]) for f in features for c in shown if (f, c) in table]


def chammi_summary(results: Sequence[Result], headline: str) -> tuple[str, dict]:
    """The CHAMMI benchmark table and headline lines, and their JSON.

    The table shows the headline classifier, the benchmark's (1-NN, L2, marked ``*``), 1-NN
    cosine and MorphEm's SGD classifier, for every feature set.
    """
    shown = list(dict.fromkeys([headline, CHAMMI_CLASSIFIER, "1nn_cosine", "sgd"]))
    rows = chammi_rows(results, shown)
    footnote = (f"the benchmark's classifier: {describe_classifier(CHAMMI_CLASSIFIER)} (MorphEm's run_benchmark "
                "default knn_metric='l2'; its authors' training code used cosine, the 1nn_cosine rows)")
    text = [chammi.format_benchmark_table(rows, CHAMMI_CLASSIFIER, footnote)]
    head = [r for r in rows if r.classifier == headline]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    what = f"{headline} ({describe_classifier(headline)}), macro-F1"
    text.append(f"headline CHAMMI score (CHAMMI-75), {what}: "
                + " | ".join(f"{r.features} {pct(r.score.chammi)}" for r in head))
    text.append(f"headline CHAMMI score (WTC+HPA only), {what}: "
                + " | ".join(f"{r.features} {pct(r.score.wtc_hpa)}" for r in head))
    data = {"definition": chammi.SCORE_DEFINITION, "wtc_hpa_definition": chammi.WTC_HPA_DEFINITION,
            "metric": "macro_f1", "benchmark_classifier": CHAMMI_CLASSIFIER,
            "tasks": [t.label for t in chammi.TASKS],
            "rows": [{"features": r.features, "classifier": r.classifier,
                      "benchmark_choice": r.classifier == CHAMMI_CLASSIFIER, "macro_f1": dict(r.macro_f1),
                      "chammi_score": r.score.chammi, "chammi_score_wtc_hpa": r.score.wtc_hpa,
                      "subsets": r.score.subsets, "missing": list(r.score.missing)} for r in rows],
            "score": {r.features: r.score.chammi for r in head},
            "score_wtc_hpa": {r.features: r.score.wtc_hpa for r in head}}
    return "\n".join(text), data


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of one evaluation (the ``evaluate`` section)."""

    embeddings: str | None = None  # OUT.h5ad or OUT.zarr written by python -m cellvit_ssl.embed
    label_key: str | None = None  # obs column with the class labels
    protocol: str = "auto"  # auto | chammi (the benchmark's rules and score) | generic (splits / groups / CV)
    headline: str | None = None  # classifier of the headline numbers (default: 1nn_l2 for CHAMMI, <k>nn_cosine)
    headline_metric: str = "macro_f1"  # macro_f1 | accuracy (CHAMMI: macro_f1 only)
    split_key: str | None = None  # obs column with train / test (or CHAMMI Train / Task_*) splits
    train_value: str | None = None  # value of split_key marking training rows (default: train / Train)
    group_key: str | None = None  # obs column for leave-one-group-out over all rows (e.g. Plate)
    leave_out: dict[str, str] = field(default_factory=dict)  # TASK: COLUMN scored leave-one-COLUMN-out
    dataset_key: str | None = None  # obs column naming sub-datasets scored apart (default: dataset if present)
    k: int = 10  # k of the k-NN classifiers (1-NN is always scored)
    baselines: bool = True  # also score random-init weights and raw pixels on the same samples
    channel_blocks: bool = True  # also score each channel's block of a concatenated embedding (trained[protein])
    pixel_size: int = 8  # raw-pixel baseline: side per channel before PCA
    pca: int = 64  # raw-pixel baseline: PCA dimensions
    seed: int = 0  # seed of the random-init baseline, CV folds and classifiers
    device: str = "auto"  # device of the random-init baseline: auto | cpu | cuda | cuda:N
    json: str | None = None  # results JSON path (default: next to the embeddings, *.eval.json)


@dataclass(frozen=True)
class EvalData:
    """How evaluate's baselines read the samples again (training key names)."""

    root: str | None = None  # base folder of relative obs paths (default: the one recorded by embed)
    num_workers: int = 0  # processes reading samples for the baselines
    batch_size: int = 64  # images per forward pass of the random-init baseline


@dataclass(frozen=True)
class EvaluateCommand:
    """``python -m cellvit_ssl.evaluate``."""

    data: EvalData = field(default_factory=EvalData)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


COMMAND_LINE = CommandLine(
    prog="python -m cellvit_ssl.evaluate",
    description="Score how well embeddings separate known labels, beside random-init and raw-pixel baselines.",
    schema=EvaluateCommand,
    positionals=("evaluate.embeddings",),
    flags=(
        Flag(("--label-key",), "evaluate.label_key"), Flag(("--protocol",), "evaluate.protocol"),
        Flag(("--headline",), "evaluate.headline"), Flag(("--headline-metric",), "evaluate.headline_metric"),
        Flag(("--split-key",), "evaluate.split_key"), Flag(("--train-value",), "evaluate.train_value"),
        Flag(("--group-key",), "evaluate.group_key"), Flag(("--leave-out",), "evaluate.leave_out"),
        Flag(("--dataset-key",), "evaluate.dataset_key"), Flag(("--k",), "evaluate.k"),
        Flag(("--no-baselines",), "evaluate.baselines", False), Flag(("--root",), "data.root"),
        Flag(("--no-channel-blocks",), "evaluate.channel_blocks", False),
        Flag(("--pixel-size",), "evaluate.pixel_size"), Flag(("--pca",), "evaluate.pca"),
        Flag(("--seed",), "evaluate.seed"), Flag(("--device",), "evaluate.device"),
        Flag(("--workers",), "data.num_workers"), Flag(("--json",), "evaluate.json"),
    ),
    examples=(
        "python -m cellvit_ssl.evaluate cells.h5ad --label-key label --split-key split",
        "python -m cellvit_ssl.evaluate cells.h5ad evaluate.label_key=label evaluate.group_key=Plate",
        "python -m cellvit_ssl.evaluate chammi.h5ad --label-key label --protocol chammi",
    ),
)


def channel_blocks(adata) -> dict[str, np.ndarray]:
    """Each channel's block of a concatenated embedding, as ``trained[<channel>]`` feature sets.

    Embeddings hold one block per model channel when ``embed`` concatenated them (the bag-of-channels
    default, or ``embed.pooling=concat``); otherwise there is nothing to split and this is empty.
    """
    model = dict(adata.uns.get("model", {}))
    channels = [str(c) for c in model.get("channels", [])]
    width = int(model.get("channel_dim", 0) or 0)
    pooling = str(dict(adata.uns.get("embed", {})).get("pooling", "default"))
    concatenated = pooling == "concat" or (pooling == "default" and model.get("variant") == "boc")
    x = np.asarray(adata.X, dtype=np.float32)
    if not (concatenated and channels and width and x.shape[1] == len(channels) * width):
        return {}
    return {f"trained[{c}]": x[:, k * width : (k + 1) * width] for k, c in enumerate(channels)}


def _check(cfg: EvaluateCommand) -> None:
    e = cfg.evaluate
    if not e.embeddings:
        raise ConfigError("give the embeddings file to evaluate (written by python -m cellvit_ssl.embed)")
    if not e.label_key:
        raise ConfigError("give the obs column holding the labels: evaluate.label_key=... (--label-key)")
    if e.protocol not in ("auto", "chammi", "generic"):
        raise ConfigError(f"evaluate.protocol={e.protocol!r}; expected auto, chammi or generic")
    if e.headline_metric not in METRICS:
        raise ConfigError(f"evaluate.headline_metric={e.headline_metric!r}; expected one of {list(METRICS)}")
    for key in ("k", "pixel_size", "pca"):
        if getattr(e, key) < 1:
            raise ConfigError(f"evaluate.{key}={getattr(e, key)}; expected >= 1")
    from cellvit_ssl.config import check_device

    check_device(e.device, "evaluate.device (--device)")
    if cfg.data.num_workers < 0 or cfg.data.batch_size < 1:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be >= 0 and data.batch_size="
                          f"{cfg.data.batch_size} >= 1")


def _k_note(k: int, tasks: Sequence[Task]) -> str | None:
    """A note when ``k`` exceeds the largest training fold: its k-NN rows then vote over every training row."""
    most = max((len(train) for task in tasks for train, _ in task.folds), default=k)
    if k > 1 and most < k:
        return (f"evaluate.k={k} (--k) is more than the {most} training rows of the largest fold: the {k}nn_* rows "
                f"are majority votes over all training rows (at most {most} neighbours)")
    return None


def run(cfg: EvaluateCommand) -> dict:
    """Evaluate the trained features and the baselines; print the tables, write the JSON."""
    from cellvit_ssl.embed_io import read_embeddings

    _check(cfg)
    args, data = cfg.evaluate, cfg.data
    out = Path(args.json) if args.json else Path(args.embeddings).with_suffix(".eval.json")
    check_writable(out, what="evaluate.json (--json)")  # before any scoring, not after it
    if args.baselines:
        from cellvit_ssl.encoder import resolve_device

        resolve_device(args.device, "evaluate.device (--device)")
    adata = read_embeddings(args.embeddings)
    trained = np.asarray(adata.X, dtype=np.float32)
    bad_rows = np.flatnonzero(~np.isfinite(trained).all(axis=1)) if trained.size else np.zeros(0, int)
    if len(bad_rows):
        raise DataError(f"{args.embeddings}: {len(bad_rows)} of {len(trained)} embeddings hold NaN / Inf (rows "
                        f"{bad_rows[:10].tolist()}); embed again (python -m cellvit_ssl.embed ... --overwrite)")
    obs = adata.obs.reset_index(drop=True)
    if args.label_key not in obs.columns:
        raise DataError(f"--label-key {args.label_key!r} is not in obs (columns: {list(obs.columns)})")
    labels = obs[args.label_key].astype(str).to_numpy()
    leave_out = dict(args.leave_out)
    protocol, split_key = select_protocol(args.protocol, obs, args.split_key, args.group_key, args.train_value)
    if protocol == "chammi":
        dataset_key = args.dataset_key or chammi.DATASET_KEY
        tasks = chammi.build_chammi_tasks(obs, split_key, dataset_key, leave_out)
        detected = chammi.describe_layout(obs, tasks, split_key, dataset_key)
        print(detected + ("" if args.protocol == "chammi" else " (--protocol generic scores the split without "
                                                                 "the CHAMMI rules)"), file=sys.stderr)
    else:
        dataset_key = args.dataset_key or ("dataset" if "dataset" in obs.columns else None)
        tasks = build_tasks(obs, labels, split_key, args.train_value, args.group_key, leave_out, dataset_key,
                            seed=args.seed)
        detected = None
    k, k_note = args.k, _k_note(args.k, tasks)
    if k_note:
        print(f"note: {k_note}", file=sys.stderr)
    headline = args.headline or default_headline(protocol, k)
    check_headline(protocol, headline, args.headline_metric, k)
    feature_sets = {"trained": trained}
    if args.channel_blocks:
        feature_sets.update(channel_blocks(adata))
    if args.baselines:
        _check_index_unchanged(adata)
        print("computing baselines: random-init encoder, raw pixels ...", file=sys.stderr)
        feature_sets["random-init"] = random_init_features(adata, data.root, args.seed, data.batch_size,
                                                           device=args.device,
                                                           workers=data.num_workers)
        feature_sets["raw-pixels"] = raw_pixel_features(adata, data.root, args.pixel_size, args.pca, args.seed,
                                                        data.num_workers)
    results = []
    for name, x in feature_sets.items():
        results += evaluate_features(name, x, labels, tasks, k, args.seed)
    summary = summarize(results, headline, args.headline_metric)
    if protocol == "chammi":
        text, summary["chammi"] = chammi_summary(results, headline)
        print(text + "\n")
    else:
        print("\n".join(summary["lines"]) + "\n")
    print("all scores (macro-F1 and accuracy as fractions):")
    print(format_table(results))
    names = list(classifiers(k))
    print("classifiers:\n" + "\n".join(f"  {c}: {describe_classifier(c)}" for c in names))
    model = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in dict(adata.uns.get("model", {})).items()}
    report = {"embeddings": str(Path(args.embeddings).resolve()), "label_key": args.label_key,
              "protocol": protocol, "detected": detected, "split_key": split_key, "group_key": args.group_key,
              "dataset_key": dataset_key, "k": k, "k_note": k_note, "model": model,
              "classifiers": {c: describe_classifier(c) for c in names},
              "tasks": [{"dataset": t.dataset, "task": t.name, "protocol": t.kind, "folds": len(t.folds)}
                        for t in tasks],
              "summary": {k: v for k, v in summary.items() if k != "lines"},
              "results": [asdict(r) for r in results]}
    atomic_write_text(out, json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 user error)."""
    try:
        run(COMMAND_LINE.load(COMMAND_LINE.parse(sys.argv[1:] if argv is None else argv)))
    except CellVitSSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
