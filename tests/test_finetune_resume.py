"""Fine-tuning killed (SIGKILL) at a random step, or half-way through writing a checkpoint, and resumed ends
exactly where the uninterrupted run ends: weights, optimizer, early-stopping state and the classifier file.
The interrupted runs are real subprocesses of ``python -m cellvit_ssl.finetune``."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES
from test_finetune import labelled_index

from cellvit_ssl import finetune as ft
from cellvit_ssl.checkpoint import load_checkpoint, step_checkpoints
from cellvit_ssl.config import load_config
from cellvit_ssl.distributed import DistInfo
from cellvit_ssl.train import run as pretrain

ROOT = Path(__file__).resolve().parents[1]

HARNESS = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from cellvit_ssl import finetune
STEP, WHERE = int(os.environ["AT_STEP"]), os.environ["AT"]
if WHERE == "step":  # killed after the optimiser step of STEP, before it is counted
    real_step = finetune.FinetuneTrainer._train_step
    def _train_step(self, *args, **kwargs):
        record = real_step(self, *args, **kwargs)
        if self.step + 1 == STEP:
            os.kill(os.getpid(), signal.SIGKILL)
        return record
    finetune.FinetuneTrainer._train_step = _train_step
else:  # killed half-way through writing the checkpoint of STEP
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == STEP and "optimizer" in obj:
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
sys.exit(finetune.main(sys.argv[1:]))
"""


def _args(teacher: Path, index: Path, out: Path) -> list[str]:
    return [str(teacher), "--index", str(index), "--out", str(out), "train.epochs=3", "data.batch_size=4",
            "data.num_workers=0", "train.device=cpu", "train.progress=false", "train.warmup_epochs=1",
            "train.base_lr=0.05", "train.checkpoint_every=3", "train.log_every=1", "train.deterministic=true",
            "finetune.mode=lora", "finetune.lora.rank=2", "finetune.lora.dropout=0.2",  # dropout: RNG state matters
            "finetune.lora.target=all", "finetune.patience=2"]


def _in_process(args: list[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg, payload = ft.load(args)
        ft.FinetuneTrainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")), payload).fit()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("finetune_resume")
    torch.set_num_threads(1)
    teacher = pretrain(load_config(None, TINY_OVERRIDES + [f"data.demo.cache_dir={base / 'demo'}",
                                                           f"train.output_dir={base / 'pre'}",
                                                           "train.progress=false", "train.tensorboard=false"]))
    index = labelled_index(base / "cells")
    _in_process(_args(teacher, index, base / "run"))
    final = load_checkpoint(base / "run" / "checkpoint.pt", expect=("cellvit_ssl.finetune",))
    return teacher, index, final, base / "run"


def _assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, atol=1e-6, rtol=0, msg=key)
    for name, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][name][key], value, atol=1e-6, rtol=0,
                                       msg=f"optimizer {name} {key}")
    ea, eb = a["early_stopping"], b["early_stopping"]
    assert {k: v for k, v in ea.items() if k != "state"} == {k: v for k, v in eb.items() if k != "state"}
    for key, value in ea["state"].items():
        torch.testing.assert_close(eb["state"][key], value, atol=1e-6, rtol=0, msg=f"best {key}")


@pytest.mark.parametrize("at", ["step", "write"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path, reference, at):
    teacher, index, expected, expected_dir = reference
    total = expected["step"]
    assert expected["early_stopping"]["epoch"] >= 0 and expected["early_stopping"]["state"]  # validation ran
    assert total >= 8, "the run must be long enough to be killed after a checkpoint"
    step = random.Random().randrange(4, total) if at == "step" else 6
    out = tmp_path / "interrupted"
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "AT": at, "AT_STEP": str(step)}
    proc = subprocess.run([sys.executable, str(harness), *_args(teacher, index, out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"killed at step {step}: {proc.stderr[-2000:]}"
    assert not (out / "classifier.pt").exists()
    survivors = [load_checkpoint(p, expect=("cellvit_ssl.finetune",))["step"] for p in step_checkpoints(out)]
    assert survivors and max(survivors) < step

    _in_process(_args(teacher, index, out))  # train.resume=auto
    assert not list(out.glob(".checkpoint*")), "half-written temporaries are cleaned up"
    _assert_same(expected, load_checkpoint(out / "checkpoint.pt", expect=("cellvit_ssl.finetune",)))
    got = load_checkpoint(out / "classifier.pt", expect=("cellvit_ssl.classifier",))
    want = load_checkpoint(expected_dir / "classifier.pt", expect=("cellvit_ssl.classifier",))
    for part in ("head", "adapters"):
        for key, value in want[part].items():
            torch.testing.assert_close(got[part][key], value, atol=1e-6, rtol=0, msg=f"{part} {key}")
    assert got["metrics"]["test"] == want["metrics"]["test"]
    # the metrics log holds each step once, as the uninterrupted run's does
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((expected_dir / "metrics.jsonl").read_text().splitlines())
