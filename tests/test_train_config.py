"""Trainer settings in the typed config: unknown / mistyped keys and bad values are ConfigErrors
naming the key (and the nearest valid key)."""

import pytest

from cellvit_ssl.config import load_config
from cellvit_ssl.errors import ConfigError


@pytest.mark.parametrize(
    ("override", "named", "nearest"),
    [
        ("train.acumulate_steps=2", "train.acumulate_steps", "train.accumulate_steps"),
        ("train.keeplast=2", "train.keeplast", "train.keep_last"),
        ("train.stratgy=fsdp", "train.stratgy", "train.strategy"),
        ("trian.epochs=3", "trian", "train"),
    ],
)
def test_unknown_override_names_the_key_and_the_nearest_one(override, named, nearest):
    with pytest.raises(ConfigError, match=rf"unknown config key '{named}'.*did you mean '{nearest}'"):
        load_config(None, [override])


def test_unknown_key_in_a_yaml_file_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  checkpoint_evry: 100\n")
    with pytest.raises(ConfigError, match=r"exp.yaml.*train.checkpoint_evry.*train.checkpoint_every"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.keep_last=many", "train.keep_last"),
        ("train.compile=perhaps", "train.compile"),
        ("train.strategy=zero3", "train.strategy"),
        ("train.precision=fp16", "train.precision"),
        ("train.accumulate_steps=0", "train.accumulate_steps"),
        ("train.layer_decay=1.5", "train.layer_decay"),
        ("train.device=tpu", "train.device"),
        ("train.checkpoint_every=-1", "train.checkpoint_every"),
    ],
)
def test_wrong_type_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_trainer_defaults_and_overrides():
    cfg = load_config(None, ["train.strategy=fsdp", "train.accumulate_steps=4", "train.resume=/ckpt/x.pt"])
    assert (cfg.train.strategy, cfg.train.accumulate_steps, cfg.train.resume) == ("fsdp", 4, "/ckpt/x.pt")
    defaults = load_config(None)
    assert (defaults.train.precision, defaults.train.resume, defaults.train.strategy) == ("auto", "auto", "ddp")
