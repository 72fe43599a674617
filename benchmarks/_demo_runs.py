"""Shared pieces of the demo-size quality benchmarks of later training phases, distillation and Gram anchoring.

Each benchmark trains tiny models with ``configs/demo.yaml`` (plus overrides) on the built-in
synthetic demo data, then scores the exported encoders with the demo probe
(:func:`benchmarks.demo_knn.probe`: k-NN macro-F1 on 48 unseen fields, leave one field out).

The three share one plain demo run, ``WORKDIR/base`` (the baseline of the high-resolution
phase, the distillation teacher, the run without Gram anchoring): with the same ``--workdir``
a finished run is reused, so they can run one after the other or side by side (start the
one that trains ``base`` first: ``distill_knn``; the others train their own run first).
Every run keeps all its epoch checkpoints (the Gram benchmark reads an early one).
"""

from __future__ import annotations

import contextlib
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

#: Overrides appended to every run and probe size, for a quick dry run of a benchmark (``--smoke``).
SMOKE = {"overrides": ["train.epochs=2", "data.demo.n_images=2", "train.warmup_epochs=1", "data.batch_size=4"],
         "eval_images": 4}
_settings = {"overrides": [], "eval_images": 48}


def smoke() -> None:
    """Make every later run and probe tiny: checks that a benchmark runs, its figures mean nothing."""
    _settings.update(SMOKE)


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
    with _claimed(run):
        if not (reuse and done.is_file()):
            start = time.perf_counter()
            code = train_main(["configs/demo.yaml", f"train.output_dir={run}", f"data.demo.cache_dir={demo_cache}",
                               "train.progress=false", "train.tensorboard=false", "train.resume=none",
                               "train.log_every=1", "train.keep_last=1000", *overrides, *_settings["overrides"]])
            if code != 0:
                raise RuntimeError(f"training {run} failed with exit code {code}")
            seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": seconds, "records": records}


def demo_data(workdir: Path) -> Path:
    """Generate the demo data into ``workdir/demo`` once (before runs that share it start side by side)."""
    from cellvit_ssl.config import load_config
    from cellvit_ssl.train import resolve_index

    resolve_index(load_config("configs/demo.yaml", [f"data.demo.cache_dir={workdir / 'demo'}",
                                                     *_settings["overrides"]]))
    return workdir / "demo"


@contextlib.contextmanager
def _claimed(run: Path):
    """Train ``run`` alone: wait while another benchmark process trains it (its pid in ``<run>.training``)."""
    claim = run.with_name(run.name + ".training")
    while claim.is_file():
        try:
            os.kill(int(claim.read_text()), 0)
        except (ProcessLookupError, ValueError, FileNotFoundError):
            break  # its owner is gone
        time.sleep(30)
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text(str(os.getpid()))
    try:
        yield
    finally:
        claim.unlink(missing_ok=True)


def knn_scores(checkpoint: Path, workdir: Path) -> dict:
    """Demo-probe macro-F1 of ``trained`` / ``random-init`` / ``raw-pixels`` for one encoder, and the classifier."""
    report = demo_knn.probe(checkpoint, workdir, n_images=_settings["eval_images"])
    scores = {k: float(v) for k, v in report["summary"]["scores"][TASK].items()}
    return {**scores, "classifier": report["summary"]["classifier"]}


def mean(values) -> float:
    """Mean as a plain float."""
    return float(np.mean(list(values)))
