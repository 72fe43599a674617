"""A run folder belongs to its settings: changed settings are refused on resume (unless allowed by
name), and a finished run says so and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES

from cellvit_ssl.checkpoint import load_checkpoint
from cellvit_ssl.config import config_changes, config_to_dict, load_config
from cellvit_ssl.errors import ConfigError
from cellvit_ssl.train import RESUME_FREE_KEYS, check_resume_config, main

FILES = ("config.yaml", "teacher.pt", "checkpoint.pt", "metrics.jsonl")


def _args(tmp_path, *extra):
    return [*TINY_OVERRIDES, f"data.demo.cache_dir={tmp_path / 'demo'}", f"train.output_dir={tmp_path / 'run'}",
            "train.progress=false", "train.tensorboard=false", *extra]


def _snapshot(run: Path) -> dict:
    return {name: ((run / name).read_bytes(), (run / name).stat().st_mtime_ns) for name in FILES}


@pytest.fixture
def finished(tmp_path):
    assert main(_args(tmp_path)) == 0
    return tmp_path / "run"


def test_changed_settings_are_refused_naming_the_keys_and_nothing_is_written(tmp_path, finished, capsys):
    capsys.readouterr()
    before = _snapshot(finished)
    # the README's old Configs example on a finished run: other epochs and batch size
    assert main(_args(tmp_path, "train.epochs=5", "data.batch_size=2")) == 2
    err = capsys.readouterr().err
    assert "data.batch_size: 4 -> 2" in err and "train.epochs: 1 -> 5" in err
    assert "train.allow_config_change=[data.batch_size,train.epochs]" in err and "train.output_dir" in err
    assert _snapshot(finished) == before


def test_a_finished_run_says_so_and_writes_nothing(tmp_path, finished, capsys):
    capsys.readouterr()
    before = _snapshot(finished)
    assert main(_args(tmp_path, "data.num_workers=1")) == 0  # a free key: how it runs, not what it learns
    out = capsys.readouterr().out
    assert "is finished" in out and "nothing to train" in out and str(finished / "teacher.pt") in out
    assert _snapshot(finished) == before


def test_more_epochs_when_allowed_by_name_continue_the_run(tmp_path, finished, capsys):
    steps = load_checkpoint(finished / "checkpoint.pt")["step"]
    capsys.readouterr()
    assert main(_args(tmp_path, "train.epochs=2", "train.allow_config_change=[train.epochs]")) == 0
    out = capsys.readouterr().out
    assert f"resumed at step {steps}" in out and "train.epochs 1 -> 2" in out
    assert load_checkpoint(finished / "checkpoint.pt")["step"] == 2 * steps
    assert load_config(finished / "config.yaml").train.epochs == 2  # config.yaml describes the weights again
    # the run's settings are now the new ones: the same command without the allowance is not refused
    assert main(_args(tmp_path, "train.epochs=2")) == 0
    assert "is finished" in capsys.readouterr().out


def test_allow_list_names_real_keys():
    with pytest.raises(ConfigError, match=r"train.allow_config_change names 'train.epoch'.*'train.epochs'"):
        from cellvit_ssl.config import validate_config

        validate_config(load_config(None, ["train.allow_config_change=[train.epoch]"]))


def test_changes_are_compared_key_by_key_with_free_keys_and_sections(tmp_path):
    cfg = load_config(None, [*TINY_OVERRIDES, "train.output_dir=a"])
    stored = config_to_dict(cfg)
    assert check_resume_config(stored, cfg, Path("x")) == {}
    moved = load_config(None, [*TINY_OVERRIDES, "train.output_dir=b", "data.num_workers=3", "data.root=/elsewhere"])
    assert check_resume_config(stored, moved, Path("x")) == {}
    lr = load_config(None, [*TINY_OVERRIDES, "train.base_lr=0.1", "views.gamma=0.5"])
    with pytest.raises(ConfigError, match=r"train.base_lr: 0.0005 -> 0.1, views.gamma: 0.2 -> 0.5"):
        check_resume_config(stored, lr, Path("x"))
    allowed = load_config(None, [*TINY_OVERRIDES, "train.base_lr=0.1", "views.gamma=0.5",
                                 "train.allow_config_change=[train.base_lr,views]"])
    assert set(check_resume_config(stored, allowed, Path("x"))) == {"train.base_lr", "views.gamma"}
    assert all("." in k for k in RESUME_FREE_KEYS)
    mapped = config_to_dict(cfg)
    mapped["data"]["channel_map"] = {"DAPI": "nucleus"}
    assert config_changes(mapped, stored) == {"data.channel_map": ({"DAPI": "nucleus"}, {})}
