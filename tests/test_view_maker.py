"""views.device: where the trainer makes its views (loader workers or the device), seeding, and
a short run whose loss curve with device views follows the one with worker views."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES

from cellvit_ssl.config import load_config
from cellvit_ssl.distributed import DistInfo
from cellvit_ssl.gpu_views import GPUMultiCrop
from cellvit_ssl.train import Trainer
from cellvit_ssl.view_maker import DeviceViews, WorkerViews, batch_seed, build_view_maker, views_on_device

CPU = torch.device("cpu")
QUIET = ["train.progress=false", "train.tensorboard=false", "train.resume=none", "train.log_every=1"]


def trainer(tmp_path, *overrides: str) -> Trainer:
    cfg = load_config(None, [*TINY_OVERRIDES, f"data.demo.cache_dir={tmp_path / 'demo'}",
                             f"train.output_dir={tmp_path / 'run'}", *QUIET, *overrides])
    return Trainer(cfg, DistInfo(0, 1, 0, CPU))


def test_auto_puts_views_on_the_device_only_on_cuda():
    assert views_on_device("auto", torch.device("cuda")) and not views_on_device("auto", CPU)
    assert views_on_device("device", CPU) and not views_on_device("workers", torch.device("cuda"))
    cfg = load_config(None, ["views.device=device"])
    assert isinstance(build_view_maker(cfg, CPU), DeviceViews)
    assert isinstance(build_view_maker(load_config(None, []), CPU), WorkerViews)


def test_device_views_loader_yields_samples_and_the_step_cuts_the_views(tmp_path):
    t = trainer(tmp_path, "views.device=device", "views.noise=poisson", "views.standardize=true")
    assert isinstance(t.view_maker, DeviceViews)
    batch = next(iter(t.loader))
    assert "views" not in batch and batch["image"].shape == (4, 4, 32, 32)  # normalised samples only
    views, ids, kwargs = t._model_inputs(batch, epoch=0, micro=0)
    assert [tuple(v.shape) for v in views] == [(4, 4, 32, 32)] * 2 + [(4, 4, 16, 16)] * 2
    assert ids.shape == (4, 4) and set(kwargs) <= {"channel_mask"}
    # the views are standardised crops of the batch's samples, not the samples themselves
    assert torch.allclose(views[0].mean((-2, -1)), torch.zeros(4, 4), atol=0.35)

    workers = trainer(tmp_path / "w", "views.device=workers")
    assert isinstance(workers.view_maker, WorkerViews)
    assert "image" not in next(iter(workers.loader))


def test_device_views_are_drawn_per_seed_epoch_rank_and_batch(tmp_path):
    t = trainer(tmp_path, "views.device=device")
    batch = next(iter(t.loader))
    ids = batch["channel_ids"]
    first = t.view_maker(batch, ids, epoch=0, batch_number=1)
    t.view_maker(batch, ids, epoch=3, batch_number=0)  # whatever ran before does not matter
    assert all(torch.equal(a, b) for a, b in zip(first, t.view_maker(batch, ids, epoch=0, batch_number=1)))
    assert not torch.equal(first[0], t.view_maker(batch, ids, epoch=0, batch_number=2)[0])
    assert not torch.equal(first[0], t.view_maker(batch, ids, epoch=1, batch_number=1)[0])
    seeds = {batch_seed(0, e, r, b) for e in range(3) for r in range(2) for b in range(3)}
    assert len(seeds) == 18 and batch_seed(1, 0, 0, 0) not in seeds


def _losses(tmp_path, *overrides: str) -> list[float]:
    t = trainer(tmp_path, "train.epochs=2", "data.demo.n_images=4", *overrides)
    t.fit()
    return [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_short_run_with_device_views_follows_the_worker_views_loss_curve(tmp_path, monkeypatch):
    calls = []
    real_call = GPUMultiCrop.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(GPUMultiCrop, "__call__", counting)
    torch.set_num_threads(1)
    device = _losses(tmp_path / "device", "views.device=device")
    assert len(calls) == len(device) > 4, "every step's views were cut by the device view maker"
    workers = _losses(tmp_path / "workers", "views.device=workers")
    assert len(calls) == len(device)
    other_seed = _losses(tmp_path / "seed", "views.device=workers", "train.seed=1")
    assert all(np.isfinite(device))
    # Same seed, same model init, other random views: the curves differ by view noise only. The
    # gap stays within a fixed bound (three times the spread a change of seed makes, and no less
    # than 0.05 nats) at every step.
    gap = np.abs(np.array(device) - np.array(workers))
    seed_gap = np.abs(np.array(other_seed) - np.array(workers))
    assert gap.max() < max(3 * seed_gap.max(), 0.05), (device, workers, other_seed)


@pytest.mark.gpu
def test_device_view_maker_issues_no_host_sync(tmp_path):
    cfg = load_config(None, [*TINY_OVERRIDES, f"data.demo.cache_dir={tmp_path / 'demo'}",
                             f"train.output_dir={tmp_path / 'run'}", *QUIET, "train.device=cuda", "views.device=auto",
                             "views.noise=poisson", "views.standardize=true", "views.channel_mode=joint",
                             "views.channel_drop_prob=0.25", "views.protected_channels=[protein]",
                             "model.variant=hierarchical"])
    t = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cuda")))
    assert isinstance(t.view_maker, DeviceViews)
    batch = next(iter(t.loader))
    assert batch["image"].is_pinned()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        views, ids, _ = t._model_inputs(batch, epoch=0, micro=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.is_cuda for v in views) and ids.is_cuda


def _step_syncs(tmp_path, batch_size: int) -> int:
    """Host syncs of one whole CUDA training step (the second: the first builds caches)."""
    import warnings

    from cellvit_ssl.train import StopRequest

    cfg = load_config(None, [*TINY_OVERRIDES, f"data.demo.cache_dir={tmp_path / 'demo'}",
                             f"train.output_dir={tmp_path / f'run{batch_size}'}", *QUIET, "train.device=cuda",
                             f"data.batch_size={batch_size}", "views.device=device"])
    t = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cuda")))
    batches = iter(t.loader)
    t._train_step(batches, 0, StopRequest())
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            t._train_step(batches, 0, StopRequest())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.gpu
def test_a_cuda_step_has_no_per_sample_host_syncs(tmp_path):
    # The step reads its record back once (loss terms, NaN check) and the model has a few
    # shape-dependent reads; none may grow with the batch (lightly's iBOT block masks, made on
    # the GPU, read every block back: they are made on the CPU and copied once).
    small, large = _step_syncs(tmp_path, 2), _step_syncs(tmp_path, 4)
    assert small == large, f"host syncs per step: {small} at batch 2, {large} at batch 4"
