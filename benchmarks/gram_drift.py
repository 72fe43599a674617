"""Patch-similarity drift of a quality-suite run: its final teacher against one of its earlier checkpoints.

    python -m benchmarks.quality --generators hpa --variants boc --workdir W \\
        --set train.epochs=24 train.keep_last=30 [ssl.gram.enabled=true ssl.gram.start_step=160 ...]
    python -m benchmarks.gram_drift W/runs/hpa/boc --step 160

The drift is the Gram term (:func:`cellvit_ssl.ssl.gram_loss`) between the patch features of
``RUN/teacher.pt`` and of ``RUN/checkpoint_<step>.pt`` on the run's held-out cells
(``RUN/heldout.h5ad``, read again exactly as ``embed`` read them). It is what
:mod:`benchmarks.gram_anchoring` measures on the demo, here for any generator of the suite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks._common import write_json
from benchmarks.gram_anchoring import patch_features
from cellvit_ssl.embed_io import read_embeddings
from cellvit_ssl.errors import CellVitSSLError, DataError
from cellvit_ssl.evaluate import _baseline_inputs
from cellvit_ssl.ssl import gram_loss


def heldout_samples(run: Path) -> tuple[torch.Tensor, list[str]]:
    """The run's held-out cells as model samples ``(B, C, s, s)``, with their channel names."""
    adata = read_embeddings(run / "heldout.h5ad")
    reader, encoder, _ = _baseline_inputs(adata, None, 0, "cpu")
    rows = [reader.read(i) for i in range(len(reader))]
    samples = [encoder.preprocess.to_sample(r.pixels, r.names, r.present, image_sample=r.is_image,
                                            source=r.source) for r in rows]
    return torch.stack(samples), list(rows[0].names)


def drift(run: Path, step: int) -> float:
    """Gram term between the patch features of ``run``'s teacher and of its step-``step`` checkpoint.

    Raises:
        DataError: If the run has no such checkpoint, no ``teacher.pt`` or no ``heldout.h5ad``.
    """
    early, final = run / f"checkpoint_{step:08d}.pt", run / "teacher.pt"
    for path in (early, final, run / "heldout.h5ad"):
        if not path.is_file():
            raise DataError(f"{path}: not found (a quality-suite run folder with train.keep_last large enough "
                            f"to keep step {step})")
    samples, channels = heldout_samples(run)
    return float(gram_loss(patch_features(final, samples, channels), patch_features(early, samples, channels)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gram_drift", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="quality-suite run folders (RUN/teacher.pt, ...)")
    parser.add_argument("--step", type=int, required=True, help="step of the earlier checkpoint")
    parser.add_argument("--json", help="write {run: drift} here")
    args = parser.parse_args(argv)
    try:
        result = {str(run): drift(run, args.step) for run in args.runs}
    except CellVitSSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for run, value in result.items():
        print(f"{run}: drift from step {args.step} {value:.4f}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
