"""Shared pieces of the demo-size quality benchmarks of later training phases, distillation and Gram anchoring.

Each benchmark trains tiny models with ``configs/demo.yaml`` (plus overrides) on the built-in
synthetic demo data, then scores the exported encoders with the demo probe
(:func:`benchmarks.demo_knn.probe`: k-NN macro-F1 on 48 unseen fields, leave one field out).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import demo_knn
from cellvit_ssl.train import main as train_main

TASK = "leave-one-image_id-out"


def machine() -> dict:
    """Where the figures were taken: CPU count, torch threads, load average at the time."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15": [round(v, 2) for v in load] if load else None,
            "processor": platform.processor() or platform.machine()}


def train_demo(run: Path, demo_cache: Path, overrides: list[str], reuse: bool = True) -> dict:
    """Train ``configs/demo.yaml`` with ``overrides`` into ``run`` (kept when it already finished).

    Returns:
        ``{"seconds": wall-clock seconds of training (None when reused), "records": metrics.jsonl}``.

    Raises:
        RuntimeError: If the training command fails.
    """
    done = run / "teacher.pt"
    seconds = None
    if not (reuse and done.is_file()):
        start = time.perf_counter()
        code = train_main(["configs/demo.yaml", f"train.output_dir={run}", f"data.demo.cache_dir={demo_cache}",
                           "train.progress=false", "train.tensorboard=false", "train.resume=none",
                           "train.log_every=1", *overrides])
        if code != 0:
            raise RuntimeError(f"training {run} failed with exit code {code}")
        seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": seconds, "records": records}


def knn_scores(checkpoint: Path, workdir: Path) -> dict:
    """Demo-probe macro-F1 of ``trained`` / ``random-init`` / ``raw-pixels`` for one encoder, and the classifier."""
    report = demo_knn.probe(checkpoint, workdir)
    scores = {k: float(v) for k, v in report["summary"]["scores"][TASK].items()}
    return {**scores, "classifier": report["summary"]["classifier"]}


def mean(values) -> float:
    """Mean as a plain float."""
    return float(np.mean(list(values)))
