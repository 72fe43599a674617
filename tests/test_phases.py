"""Later training phases (``train.phases``): the plan, each phase's config and schedules, and a
tiny run whose last phase trains at twice the view size, read back from its metrics log and
its exported encoder."""

from __future__ import annotations

import json

import pytest
import torch

from cellvit_ssl import load_encoder
from cellvit_ssl.checkpoint import load_checkpoint
from cellvit_ssl.config import load_config
from cellvit_ssl.distributed import DistInfo
from cellvit_ssl.errors import ConfigError
from cellvit_ssl.models.vit import resample_grid
from cellvit_ssl.phases import phase_config, phase_schedules, plan_phases
from cellvit_ssl.train import Trainer

QUIET = ["train.progress=false", "train.tensorboard=false", "train.resume=none", "train.log_every=1"]
HIGHRES = "train.phases=[{start: 0.75, crop_scale: 2}]"


def test_a_phase_scales_crops_samples_and_batch():
    cfg = load_config(None, ["data.batch_size=64", "data.sample_size=256",
                             "train.phases=[{start: 0.9, crop_scale: 2}, {start: 0.95, crop_scale: 2, "
                             "sample_scale: 1, batch_size: 7}]"])
    first, second = (phase_config(cfg, p) for p in cfg.train.phases)
    assert (first.views.global_crop_size, first.views.local_crop_size) == (448, 192)
    assert (first.data.sample_size, first.data.batch_size) == (512, 16)  # batch / crop_scale**2: same tokens
    assert (second.data.sample_size, second.data.batch_size) == (256, 7)
    assert first.views.n_local_views == cfg.views.n_local_views and first.model == cfg.model


def test_phases_split_the_run_and_refuse_an_empty_one():
    cfg = load_config(None, ["train.phases=[{start: 0.5}, {start: 0.75}]"])
    phases = plan_phases(cfg, 100)
    assert [(p.index, p.first_step, p.end_step) for p in phases] == [(0, 0, 50), (1, 50, 75), (2, 75, 100)]
    assert phases[0].cfg is cfg and phases[0].seed == cfg.train.seed
    assert len({p.seed for p in phases}) == 3  # each phase has its own data order
    with pytest.raises(ConfigError, match=r"train.phases\[0\] \(start=0.5\) gets no optimiser step"):
        plan_phases(cfg, 3)  # phase starts round(1.5) = round(2.25) = 2: the first later phase is empty
    assert [(p.first_step, p.end_step) for p in plan_phases(load_config(None, []), 7)] == [(0, 7)]


@pytest.mark.parametrize("phases, match", [
    ("[{start: 0.9}, {start: 0.5}]", r"train.phases\[1\].start=0.5"),
    ("[{start: 1.0}]", r"train.phases\[0\].start=1.0"),
    ("[{start: 0.9, crop_scale: 1.3}]", "not a multiple of model.patch_size"),
    ("[{start: 0.9, momentum_end: 1.5}]", "momentum_end=1.5"),
    ("[{start: 0.9, warmup_fraction: 2}]", "warmup_fraction=2"),
])
def test_bad_phases_are_config_errors(phases, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"train.phases={phases}"])


def test_a_phase_has_its_own_learning_rate_and_momentum_segment():
    cfg = load_config(None, ["train.base_lr=0.1", "train.lr_reference_batch=10", "train.min_lr=0.0",
                             "train.warmup_epochs=1", "ssl.momentum_start=0.9", "ssl.momentum_end=1.0",
                             "train.weight_decay=0.04", "train.weight_decay_end=0.4",
                             "train.phases=[{start: 0.8, base_lr: 0.01, warmup_fraction: 0.25, momentum_start: 0.99, "
                             "momentum_end: 0.999}]"])
    main, late = plan_phases(cfg, 100)
    s0 = phase_schedules(cfg, main, global_batch=10, steps_per_epoch=10)
    s1 = phase_schedules(cfg, late, global_batch=5, steps_per_epoch=10)
    assert s0.lr(9) == pytest.approx(0.1) and s0.lr(80) == pytest.approx(0.0)  # the main cosine ends at the boundary
    assert s0.momentum(0) == pytest.approx(0.9) and s0.momentum(79) == pytest.approx(1.0)
    # the phase: warm-up from 0 over 5 of its 20 steps to 0.01 * 5 / 10, then cosine to 0
    assert [round(s1.lr(s), 6) for s in (80, 84)] == [0.001, 0.005]
    assert s1.lr(100) == pytest.approx(0.0)
    assert s1.momentum(80) == pytest.approx(0.99) and s1.momentum(99) == pytest.approx(0.999)
    assert s1.wd(80) == s1.wd(99) == pytest.approx(0.4)


