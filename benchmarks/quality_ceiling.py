"""How far issue 13's gates are from what a backbone reaches *with* labels: the suite's scores of any checkpoint.

    python -m benchmarks.quality --generators wtc --variants boc --workdir W
    python -m cellvit_ssl.finetune W/runs/wtc/boc/teacher.pt --index LABELLED.csv --mode full --out FT
    python -m benchmarks.quality_ceiling W/runs/wtc/boc/heldout.h5ad FT/classifier.pt [--json out.json]

The quality suite (:mod:`benchmarks.quality`) scores a label-free teacher's embedding of a
generator's held-out cells. This script scores any other checkpoint's embedding of the *same*
cells in exactly the same way (the rows read again as ``embed`` read them, stratified 5-fold
cross-validation, 1-NN / 10-NN cosine and logistic-regression macro-F1), next to the suite's
two baselines (random-init and raw pixels, recomputed from the same file) and the gates.
Given a fully fine-tuned classifier (``classifier.pt``, its backbone's image embedding, not its
head), the row is a supervised reference: the same architecture and input, every weight
trained with the labels. A gate above that row asks a frozen label-free embedding to beat
full supervision of its own backbone. A ``teacher.pt`` scores as the suite scored it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import format_table, versions, write_json  # noqa: E402
from benchmarks.quality import HeldoutCells, _protocols, gates, score_features  # noqa: E402
from cellvit_ssl import evaluate as ev  # noqa: E402
from cellvit_ssl.checkpoint import CLASSIFIER_FORMAT, ENCODER_FORMAT, TRAINING_FORMAT, load_checkpoint  # noqa: E402
from cellvit_ssl.errors import CellVitSSLError  # noqa: E402


def load_any(path: str | Path):
    """An :class:`~cellvit_ssl.encoder.Encoder` of a ``teacher.pt`` / ``checkpoint.pt`` or a ``classifier.pt``."""
    from cellvit_ssl.classifier import load_classifier
    from cellvit_ssl.encoder import load_encoder

    payload = load_checkpoint(path, expect=(CLASSIFIER_FORMAT, ENCODER_FORMAT, TRAINING_FORMAT))
    if payload.get("format") == CLASSIFIER_FORMAT:
        return load_classifier(path, device="cpu", payload=payload)
    return load_encoder(path, device="cpu", payload=payload)


def run(heldout: Path, checkpoints: list[Path], label_key: str, batch_key: str | None, k: int, seed: int) -> dict:
    """Score every checkpoint and the two baselines on ``heldout``; returns the JSON payload."""
    cells = HeldoutCells.read(heldout)
    obs = cells.obs
    if label_key not in obs.columns:
        raise CellVitSSLError(f"{heldout}: no {label_key!r} column in obs; columns: {list(obs.columns)}")
    labels = obs[label_key].astype(str).to_numpy()
    features = {"random-init": ev.random_init_features(cells.adata, seed=seed, device="cpu"),
                "raw-pixels": ev.raw_pixel_features(cells.adata, seed=seed)}
    for path in checkpoints:
        features[str(path)] = cells.embed(load_any(path))
    scores = score_features(features, labels, _protocols(obs, labels, batch_key, seed), k, seed)
    cv = scores["cv"]
    rows = {str(p): {"scores": {proto: s[str(p)] for proto, s in scores.items()},
                     "gates": gates({"trained": cv[str(p)], "random-init": cv["random-init"],
                                     "raw-pixels": cv["raw-pixels"]})} for p in checkpoints}
    return {"benchmark": "quality_ceiling", "heldout": str(heldout), "n": len(labels), "label_key": label_key,
            "k": k, "seed": seed, "baselines": {name: {proto: s[name] for proto, s in scores.items()}
                                                for name in ("random-init", "raw-pixels")},
            "checkpoints": rows,
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
            "versions": versions()}


def table(payload: dict) -> str:
    """One row per feature set: cv 1-NN / 10-NN / linear macro-F1 and, for checkpoints, the gates they meet."""
    rows = []
    for name, s in payload["baselines"].items():
        rows.append({"features": name, **s["cv"], "gates": "-"})
    for name, r in payload["checkpoints"].items():
        met = [g for g, v in r["gates"].items() if v["pass"]]
        rows.append({"features": name, **r["scores"]["cv"], "gates": ", ".join(met) or "none"})
    cols = [("features", "features", ""), ("1nn", "1-NN", ".3f"), ("knn", f"{payload['k']}-NN", ".3f"),
            ("linear", "linear", ".3f"), ("gates", "gates met", "")]
    return format_table(rows, cols)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality_ceiling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("heldout", help="a quality-suite run's heldout.h5ad (WORKDIR/runs/GENERATOR/VARIANT)")
    p.add_argument("checkpoints", nargs="+", help="classifier.pt / teacher.pt / checkpoint.pt files to score")
    p.add_argument("--label-key", default="label")
    p.add_argument("--batch-key", default="batch", help="also score leave-one-batch-out when obs has it")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    try:
        payload = run(Path(args.heldout), [Path(c) for c in args.checkpoints], args.label_key, args.batch_key,
                      args.k, args.seed)
    except CellVitSSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    payload["command"] = "python -m benchmarks.quality_ceiling " + " ".join(sys.argv[1:] if argv is None else argv)
    print(table(payload))
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
