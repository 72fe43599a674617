"""Preemption safety: a run killed (SIGKILL) or stopped (SIGTERM) and resumed ends exactly where
the uninterrupted run ends. The interrupted runs are real subprocesses of
``python -m cellvit_ssl.train``; a small harness only decides *when* the signal arrives."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES

from cellvit_ssl.checkpoint import load_checkpoint, step_checkpoints
from cellvit_ssl.config import load_config
from cellvit_ssl.distributed import DistInfo
from cellvit_ssl.train import Trainer, resolve_index

ROOT = Path(__file__).resolve().parents[1]
TOTAL_STEPS = 8  # 11 demo samples / batch 4 = 2 steps per epoch, 4 epochs

HARNESS = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from cellvit_ssl import train
STEP, WHERE, SIG = int(os.environ["AT_STEP"]), os.environ["AT"], getattr(signal, os.environ["SIGNAL"])
if WHERE == "step":  # the signal arrives after the optimiser step of STEP, before it is counted
    real_step = train.Trainer._train_step
    def _train_step(self, *args, **kwargs):
        record = real_step(self, *args, **kwargs)
        if self.step + 1 == STEP:
            os.kill(os.getpid(), SIG)
        return record
    train.Trainer._train_step = _train_step
else:  # the process dies half-way through writing the checkpoint of STEP
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == STEP and "optimizer" in obj:
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), SIG)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
sys.exit(train.main(sys.argv[1:]))
"""


def _overrides(demo: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, "data.demo.n_images=3", f"data.demo.cache_dir={demo}", f"train.output_dir={out}",
            "data.num_workers=1", "train.epochs=4", "train.warmup_epochs=1", "train.base_lr=0.05",
            "train.checkpoint_every=3", "train.log_every=1", "train.deterministic=true",
            "train.tensorboard=false", "train.progress=false", "ssl.warmup_teacher_temp_epochs=2",
            "model.drop_path_rate=0.2", *extra]  # stochastic depth: the resumed run needs the RNG state too


# A high-resolution phase over the last half (views 64 / 32 px, batch 2: 5 steps per phase epoch)
# and Gram anchoring from step 2, refreshed at step 5: checkpoints at 3, 4 (the phase boundary), 6, 8.
LATER_PHASES = ["train.phases=[{start: 0.5, crop_scale: 2, batch_size: 2}]", "ssl.gram.enabled=true",
                "ssl.gram.start_step=2", "ssl.gram.refresh_every=3"]


