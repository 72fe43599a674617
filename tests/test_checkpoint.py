"""cellvit_ssl.checkpoint: atomic writes, safe loads, RNG state, and refusing broken files."""

import random

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES

from cellvit_ssl.checkpoint import (
    ENCODER_FORMAT,
    STATE_LAYOUT,
    TRAINING_FORMAT,
    find_resume_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    save_training_checkpoint,
    set_rng_state,
    step_checkpoints,
    upgrade_state_layout,
)
from cellvit_ssl.errors import CheckpointError
from cellvit_ssl.train import main


def _draws():
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    torch.manual_seed(3)
    state = rng_state()
    expected = _draws()
    save_checkpoint({"format": TRAINING_FORMAT, "rng": [state]}, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")["rng"][0]  # weights_only=True inside
    _draws()
    set_rng_state(loaded)
    assert _draws() == expected


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = save_checkpoint({"format": TRAINING_FORMAT, "step": 1}, tmp_path / "checkpoint.pt")

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="disk full.*the previous file is unchanged"):
        save_checkpoint({"format": TRAINING_FORMAT, "step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_rotation_keeps_the_last_k_and_points_latest_at_the_newest(tmp_path):
    for step in (5, 10, 15, 20):
        save_training_checkpoint({"format": TRAINING_FORMAT, "step": step}, tmp_path, step, keep_last=2)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["checkpoint_00000015.pt", "checkpoint_00000020.pt"]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 20
    (tmp_path / ".checkpoint_00000025.pt.abc.tmp").write_bytes(b"half")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".checkpoint_00000025.pt.abc.tmp"]
    assert find_resume_checkpoint("auto", tmp_path) == tmp_path / "checkpoint.pt"
    assert find_resume_checkpoint("none", tmp_path) is None
    assert find_resume_checkpoint("auto", tmp_path / "elsewhere") is None
    with pytest.raises(CheckpointError, match="missing.pt"):
        find_resume_checkpoint(str(tmp_path / "missing.pt"), tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_a_checkpoint", "encoder_export"])
def test_resuming_from_a_broken_checkpoint_is_refused_clearly(tmp_path, capsys, damage):
    out = tmp_path / "run"
    overrides = [*TINY_OVERRIDES, f"data.demo.cache_dir={tmp_path / 'demo'}", f"train.output_dir={out}",
                 "train.progress=false", "train.tensorboard=false"]
    config = tmp_path / "run.yaml"
    config.write_text("train: {}\n")
    assert main([str(config), *overrides]) == 0
    latest = out / "checkpoint.pt"
    good = latest.read_bytes()
    latest.unlink()  # break the link, not the step file it points at
    if damage == "truncated":
        latest.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        latest.write_bytes(b"\x00not a checkpoint" * 100)
    elif damage == "not_a_checkpoint":
        torch.save({"weights": torch.zeros(2)}, latest)
    else:
        latest.write_bytes((out / "teacher.pt").read_bytes())
    capsys.readouterr()
    assert main([str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert str(latest) in err
    assert ("truncated, corrupt" in err) if damage in ("truncated", "garbage") else (TRAINING_FORMAT in err)


def test_upgrade_state_layout_renames_old_keys_and_leaves_current_and_encoder_payloads_alone(tmp_path):
    w = torch.ones(2)
    old = {"format": TRAINING_FORMAT, "config": {"ssl": {"centering": "sinkhorn_knopp"}},
           "model": {"student.backbone.cls_token": w, "teacher.cross_blocks.0.ls.gamma": w,
                     "student_ibot_head.layers.0.weight": w, "teacher_dino_head.last_layer.weight_v": w,
                     "dino_loss.center": w, "ibot_loss.center.center": w},
           "optimizer": {"state": {"student.backbone.cls_token": {"step": w}},
                         "param_groups": [{"lr": 0.1, "params": ["student.backbone.cls_token",
                                                                 "student_ibot_head.layers.0.weight"]}]}}
    new = upgrade_state_layout(old)
    assert new["state_layout"] == STATE_LAYOUT
    assert sorted(new["model"]) == ["student.backbone.backbone.cls_token", "student.ibot_head.layers.0.weight",
                                    "teacher.backbone.cross_blocks.0.ls.gamma",
                                    "teacher.dino_head.last_layer.weight_v"]  # no SK centre
    assert list(new["optimizer"]["state"]) == ["student.backbone.backbone.cls_token"]
    assert new["optimizer"]["param_groups"] == [{"lr": 0.1, "params": ["student.backbone.backbone.cls_token",
                                                                       "student.ibot_head.layers.0.weight"]}]
    mean = upgrade_state_layout({**old, "config": {"ssl": {"centering": "mean"}}})
    assert {"dino_loss.center", "ibot_loss.center.center"} <= mean["model"].keys()
    assert upgrade_state_layout(new) is new
    encoder = {"format": ENCODER_FORMAT, "backbone": {"backbone.cls_token": w}}
    assert upgrade_state_layout(encoder) is encoder
    save_checkpoint({**new, "state_layout": STATE_LAYOUT + 1}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"future\.pt.*state_layout=3"):
        load_checkpoint(tmp_path / "future.pt")
