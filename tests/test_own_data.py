"""A lab's own data, start to finish: docs/own_data.md's walkthroughs on generated files, and the paths.

Each walkthrough runs the commands the document shows (index, train, embed), in-process, on
files made here: HPA PNGs by colour with cellpose-named masks, a Phenix plate, OME-Zarr fields
with label images. Only a tiny model is appended to the ``train`` command.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import TINY_OVERRIDES
from PIL import Image

from cellvit_ssl.data.index import build_folder_index
from cellvit_ssl.data.index import main as index_main
from cellvit_ssl.data.readers import open_stack
from cellvit_ssl.data.samples import ROOT_COLUMN, SampleReader
from cellvit_ssl.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "own_data.md"
#: The tiny model appended to the document's train commands (no demo data: the index is the user's).
TINY_MODEL = [o for o in TINY_OVERRIDES if not o.startswith("data.demo.")] + [
    "data.batch_size=2", "train.progress=false", "train.tensorboard=false"]


def doc_commands(name: str) -> list[list[str]]:
    """The commands of the walkthrough block ``name`` of docs/own_data.md, split as a shell would."""
    match = re.search(rf"<!-- walkthrough: {re.escape(name)} -->\s*```bash\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"docs/own_data.md has no walkthrough block {name!r}"
    text = match.group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.strip()]


def run_doc(name: str, data: Path, placeholder: str) -> list[list[str]]:
    """Run a walkthrough with ``placeholder`` (e.g. /data/hpa) replaced by ``data``; returns the commands run."""
    ran = []
    for argv in doc_commands(name):
        assert argv[:2] == ["python", "-m"], argv
        args = [a.replace(placeholder, str(data)).replace("configs/", f"{ROOT}/configs/") for a in argv[3:]]
        if argv[2] == "cellvit_ssl.train":
            args += TINY_MODEL
        assert importlib.import_module(argv[2]).main(args) == 0, f"{' '.join(argv)} failed"
        ran.append([argv[2], *args])
    return ran


def _blobs(rng, size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A plane with ``n`` bright disks and its label image."""
    yy, xx = np.mgrid[:size, :size]
    plane = rng.integers(0, 20, (size, size)).astype(np.float32)
    labels = np.zeros((size, size), np.uint16)
    for k in range(n):
        cy, cx = rng.integers(10, size - 10, 2)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < 36
        plane[disk] += 150
        labels[disk & (labels == 0)] = k + 1
    return plane, labels


def make_hpa(folder: Path, n_images: int = 3, size: int = 64) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n_images):
        plane, labels = _blobs(rng, size, 3)
        for c, colour in enumerate(("red", "green", "blue", "yellow")):
            stain = np.clip(plane * (1 + 0.1 * c), 0, 255).astype(np.uint8)
            Image.fromarray(stain).save(folder / f"img{i}_{colour}.png")
        Image.fromarray(labels.astype(np.uint8)).save(folder / f"img{i}_blue_cp_masks.png")  # cellpose's naming


def make_phenix(folder: Path, fields: int = 3, size: int = 64) -> None:
    rng = np.random.default_rng(1)
    images = folder / "P1__2024-01-01T00_00_00-Measurement1" / "Images"
    images.mkdir(parents=True)
    for f in range(1, fields + 1):
        plane, _ = _blobs(rng, size, 4)
        for ch in range(1, 6):
            tifffile.imwrite(images / f"r02c03f{f:02d}p01-ch{ch}sk1fk1fl1.tiff", (plane * ch * 10).astype(np.uint16))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The user's working folder (the index and runs go here), apart from the images."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _embeddings(path: Path, index: Path) -> anndata.AnnData:
    adata = anndata.read_h5ad(path)
    assert adata.n_obs == len(pd.read_csv(index)) and np.isfinite(adata.X).all()
    return adata