def _in_process(overrides: list[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(load_config(None, overrides), DistInfo(0, 1, 0, torch.device("cpu"))).fit()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)


def _interrupt(tmp_path: Path, demo: Path, at: str, step: int, sig: str,
               *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "interrupted"
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "AT": at, "AT_STEP": str(step),
           "SIGNAL": sig}
    empty = tmp_path / "empty.yaml"
    empty.write_text("train: {}\n")
    proc = subprocess.run([sys.executable, str(harness), str(empty), *_overrides(demo, out, *extra)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its final checkpoint."""
    base = tmp_path_factory.mktemp("reference")
    demo = base / "demo"
    resolve_index(load_config(None, _overrides(demo, base / "x")))
    _in_process(_overrides(demo, base / "run"))
    ckpt = load_checkpoint(base / "run" / "checkpoint.pt")
    assert ckpt["step"] == TOTAL_STEPS
    return demo, ckpt


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, atol=1e-6, rtol=0, msg=key)
    for name, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][name][key], value, atol=1e-6, rtol=0,
                                       msg=f"optimizer {name} {key}")


@pytest.mark.parametrize("at", ["step", "write"])
def test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(tmp_path, reference, at):
    demo, expected = reference
    rng = random.Random()
    step = rng.randrange(4, TOTAL_STEPS) if at == "step" else 6  # after the step-3 checkpoint
    proc, out = _interrupt(tmp_path, demo, at, step, "SIGKILL")
    assert proc.returncode == -signal.SIGKILL, f"killed at step {step}: {proc.stderr[-2000:]}"
    assert not (out / "teacher.pt").exists()
    survivors = [load_checkpoint(p)["step"] for p in step_checkpoints(out)]
    last_good = max([s for s in (3, 6) if s < step], default=0)
    assert max(survivors, default=0) == last_good, f"killed at step {step} ({at}); kept {survivors}"

    _in_process(_overrides(demo, out))  # train.resume=auto is the default
    assert not list(out.glob(".checkpoint*")), "half-written temporaries are cleaned up"
    _assert_same_run(expected, load_checkpoint(out / "checkpoint.pt"))
    assert (out / "teacher.pt").is_file()


def test_sigterm_after_the_update_writes_the_next_steps_checkpoint_and_exits_cleanly(tmp_path, reference):
    demo, expected = reference
    step = random.Random().randrange(1, TOTAL_STEPS - 1)
    proc, out = _interrupt(tmp_path, demo, "step", step, "SIGTERM")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stop requested" in proc.stdout and "run the same command again to resume" in proc.stdout
    ckpt = load_checkpoint(out / "checkpoint.pt")
    # the signal came after step `step`'s ranks had agreed on stopping (it arrives after the
    # optimiser update): as StopRequest documents, the run ends at the end of the next step
    assert ckpt["step"] == step + 1, f"SIGTERM during step {step}'s optimiser update"
    assert not (out / "teacher.pt").exists()

    _in_process(_overrides(demo, out))
    _assert_same_run(expected, load_checkpoint(out / "checkpoint.pt"))


@pytest.fixture(scope="module")
def references_with_phases(tmp_path_factory):
    """The uninterrupted runs with a high-resolution phase and Gram anchoring, by view maker (made on first use)."""
    base = tmp_path_factory.mktemp("reference_phases")
    demo = base / "demo"
    resolve_index(load_config(None, _overrides(demo, base / "x")))
    runs = {}

    def reference(views_device: str) -> dict:
        if views_device not in runs:
            out = base / f"run_{views_device}"
            _in_process([*_overrides(demo, out), *LATER_PHASES, f"views.device={views_device}"])
            runs[views_device] = load_checkpoint(out / "checkpoint.pt")
            assert runs[views_device]["step"] == TOTAL_STEPS and runs[views_device]["phase"] == 1
        return runs[views_device]

    return demo, reference


@pytest.mark.parametrize("step, last_good, views_device",
                         [(4, 3, "workers"), (5, 4, "workers"), (7, 6, "workers"), (7, 6, "device")],
                         ids=["in-main-phase", "at-the-boundary", "in-high-res-phase",
                              "in-high-res-phase-device-views"])
def test_sigkill_in_each_phase_then_resume_equals_the_uninterrupted_run(tmp_path, references_with_phases, step,
                                                                       last_good, views_device):
    """Killed during step 4 (resumes in the main phase from 3 and crosses the boundary), 5 (resumes
    from the boundary checkpoint straight into the high-resolution phase) or 7 (resumes inside it,
    with views cut in the loader's workers or batched on the device)."""
    demo, reference = references_with_phases
    expected = reference(views_device)
    phases = [*LATER_PHASES, f"views.device={views_device}"]
    proc, out = _interrupt(tmp_path, demo, "step", step, "SIGKILL", *phases)
    assert proc.returncode == -signal.SIGKILL, f"killed at step {step}: {proc.stderr[-2000:]}"
    survivors = [load_checkpoint(p)["step"] for p in step_checkpoints(out)]
    assert max(survivors) == last_good, survivors
    _in_process([*_overrides(demo, out), *phases])
    _assert_same_run(expected, load_checkpoint(out / "checkpoint.pt"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))
    assert [r["global_crop"] for r in records] == [32] * 4 + [64] * 4


@pytest.fixture(scope="module")
def device_reference(reference, tmp_path_factory):
    """The uninterrupted run with its views cut batched on the device (here the CPU): its final checkpoint."""
    demo, _ = reference
    out = tmp_path_factory.mktemp("device_reference") / "run"
    _in_process(_overrides(demo, out, *DEVICE_VIEWS))
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == TOTAL_STEPS
    return demo, ckpt


DEVICE_VIEWS = ("views.device=device", "views.noise=poisson")


def test_device_views_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(tmp_path, device_reference,
                                                                                      reference):
    """Device views are drawn per (seed, epoch, rank, batch): a resumed run cuts the views the
    uninterrupted one cut, wherever it was killed (here mid-epoch, after the step-3 checkpoint)."""
    demo, expected = device_reference
    step = random.Random().randrange(4, TOTAL_STEPS)
    proc, out = _interrupt(tmp_path, demo, "step", step, "SIGKILL", *DEVICE_VIEWS)
    assert proc.returncode == -signal.SIGKILL, f"killed at step {step}: {proc.stderr[-2000:]}"
    assert "views batched on cpu" in proc.stdout
    _in_process(_overrides(demo, out, *DEVICE_VIEWS))
    _assert_same_run(expected, load_checkpoint(out / "checkpoint.pt"))
    # ... and the device views are views of their own: the run differs from the worker-views run
    key = "student.backbone.backbone.blocks.0.attn.qkv.weight"
    assert (expected["model"][key] - reference[1]["model"][key]).abs().max() > 1e-4
