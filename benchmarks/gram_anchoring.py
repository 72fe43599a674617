"""Gram anchoring on a long tiny run: patch-similarity drift from the early teacher, and CLS k-NN.

    python -m benchmarks.gram_anchoring [--start 40] [--refresh 0] [--weight 1] [--epochs 25]
        [--workdir /tmp/gram] [--json benchmarks/results/gram_anchoring.json]

Two runs of ``configs/demo.yaml`` (``--epochs`` of 4 steps; the demo's 25: 100 steps), the same
up to step ``--start``: the plain demo run (``WORKDIR/base``; ``base_e<epochs>`` for other
lengths) and one that adds ``ssl.gram`` from there (Gram teacher = the EMA
teacher at ``--start``, refreshed every ``--refresh`` steps, 0 = never). For each run the script measures, on the
cells of 48 unseen demo fields (each channel one sample, as the bag-of-channels model trains):

- **drift**: the mean squared difference between the Gram matrices of L2-normalised patch
  features of the run's final teacher and of the early teacher (the step-``--start``
  checkpoint, which both runs share), i.e. the Gram term itself, between the two models;
- **k-NN**: the demo probe's macro-F1 of the CLS embeddings.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks._common import format_table, write_json
from benchmarks._demo_runs import demo_data, knn_scores, machine, smoke, train_demo
from cellvit_ssl import load_encoder
from cellvit_ssl.checkpoint import load_checkpoint
from cellvit_ssl.config import config_from_dict
from cellvit_ssl.data.dataset import IndexDataset
from cellvit_ssl.data.synthetic import DemoSpec, generate_demo
from cellvit_ssl.ssl import gram_loss


def patch_features(checkpoint: Path, samples: torch.Tensor, channels: list[str]) -> torch.Tensor:
    """Teacher patch tokens ``(S, N, D)`` of normalised samples ``(B, C, s, s)`` (one sample per channel for boc)."""
    enc = load_encoder(checkpoint, device="cpu")
    ids = torch.tensor([enc.vocabulary.ids(channels)] * samples.shape[0])
    with torch.inference_mode():
        return enc.model.forward_features(enc.preprocess.model_input(samples), ids)["x_norm_patchtokens"]


def heldout_samples(checkpoint: Path, workdir: Path) -> tuple[torch.Tensor, list[str]]:
    """The normalised cell samples of 48 unseen demo fields (seed 1), with their channel names."""
    cfg = config_from_dict(load_checkpoint(checkpoint)["config"])
    demo = cfg.data.demo
    index = generate_demo(workdir / "demo_seed1", DemoSpec(n_images=48, image_size=demo.image_size,
                                                           cells_per_image=demo.cells_per_image, seed=1))
    data = IndexDataset(index, list(cfg.data.channels), sample_size=cfg.data.sample_size, mode=cfg.data.mode)
    return torch.stack([data.load(i) for i in range(len(data))]), list(data.channels)


def run(work: Path, start: int = 40, refresh: int = 0, weight: float = 1.0, epochs: int = 25) -> dict:
    """Train (or reuse) the plain demo run and the Gram-anchored one in ``work``; measure both.

    Returns:
        ``rows`` (off, on, the early teacher: drift from the early teacher and k-NN scores), the
        Gram settings, the number of held-out samples and how far apart the two runs' early
        teachers are (0 when the runs are the same until ``start``).
    """
    gram = ["ssl.gram.enabled=true", f"ssl.gram.start_step={start}", f"ssl.gram.refresh_every={refresh}",
            f"ssl.gram.weight={weight}"]
    length = [] if epochs == 25 else [f"train.epochs={epochs}"]  # 25: the demo's own (4 steps each)
    rows, early, same_until_start = [], None, None
    cache = demo_data(work)
    base = work / ("base" if epochs == 25 else f"base_e{epochs}")
    on_run = work / (f"gram_on_s{start}_r{refresh}_w{weight:g}" + ("" if epochs == 25 else f"_e{epochs}"))
    runs = {"on": train_demo(on_run, cache, [*length, *gram])}  # base second: another benchmark may train it
    runs["off"] = train_demo(base, cache, length)
    for name, run_dir in (("off", base), ("on", on_run)):
        trained = runs[name]
        early_ckpt = run_dir / f"checkpoint_{start:08d}.pt"
        if early is None:
            early = early_ckpt
            samples, channels = heldout_samples(early, work)
            reference = patch_features(early, samples, channels)
        else:  # both runs are the same until the Gram term starts
            other = patch_features(early_ckpt, samples, channels)
            same_until_start = float((other - reference).abs().max())
        final = patch_features(run_dir / "teacher.pt", samples, channels)
        gram_terms = [r["gram"] for r in trained["records"] if "gram" in r]
        rows.append({"gram": name, "steps": trained["records"][-1]["step"], "train_s": trained["seconds"],
                     "drift_from_early": float(gram_loss(final, reference)),
                     "gram_term_last": gram_terms[-1] if gram_terms else None,
                     **knn_scores(run_dir / "teacher.pt", work / f"probe_{run_dir.name}")})
    rows.append({"gram": f"early teacher (step {start})", "steps": start, "drift_from_early": 0.0,
                 **knn_scores(early, work / "probe_early")})
    return {"gram": gram, "epochs": epochs, "samples": int(samples.shape[0]), "rows": rows,
            "early_teachers_max_abs_difference": same_until_start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=40, help="step of the Gram teacher snapshot (an epoch end)")
    parser.add_argument("--refresh", type=int, default=0, help="steps between refreshes (0: never)")
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=25, help="run length (4 steps an epoch; 25: the demo's)")
    parser.add_argument("--workdir", help="keep runs and probes here (default: a temp folder)")
    parser.add_argument("--json", default="benchmarks/results/gram_anchoring.json")
    parser.add_argument("--smoke", action="store_true", help="tiny runs: check that the script works")
    args = parser.parse_args()
    if args.smoke:
        smoke()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(args.workdir or tmp), args.start, args.refresh, args.weight, args.epochs)
    print(format_table(result["rows"], [("gram", "Gram anchoring", "s"), ("steps", "steps", "d"),
                                        ("train_s", "train s", ".0f"), ("drift_from_early", "drift from early", ".4f"),
                                        ("trained", "CLS k-NN F1", ".3f"), ("random-init", "random F1", ".3f"),
                                        ("raw-pixels", "raw F1", ".3f")]))
    write_json(args.json, {"benchmark": "gram_anchoring", "machine": machine(), **result,
                           "probe": "demo_knn: k-NN macro-F1, leave one field out, 48 unseen demo fields"})


if __name__ == "__main__":
    main()