def test_hpa_pngs_by_colour_with_cellpose_masks_from_index_to_embeddings(tmp_path, workdir):
    make_hpa(tmp_path / "images" / "hpa")
    run_doc("hpa", tmp_path / "images" / "hpa", "/data/hpa")
    index = pd.read_csv(workdir / "hpa.csv")
    assert set(index[ROOT_COLUMN]) == {str((tmp_path / "images" / "hpa").resolve())}
    assert set(index["channels"]) == {"microtubules;protein;nucleus;er"}
    assert index["path"].iloc[0] == "img0_red.png;img0_green.png;img0_blue.png;img0_yellow.png"
    assert len(index) == index.groupby("image")["cell_id"].count().sum() >= 6  # one row per cell
    adata = _embeddings(workdir / "hpa_own.h5ad", workdir / "hpa.csv")
    assert set(adata.obs["sample_kind"]) == {"cells"}


def test_phenix_plate_on_tiles_from_index_to_embeddings(tmp_path, workdir):
    make_phenix(tmp_path / "images" / "plate1")
    run_doc("phenix", tmp_path / "images" / "plate1", "/data/plate1")
    index = pd.read_csv(workdir / "plate1.csv", dtype=str)
    assert len(index) == 3 and set(index["channels"]) == {"nucleus;rna;er;agp;mito"}
    assert index["path"].iloc[0].split(";")[0].endswith("r02c03f01p01-ch1sk1fk1fl1.tiff")
    assert (index["row"] == "02").all() and index["field"].tolist() == ["01", "02", "03"]
    adata = _embeddings(workdir / "plate1.h5ad", workdir / "plate1.csv")
    assert set(adata.obs["sample_kind"]) == {"tiles"}


def test_ome_zarr_fields_with_label_images_from_index_to_embeddings(tmp_path, workdir):
    from cellvit_ssl.data.synthetic import DemoSpec, generate_demo

    generate_demo(tmp_path / "gen", DemoSpec(n_images=2, image_size=64, cells_per_image=3), fmt="ome-zarr")
    fovs = tmp_path / "gen" / "images"
    run_doc("ome-zarr", fovs, "/data/fovs")
    index = pd.read_csv(workdir / "fovs.csv")
    assert index["path"].str.endswith(".ome.zarr").all() and "cell_id" in index
    _embeddings(workdir / "fovs.h5ad", workdir / "fovs.csv")


def test_an_index_finds_its_images_from_any_folder_and_after_moving_with_them(tmp_path, monkeypatch):
    make_hpa(tmp_path / "data" / "hpa", n_images=1)
    table = build_folder_index(tmp_path / "data" / "hpa", layout="hpa")
    index = tmp_path / "indexes" / "hpa.csv"
    index.parent.mkdir()
    table.to_csv(index, index=False)
    monkeypatch.chdir(tmp_path)  # neither the images' nor the index's folder
    read = SampleReader(pd.read_csv(index), default_root=index.parent, mode="image", sample_size=0)
    assert read.read(0).pixels.shape == (4, 64, 64)
    # the images and the index moved together: the recorded root is gone, the index's folder serves
    moved = tmp_path / "moved"
    (tmp_path / "data" / "hpa").rename(moved)
    table.to_csv(moved / "hpa.csv", index=False)
    read = SampleReader(pd.read_csv(moved / "hpa.csv"), default_root=moved, mode="image", sample_size=0)
    assert read.read(0).pixels.shape == (4, 64, 64)
    assert "does not exist" in read.base(0)[1]
    # only the images moved and the index stayed: the error names where it looked and the way out
    stale = SampleReader(pd.read_csv(index), default_root=index.parent, mode="image", sample_size=0)
    with pytest.raises(DataError, match=rf"no such file.*resolved against {re.escape(str(index.parent))}.*"
                                        r"point data.root \(--root\)"):
        stale.read(0)
    fixed = SampleReader(pd.read_csv(index), root=moved, default_root=index.parent, mode="image", sample_size=0)
    assert fixed.read(0).pixels.shape == (4, 64, 64)


