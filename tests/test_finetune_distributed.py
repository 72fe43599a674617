"""Fine-tuning under torchrun: 2 gloo processes with batch 2 end where one process with batch 4 ends
(weights, optimizer, early-stopping state, and the validation and test scores computed from shards)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import TINY_OVERRIDES
from test_finetune import labelled_index

from cellvit_ssl import finetune as ft
from cellvit_ssl.checkpoint import load_checkpoint
from cellvit_ssl.config import load_config
from cellvit_ssl.distributed import DistInfo
from cellvit_ssl.train import run as pretrain

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, sys
import torch
torch.set_num_threads(1)
from cellvit_ssl import distributed as D
from cellvit_ssl import finetune as ft
info = D.init_distributed("cpu", "gloo")
assert info.world_size == 2, info
for args in json.loads(open(sys.argv[1]).read()):
    cfg, payload = ft.load(args)
    ft.FinetuneTrainer(cfg, info, payload).fit()
D.cleanup()
"""


def _args(teacher: Path, index: Path, out: Path, batch: int, mode: str) -> list[str]:
    return [str(teacher), "--index", str(index), "--out", str(out), "train.epochs=2", f"data.batch_size={batch}",
            "data.num_workers=0", "train.device=cpu", "train.progress=false", "train.base_lr=0.05",
            "train.deterministic=true", "train.dist_backend=gloo", f"finetune.mode={mode}", "finetune.lora.rank=2"]


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    torch.set_num_threads(1)
    teacher = pretrain(load_config(None, TINY_OVERRIDES + [f"data.demo.cache_dir={tmp_path / 'demo'}",
                                                           f"train.output_dir={tmp_path / 'pre'}",
                                                           "train.progress=false", "train.tensorboard=false"]))
    index = labelled_index(tmp_path / "cells")
    modes = ("full", "lora")
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps([_args(teacher, index, tmp_path / f"ddp_{m}", 2, m) for m in modes]))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(spec)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for mode in modes:
        cfg, payload = ft.load(_args(teacher, index, tmp_path / f"single_{mode}", 4, mode))
        try:
            ft.FinetuneTrainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")), payload).fit()
        finally:
            torch.use_deterministic_algorithms(False)
        single = load_checkpoint(tmp_path / f"single_{mode}" / "checkpoint.pt", expect=("cellvit_ssl.finetune",))
        ddp = load_checkpoint(tmp_path / f"ddp_{mode}" / "checkpoint.pt", expect=("cellvit_ssl.finetune",))
        assert ddp["step"] == single["step"] > 2 and ddp["world_size"] == 2 and len(ddp["rng"]) == 2
        for key, value in single["model"].items():
            torch.testing.assert_close(ddp["model"][key], value, atol=1e-6, rtol=0, msg=f"{mode}: {key}")
        assert ddp["early_stopping"]["epoch"] == single["early_stopping"]["epoch"]
        assert abs(ddp["early_stopping"]["score"] - single["early_stopping"]["score"]) < 1e-6
        evaluation = [json.loads((tmp_path / f"{run}_{mode}" / "evaluation.json").read_text())
                      for run in ("single", "ddp")]
        assert evaluation[0]["test"] == evaluation[1]["test"] and evaluation[0]["validation"] == evaluation[1][
            "validation"]
