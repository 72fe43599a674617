"""Patch-similarity drift of a quality-suite run: its final teacher against one of its earlier checkpoints.

    python -m benchmarks.quality --generators hpa --variants boc --workdir W \\
        --set train.epochs=24 train.keep_last=30 [ssl.gram.enabled=true ssl.gram.start_step=160 ...]
    python -m benchmarks.gram_drift W/runs/hpa/boc --step 160

The drift is the Gram term (:func:`cellvit_ssl.ssl.gram_loss`) between the patch features of
``RUN/teacher.pt`` and of ``RUN/checkpoint_<step>.pt`` on the run's held-out cells
(``RUN/heldout.h5ad``, read again exactly as ``embed`` read them). It is what
:mod:`benchmarks.gram_anchoring` measures on the demo, here for any generator of the suite.
``--knn`` also scores the earlier checkpoint's CLS embedding of those cells as the suite
scores its teachers (1-NN / 10-NN cosine and linear macro-F1, 5-fold cv), for the row the
final teachers are compared with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks._common import write_json
from benchmarks.gram_anchoring import patch_features
from benchmarks.quality import HeldoutCells, _protocols, score_features
from cellvit_ssl.encoder import load_encoder
from cellvit_ssl.errors import CellVitSSLError, DataError
from cellvit_ssl.ssl import gram_loss


def _checkpoint(run: Path, step: int) -> Path:
    path = run / f"checkpoint_{step:08d}.pt"
    if not path.is_file():
        raise DataError(f"{path}: not found (a quality-suite run folder with train.keep_last large enough "
                        f"to keep step {step})")
    return path


def checkpoint_scores(run: Path, step: int, label_key: str = "label", k: int = 10,
                      heldout: HeldoutCells | None = None) -> dict[str, float]:
    """The step-``step`` checkpoint's held-out scores, as :mod:`benchmarks.quality` scores a teacher (``cv``)."""
    heldout = heldout or HeldoutCells.read(run / "heldout.h5ad")
    x = heldout.embed(load_encoder(_checkpoint(run, step), device="cpu"))
    labels = heldout.obs[label_key].astype(str).to_numpy()
    cv = _protocols(heldout.obs, labels, None, 0)["cv"]
    return score_features({"early": x}, labels, {"cv": cv}, k, 0)["cv"]["early"]


def drift(run: Path, step: int, heldout: HeldoutCells | None = None) -> float:
    """Gram term between the patch features of ``run``'s teacher and of its step-``step`` checkpoint.

    Raises:
        DataError: If the run has no such checkpoint, no ``teacher.pt`` or no ``heldout.h5ad``.
    """
    early, final = _checkpoint(run, step), run / "teacher.pt"
    if not final.is_file():
        raise DataError(f"{final}: not found (not a finished quality-suite run?)")
    samples, channels = (heldout or HeldoutCells.read(run / "heldout.h5ad")).samples()
    return float(gram_loss(patch_features(final, samples, channels), patch_features(early, samples, channels)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gram_drift", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="quality-suite run folders (RUN/teacher.pt, ...)")
    parser.add_argument("--step", type=int, required=True, help="step of the earlier checkpoint")
    parser.add_argument("--knn", action="store_true", help="also score the step-STEP checkpoint's embedding")
    parser.add_argument("--label-key", default="label", help="label column of the held-out rows (with --knn)")
    parser.add_argument("--json", help="write {run: {drift[, early]}} here")
    args = parser.parse_args(argv)
    try:
        result = {}
        for run in args.runs:
            heldout = HeldoutCells.read(run / "heldout.h5ad")
            result[str(run)] = {"drift": drift(run, args.step, heldout)}
            if args.knn:
                result[str(run)]["early"] = checkpoint_scores(run, args.step, args.label_key, heldout=heldout)
    except CellVitSSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for run, value in result.items():
        early = value.get("early")
        print(f"{run}: drift from step {args.step} {value['drift']:.4f}"
              + (f"; step-{args.step} checkpoint 10-NN {early['knn']:.3f}, linear {early['linear']:.3f}"
                 if early else ""))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