def test_hpa_files_of_any_format_and_tinted_jpegs_read_as_one_channel_each(tmp_path):
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "a_red.png")
    tifffile.imwrite(tmp_path / "a_green.tif", gray // 2)  # channels share shape and pixel type
    tinted = np.zeros((16, 16, 3), np.uint8)
    tinted[..., 2] = gray  # a blue-tinted export: the signal is in the blue component
    Image.fromarray(tinted).save(tmp_path / "a_blue.png")
    Image.fromarray(gray).save(tmp_path / "a_yellow.jpg", quality=100)
    table = build_folder_index(tmp_path, layout="hpa")
    assert len(table) == 1 and table.loc[0, "channels"] == "microtubules;protein;nucleus;er"
    stack = open_stack([tmp_path / p for p in table.loc[0, "path"].split(";")],
                       channel_names=table.loc[0, "channels"].split(";"))
    pixels = stack.read()
    np.testing.assert_array_equal(pixels[2], gray)
    np.testing.assert_array_equal(pixels[0], gray)


def test_label_images_beside_images_stop_the_builder_with_the_two_ways_on(tmp_path, capsys):
    from cellvit_ssl.data.synthetic import DemoSpec, generate_demo

    generate_demo(tmp_path / "demo", DemoSpec(n_images=2, image_size=64, cells_per_image=3), fmt="ome-tiff")
    folder = tmp_path / "demo" / "images"
    assert index_main(["folder", str(folder), "-o", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert "look like label images" in err and "field_000_labels.tif" in err
    assert "--masks _labels.tif" in err and "--include '*.ome." in err
    assert not (tmp_path / "x.csv").exists()
    assert index_main(["folder", str(folder), "-o", str(tmp_path / "x.csv"), "--include", "*.ome.tif",
                       "--masks", "_labels.tif"]) == 0


def test_ome_zarr_with_labels_indexed_per_image_gets_a_note(tmp_path, capsys):
    from cellvit_ssl.data.synthetic import DemoSpec, generate_demo

    generate_demo(tmp_path / "demo", DemoSpec(n_images=1, image_size=64, cells_per_image=3), fmt="ome-zarr")
    assert index_main(["folder", str(tmp_path / "demo" / "images"), "-o", str(tmp_path / "x.csv"),
                       "--include", "*.ome.zarr"]) == 0
    assert "--masks labels/cells" in capsys.readouterr().out


def test_layout_needs_named_channels_and_a_mask_template(tmp_path):
    make_phenix(tmp_path / "plate", fields=1)
    with pytest.raises(DataError, match=r"channel token 'ch1' \(--layout phenix\).*--channel-map ch1="):
        build_folder_index(tmp_path / "plate", layout="phenix")
    with pytest.raises(DataError, match=r"--channel-map ch1=NAME.*load_data.csv"):
        build_folder_index(tmp_path / "plate", layout="jump")
    with pytest.raises(DataError, match=r"template of the pattern's groups.*\{folder\}"):
        build_folder_index(tmp_path / "plate", layout="phenix", masks="_cp_masks.tif",
                           channel_map={f"ch{i}": n for i, n in enumerate(["nucleus", "rna", "er", "agp", "mito"], 1)})


def test_a_wrong_root_fails_before_anything_is_written_and_the_fix_then_runs(tmp_path, workdir, capsys):
    from cellvit_ssl import embed, train

    make_hpa(tmp_path / "images" / "hpa", n_images=2)
    assert index_main(["folder", str(tmp_path / "images" / "hpa"), "--layout", "hpa", "-o", "hpa.csv"]) == 0
    bad = str(tmp_path / "nowhere")
    run = workdir / "runs" / "bad"
    assert train.main([f"{ROOT}/configs/hpa.yaml", "data.index=hpa.csv", f"data.root={bad}",
                       f"train.output_dir={run}", *TINY_MODEL]) == 2
    err = capsys.readouterr().err
    assert f"resolved against {bad} (data.root" in err and not run.exists()
    assert train.main([f"{ROOT}/configs/hpa.yaml", "data.index=hpa.csv", f"train.output_dir={run}", *TINY_MODEL]) == 0
    assert embed.main([str(run / "teacher.pt"), "--index", "hpa.csv", "--root", bad, "--out", "e.h5ad"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (workdir / "e.h5ad.partial").exists() and not (workdir / "e.h5ad").exists()
    assert embed.main([str(run / "teacher.pt"), "--index", "hpa.csv", "--out", "e.h5ad"]) == 0
