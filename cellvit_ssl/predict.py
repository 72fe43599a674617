"""``python -m cellvit_ssl.predict``: a fine-tuned classifier's predictions for an index or images, into AnnData.

Examples:
    python -m cellvit_ssl.predict runs/ft/classifier.pt --index cells.csv --out predictions.h5ad
    python -m cellvit_ssl.predict classifier.pt --images a.ome.tif --labels a_labels.tif --out cells.h5ad
    python -m cellvit_ssl.predict classifier.pt --index cells.csv --out p.zarr predict.base=/moved/teacher.pt

Rows are read exactly as ``embed`` reads them (the same reader, the classifier's preprocessing
contract) and the output is written the same way: finished chunks are kept in ``OUT.partial/``,
so an interrupted run continues when the same command is given again, and the output is
locked while it is written. LoRA adapters are merged into the backbone for the run (the same
outputs to 1e-5, without the adapters' extra work). The AnnData holds ``X`` = class probabilities (one column per
class, ``var_names`` = the classes) and ``obs`` = the index columns, the sample regions,
``predicted`` (the class; multi-label: the classes over their thresholds, joined by ``;``),
``prob_<class>`` and, multi-label, ``predicted_<class>``. ``uns["classifier"]`` records the
file, its mode, classes and thresholds and the scores fine-tuning measured.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellvit_ssl.cli import CommandLine, Flag
from cellvit_ssl.config import DataConfig
from cellvit_ssl.embed import (
    READ_SETTINGS,
    check_run_inputs,
    checkpoint_data,
    encoder_featurizer,
    provenance,
    run_command,
    write_rows,
)


@dataclass(frozen=True)
class PredictConfig:
    """Settings of one prediction run (the ``predict`` section)."""

    classifier: str | None = None  # classifier.pt written by python -m cellvit_ssl.finetune
    base: str | None = None  # the pre-trained checkpoint, if the classifier refers to one that has moved
    out: str | None = None  # OUT.h5ad (AnnData) or OUT.zarr (AnnData Zarr store)
    images: list[str] = field(default_factory=list)  # image files / OME-Zarr folders instead of data.index
    labels: list[str] = field(default_factory=list)  # a segmentation mask per image: one row per cell
    channels: list[str] = field(default_factory=list)  # channel names, in file order, of images that lack them
    mask_background: bool = False  # zero pixels outside the cell (masks: labels, or labels_path + cell_label)
    allow_missing: bool = False  # predict for images that lack some model channels (their blocks stay empty)
    chunk_rows: int = 512  # rows per saved chunk (the unit of resuming)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    overwrite: bool = False  # replace an output made from other inputs or settings
    progress: bool = True  # progress bar


@dataclass(frozen=True)
class PredictCommand:
    """``python -m cellvit_ssl.predict``: the data section (defaults from the classifier) and ``predict``."""

    data: DataConfig = field(default_factory=DataConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)


COMMAND_LINE = CommandLine(
    prog="python -m cellvit_ssl.predict",
    description="Class probabilities and labels of the rows of an index (or of images) by a fine-tuned classifier, "
                "into AnnData. The data.* defaults are the classifier's own (its preprocessing contract cannot be "
                "changed here).",
    schema=PredictCommand,
    positionals=("predict.classifier",),
    flags=(
        Flag(("--index",), "data.index"), Flag(("--root",), "data.root"), Flag(("--out",), "predict.out"),
        Flag(("--images",), "predict.images"), Flag(("--labels",), "predict.labels"),
        Flag(("--channels",), "predict.channels"), Flag(("--base",), "predict.base"),
        Flag(("--mode",), "data.mode"), Flag(("--mask-background",), "predict.mask_background", True),
        Flag(("--allow-missing",), "predict.allow_missing", True),
        Flag(("--batch-size",), "data.batch_size"), Flag(("--chunk-rows",), "predict.chunk_rows"),
        Flag(("--workers",), "data.num_workers"), Flag(("--device",), "predict.device"),
        Flag(("--overwrite",), "predict.overwrite", True), Flag(("--no-progress",), "predict.progress", False),
    ),
    examples=(
        "python -m cellvit_ssl.predict runs/ft/classifier.pt --index cells.csv --out predictions.h5ad",
        "python -m cellvit_ssl.predict classifier.pt --images a.ome.tif --labels a_labels.tif --out cells.h5ad",
    ),
)


def run(cfg: PredictCommand, payload: dict | None = None):
    """Predict every row and write the output; returns its path (None when already up to date).

    Raises:
        DataError / ConfigError / CheckpointError: On any bad input, named.
    """
    from cellvit_ssl.classifier import load_classifier

    p, data = cfg.predict, cfg.data
    check_run_inputs(data, p, "predict", p.classifier, "the classifier (classifier.pt from python -m "
                                                       "cellvit_ssl.finetune)")
    classifier = load_classifier(p.classifier, device=p.device, base=p.base, payload=payload)
    if classifier.lora is not None:  # inference only: the merged, re-fused backbone (same outputs, faster)
        classifier.merge_lora(unload=True)
    if data.sample_size != classifier.crop_size:
        print(f"note: cutting {data.sample_size}px samples for a model trained on {classifier.crop_size}px ones "
              "(data.sample_size); the model sees cells at another scale than in training", file=sys.stderr)
    read = {k: getattr(getattr(data, k), "value", getattr(data, k)) for k in READ_SETTINGS}
    settings = {**read, "mask_background": p.mask_background,
                "allow_missing": p.allow_missing, "chunk_rows": p.chunk_rows}

    def make_featurize(source: str):
        embed = encoder_featurizer(classifier, None, data.batch_size, source)
        return lambda samples: classifier.probabilities(embed(samples))

    def make_uns(sha: str) -> dict:
        uns = provenance(classifier, p.classifier, sha)
        uns["classifier"] = {"file": str(Path(p.classifier).resolve()), "sha256": sha, "mode": classifier.mode,
                             "classes": list(classifier.classes), "multi_label": classifier.multi_label,
                             "thresholds": json.dumps(None if classifier.thresholds is None else
                                                      [float(t) for t in classifier.thresholds]),
                             "base": json.dumps(classifier.base or {}), "metrics": json.dumps(classifier.metrics)}
        return uns

    def columns(probabilities: np.ndarray):
        return classifier.predictions(probabilities).table()

    return write_rows("predict", data, p, classifier, p.classifier, make_featurize, settings, make_uns,
                      columns=columns, var_names=classifier.classes)


def load(argv: list[str]) -> tuple[PredictCommand, dict | None]:
    """The command's config (data defaults from the classifier file) and the classifier file's content."""
    from cellvit_ssl.checkpoint import CLASSIFIER_FORMAT, load_checkpoint

    sources = COMMAND_LINE.parse(argv)
    first = COMMAND_LINE.load(sources)
    base, payload = [], None
    if first.predict.classifier:
        payload = load_checkpoint(first.predict.classifier, expect=(CLASSIFIER_FORMAT,))
        base = checkpoint_data(payload, sources, "classifier")
    return COMMAND_LINE.load(sources, base), payload


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    return run_command(load, run, lambda cfg: cfg.predict.out, argv)


if __name__ == "__main__":
    sys.exit(main())
