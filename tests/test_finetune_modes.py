"""The fine-tuning benchmark on quality-suite generators: the labelled split, labels and sample mode (no training)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from benchmarks import finetune_modes as fm
from cellvit_ssl import finetune as ft
from cellvit_ssl.channels import ChannelVocabulary
from cellvit_ssl.config import SampleMode, load_config


@pytest.mark.parametrize("generator, mode", [("cellpainting", "cells"), ("hpa", "image")])
def test_a_suite_generator_gives_train_val_test_by_file_with_labels_read_in_its_sample_mode(generator, mode,
                                                                                              tmp_path):
    labelled = fm.suite_labelled_set(tmp_path / "set", generator, tmp_path / "work", seed=0, n_cells=24)
    source = pd.read_csv(labelled.root / "index.csv")
    table = pd.read_csv(labelled.index)
    assert labelled.mode == mode and labelled.label_key == "label"
    assert labelled.root == tmp_path / "work" / "data" / f"{generator}_seed0_n24"  # the quality suite's cache
    # the generator's held-out rows are the test rows; its training rows split into train / val by image file
    assert table["path"].tolist() == source["path"].tolist()
    assert (table["split"] == "test").tolist() == (source["split"] == "test").tolist()
    files = {s: set(table.loc[table["split"] == s, "path"]) for s in ("train", "val", "test")}
    assert all(files.values())
    assert not (files["train"] & files["val"]) and not (files["test"] & (files["train"] | files["val"]))
    train_files = list(pd.unique(source.loc[source["split"] == "train", "path"]))
    assert files["val"] == set(train_files[fm.VAL_EVERY_FILE - 1::fm.VAL_EVERY_FILE])
    assert table["label"].tolist() == source["label"].tolist() and table["label"].notna().all()

    # fine-tuning reads the same splits and labels, from the generator's folder, in the set's sample mode
    args = fm.finetune_args(Path("teacher.pt"), labelled, tmp_path / "out", "lora", False, [])
    cfg = ft.COMMAND_LINE.load(ft.COMMAND_LINE.parse(args))
    assert cfg.data.mode == SampleMode(mode) and list(cfg.finetune.label_columns) == ["label"]
    splits = ft.read_splits(cfg)
    assert not splits.val_carved
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(splits, name), np.flatnonzero(table["split"] == name))

    # the frozen k-NN's reader: the checkpoint's data settings, the set's mode; a row reads as one cell
    channels = list(source["channels"].iloc[0].split(";"))
    data = load_config(None, [f"data.channels=[{','.join(channels)}]"]).data
    encoder = SimpleNamespace(config=SimpleNamespace(data=data), crop_size=48, channels=channels,
                              vocabulary=ChannelVocabulary.from_config(data), preprocess=SimpleNamespace(bounds=None))
    reader = fm.labelled_reader(encoder, labelled, table)
    assert reader.kind(0) == SampleMode(mode)
    sample = reader.read(int(np.flatnonzero(table["split"] == "test")[0]))
    assert sample.kind == SampleMode(mode) and sample.pixels.shape[0] == len(channels)
    if mode == "cells":  # a 48-px crop around the centroid of a multi-cell field
        assert sample.pixels.shape[1:] == (48, 48)


def test_multi_label_asks_for_the_demo_generator(capsys):
    assert fm.is_demo_like("demo") and not fm.is_demo_like("hpa")
    assert not fm.is_demo_like("cellvit_ssl.data.generators.hpa:generate")  # the suite's protocol
    with pytest.raises(SystemExit) as exc:
        fm.main(["--generator", "hpa", "--tasks", "multi", "--checkpoint", "teacher.pt"])
    assert exc.value.code == 2
    assert "--generator demo" in capsys.readouterr().err