def _train(overrides):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(load_config(None, overrides), DistInfo(0, 1, 0, torch.device("cpu")))
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    return trainer


@pytest.mark.parametrize("views_device", ["workers", "device"])
def test_the_last_phase_trains_at_twice_the_view_size_and_the_encoder_embeds_at_it(tiny_overrides, tmp_path,
                                                                                 views_device):
    """11 demo cells, batch 4: 2 steps per epoch, 4 epochs = 8 steps; the phase trains steps 7 and 8,
    with views cut in the loader's workers or batched on the device (both switch at the boundary)."""
    out = tmp_path / "run"
    trainer = _train([*tiny_overrides, *QUIET, "data.demo.n_images=3", "train.epochs=4", HIGHRES,
                      f"views.device={views_device}"])
    assert trainer.view_maker.on_device == (views_device == "device")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seen = [(r["step"], r["phase"], r["global_crop"], r["local_crop"], r["micro_batch"]) for r in records]
    assert seen == [(s, 0, 32, 16, 4) for s in range(1, 7)] + [(s, 1, 64, 32, 1) for s in (7, 8)]
    # the phase's own schedule segment: its momentum starts again at ssl.momentum_start
    assert records[5]["momentum"] == pytest.approx(1.0) and records[6]["momentum"] == pytest.approx(0.996)

    # the boundary is checkpointed with the main phase's contract; the export carries the phase's
    boundary = load_checkpoint(out / "checkpoint_00000006.pt")
    contract = boundary["preprocess"]
    assert (boundary["phase"], contract["input_size"], contract["sample_size"]) == (0, 32, 32)
    final = load_checkpoint(out / "teacher.pt")
    assert (final["preprocess"]["input_size"], final["preprocess"]["sample_size"]) == (64, 64)
    encoder = load_encoder(out / "teacher.pt", device="cpu")
    assert (encoder.input_size, encoder.crop_size) == (64, 64)
    assert encoder.embed(torch.rand(2, 4, 80, 80), channels=list(trainer.cfg.data.channels)).shape[0] == 2

    # position embeddings: the stored native grid is never replaced, and every grid the run saw
    # (views of 16, 32 and 64 px with 8-px patches) is the exact resample of it
    vit = encoder.model.backbone
    assert tuple(vit.pos_embed.shape) == (1, 1 + 4 * 4, 32)
    assert tuple(boundary["model"]["teacher.backbone.backbone.pos_embed"].shape) == tuple(vit.pos_embed.shape)
    grids = {(size // 8, size // 8) for *_, g, loc, _ in seen for size in (g, loc)}
    assert grids == {(2, 2), (4, 4), (8, 8)}
    for grid in grids:
        got = vit.interpolate_pos_encoding(grid)
        want = torch.cat([vit.pos_embed[:, :1], resample_grid(vit.pos_embed[:, 1:], vit.native_grid, grid)], dim=1)
        assert got.shape == (1, 1 + grid[0] * grid[1], 32)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert vit.interpolate_pos_encoding(vit.native_grid) is vit.pos_embed
    assert (encoder.input_size // encoder.patch_size,) * 2 == (8, 8)  # inference at the last grid trained


def test_embed_cuts_the_samples_of_the_contract(tmp_path, monkeypatch):
    """``embed`` takes ``data.sample_size`` from the checkpoint's contract, not from the main phase's config."""
    import cellvit_ssl.checkpoint
    from cellvit_ssl import embed

    payload = {"config": {"data": {"sample_size": 32, "channels": ["nucleus"]}}, "preprocess": {"sample_size": 64}}
    monkeypatch.setattr(cellvit_ssl.checkpoint, "load_checkpoint", lambda path, **kwargs: payload)
    cfg, _ = embed.load(["teacher.pt", "--index", "x.csv", "--out", str(tmp_path / "o.h5ad")])
    assert cfg.data.sample_size == 64
    cfg, _ = embed.load(["teacher.pt", "--index", "x.csv", "--out", str(tmp_path / "o.h5ad"), "--crop-size", "48"])
    assert cfg.data.sample_size == 48  # an explicit choice still wins


@pytest.mark.parametrize("name", ["hpa_highres"])
def test_shipped_highres_config_loads_and_plans(name):
    cfg = load_config(f"configs/{name}.yaml")
    phases = plan_phases(cfg, 1000)
    assert len(phases) == 2 and phases[1].cfg.views.global_crop_size == 2 * cfg.views.global_crop_size
