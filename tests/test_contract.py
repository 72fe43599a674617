"""The preprocessing contract travels with the model: dataset statistics from the checkpoint, old files too."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import anndata
import numpy as np
import pytest
import torch

from cellvit_ssl import CheckpointError, load_encoder
from cellvit_ssl.checkpoint import ENCODER_FORMAT, save_checkpoint
from cellvit_ssl.config import config_to_dict, load_config
from cellvit_ssl.data.normalize import ChannelStats
from cellvit_ssl.models.channels import build_model
from cellvit_ssl.preprocess import Preprocess


def test_contract_round_trips_and_refuses_a_newer_version():
    cfg = load_config(None, ["data.normalize=dataset", "views.standardize=true", "data.mode=image"])
    stats = ChannelStats((1.0, 99.8), {"nucleus": 3.0}, {"nucleus": 900.0}, {"nucleus": 1.0}, {"nucleus": 2.0}, 4)
    contract = Preprocess.from_config(cfg, stats)
    again = Preprocess.from_dict(contract.to_dict())
    assert again == contract and again.bounds == {"nucleus": (3.0, 900.0)} and again.standardize
    with pytest.raises(CheckpointError, match="newer"):
        Preprocess.from_dict({**contract.to_dict(), "version": 99})
    with pytest.raises(CheckpointError, match="malformed"):
        Preprocess.from_dict({"normalize": "percentile"})


def test_dataset_statistics_come_from_the_checkpoint_in_a_fresh_process(tiny_overrides, tmp_path):
    """Trained with data.normalize=dataset; embedded in a new process with another HOME and no stats cache."""
    run = tmp_path / "run"
    cache = tmp_path / "stats.json"
    overrides = [*tiny_overrides, "data.normalize=dataset", f"data.stats_cache={cache}", "train.tensorboard=false",
                 "train.progress=false", f"train.output_dir={run}"]
    proc = subprocess.run([sys.executable, "-m", "cellvit_ssl.train", *overrides], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    stored = torch.load(run / "teacher.pt", weights_only=True)["preprocess"]
    assert stored["normalize"] == "dataset" and set(stored["bounds"]) == {"nucleus", "microtubules", "er", "protein"}
    index = tmp_path / "demo" / "index_ome-zarr.csv"
    here = tmp_path / "here.h5ad"
    args = [str(run / "teacher.pt"), "--index", str(index), "--out"]
    from cellvit_ssl.embed import main as embed_main

    assert embed_main([*args, str(here), "--no-progress"]) == 0
    cache.unlink()  # "another machine": no cache file, another home folder
    env = {**os.environ, "HOME": str(tmp_path / "elsewhere")}
    there = tmp_path / "there.h5ad"
    proc = subprocess.run([sys.executable, "-m", "cellvit_ssl.embed", *args, str(there), "--no-progress"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(anndata.read_h5ad(there).X, anndata.read_h5ad(here).X)
    assert json.loads(anndata.read_h5ad(there).uns["preprocess"])["bounds"] == stored["bounds"]


@pytest.mark.parametrize("normalize", ["percentile", "none"])
def test_checkpoints_older_than_the_contract_use_what_their_config_implies(tiny_cfg, tmp_path, normalize):
    cfg = load_config(None, _overrides(tiny_cfg, normalize))
    model = build_model(cfg.model, list(cfg.data.channels))
    old = save_checkpoint({"format": ENCODER_FORMAT, "config": config_to_dict(cfg), "backbone": model.state_dict()},
                          tmp_path / "old.pt")
    enc = load_encoder(old, device="cpu")
    assert enc.preprocess == Preprocess.from_config(cfg)


def test_an_old_dataset_normalised_checkpoint_needs_its_statistics_file(tiny_cfg, tmp_path):
    cache = tmp_path / "stats.json"
    cfg = load_config(None, _overrides(tiny_cfg, "dataset") + [f"data.stats_cache={cache}"])
    model = build_model(cfg.model, list(cfg.data.channels))
    old = save_checkpoint({"format": ENCODER_FORMAT, "config": config_to_dict(cfg), "backbone": model.state_dict()},
                          tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="stats"):
        load_encoder(old, device="cpu")
    names = list(cfg.data.channels)
    ChannelStats((1.0, 99.8), dict.fromkeys(names, 1.0), dict.fromkeys(names, 9.0), dict.fromkeys(names, 5.0),
                 dict.fromkeys(names, 1.0), 3).save(cache)
    assert load_encoder(old, device="cpu").preprocess.bounds == dict.fromkeys(names, (1.0, 9.0))


def _overrides(cfg, normalize: str) -> list[str]:
    from tests.conftest import TINY_OVERRIDES

    return [*TINY_OVERRIDES, f"data.normalize={normalize}"]


def test_a_different_contract_changes_the_embedding(tiny_overrides):
    """The contract is applied, not just stored: other clipping percentiles give another embedding.

    (An affine change alone would barely show: each channel's tokens are layer-normalised.)
    """
    from cellvit_ssl.encoder import Encoder

    # LayerScale 0.5: at DINOv2's 1e-5 a random 2-block ViT's CLS token hardly sees the pixels
    cfg = load_config(None, [*tiny_overrides, "model.layerscale_init=0.5"])
    torch.manual_seed(0)
    model = build_model(cfg.model, list(cfg.data.channels))
    image = np.random.default_rng(0).gamma(2.0, 100.0, size=(4, 32, 32)).astype(np.float32)
    a = Encoder(model, cfg, "cpu").embed(image, list(cfg.data.channels))
    b = Encoder(model, cfg, "cpu", preprocess=Preprocess(percentiles=(30.0, 70.0), sample_size=32, input_size=32))
    assert not np.allclose(a, b.embed(image, list(cfg.data.channels)), atol=1e-2)
