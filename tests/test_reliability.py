"""The bad-input and fault matrix: nothing silently wrong, nothing lost, nothing hangs.

Every case is a careless or hostile use of a command or of the API, made from tiny files generated
here: bad data, bad config values, bad checkpoints, filesystem faults (a file where a folder
should be, no permission, a full disk), concurrent runs, and bad API inputs. Each must end in a
named error (exit status 2 on the command line) saying what is wrong, which file / row / key /
flag, what was kept and how to continue; never in a traceback, a hang, a silently wrong file or
lost work. The README's reliability section lists these promises.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from conftest import TINY_OVERRIDES

import cellvit_ssl.curate as curate_cli
import cellvit_ssl.embed as embed_cli
import cellvit_ssl.evaluate as evaluate_cli
import cellvit_ssl.io as cio
from cellvit_ssl import load_encoder, train
from cellvit_ssl.checkpoint import ENCODER_FORMAT, load_checkpoint, save_checkpoint
from cellvit_ssl.config import config_to_dict, load_config
from cellvit_ssl.data.dataset import IndexDataset
from cellvit_ssl.embed_io import ResumableWriter, table_sha256
from cellvit_ssl.errors import CheckpointError, DataError
from cellvit_ssl.models.channels import build_model

ROOT = Path(__file__).resolve().parents[1]
CHANNELS = ["nucleus", "microtubules", "er", "protein"]
QUIET = ["train.progress=false", "train.tensorboard=false"]
#: Text that must never reach a user: a traceback, a worker's traceback, torch's advice to unpickle code.
NEVER_SHOWN = ("Traceback (most recent call last)", "Original Traceback", "weights_only", "will likely succeed")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clean(text: str) -> None:
    for bad in NEVER_SHOWN:
        assert bad not in text, f"{bad!r} shown to the user:\n{text}"


def _ome_tiff(path: Path, image: np.ndarray, names=CHANNELS) -> Path:
    tifffile.imwrite(path, image, ome=True, metadata={"axes": "CYX", "Channel": {"Name": list(names)}})
    return path


# ------------------------------------------------------------------------------------------ files
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny encoder export, two 4-channel OME-TIFF fields with masks, and an 8-cell index."""
    d = tmp_path_factory.mktemp("files")
    cfg = load_config(None, [*TINY_OVERRIDES, f"data.demo.cache_dir={d / 'demo'}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, CHANNELS)
    save_checkpoint({"format": ENCODER_FORMAT, "config": config_to_dict(cfg), "backbone": model.state_dict()},
                    d / "teacher.pt")
    rng = np.random.default_rng(0)
    rows = []
    for f in range(2):
        image = rng.poisson(50, size=(4, 64, 64)).astype(np.uint16)
        labels = np.zeros((64, 64), np.int32)
        for k, (y, x) in enumerate([(10, 12), (40, 20), (30, 50), (55, 55)], start=1):
            labels[max(y - 5, 0) : y + 5, max(x - 5, 0) : x + 5] = k + 10 * f
            image[:, max(y - 5, 0) : y + 5, max(x - 5, 0) : x + 5] += np.uint16(30 * k)
        _ome_tiff(d / f"f{f}.ome.tif", image)
        tifffile.imwrite(d / f"f{f}_labels.tif", labels)
        for k in np.unique(labels)[1:]:
            ys, xs = np.nonzero(labels == k)
            rows.append({"path": f"f{f}.ome.tif", "centroid_y": ys.mean(), "centroid_x": xs.mean(),
                         "label": f"c{k % 2}", "split": "train" if k % 2 else "test"})
    pd.DataFrame(rows).to_csv(d / "index.csv", index=False)
    return d


def _embed(files: Path, out: Path, *args: str) -> list[str]:
    return [str(files / "teacher.pt"), "--out", str(out), "--no-progress", *args]


def _index(files: Path, tmp: Path, name: str, edit) -> Path:
    table = pd.read_csv(files / "index.csv")
    table["path"] = [str(files / p) for p in table["path"]]
    table = edit(table) if edit is not None else table
    path = tmp / f"{name}.csv"
    table.to_csv(path, index=False)
    return path


# ------------------------------------------------------------------------------------------ data
def _with_file(files: Path, tmp: Path, name: str, image: np.ndarray, names=CHANNELS):
    _ome_tiff(tmp / f"{name}.ome.tif", image, names)

    def edit(t: pd.DataFrame) -> pd.DataFrame:
        t.loc[1, "path"] = str(tmp / f"{name}.ome.tif")
        return t

    return ["--index", str(_index(files, tmp, name, edit))]


def _case_swapped_index(files, tmp):
    def edit(t):
        t["channels"] = "protein;er;microtubules;nucleus"
        return t

    return ["--index", str(_index(files, tmp, "swapped", edit))]


def _case_swapped_images(files, tmp):
    return ["--images", str(files / "f0.ome.tif"), "--channels", "protein,er,microtubules,nucleus"]


def _case_nan_centroid(files, tmp):
    def edit(t):
        t.loc[2, "centroid_y"] = np.nan
        return t

    return ["--index", str(_index(files, tmp, "nan_centroid", edit))]


def _case_text_centroid(files, tmp):
    def edit(t):
        t["centroid_y"] = t["centroid_y"].astype(object)
        t.loc[2, "centroid_y"] = "abc"
        return t

    return ["--index", str(_index(files, tmp, "text_centroid", edit))]


def _case_mask_of_another_shape(files, tmp):
    tifffile.imwrite(tmp / "small_labels.tif", np.pad(np.ones((10, 10), np.int32), 45))
    return ["--images", str(files / "f0.ome.tif"), "--labels", str(tmp / "small_labels.tif")]


def _case_blank_image(files, tmp):
    _ome_tiff(tmp / "blank.ome.tif", np.full((4, 64, 64), 7, np.uint16))
    return ["--images", str(tmp / "blank.ome.tif")]


def _case_truncated_ome_tiff(files, tmp):
    data = (files / "f0.ome.tif").read_bytes()
    (tmp / "cut.ome.tif").write_bytes(data[: len(data) // 2])
    return ["--images", str(tmp / "cut.ome.tif")]


def _case_nan_pixels(files, tmp):
    image = np.random.default_rng(1).poisson(50, (4, 64, 64)).astype(np.float32)
    image[2, 30, 30] = np.nan
    return _with_file(files, tmp, "nan_pixels", image)


def _case_missing_channel(files, tmp):
    image = np.random.default_rng(1).poisson(50, (3, 64, 64)).astype(np.uint16)
    return _with_file(files, tmp, "three", image, CHANNELS[:3])


def _case_unknown_channel(files, tmp):
    image = np.random.default_rng(1).poisson(50, (4, 64, 64)).astype(np.uint16)
    return _with_file(files, tmp, "unknown", image, [*CHANNELS[:3], "zzfoo"])


DATA_CASES = {
    # case: (make the arguments, fragments the message must hold)
    "swapped_index_channels": (_case_swapped_index, ["f0.ome.tif", "would be swapped", "row 0"]),
    "swapped_images_channels": (_case_swapped_images, ["f0.ome.tif", "would be swapped", "--channels"]),
    "nan_centroid": (_case_nan_centroid, ["row 2", "centroid_y=nan is not a finite number"]),
    "text_centroid": (_case_text_centroid, ["row 2", "centroid_y='abc' is not a number"]),
    "mask_of_another_shape": (_case_mask_of_another_shape, ["small_labels.tif", "(100, 100)", "64x64"]),
    "blank_image": (_case_blank_image, ["blank.ome.tif", "row 0", "blank"]),
    "truncated_ome_tiff": (_case_truncated_ome_tiff, ["cut.ome.tif", "truncated"]),
    "nan_pixels": (_case_nan_pixels, ["nan_pixels.ome.tif", "row 1", "1 NaN or Inf pixels"]),
    "missing_channel": (_case_missing_channel, ["three.ome.tif", "row 1", "missing ['protein']", "--allow-missing"]),
    "unknown_channel": (_case_unknown_channel, ["unknown.ome.tif", "row 1", "'zzfoo'", "--channels"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_is_refused_by_embed_naming_the_file_and_row(files, tmp_path, capsys, caplog, case):
    make, fragments = DATA_CASES[case]
    out = tmp_path / "out.h5ad"
    code = embed_cli.main(_embed(files, out, *make(files, tmp_path)))
    err = capsys.readouterr().err
    assert code == 2, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    _clean(err)
    assert not [r.getMessage() for r in caplog.records if r.name == "tifffile"], "tifffile's log lines leaked"
    assert err.count("\n") == 1 and err.startswith("error: "), "one line, the named error only"
    assert not out.exists()


def test_a_truncated_tiff_is_named_truncated_in_the_api_too(files, tmp_path):
    from cellvit_ssl.data.readers import open_stack

    data = (files / "f0.ome.tif").read_bytes()
    for n in (len(data) // 2, 600):
        (tmp_path / "cut.ome.tif").write_bytes(data[:n])
        with pytest.raises(DataError, match=r"cut.ome.tif: the file is truncated"):
            open_stack(tmp_path / "cut.ome.tif")
    plain = np.random.default_rng(0).integers(1, 900, (4, 32, 32)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "plain.tif", plain)  # no OME metadata: the truncation must still be seen
    data = (tmp_path / "plain.tif").read_bytes()
    (tmp_path / "plain_cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        open_stack(tmp_path / "plain_cut.tif", channel_names=CHANNELS).read()


def test_skip_bad_skips_and_counts_a_non_numeric_centroid(files):
    table = pd.read_csv(files / "index.csv")
    table["centroid_y"] = table["centroid_y"].astype(object)
    table.loc[2, "centroid_y"] = "abc"
    data = IndexDataset(table, CHANNELS, root=files, sample_size=16, skip_bad=True)
    assert data[2]["index"] != 2 and data.bad_samples == 1
    strict = IndexDataset(table, CHANNELS, root=files, sample_size=16)
    with pytest.raises(DataError, match="row 2: centroid_y='abc' is not a number"):
        strict[2]


# ------------------------------------------------------------------------------------------ config
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo data, generated once for every training case."""
    cache = tmp_path_factory.mktemp("demo")
    train.resolve_index(load_config(None, [*TINY_OVERRIDES, f"data.demo.cache_dir={cache}"]))
    return cache


def _train_args(demo: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, *QUIET, f"data.demo.cache_dir={demo}", f"train.output_dir={out}", *extra]


TRAIN_CONFIG_CASES = {
    "device_cuda_x": (["train.device=cuda:x"], "train.device='cuda:x'; expected auto, cpu, cuda or cuda:N"),
    "device_foo": (["train.device=foo"], "train.device='foo'"),
    "num_workers_negative": (["data.num_workers=-1"], "data.num_workers=-1; expected >= 0"),
    "demo_format_png": (["data.demo.format=png"], "'data.demo.format'"),
    "student_temp_zero": (["ssl.student_temp=0"], "ssl.student_temp=0.0; expected a temperature > 0"),
    "teacher_temp_negative": (["ssl.teacher_temp=-1"], "ssl.teacher_temp=-1.0; expected a temperature > 0"),
    "percentiles_reversed": (["data.normalize_percentiles=[99,1]"], "data.normalize_percentiles=[99.0, 1.0]"),
    "percentiles_one_value": (["data.normalize_percentiles=[1]"], "data.normalize_percentiles=[1.0]"),
    "heads_do_not_divide_width": (["model.embed_dim=30", "model.num_heads=4"], "model.embed_dim=30"),
    "pretrained_missing": (["model.pretrained=/nonexistent/weights.pth"], "/nonexistent/weights.pth"),
}


@pytest.mark.parametrize("case", list(TRAIN_CONFIG_CASES))
def test_a_refused_training_config_writes_nothing(demo, tmp_path, capsys, case):
    extra, fragment = TRAIN_CONFIG_CASES[case]
    out = tmp_path / "run"
    assert train.main(_train_args(demo, out, *extra)) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    _clean(err)
    assert not out.exists(), "a refused run must not create its folder"
    assert list(tmp_path.iterdir()) == [], "nor leave anything beside it"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_by_every_command(demo, files, tmp_path, capsys):
    assert train.main(_train_args(demo, tmp_path / "run", "train.device=cuda")) == 2
    assert "train.device='cuda' but CUDA is not available" in capsys.readouterr().err
    assert embed_cli.main(_embed(files, tmp_path / "o.h5ad", "--index", str(files / "index.csv"), "--device",
                                 "cuda")) == 2
    assert "embed.device (--device)='cuda' but no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "o.h5ad").exists()


EMBED_CONFIG_CASES = {
    "device_foo": (["--device", "foo"], "embed.device (--device)='foo'"),
    "crop_size_zero": (["--crop-size", "0"], "data.sample_size=0 (--crop-size)"),
    "workers_negative": (["--workers", "-1"], "data.num_workers=-1 (--workers); expected >= 0"),
    "batch_size_zero": (["--batch-size", "0"], "data.batch_size=0 (--batch-size); expected >= 1"),
    "chunk_rows_zero": (["--chunk-rows", "0"], "embed.chunk_rows=0 (--chunk-rows)"),
    "unknown_pooling": (["--pooling", "zzz"], "pooling='zzz'"),
    "contract_key": (["data.normalize=none"], "data.normalize is part of the model's preprocessing contract"),
}


@pytest.mark.parametrize("case", list(EMBED_CONFIG_CASES))
def test_a_refused_embed_config_names_the_key_and_flag(files, tmp_path, capsys, case):
    extra, fragment = EMBED_CONFIG_CASES[case]
    out = tmp_path / "o.h5ad"
    assert embed_cli.main(_embed(files, out, "--index", str(files / "index.csv"), *extra)) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    _clean(err)
    assert list(tmp_path.iterdir()) == []
    assert "note:" not in err, "no note about settings that are then refused"


@pytest.fixture(scope="module")
def embedded(files, tmp_path_factory):
    """The index embedded once (the reference output)."""
    out = tmp_path_factory.mktemp("embedded") / "cells.h5ad"
    assert embed_cli.main(_embed(files, out, "--index", str(files / "index.csv"), "--chunk-rows", "3")) == 0
    return out


def _evaluate(path: Path, *extra: str) -> list[str]:
    return [str(path), "--label-key", "label", "--split-key", "split", "--no-baselines", *extra]


@pytest.mark.parametrize("extra, fragment", [
    (["--k", "0"], "evaluate.k=0; expected >= 1"),
    (["--pca", "0"], "evaluate.pca=0; expected >= 1"),
    (["--pixel-size", "0"], "evaluate.pixel_size=0; expected >= 1"),
    (["--device", "foo"], "evaluate.device (--device)='foo'"),
])
def test_a_refused_evaluate_config_names_the_key(embedded, tmp_path, capsys, extra, fragment):
    code = evaluate_cli.main(_evaluate(embedded, "--json", str(tmp_path / "r.json"), *extra))
    captured = capsys.readouterr()
    assert code == 2 and fragment in captured.err, captured.err
    assert captured.out == "" and not (tmp_path / "r.json").exists(), "refused before any scoring"


def test_evaluate_says_when_k_exceeds_the_training_rows(embedded, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert evaluate_cli.main(_evaluate(embedded, "--k", "100000", "--json", str(out))) == 0
    err = capsys.readouterr().err
    assert "evaluate.k=100000 (--k) is more than the 4 training rows" in err
    assert "majority votes over all training rows" in json.loads(out.read_text())["k_note"]


def test_evaluate_refuses_nan_embeddings_naming_the_rows(embedded, tmp_path, capsys):
    adata = anndata.read_h5ad(embedded)
    adata.X[3, 5] = np.nan
    adata.X[6] = np.inf
    path = tmp_path / "nan.h5ad"
    adata.write_h5ad(path)
    assert evaluate_cli.main(_evaluate(path)) == 2
    err = capsys.readouterr().err
    assert "2 of 8 embeddings hold NaN / Inf (rows [3, 6])" in err and "--overwrite" in err
    _clean(err)
    assert not path.with_suffix(".eval.json").exists()


# ------------------------------------------------------------------------------------------ checkpoints
def _bad_checkpoint(tmp: Path, kind: str) -> Path:
    path = tmp / f"{kind}.pt"
    if kind == "no_config":
        torch.save({"format": ENCODER_FORMAT, "backbone": {}}, path)
    elif kind == "malicious":
        marker = tmp / "pwned"

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save({"format": ENCODER_FORMAT, "x": Payload()}, path)
    elif kind == "numpy_objects":
        torch.save({"format": ENCODER_FORMAT, "x": np.zeros(3)}, path)
    elif kind == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 100)
    elif kind == "not_cellvit":
        torch.save({"weights": torch.zeros(2)}, path)
    return path


CHECKPOINT_CASES = {
    "no_config": "holds no run config",
    "malicious": "it references posix.system",
    "numpy_objects": "holds Python objects other than tensors and plain data",
    "garbage": "truncated, corrupt or not a torch checkpoint",
    "truncated": "truncated, corrupt",
    "not_cellvit": "is not a cellvit_ssl checkpoint",
}


@pytest.mark.parametrize("kind", list(CHECKPOINT_CASES))
def test_a_bad_checkpoint_is_refused_by_embed_and_the_api(files, tmp_path, capsys, kind):
    if kind == "truncated":
        data = (files / "teacher.pt").read_bytes()
        (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
        path = tmp_path / "truncated.pt"
    else:
        path = _bad_checkpoint(tmp_path, kind)
    fragment = CHECKPOINT_CASES[kind]
    if kind == "malicious":
        fragment = "it references " + ("posix" if os.name == "posix" else "nt") + ".system"
    code = embed_cli.main([str(path), "--index", str(files / "index.csv"), "--out", str(tmp_path / "o.h5ad")])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err, err
    _clean(err)
    with pytest.raises(CheckpointError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as info:
        load_encoder(path, device="cpu")
    _clean(str(info.value))
    assert not (tmp_path / "pwned").exists(), "the file's code must never run"
    assert not (tmp_path / "o.h5ad").exists()


@pytest.fixture(scope="module")
def step_one_run(demo, tmp_path_factory):
    """A run folder stopped after its first of two steps (train.max_steps=1)."""
    out = tmp_path_factory.mktemp("step_one") / "run"
    assert train.main(_train_args(demo, out, "train.max_steps=1", "train.log_every=1")) == 0
    return out


def _copy_run(run: Path, tmp: Path) -> Path:
    out = tmp / "run"
    shutil.copytree(run, out)
    return out


def test_a_model_change_on_an_existing_run_is_refused_before_anything_is_rewritten(demo, step_one_run, tmp_path,
                                                                                    capsys):
    out = _copy_run(step_one_run, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert train.main(_train_args(demo, out, "model.depth=3")) == 2
    err = capsys.readouterr().err
    assert "was trained with other settings (model.depth: 2 -> 3" in err, err
    assert "in another folder (train.output_dir=...)" in err
    _clean(err)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before, "config.yaml, checkpoints and metrics are untouched"


def test_resuming_a_state_with_missing_or_extra_entries_is_refused():
    from cellvit_ssl.distributed import load_full_state_dict

    small, large = torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.Sequential(torch.nn.Linear(2, 2),
                                                                                  torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"lacks 2 entries of this model \['1.bias', '1.weight'\]"):
        load_full_state_dict(large, None, small.state_dict(), None)
    with pytest.raises(ValueError, match="has 2 it does not know"):
        load_full_state_dict(small, None, large.state_dict(), None)


def test_the_epoch_summary_after_a_resume_says_what_it_averages(demo, step_one_run, tmp_path, capsys):
    out = _copy_run(step_one_run, tmp_path)
    # the run to its end: the stop after step 1 (train.max_steps=1) is a setting that changes
    assert train.main(_train_args(demo, out, "train.log_every=1", "train.allow_config_change=[train.max_steps]")) == 0
    captured = capsys.readouterr()
    assert "resumed at step 1" in captured.out
    assert "mean of the 1 steps since the resume, of 2 in the epoch" in captured.out + captured.err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2], "the metrics JSONL holds every step of the epoch"


# ------------------------------------------------------------------------------------------ filesystem
@pytest.fixture
def disk_full(monkeypatch):
    """Make the atomic rename onto a path ending in ``name`` fail as on a full disk (or with another errno)."""

    def arm(name: str, code: int = errno.ENOSPC):
        real = os.replace

        def replace(src, dst, *args, **kwargs):
            if str(dst).endswith(name):
                raise OSError(code, os.strerror(code), str(dst))
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
        return monkeypatch

    return arm


def _a_file(tmp: Path) -> Path:
    path = tmp / "a_file"
    path.write_text("not a folder")
    return path


def test_train_output_dir_under_a_file_is_a_named_error(demo, tmp_path, capsys):
    assert train.main(_train_args(demo, _a_file(tmp_path) / "run")) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a_file'} is a file, not a folder" in err
    _clean(err)


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full"),
                                          (errno.EACCES, "permission denied")])
def test_a_checkpoint_that_cannot_be_written_keeps_the_last_one_and_the_run_resumes(demo, tmp_path, capsys,
                                                                                    disk_full, code, words):
    out = tmp_path / "run"
    args = _train_args(demo, out, "train.checkpoint_every=1", "train.log_every=1")
    patch = disk_full("checkpoint_00000002.pt", code)
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert words in err and "checkpoint_00000002.pt: writing failed" in err
    assert f"the last complete checkpoint is {out / 'checkpoint_00000001.pt'}" in err
    assert "run the same command again to resume" in err
    _clean(err)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "no half-written file is left"
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 1
    patch.undo()
    assert train.main(args) == 0
    assert "resumed at step 1" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2 and (out / "teacher.pt").is_file()


def test_a_metrics_log_that_cannot_be_written_is_a_named_error(demo, tmp_path, capsys, monkeypatch):
    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(cio, "open", lambda path, *a, **k: FullDisk() if str(path).endswith("metrics.jsonl")
                        else open(path, *a, **k), raising=False)
    out = tmp_path / "run"
    assert train.main(_train_args(demo, out, "train.log_every=1")) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl: writing failed: the disk is full" in err and "the checkpoints in" in err
    _clean(err)


def test_embed_out_under_a_file_is_refused_before_embedding(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(embed_cli, "featurize_rows", lambda *a: pytest.fail("nothing is embedded"))
    out = _a_file(tmp_path) / "cells.h5ad"
    assert embed_cli.main(_embed(files, out, "--index", str(files / "index.csv"))) == 2
    err = capsys.readouterr().err
    assert "embed.out" in err and f"{tmp_path / 'a_file'} is a file, not a folder" in err


@pytest.mark.parametrize("fail_at", ["chunk", "final"])
def test_embed_on_a_full_disk_keeps_its_chunks_and_resumes(files, embedded, tmp_path, capsys, disk_full,
                                                           monkeypatch, fail_at):
    out = tmp_path / "cells.h5ad"
    args = _embed(files, out, "--index", str(files / "index.csv"), "--chunk-rows", "3")
    patch = disk_full("chunk_0000000003.npz" if fail_at == "chunk" else "cells.h5ad")
    assert embed_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and f"the finished chunks are kept in {out}.partial" in err
    assert "run the same command again" in err
    _clean(err)
    kept = sorted(p.name for p in (tmp_path / "cells.h5ad.partial").glob("chunk_*.npz"))
    assert kept == (["chunk_0000000000.npz"] if fail_at == "chunk"
                    else ["chunk_0000000000.npz", "chunk_0000000003.npz", "chunk_0000000006.npz"])
    patch.undo()
    embedded_rows = []
    real = embed_cli.featurize_rows
    monkeypatch.setattr(embed_cli, "featurize_rows", lambda r, rows, f, w: embedded_rows.extend(rows)
                        or real(r, rows, f, w))
    assert embed_cli.main(args) == 0
    assert embedded_rows == ([3, 4, 5, 6, 7] if fail_at == "chunk" else []), "finished chunks are not recomputed"
    np.testing.assert_array_equal(anndata.read_h5ad(out).X, anndata.read_h5ad(embedded).X)


def test_evaluate_json_that_cannot_be_written_is_refused_before_scoring(embedded, tmp_path, capsys):
    assert evaluate_cli.main(_evaluate(embedded, "--json", str(_a_file(tmp_path) / "r.json"))) == 2
    captured = capsys.readouterr()
    assert "evaluate.json (--json)" in captured.err and "is a file, not a folder" in captured.err
    assert captured.out == "", "refused before any scoring"


def test_evaluate_json_on_a_full_disk_is_a_named_error(embedded, tmp_path, capsys, disk_full):
    out = tmp_path / "r.json"
    disk_full("r.json")
    assert evaluate_cli.main(_evaluate(embedded, "--json", str(out))) == 2
    err = capsys.readouterr().err
    assert f"{out}: writing failed: the disk is full (or the quota is used up); nothing was written" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fault", ["under_a_file", "disk_full"])
def test_a_stats_cache_that_cannot_be_written_is_a_warning_not_lost_work(files, tmp_path, caplog, disk_full, fault):
    cache = (_a_file(tmp_path) / "stats.json") if fault == "under_a_file" else tmp_path / "stats.json"
    if fault == "disk_full":
        disk_full("stats.json")
    data = IndexDataset(files / "index.csv", CHANNELS, sample_size=16, normalize="dataset", stats_cache=cache)
    assert data.stats is not None and set(data.stats.low) == set(CHANNELS)
    assert "channel statistics are not cached (data.stats_cache)" in caplog.text
    assert ("is a file, not a folder" if fault == "under_a_file" else "the disk is full") in caplog.text
    assert not cache.exists()


def test_demo_cache_dir_under_a_file_is_a_named_error(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY_OVERRIDES, *QUIET, f"data.demo.cache_dir={_a_file(tmp_path) / 'demo'}", f"train.output_dir={out}"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "data.demo.cache_dir=" in err and "is a file, not a folder" in err
    assert not out.exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_by_every_command(files, embedded, demo, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert train.main(_train_args(demo, locked / "run")) == 2
        assert "permission denied" in capsys.readouterr().err
        assert embed_cli.main(_embed(files, locked / "o.h5ad", "--index", str(files / "index.csv"))) == 2
        assert "permission denied" in capsys.readouterr().err
        assert evaluate_cli.main(_evaluate(embedded, "--json", str(locked / "r.json"))) == 2
        assert "permission denied" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------------------------------ concurrency
HOLD_LOCK = """
import sys, time
from cellvit_ssl.io import exclusive_lock
with exclusive_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the output lock of a path; yields its Popen."""
    procs = []

    def start(target: Path) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(target)], stdout=subprocess.PIPE, text=True,
                                env=env)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=30)


def test_a_second_embed_on_the_same_output_is_refused_naming_the_holder(files, tmp_path, capsys, holder):
    out = tmp_path / "cells.h5ad"
    proc = holder(out)
    assert embed_cli.main(_embed(files, out, "--index", str(files / "index.csv"))) == 2
    err = capsys.readouterr().err
    assert f"{out} is being written by process {proc.pid}" in err and "choose another output" in err
    assert not out.exists() and not (tmp_path / "cells.h5ad.partial").exists()
    proc.kill()
    proc.wait(timeout=30)  # a killed holder leaves no lock behind
    assert embed_cli.main(_embed(files, out, "--index", str(files / "index.csv"))) == 0
    assert not (tmp_path / "cells.h5ad.lock").exists()


def test_a_second_training_run_on_the_same_output_dir_is_refused(demo, tmp_path, capsys, holder):
    out = tmp_path / "run"
    proc = holder(out)
    assert train.main(_train_args(demo, out)) == 2
    err = capsys.readouterr().err
    assert f"{out} is being written by process {proc.pid}" in err
    assert not out.exists(), "the refused run wrote nothing"


@pytest.mark.parametrize("where", ["same", "inside"])
def test_embed_never_writes_over_its_input(demo, files, tmp_path, capsys, where):
    image = sorted((demo / "images").glob("*.ome.zarr"))[0]
    copy = tmp_path / image.name
    shutil.copytree(image, copy)
    before = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    out = copy if where == "same" else copy / "cells.zarr"
    assert embed_cli.main(_embed(files, out, "--images", str(copy), "--overwrite")) == 2
    assert "would be written over the input" in capsys.readouterr().err
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == before


def _curate_inputs(folder: Path, index_name: str = "index.csv", features_name: str = "emb.h5ad") -> list[str]:
    """A 60-row index and embed-style features of it; returns curate's arguments without ``curate.out``."""
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"path": [f"f{i // 10}.tif" for i in range(60)], "cell_id": np.arange(60),
                          "centroid_y": 5.0, "centroid_x": 5.0, "label": np.repeat(list("ab"), 30)})
    index, features = folder / index_name, folder / features_name
    features.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(index, index=False)
    obs = table.set_axis(table.index.astype(str))
    fingerprint = json.dumps({"index_sha256": table_sha256(table)})
    anndata.AnnData(X=rng.normal(size=(60, 8)).astype(np.float32), obs=obs,
                    uns={"embed": {"fingerprint": fingerprint}}).write_h5ad(features)
    return [f"data.index={index}", f"curate.features={features}", "curate.progress=false", "curate.backend=sklearn",
            "curate.clusters=[4]"]


def test_a_second_curate_on_the_same_output_is_refused_naming_the_holder(tmp_path, capsys, holder):
    out = tmp_path / "cur.csv"
    args = [*_curate_inputs(tmp_path), f"curate.out={out}"]
    proc = holder(out)
    assert curate_cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"{out} is being written by process {proc.pid}" in err and "choose another output" in err
    assert not out.exists() and not (tmp_path / "cur.csv.partial").exists()
    proc.kill()
    proc.wait(timeout=30)  # a killed holder leaves no lock behind
    assert curate_cli.main(args) == 0, capsys.readouterr().err
    assert out.is_file() and not (tmp_path / "cur.csv.lock").exists()


@pytest.mark.parametrize("inputs", [{"index_name": "cur.all.csv"}, {"features_name": "cur.csv.partial/emb.h5ad"}])
def test_curate_never_writes_over_its_inputs(tmp_path, capsys, inputs):
    args = [*_curate_inputs(tmp_path, **inputs), f"curate.out={tmp_path / 'cur.csv'}", "curate.overwrite=true"]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert curate_cli.main(args) == 2
    assert "over the input" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before, "the refused run wrote nothing"


def test_a_damaged_chunk_in_a_partial_output_is_recomputed(files, embedded, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cells.h5ad"
    args = _embed(files, out, "--index", str(files / "index.csv"), "--chunk-rows", "3")
    real_save = ResumableWriter.save
    saved = []

    def save_then_stop(self, start, *rest):
        real_save(self, start, *rest)
        saved.append(start)
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ResumableWriter, "save", save_then_stop)
    assert embed_cli.main(args) == 130
    monkeypatch.setattr(ResumableWriter, "save", real_save)
    chunk = tmp_path / "cells.h5ad.partial" / "chunk_0000000003.npz"
    chunk.write_bytes(chunk.read_bytes()[:40])  # a chunk cut short (BadZipFile when read)
    capsys.readouterr()
    assert embed_cli.main(args) == 0
    assert "chunk_0000000003.npz was damaged and is recomputed" in capsys.readouterr().err
    np.testing.assert_array_equal(anndata.read_h5ad(out).X, anndata.read_h5ad(embedded).X)


def test_a_run_that_failed_before_its_first_chunk_does_not_block_the_next(files, tmp_path, capsys):
    out = tmp_path / "cells.h5ad"
    blank = tmp_path / "blank.ome.tif"
    _ome_tiff(blank, np.full((4, 64, 64), 7, np.uint16))
    assert embed_cli.main(_embed(files, out, "--images", str(blank))) == 2
    assert embed_cli.main(_embed(files, out, "--index", str(files / "index.csv"))) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------------ hangs
def _bad_index(demo: Path, tmp: Path) -> Path:
    """The demo index with one row pointing at a file that is not a TIFF (a DataError when read)."""
    table = pd.read_csv(demo / "index_ome-zarr.csv")
    (tmp / "broken.ome.tif").write_bytes(b"II*\x00" + b"garbage" * 10)
    table.loc[len(table) // 2, "path"] = str(tmp / "broken.ome.tif")
    table.loc[:, "path"] = [p if Path(p).is_absolute() else str(demo / p) for p in table["path"]]
    table.to_csv(tmp / "bad.csv", index=False)
    return tmp / "bad.csv"


def test_a_worker_error_reaches_the_main_process_as_itself_and_the_workers_stop(demo, tmp_path):
    index = _bad_index(demo, tmp_path)
    cfg = load_config(None, _train_args(demo, tmp_path / "run", "data.demo.enabled=false", f"data.index={index}",
                                        "data.num_workers=1"))
    try:
        loader = train.build_loader(cfg)
        loader.sampler.set_position(0)
        items = list(iter(loader))
        errors = [b for b in items if isinstance(b, Exception)]
        assert len(errors) == 1 and isinstance(errors[0], DataError)
        assert str(errors[0]).startswith(f"{tmp_path / 'broken.ome.tif'}: ")
        _clean(str(errors[0]))
        train.shutdown_workers(loader)
        assert not multiprocessing.active_children()

        with pytest.raises(DataError, match="broken.ome.tif"):
            train.run(cfg)
        assert not multiprocessing.active_children(), "run() leaves no loader worker behind"
    finally:  # workers ignore SIGTERM: left alive, they would hang this test process at its exit
        for child in multiprocessing.active_children():
            child.kill()
            child.join(timeout=10)


HARNESS = """
import os, signal, sys, time
import torch
torch.set_num_threads(1)
from cellvit_ssl import train
print(f"STARTED {time.monotonic()}", file=sys.stderr, flush=True)  # imports done: the run, its end, its exit
if os.environ.get("INTERRUPT_AT"):  # Ctrl-C: SIGINT to the whole process group, workers included
    step = int(os.environ["INTERRUPT_AT"])
    real = train.Trainer._train_step
    def _train_step(self, *args, **kwargs):
        if self.step + 1 == step:
            os.killpg(os.getpgid(0), signal.SIGINT)
        return real(self, *args, **kwargs)
    train.Trainer._train_step = _train_step
sys.exit(train.main(sys.argv[1:]))
"""


def _train_process(tmp: Path, args: list[str], timeout: float, **env) -> tuple[int, str, float]:
    """Run training in a subprocess (its own process group).

    Returns:
        ``(exit status, stderr, seconds from the end of the imports to the process's exit)``.
    """
    harness = tmp / "harness.py"
    harness.write_text(textwrap.dedent(HARNESS))
    proc = subprocess.Popen([sys.executable, str(harness), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env})
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the run did not exit within {timeout} s (it hangs)")
    ended = time.monotonic()  # CLOCK_MONOTONIC: the same clock in both processes
    started = [line for line in err.splitlines() if line.startswith("STARTED ")]
    assert started, err
    return proc.returncode, err.replace(started[0] + "\n", ""), ended - float(started[0].split()[1])


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_data_error_ends_the_run_in_seconds(demo, tmp_path, workers):
    index = _bad_index(demo, tmp_path)
    args = _train_args(demo, tmp_path / "run", "data.demo.enabled=false", f"data.index={index}",
                       f"data.num_workers={workers}", "train.epochs=3")
    code, err, seconds = _train_process(tmp_path, args, timeout=120)
    assert code == 2, err
    assert f"error: {tmp_path / 'broken.ome.tif'}: " in err
    _clean(err)
    assert seconds < 20, f"{seconds:.0f} s from start to exit"


@pytest.mark.slow
def test_ctrl_c_with_loader_workers_ends_the_run_with_a_message(demo, tmp_path):
    args = _train_args(demo, tmp_path / "run", "data.num_workers=2", "train.epochs=3", "train.checkpoint_every=1")
    code, err, seconds = _train_process(tmp_path, args, timeout=120, INTERRUPT_AT="3")
    assert code == 130, err
    assert "interrupted; the last checkpoint written is kept" in err
    _clean(err)
    assert seconds < 20, f"{seconds:.0f} s from start to exit"
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2


@pytest.mark.slow
def test_a_killed_run_leaves_no_loader_worker_behind(demo, tmp_path):
    args = _train_args(demo, tmp_path / "run", "data.num_workers=2", "train.epochs=100000")
    proc = subprocess.Popen([sys.executable, "-m", "cellvit_ssl.train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    workers = []
    try:
        for line in proc.stdout:  # the epoch summaries: the workers are running
            if line.startswith("epoch 2/"):
                break
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        proc.kill()  # kill -9: nothing in the run can clean up
        proc.wait(timeout=30)

        def alive() -> list[str]:  # a zombie (state Z) has exited
            return [w for w in workers if Path(f"/proc/{w}").exists()
                    and Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]

        deadline = time.monotonic() + 20
        while alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive(), "loader workers outlived their killed run"
    finally:  # the run and any worker left of it share the run's process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------ API
@pytest.fixture(scope="module")
def encoder(files):
    return load_encoder(files / "teacher.pt", device="cpu")


def _field(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(50, (4, 64, 64)).astype(np.float32)


API_CASES = {
    "ragged_list": (lambda enc: enc.embed([[[1, 2], [3]]], CHANNELS), "not a regular array"),
    "string": (lambda enc: enc.embed("image.tif", CHANNELS), "got a string"),
    "batch_size_text": (lambda enc: enc.embed(_field(), CHANNELS, batch_size="2"), "batch_size='2'"),
    "batch_size_zero": (lambda enc: enc.embed(_field(), CHANNELS, batch_size=0), "batch_size=0"),
    "patch_size_zero": (lambda enc: enc.patch_features(_field(), CHANNELS, size=0), "size=0"),
    "bool_pixels": (lambda enc: enc.embed(_field() > 50, CHANNELS), "dtype bool"),
    "complex_pixels": (lambda enc: enc.embed(_field().astype(np.complex64), CHANNELS), "dtype complex64"),
    "five_dims": (lambda enc: enc.embed(_field()[None, None], CHANNELS), "got shape (1, 1, 4, 64, 64)"),
    "channels_last": (lambda enc: enc.embed(np.moveaxis(_field(), 0, -1), CHANNELS), "is the channel axis last?"),
    "channels_as_text": (lambda enc: enc.embed(_field(), "nucleus,er"), "as a list"),
    "same_channel_twice": (lambda enc: enc.embed(_field(), ["nucleus", "nucleus", "er", "protein"]),
                           "name the same channel twice"),
    "missing_channel": (lambda enc: enc.embed(_field()[:3], CHANNELS[:3]), "allow_missing=True"),
    "empty_batch": (lambda enc: enc.embed(np.zeros((0, 4, 64, 64)), CHANNELS), "the images are empty"),
    "nan_pixels": (lambda enc: enc.embed(np.where(_field() > 60, np.nan, _field()), CHANNELS), "NaN or Inf"),
    "mask_of_another_shape": (lambda enc: enc.embed_cells(_field(), np.ones((32, 32), int), CHANNELS),
                              "the label mask has shape (32, 32)"),
    "float_mask": (lambda enc: enc.embed_cells(_field(), np.ones((64, 64)), CHANNELS), "integer label image"),
    "crop_size_zero": (lambda enc: enc.embed_cells(_field(), np.ones((64, 64), int), CHANNELS, crop_size=0),
                       "crop_size=0"),
    "tile_size_zero": (lambda enc: enc.embed_tiles(_field(), CHANNELS, tile_size=0), "tile_size=0"),
    "unknown_pooling": (lambda enc: enc.embed(_field(), CHANNELS, pooling="zzz"), "pooling='zzz'"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_bad_api_input_is_a_data_error(encoder, case):
    call, fragment = API_CASES[case]
    with pytest.raises(DataError) as info:
        call(encoder)
    assert fragment in str(info.value)


@pytest.mark.parametrize("scale", [1e39, 1e300])
def test_float64_beyond_float32_range_embeds_like_the_same_image_scaled_down(encoder, scale):
    x = np.random.default_rng(0).normal(size=(4, 64, 64))
    z = encoder.embed(x * scale, CHANNELS)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z, encoder.embed(x, CHANNELS), atol=1e-5, rtol=0)


def test_bf16_tensors_blank_images_and_wide_integers_embed_to_finite_values(encoder):
    x = _field()
    np.testing.assert_allclose(encoder.embed(torch.from_numpy(x).bfloat16(), CHANNELS),
                               encoder.embed(torch.from_numpy(x).bfloat16().float(), CHANNELS), atol=1e-5)
    assert np.isfinite(encoder.embed(np.zeros((4, 64, 64)), CHANNELS)).all()  # blank: no content, no NaN
    assert np.isfinite(encoder.embed((x * 1e17).astype(np.int64), CHANNELS)).all()


def test_unnormalised_model_refuses_values_beyond_float32(encoder):
    from dataclasses import replace

    from cellvit_ssl.encoder import Encoder

    raw = Encoder(encoder.model, encoder.config, "cpu", preprocess=replace(encoder.preprocess, normalize="none"))
    with pytest.raises(DataError, match="exceed float32's range.*data.normalize=none"):
        raw.embed(np.full((4, 64, 64), 1e39), CHANNELS)
