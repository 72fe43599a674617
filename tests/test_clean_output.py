"""What a user sees: the demo and an embedding run print no third-party warnings, and the final
line of training stands on its own line after the progress bar."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: configs/demo.yaml made tiny: the same code path (demo data, model, heads, progress bar), in seconds.
TINY_DEMO = ["data.demo.n_images=2", "data.demo.image_size=96", "data.demo.cells_per_image=6", "data.batch_size=4",
             "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "train.epochs=1", "train.warmup_epochs=0"]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)  # the default filters, as a user's shell has them
    # stdout and stderr in one stream, in the order a terminal shows them
    return subprocess.run([sys.executable, "-m", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(r"warn", line, re.IGNORECASE)]


def test_demo_and_embed_print_no_warnings_and_the_final_line_stands_alone(tmp_path):
    train = _run(["cellvit_ssl.train", str(ROOT / "configs" / "demo.yaml"), f"train.output_dir={tmp_path / 'run'}",
                  f"data.demo.cache_dir={tmp_path / 'demo'}", *TINY_DEMO], tmp_path)
    assert train.returncode == 0, train.stdout[-3000:]
    assert _warnings(train.stdout) == []
    assert re.search(r"(^|\n)done: wrote .*teacher\.pt", train.stdout), train.stdout[-1000:]
    assert "ddp" not in train.stdout  # the strategy is named only when there are several processes
    embed = _run(["cellvit_ssl.embed", str(tmp_path / "run" / "teacher.pt"), "--index",
                  str(tmp_path / "demo" / "index_ome-zarr.csv"), "--out", str(tmp_path / "cells.zarr")], tmp_path)
    assert embed.returncode == 0, embed.stdout[-3000:]
    assert _warnings(embed.stdout) == []
    assert re.search(r"(^|\n)wrote .*cells\.zarr", embed.stdout)
