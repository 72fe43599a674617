"""Build index tables: ``python -m cellvit_ssl.data.index {folder,chammi} ROOT -o index.csv``.

Channel names are written in canonical vocabulary form (a ``--channel-map`` is applied).

An index has one row per image (or per cell crop) and is what
:class:`~cellvit_ssl.data.dataset.IndexDataset` samples from. Columns: ``path`` (relative to
the index's folder or ``data.root``; ``;``-separated files for one-file-per-channel images),
``channels`` (``;``-separated names in file order), optional ``channel_width`` (CHAMMI
tapes), ``centroid_y`` / ``centroid_x`` or ``box_y0`` / ``box_x0`` / ``box_y1`` / ``box_x1``
for cell crops, and any label / group columns (plate, cell type, split, ...).

Two builders:

- :func:`build_folder_index`: every image under a folder (OME-TIFF, TIFF, OME-Zarr, Zarr,
  PNG tapes), or, with a regular expression, single-channel TIFFs grouped into one image per
  site (Cell Painting plates); with segmentation masks (a sidecar label image, or an
  OME-Zarr ``labels/<name>`` group) one row per cell with its centroid and box.
- :func:`build_chammi_index`: a CHAMMI root with ``Allen/``, ``HPA/`` and ``CP/``, each with
  an ``enriched_meta.csv``; every metadata column is kept (``train_test_split``, ``Label`` →
  also ``label``, ``cell_type``, ``Plate``, ...), channel names come from the presets.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cellvit_ssl.channels import CHAMMI_PRESETS, ChannelVocabulary, preset
from cellvit_ssl.cli import CommandLine, Flag
from cellvit_ssl.config import Choice
from cellvit_ssl.data.readers import PNG_SUFFIXES, TIFF_SUFFIXES, ZARR_MARKERS, open_labels, open_stack
from cellvit_ssl.data.samples import cells_from_mask
from cellvit_ssl.errors import CellVitSSLError, ConfigError, DataError
from cellvit_ssl.io import atomic_write_with

CHAMMI_META = "enriched_meta.csv"
IMAGE_SUFFIXES = (".ome.zarr", ".ome.tiff", ".ome.tif", ".zarr", ".tiff", ".tif", ".png")


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in ZARR_MARKERS)


def find_images(root: str | Path, recursive: bool = True) -> list[Path]:
    """Image files and Zarr folders under ``root``, sorted; Zarr folders are not descended into."""
    root = Path(root)
    found: list[Path] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if _is_zarr(entry):
                found.append(entry)
            elif entry.is_dir():
                if recursive:
                    stack.append(entry)
            elif entry.name.lower().endswith(TIFF_SUFFIXES + PNG_SUFFIXES):
                found.append(entry)
    return sorted(found)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def read_mask(image: Path, masks: str) -> tuple[np.ndarray, str]:
    """The label image of ``image``: ``labels/<name>`` inside an OME-Zarr, else a sidecar file.

    Args:
        image: The image file or Zarr folder.
        masks: ``labels/<name>`` (OME-Zarr labels group) or a suffix replacing the image's
            format suffix, e.g. ``_labels.tif`` for ``a.ome.tif`` → ``a_labels.tif``.

    Raises:
        DataError: If the mask does not exist or cannot be read.
    """
    if masks.startswith("labels/"):
        where = image / masks
    else:
        name = image.name
        stem = next((name[: -len(s)] for s in IMAGE_SUFFIXES if name.lower().endswith(s)), image.stem)
        where = image.with_name(stem + masks)
        if not where.is_file():
            raise DataError(f"{where}: no such mask file for image {image} (--masks {masks!r})")
    return np.asarray(open_labels(where)), str(where)


def build_folder_index(
    root: str | Path,
    channels: Sequence[str] | None = None,
    channel_map: Mapping[str, str] | ChannelVocabulary | None = None,
    pattern: str | None = None,
    channel_width: int | None = None,
    recursive: bool = True,
    masks: str | None = None,
    include: str | None = None,
) -> pd.DataFrame:
    """One row per image found under ``root`` (paths relative to ``root``).

    Args:
        root: Folder to scan.
        channels: Channel names for files that do not store them (plain TIFF, Zarr, PNG
            tapes); with ``pattern``, the wanted channels in output order.
        channel_map: Your names (or the ``channel`` tokens of ``pattern``) → vocabulary names, or a
            whole :class:`~cellvit_ssl.channels.ChannelVocabulary` (with new stains).
        pattern: Regular expression matched against each TIFF's path relative to ``root``,
            with a named group ``channel`` and any other named groups (e.g. ``plate``,
            ``well``, ``site``) that identify one image; files of the same image become one
            row with ``;``-separated paths, and the other groups become columns.
        channel_width: Channel width of PNG / TIFF tapes (default: square channels).
        recursive: Descend into sub-folders.
        masks: Segmentation of each image (see :func:`read_mask`): one row per cell, with
            ``cell_id``, ``centroid_y``, ``centroid_x``, the box and ``area``. Files that are
            masks of another image are not indexed as images.
        include: Glob pattern on the path relative to ``root`` (e.g. ``*.ome.zarr``) that
            images must match.

    Raises:
        DataError: If the folder holds no image, a file cannot be opened, does not name its
            channels and none were given, or a channel is unknown or missing.
    """
    vocabulary = channel_map if isinstance(channel_map, ChannelVocabulary) else \
        ChannelVocabulary.extended((), channel_map)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    images = find_images(root, recursive)
    if include:
        images = [p for p in images if fnmatch.fnmatch(_relative(p, root), include)]
    if pattern:
        return _grouped_index(root, images, pattern, channels, vocabulary)
    if masks and not masks.startswith("labels/"):
        images = [p for p in images if not p.name.endswith(masks)]
    rows = []
    for path in images:
        if channels:
            stack = open_stack(path, channel_names=list(channels), channel_width=channel_width)
        else:
            stack = _open_named(path, channel_width)
        names = vocabulary.canonical_names(stack.channel_names, source=stack.path)
        row = {"path": _relative(path, root), "channels": ";".join(names),
               "n_channels": stack.num_channels, "height": stack.shape[1], "width": stack.shape[2],
               "format": stack.metadata.get("format", "")}
        if stack.metadata.get("format") == "tape":
            row["channel_width"] = stack.metadata["channel_width"]
        if masks:
            mask, where = read_mask(path, masks)
            if mask.shape[-2:] != stack.shape[1:]:
                raise DataError(f"{where}: mask shape {mask.shape} does not match image {path} {stack.shape[1:]}")
            cells = cells_from_mask(mask, where).rename(columns={"cell_label": "cell_id"})
            rows += [{**row, **cell} for cell in cells.to_dict("records")]
        else:
            rows.append(row)
    if not images:
        raise DataError(f"{root}: no images found (expected .tif/.tiff, .png tapes or Zarr folders)")
    return pd.DataFrame(rows)


def _open_named(path: Path, channel_width: int | None):
    try:
        return open_stack(path, channel_width=channel_width)
    except DataError as exc:
        if "does not name" in str(exc):
            raise DataError(f"{exc}. For a folder index, pass --channels a,b,c") from exc
        raise


def _grouped_index(root: Path, images: list[Path], pattern: str, channels: Sequence[str] | None,
                   vocabulary: ChannelVocabulary) -> pd.DataFrame:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise DataError(f"--pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    if "channel" not in regex.groupindex:
        raise DataError(f"--pattern {pattern!r} has no named group 'channel', e.g. (?P<channel>ch\\d)")
    keys = [g for g in regex.groupindex if g != "channel"]
    groups: dict[tuple, dict[str, str]] = {}
    for path in images:
        rel = _relative(path, root)
        m = regex.search(rel)
        if m is None or not rel.lower().endswith(TIFF_SUFFIXES):
            continue
        name = vocabulary.canonical_names([m.group("channel")], source=rel)[0]
        files = groups.setdefault(tuple(m.group(k) for k in keys), {})
        if name in files:
            raise DataError(f"{rel}: channel {name!r} of image {dict(zip(keys, m.groups()))} is already {files[name]}")
        files[name] = rel
    if not groups:
        raise DataError(f"{root}: no TIFF file matches --pattern {pattern!r}")
    wanted = vocabulary.canonical_names(channels, source="index.channels") if channels else None
    rows = []
    for key, files in sorted(groups.items()):
        order = wanted or sorted(files)
        missing = [c for c in order if c not in files]
        if missing:
            raise DataError(f"{root}: image {dict(zip(keys, key))} has no file for channels {missing} "
                            f"(found {sorted(files)})")
        stack = open_stack([root / files[c] for c in order], channel_names=order)
        rows.append({"path": ";".join(files[c] for c in order), "channels": ";".join(order),
                     **dict(zip(keys, key)), "n_channels": len(order), "height": stack.shape[1],
                     "width": stack.shape[2], "format": "tiff-list"})
    return pd.DataFrame(rows)


def build_chammi_index(root: str | Path, subsets: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per single-cell tape of a CHAMMI download, with all its metadata.

    Args:
        root: The CHAMMI folder holding ``Allen/``, ``HPA/``, ``CP/``.
        subsets: Sub-datasets to include (default: every one with an ``enriched_meta.csv``).

    Returns:
        Columns ``path`` (relative to ``root``), ``channels`` (the sub-dataset's preset in
        on-disk order), ``channel_width``, ``dataset``, ``label`` (from ``Label``), then every
        column of ``enriched_meta.csv`` unchanged (``train_test_split``, ``cell_type``,
        ``Plate``, ...).

    Raises:
        DataError: If no sub-dataset is found, a metadata file lacks ``file_path`` /
            ``channel_width``, or an image named by the metadata does not exist.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    subsets = list(subsets) if subsets else [s for s in CHAMMI_PRESETS if (root / s / CHAMMI_META).is_file()]
    if not subsets:
        raise DataError(f"{root}: no CHAMMI sub-dataset found; expected {sorted(CHAMMI_PRESETS)} folders "
                        f"each holding {CHAMMI_META}")
    tables = []
    for sub in subsets:
        if sub not in CHAMMI_PRESETS:
            raise DataError(f"unknown CHAMMI sub-dataset {sub!r}; expected one of {sorted(CHAMMI_PRESETS)}")
        meta_path = root / sub / CHAMMI_META
        if not meta_path.is_file():
            raise DataError(f"{meta_path}: no such file; expected the CHAMMI metadata of {sub}")
        try:
            meta = pd.read_csv(meta_path, low_memory=False)
        except Exception as exc:
            raise DataError(f"{meta_path}: could not be read as CSV: {exc}") from exc
        missing = [c for c in ("file_path", "channel_width") if c not in meta.columns]
        if missing:
            raise DataError(f"{meta_path}: has no columns {missing} (columns: {list(meta.columns)})")
        if meta.empty:
            raise DataError(f"{meta_path}: has no rows")
        paths = meta["file_path"].astype(str)
        if not (root / paths.iloc[0]).is_file() and (root / sub / paths.iloc[0]).is_file():
            paths = sub + "/" + paths  # some copies store paths relative to the sub-dataset
        if not (root / paths.iloc[0]).is_file():
            raise DataError(f"{meta_path}: first image {paths.iloc[0]!r} not found under {root} or {root / sub}")
        names = preset(CHAMMI_PRESETS[sub])
        table = pd.DataFrame({"path": paths, "channels": ";".join(names),
                              "channel_width": meta["channel_width"].astype(int), "dataset": sub})
        label = meta["Label"] if "Label" in meta.columns else meta.get("label")
        if label is not None:
            table["label"] = label
        rest = meta.drop(columns=[c for c in ("file_path", "channel_width", "label") if c in meta.columns])
        tables.append(pd.concat([table, rest.reset_index(drop=True)], axis=1))
    return pd.concat(tables, ignore_index=True)


def write_index(table: pd.DataFrame, path: str | Path) -> Path:
    """Write an index as CSV, or parquet when ``path`` ends in ``.parquet``.

    Raises:
        DataError: If the folder cannot be written or parquet support (pyarrow) is missing.
    """
    path = Path(path).expanduser()

    def write(tmp: Path) -> None:
        if path.suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False)

    try:
        return atomic_write_with(path, write)
    except ImportError as exc:
        raise DataError(f"{path}: writing parquet needs pyarrow (pip install pyarrow), or use .csv ({exc})") from exc


def summary(table: pd.DataFrame) -> str:
    """A few lines describing an index: rows, channel sets, splits / datasets."""
    lines = [f"{len(table)} rows"]
    lines += [f"  channels {k}: {v} rows" for k, v in table["channels"].value_counts().items()]
    for col in ("dataset", "train_test_split", "split"):
        if col in table.columns:
            lines.append(f"  {col}: " + ", ".join(f"{k}={v}" for k, v in table[col].value_counts().items()))
    return "\n".join(lines)


class IndexSource(Choice):
    """What an index is built from."""

    folder = "folder"
    chammi = "chammi"


@dataclass(frozen=True)
class IndexConfig:
    """Settings of the index builder (the ``index`` section)."""

    source: IndexSource = IndexSource.folder  # folder (every image under a folder) | chammi (a CHAMMI download)
    root: str | None = None  # the folder to index
    out: str | None = None  # index file to write (.csv or .parquet)
    channels: list[str] = field(default_factory=list)  # channel names, in file order, of files that lack them
    pattern: str | None = None  # regex grouping single-channel TIFFs, with a (?P<channel>...) group
    channel_width: int | None = None  # channel width of tapes (default: square channels)
    masks: str | None = None  # one row per cell: 'labels/<name>' inside OME-Zarr, or a suffix such as _labels.tif
    include: str | None = None  # glob on relative paths that images must match, e.g. '*.ome.zarr'
    recursive: bool = True  # descend into sub-folders
    subsets: list[str] = field(default_factory=list)  # chammi: sub-datasets to include (default: all found)


@dataclass(frozen=True)
class IndexData:
    """Channel naming shared with training (same keys as ``data``)."""

    channel_map: dict[str, str] = field(default_factory=dict)  # your channel names -> vocabulary names
    extra_channels: list[str] = field(default_factory=list)  # new stains the built-in vocabulary lacks


@dataclass(frozen=True)
class IndexCommand:
    """``python -m cellvit_ssl.data.index``."""

    data: IndexData = field(default_factory=IndexData)
    index: IndexConfig = field(default_factory=IndexConfig)


COMMAND_LINE = CommandLine(
    prog="python -m cellvit_ssl.data.index",
    description="Build an index table (one row per image or cell) from a folder of images or a CHAMMI download.",
    schema=IndexCommand,
    positionals=("index.source", "index.root"),
    config_file=False,
    flags=(
        Flag(("-o", "--out"), "index.out"), Flag(("--channels",), "index.channels"),
        Flag(("--channel-map",), "data.channel_map"), Flag(("--pattern",), "index.pattern"),
        Flag(("--channel-width",), "index.channel_width"), Flag(("--masks",), "index.masks"),
        Flag(("--include",), "index.include"), Flag(("--no-recursive",), "index.recursive", False),
        Flag(("--subsets",), "index.subsets"),
    ),
    examples=(
        "python -m cellvit_ssl.data.index folder /data/plate1 --out plate1.csv --channels nucleus,rna,er,agp,mito",
        "python -m cellvit_ssl.data.index folder /data/fovs --out cells.csv --include '*.ome.zarr' "
        "--masks labels/cells",
        "python -m cellvit_ssl.data.index chammi /data/CHAMMI --out /data/CHAMMI/index.csv",
    ),
)


def run(cfg: IndexCommand) -> tuple[pd.DataFrame, Path]:
    """Build and write the index a command config describes.

    Raises:
        ConfigError: If the folder or the output is not given.
        DataError: On unreadable or unnamed images.
    """
    idx = cfg.index
    if not idx.root or not idx.out:
        raise ConfigError("give the folder to index and the output: ... folder ROOT --out INDEX.csv "
                          "(index.root=..., index.out=...)")
    if idx.source == IndexSource.folder:
        vocabulary = ChannelVocabulary.extended(list(cfg.data.extra_channels), dict(cfg.data.channel_map))
        table = build_folder_index(idx.root, channels=list(idx.channels) or None, channel_map=vocabulary,
                                   pattern=idx.pattern, channel_width=idx.channel_width, recursive=idx.recursive,
                                   masks=idx.masks, include=idx.include)
    else:
        table = build_chammi_index(idx.root, list(idx.subsets) or None)
    return table, write_index(table, idx.out)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    try:
        cfg = COMMAND_LINE.load(COMMAND_LINE.parse(sys.argv[1:] if argv is None else argv))
        table, out = run(cfg)
    except CellVitSSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {summary(table)}")
    root = cfg.index.root
    if out.resolve().parent != Path(root).expanduser().resolve():
        print(f"paths are relative to {root}: train with data.index={out} data.root={root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
