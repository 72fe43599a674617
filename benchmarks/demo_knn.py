"""Phenotype probe of a demo run: trained encoder vs random init vs raw pixels, on unseen cells.

    python -m benchmarks.demo_knn runs/demo/teacher.pt [--eval-images 48] [--eval-seed 1] [--json out.json]

Generates a second demo set from the same generator with another seed (cells the run never
saw; 48 fields are about 400 cells), embeds its cells with ``python -m cellvit_ssl.embed`` and
scores them with ``python -m cellvit_ssl.evaluate --group-key image_id``: leave one field out,
so that every cell is scored once by classifiers fitted on the other fields. The same command
computes the random-init and raw-pixel baselines. Prints the table and writes a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from cellvit_ssl import embed as embed_cli
from cellvit_ssl import evaluate as ev
from cellvit_ssl.checkpoint import load_checkpoint
from cellvit_ssl.data.synthetic import DemoSpec, generate_demo
from cellvit_ssl.errors import CellVitSSLError
from cellvit_ssl.io import atomic_write_text


def probe(checkpoint: str | Path, workdir: str | Path, n_images: int = 48, seed: int = 1, k: int = 10) -> dict:
    """Embed and score a held-out demo set; returns ``evaluate``'s report plus the set's size.

    ``report["summary"]["scores"]["leave-one-image_id-out"]`` holds the k-NN (cosine) macro-F1 of
    ``trained``, ``random-init`` and ``raw-pixels``.

    Args:
        checkpoint: ``teacher.pt`` or ``checkpoint.pt`` of a run trained on the demo data.
        workdir: Where the held-out data, the embeddings and the report go.
        n_images: Fields in the held-out set.
        seed: Generator seed of the held-out set (the demo trains on seed 0).
        k: Neighbours of the k-NN classifiers.
    """
    config = load_checkpoint(checkpoint)["config"]["data"]["demo"]
    spec = DemoSpec(n_images=n_images, image_size=config["image_size"], cells_per_image=config["cells_per_image"],
                    seed=seed)
    workdir = Path(workdir)
    print(f"probe: generating {n_images} held-out demo fields (seed {seed}) ...", file=sys.stderr, flush=True)
    index = generate_demo(workdir / f"demo_seed{seed}", spec)
    out = workdir / "heldout.h5ad"
    print(f"probe: embedding their cells with {checkpoint} ...", file=sys.stderr, flush=True)
    if embed_cli.main([str(checkpoint), "--index", str(index), "--out", str(out), "--overwrite",
                       "--no-progress"]) != 0:
        raise CellVitSSLError(f"embedding {index} with {checkpoint} failed (see above)")
    line = ev.COMMAND_LINE
    print("probe: scoring leave-one-field-out (trained, random-init and raw-pixel features) ...", file=sys.stderr,
          flush=True)
    report = ev.run(line.load(line.parse([str(out), "--label-key", "label", "--group-key", "image_id",
                                          "--k", str(k), "--device", "cpu"])))
    report["heldout"] = {"n_images": n_images, "seed": seed}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="teacher.pt or checkpoint.pt of a demo run")
    parser.add_argument("--eval-images", type=int, default=48, help="fields in the held-out demo set")
    parser.add_argument("--eval-seed", type=int, default=1, help="generator seed of the held-out set")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--workdir", help="keep the held-out data and embeddings here (default: a temp folder)")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = probe(args.checkpoint, args.workdir or tmp, args.eval_images, args.eval_seed, args.k)
    if not args.workdir:
        print("probe: the held-out data, embeddings and report above were in a temporary folder, now deleted "
              "(--workdir DIR keeps them)", file=sys.stderr)
    summary = {"checkpoint": str(args.checkpoint), "heldout": report["heldout"], "k": args.k,
               "classifier": report["summary"]["classifier"], "macro_f1": report["summary"]["scores"]}
    if args.json:
        atomic_write_text(args.json, json.dumps(summary, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
