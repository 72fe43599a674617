"""Synthetic generators: files the readers take, the index protocol, determinism, held-out splits."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from cellvit_ssl.data.dataset import IndexDataset
from cellvit_ssl.data.generators import GENERATOR_NAMES, GeneratedSet, get_generator, run_generator
from cellvit_ssl.data.readers import open_stack
from cellvit_ssl.errors import DataError

SMALL = {"hpa": 48, "cellpainting": 108, "wtc": 36}


@pytest.fixture(scope="module", params=GENERATOR_NAMES)
def generated(request, tmp_path_factory):
    name = request.param
    _, fn = get_generator(name)
    out = tmp_path_factory.mktemp(name)
    return name, fn(out, seed=3, n_cells=SMALL[name]), out


def test_index_follows_the_protocol(generated):
    name, data, _ = generated
    assert isinstance(data, GeneratedSet) and data.name == name
    table = pd.read_csv(data.index)
    for column in ("path", "channels", "label", "batch", "split"):
        assert column in table.columns, column
    assert set(table["split"]) == {"train", "test"}
    assert set(table["label"]) == set(data.classes)
    # every class is held out, in about a third of its cells
    held = table[table["split"] == "test"]
    assert set(held["label"]) == set(data.classes)
    assert 0.2 < len(held) / len(table) < 0.45
    assert table["batch"].nunique() >= 3
    assert (table["channels"] == ";".join(data.channels)).all()


def test_files_open_with_their_channel_names(generated):
    _, data, _ = generated
    table = pd.read_csv(data.index)
    stack = open_stack(str(data.index.parent / table["path"].iloc[0]))
    assert list(stack.channel_names) == list(data.channels)
    assert stack.dtype == np.uint16
    pixels = stack.read(None, list(range(len(data.channels))))
    assert pixels.shape[0] == len(data.channels)
    # every channel holds signal above its noise floor somewhere
    assert all(np.percentile(c, 99.5) > np.percentile(c, 10) + 20 for c in pixels)


def test_the_dataset_reads_every_row(generated):
    _, data, _ = generated
    table = pd.read_csv(data.index)
    mode = "cells" if "centroid_y" in table.columns else "image"
    ds = IndexDataset(data.index, channels=list(data.channels), sample_size=48, mode=mode)
    for i in (0, len(ds) - 1):
        image = ds[i]["image"]
        assert tuple(image.shape) == (len(data.channels), 48, 48)


def test_output_is_a_function_of_the_seed(generated, tmp_path):
    name, data, _ = generated
    _, fn = get_generator(name)
    again = fn(tmp_path / "again", seed=3, n_cells=SMALL[name])
    other = fn(tmp_path / "other", seed=4, n_cells=SMALL[name])
    a, b, c = (pd.read_csv(d.index) for d in (data, again, other))
    pd.testing.assert_frame_equal(a, b)
    first = a["path"].iloc[0]
    same = open_stack(str(data.index.parent / first)).read(None, [0])
    assert np.array_equal(same, open_stack(str(again.index.parent / first)).read(None, [0]))
    assert not np.array_equal(same, open_stack(str(other.index.parent / c["path"].iloc[0])).read(None, [0]))


def test_cellpainting_holds_out_whole_fields(tmp_path):
    _, fn = get_generator("cellpainting")
    table = pd.read_csv(fn(tmp_path, seed=0, n_cells=108).index)
    splits_per_file = table.groupby("path")["split"].nunique()
    assert (splits_per_file == 1).all()
    # one treatment per well, every treatment on every plate
    assert (table.groupby("well")["label"].nunique() == 1).all()
    assert (table.groupby("plate")["label"].nunique() == table["label"].nunique()).all()


def test_a_generator_outside_the_package_plugs_in(tmp_path, monkeypatch):
    module = tmp_path / "my_cells.py"
    module.write_text(textwrap.dedent("""
        from pathlib import Path
        from cellvit_ssl.data.generators import hpa

        def make(out_dir, *, seed=0, n_cells=None):
            return hpa.generate(out_dir, seed=seed, n_cells=n_cells).index  # a bare index path
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_cells", raising=False)
    name, fn = get_generator("my_cells:make")
    data = run_generator(name, fn, tmp_path / "out", seed=1, n_cells=16)
    assert data.name == "make" and data.channels == ("nucleus", "microtubules", "er", "protein")
    assert data.batch_key == "batch" and len(data.classes) == 8


@pytest.mark.parametrize("spec, message", [("nope", "unknown generator"), ("no_such_module_xyz:f", "cannot import"),
                                           ("cellvit_ssl.data.generators:nothing", "no callable")])
def test_bad_generator_names_are_clear_errors(spec, message):
    with pytest.raises(DataError, match=message):
        get_generator(spec)
