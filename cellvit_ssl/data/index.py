"""Build index tables: ``python -m cellvit_ssl.data.index {folder,chammi} ROOT -o index.csv``.

Channel names are written in canonical vocabulary form (a ``--channel-map`` is applied).

An index has one row per image (or per cell crop) and is what
:class:`~cellvit_ssl.data.dataset.IndexDataset` samples from. Columns: ``path`` (relative to
``root``; ``;``-separated files for one-file-per-channel images), ``root`` (the folder that was
indexed, absolute: the index remembers where its images are, see
:class:`~cellvit_ssl.data.samples.SampleReader`), ``channels`` (``;``-separated names in file
order), optional ``channel_width`` (CHAMMI tapes), ``centroid_y`` / ``centroid_x`` or
``box_y0`` / ``box_x0`` / ``box_y1`` / ``box_x1`` for cell crops, and any label / group columns
(plate, cell type, split, ...).

Two builders:

- :func:`build_folder_index`: every image under a folder (OME-TIFF, TIFF, OME-Zarr, Zarr,
  PNG tapes), or single-channel files (TIFF, PNG, JPEG) grouped into one image per site by a
  regular expression or a :class:`Layout` preset (HPA ``ID_red.png`` ..., Opera Phenix / JUMP
  ``r01c01f01p01-ch1sk1fk1fl1.tiff``); with segmentation masks (a sidecar label image, or an
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
from cellvit_ssl.data.readers import (
    PLANE_SUFFIXES,
    PNG_SUFFIXES,
    TIFF_SUFFIXES,
    ZARR_MARKERS,
    open_labels,
    open_stack,
)
from cellvit_ssl.data.samples import ROOT_COLUMN, cells_from_mask
from cellvit_ssl.errors import CellVitSSLError, ConfigError, DataError
from cellvit_ssl.io import atomic_write_with

CHAMMI_META = "enriched_meta.csv"
IMAGE_SUFFIXES = (".ome.zarr", ".ome.tiff", ".ome.tif", ".zarr", ".tiff", ".tif", ".png", ".jpeg", ".jpg")
#: Name endings (before the format suffix) of label images saved beside their image: ``a_labels.tif``
#: for ``a.ome.tif``; ``_cp_masks`` is cellpose's.
MASK_ENDINGS = ("_cp_masks", "_labels", "_label", "_masks", "_mask", "_segmentation", "_seg")


class Layout(Choice):
    """How the files of one image are laid out in a folder (``index.layout``)."""

    files = "files"
    hpa = "hpa"
    phenix = "phenix"
    jump = "jump"


@dataclass(frozen=True)
class LayoutPreset:
    """What a :class:`Layout` means for the index builder.

    Attributes:
        pattern: Regular expression on the path relative to the root, with a named group
            ``channel``; the other named groups identify one image and become columns.
        channel_map: The ``channel`` tokens → vocabulary names (the user's ``--channel-map`` wins).
        channels: Channels kept, in output order (empty: every channel found, sorted by name).
        note: What the user must still check, printed with the index.
    """

    pattern: str
    channel_map: Mapping[str, str] = field(default_factory=dict)
    channels: tuple[str, ...] = ()
    note: str = ""


#: Opera Phenix / Operetta export names: r<row>c<column>f<field>p<plane>-ch<channel>sk<time>fk1fl1.tiff,
#: usually in <plate measurement>/Images/.
PHENIX_PATTERN = (r"^(?:(?P<folder>.*)/)?r(?P<row>\d+)c(?P<column>\d+)f(?P<field>\d+)p(?P<plane>\d+)"
                  r"-(?P<channel>ch\d+)sk(?P<timepoint>\d+)fk\d+fl\d+\.tiff?$")

#: The presets of :class:`Layout` (``files`` needs none: one file or Zarr folder per image).
LAYOUTS: dict[Layout, LayoutPreset] = {
    # HPA: one 8/16-bit grayscale file per stain, named by the colour it is shown in.
    Layout.hpa: LayoutPreset(
        pattern=r"^(?P<image>.+)_(?P<channel>red|green|blue|yellow)\.(?:png|tiff?|jpe?g)$",
        channel_map={"red": "microtubules", "green": "protein", "blue": "nucleus", "yellow": "er"},
        channels=tuple(preset("hpa")),
    ),
    Layout.phenix: LayoutPreset(
        pattern=PHENIX_PATTERN,
        note="Phenix channel numbers are your instrument's: name them with --channel-map ch1=...,ch2=...",
    ),
    # JUMP Cell Painting (cpg0016) plates imaged on Phenix: the five stains, brightfield (ch6-ch8) left out.
    # Which chN holds which stain differs between JUMP sources, so the map must come from the plate's
    # load_data.csv (FileName_OrigDNA, _OrigRNA, _OrigER, _OrigAGP, _OrigMito).
    Layout.jump: LayoutPreset(
        pattern=PHENIX_PATTERN,
        channels=tuple(preset("cellpainting")),
        note="JUMP sources number the stains differently: check --channel-map against the plate's load_data.csv",
    ),
}


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in ZARR_MARKERS)


def find_images(root: str | Path, recursive: bool = True, suffixes: Sequence[str] = TIFF_SUFFIXES + PNG_SUFFIXES
                ) -> list[Path]:
    """Image files and Zarr folders under ``root``, sorted; Zarr folders are not descended into.

    Args:
        root: Folder to scan.
        recursive: Descend into sub-folders.
        suffixes: File name endings (lower case) of the image files to list.
    """
    root = Path(root)
    found: list[Path] = []
    stack = [root]
    suffixes = tuple(suffixes)
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
            elif entry.name.lower().endswith(suffixes):
                found.append(entry)
    return sorted(found)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _stem(path: Path) -> str:
    name = path.name
    return next((name[: -len(s)] for s in IMAGE_SUFFIXES if name.lower().endswith(s)), path.stem)


def _format_suffix(path: Path) -> str:
    return next((path.name[-len(s):] for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), path.suffix)


def find_label_images(images: Sequence[Path]) -> list[tuple[Path, Path, str]]:
    """``(label image, its image, ending)`` for files named like a mask saved beside an image.

    ``a_labels.tif`` beside ``a.ome.tif``, ``a_cp_masks.png`` beside ``a.tif`` (cellpose), ...: see
    :data:`MASK_ENDINGS`.
    """
    by_stem = {(p.parent, _stem(p)): p for p in images}
    pairs = []
    for path in images:
        stem = _stem(path)
        for ending in MASK_ENDINGS:
            image = by_stem.get((path.parent, stem[: -len(ending)])) if stem.endswith(ending) else None
            if image is not None and image != path:
                pairs.append((path, image, ending + _format_suffix(path)))
                break
    return pairs


def _zarr_label_names(path: Path) -> list[str]:
    labels = path / "labels"
    if not labels.is_dir():
        return []
    return sorted(e.name for e in labels.iterdir() if e.is_dir() and not e.name.startswith("."))


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
        where = image.with_name(_stem(image) + masks)
        if not where.is_file():
            raise DataError(f"{where}: no such mask file for image {image} (--masks {masks!r})")
    return np.asarray(open_labels(where)), str(where)


def _layout_vocabulary(layout: Layout, vocabulary: ChannelVocabulary) -> ChannelVocabulary:
    """The vocabulary with the layout's channel map under the user's own (the user's entries win)."""
    preset_map = LAYOUTS[layout].channel_map if layout in LAYOUTS else {}
    if not preset_map:
        return vocabulary
    return ChannelVocabulary(vocabulary.names, dict(vocabulary.aliases), {**preset_map, **dict(vocabulary.mapping)})


def build_folder_index(
    root: str | Path,
    channels: Sequence[str] | None = None,
    channel_map: Mapping[str, str] | ChannelVocabulary | None = None,
    pattern: str | None = None,
    channel_width: int | None = None,
    recursive: bool = True,
    masks: str | None = None,
    include: str | None = None,
    layout: Layout | str = Layout.files,
) -> pd.DataFrame:
    """One row per image found under ``root`` (paths relative to ``root``, kept in the ``root`` column).

    Args:
        root: Folder to scan.
        channels: Channel names for files that do not store them (plain TIFF, Zarr, PNG
            tapes); with ``pattern`` or a layout preset, the wanted channels in output order
            (files of other channels are left out).
        channel_map: Your names (or the ``channel`` tokens of ``pattern``) → vocabulary names, or a
            whole :class:`~cellvit_ssl.channels.ChannelVocabulary` (with new stains).
        pattern: Regular expression matched against each single-plane file's path (TIFF, PNG,
            JPEG) relative to ``root``, with a named group ``channel`` and any other named
            groups (e.g. ``plate``, ``well``, ``site``) that identify one image; files of the
            same image become one row with ``;``-separated paths, and the other groups become
            columns.
        channel_width: Channel width of PNG / TIFF tapes (default: square channels).
        recursive: Descend into sub-folders.
        masks: Segmentation of each image (see :func:`read_mask`): one row per cell, with
            ``cell_id``, ``centroid_y``, ``centroid_x``, the box and ``area``. Files that are
            masks of another image are not indexed as images. For grouped files (``pattern`` or
            a layout) a template of the pattern's groups relative to ``root``, e.g.
            ``{image}_blue_cp_masks.png`` for HPA.
        include: Glob pattern on the path relative to ``root`` (e.g. ``*.ome.zarr``) that
            images must match.
        layout: ``files`` (one file or Zarr folder per image), or a preset of
            :data:`LAYOUTS` that groups per-channel files (``hpa``, ``phenix``, ``jump``).

    Returns:
        The index; ``table.attrs["notes"]`` holds hints for the user (label images found in
        OME-Zarr files, what a layout leaves to check).

    Raises:
        DataError: If the folder holds no image, a file cannot be opened, does not name its
            channels and none were given, a channel is unknown or missing, or files named like
            label images of other images are found without ``masks``.
    """
    layout = Layout(layout)
    vocabulary = channel_map if isinstance(channel_map, ChannelVocabulary) else \
        ChannelVocabulary.extended((), channel_map)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    root_text = str(root.resolve())
    if layout != Layout.files:
        if pattern:
            raise DataError(f"give either --layout {layout.value} or --pattern, not both (the layout is a pattern)")
        preset_ = LAYOUTS[layout]
        wanted = list(channels) if channels else list(preset_.channels) or None
        images = _included(find_images(root, recursive, PLANE_SUFFIXES), root, include)
        table = _grouped_index(root, images, preset_.pattern, wanted, _layout_vocabulary(layout, vocabulary),
                               f"--layout {layout.value}", preset_.note, masks)
        table.insert(1, ROOT_COLUMN, root_text)
        table.attrs["notes"] = [preset_.note] if preset_.note else []
        return table
    if pattern:
        images = _included(find_images(root, recursive, PLANE_SUFFIXES), root, include)
        table = _grouped_index(root, images, pattern, channels, vocabulary, f"--pattern {pattern!r}", masks=masks)
        table.insert(1, ROOT_COLUMN, root_text)
        return table
    images = _included(find_images(root, recursive), root, include)
    if masks and not masks.startswith("labels/"):
        images = [p for p in images if not p.name.endswith(masks)]
    if not masks:
        _refuse_label_images(root, images)
    rows, notes = [], []
    with_labels = []
    for path in images:
        if channels:
            stack = open_stack(path, channel_names=list(channels), channel_width=channel_width)
        else:
            stack = _open_named(path, channel_width)
        names = vocabulary.canonical_names(stack.channel_names, source=stack.path)
        row = {"path": _relative(path, root), ROOT_COLUMN: root_text, "channels": ";".join(names),
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
            if _is_zarr(path) and _zarr_label_names(path):
                with_labels.append(path)
    if not images:
        raise DataError(f"{root}: no images found (expected .tif/.tiff, .png tapes or Zarr folders"
                        + (f" matching --include {include!r}" if include else "") + "; for one file per channel, "
                        "pass --layout hpa|phenix|jump or --pattern)")
    if with_labels:
        name = _zarr_label_names(with_labels[0])[0]
        notes.append(f"{len(with_labels)} OME-Zarr image(s) hold label images (e.g. "
                     f"{_relative(with_labels[0], root)}/labels/{name}); one row per cell instead of per image: "
                     f"--masks labels/{name}")
    table = pd.DataFrame(rows)
    table.attrs["notes"] = notes
    return table


def _included(images: list[Path], root: Path, include: str | None) -> list[Path]:
    return [p for p in images if fnmatch.fnmatch(_relative(p, root), include)] if include else images


def _refuse_label_images(root: Path, images: list[Path]) -> None:
    """Stop when files named like label images sit beside their images and no ``--masks`` says what they are."""
    pairs = find_label_images(images)
    if not pairs:
        return
    mask, image, ending = pairs[0]
    endings = sorted({e for _, _, e in pairs})
    kinds = sorted({_format_suffix(i) for _, i, _ in pairs})
    raise DataError(
        f"{root}: {len(pairs)} file(s) look like label images of other images (e.g. {_relative(mask, root)} "
        f"beside {_relative(image, root)}), not images to train on. For one row per cell, pass "
        f"--masks {endings[0]} (index.masks); to index the images alone, pass --include '*{kinds[0]}' "
        "(index.include)"
    )


def _open_named(path: Path, channel_width: int | None):
    try:
        return open_stack(path, channel_width=channel_width)
    except DataError as exc:
        if "does not name" in str(exc):
            raise DataError(f"{exc}. For a folder index, pass --channels a,b,c") from exc
        if "no channel axis" in str(exc):
            raise DataError(f"{exc}. One file per channel? Group them with --layout hpa|phenix|jump or "
                            "--pattern '(?P<image>...)_(?P<channel>...)'") from exc
        raise


def _grouped_index(root: Path, images: list[Path], pattern: str, channels: Sequence[str] | None,
                   vocabulary: ChannelVocabulary, what: str, hint: str = "", masks: str | None = None) -> pd.DataFrame:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise DataError(f"--pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    if "channel" not in regex.groupindex:
        raise DataError(f"--pattern {pattern!r} has no named group 'channel', e.g. (?P<channel>ch\\d)")
    keys = [g for g in regex.groupindex if g != "channel"]
    if masks and "{" not in masks:
        raise DataError(f"--masks {masks!r}: the images of {what} are groups of files, so name each one's label "
                        "image with a template of the pattern's groups, relative to the folder, e.g. --masks "
                        f"'{{{keys[0] if keys else 'image'}}}_cp_masks.png' (groups: {keys})")
    wanted = vocabulary.canonical_names(channels, source="index.channels") if channels else None
    groups: dict[tuple, dict[str, str]] = {}
    left_out: set[str] = set()
    for path in images:
        rel = _relative(path, root)
        m = regex.search(rel)
        if m is None or not rel.lower().endswith(PLANE_SUFFIXES):
            continue
        if masks and any(_stem(path).endswith(e) for e in MASK_ENDINGS):
            continue  # a label image named like a channel file (ID_blue_cp_masks.png for ID_blue.png)
        token = m.group("channel")
        if wanted is not None:
            try:
                name = vocabulary.canonical(token)
            except DataError:
                name = None
            if name not in wanted:
                left_out.add(token)
                continue
        else:
            try:
                name = vocabulary.canonical(token)
            except DataError:
                raise DataError(f"{rel}: the channel token {token!r} ({what}) is no known channel name; name the "
                                f"tokens with --channel-map {token}=NAME,... and keep some with --channels "
                                f"a,b,c{'. ' + hint if hint else ''}") from None
        files = groups.setdefault(tuple(m.group(k) for k in keys), {})
        if name in files:
            raise DataError(f"{rel}: channel {name!r} of image {dict(zip(keys, m.groups()))} is already {files[name]}")
        files[name] = rel
    if not groups:
        extra = (f" (files of channel tokens {sorted(left_out)} are not among the wanted {wanted}: name the tokens "
                 f"with --channel-map {sorted(left_out)[0]}=NAME,...{'; ' + hint if hint else ''})" if left_out else "")
        raise DataError(f"{root}: no image file (.tif, .png, .jpg) matches {what}{extra}")
    rows = []
    for key, files in sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        order = wanted or sorted(files)
        missing = [c for c in order if c not in files]
        if missing:
            raise DataError(f"{root}: image {dict(zip(keys, key))} has no file for channels {missing} "
                            f"(found {sorted(files)}; name your channel tokens with --channel-map)")
        stack = open_stack([root / files[c] for c in order], channel_names=order)
        row = {"path": ";".join(files[c] for c in order), "channels": ";".join(order),
               **dict(zip(keys, key)), "n_channels": len(order), "height": stack.shape[1],
               "width": stack.shape[2], "format": "file-list"}
        if not masks:
            rows.append(row)
            continue
        try:
            where = root / masks.format(**{k: "" if v is None else v for k, v in zip(keys, key)})
        except (KeyError, IndexError, ValueError) as exc:
            raise DataError(f"--masks {masks!r}: not a template of the pattern's groups {keys} ({exc!r})") from None
        if not where.is_file():
            raise DataError(f"{where}: no such mask file for image {dict(zip(keys, key))} (--masks {masks!r})")
        mask = np.asarray(open_labels(where))
        if mask.shape[-2:] != stack.shape[1:]:
            raise DataError(f"{where}: mask shape {mask.shape} does not match image {row['path']} {stack.shape[1:]}")
        cells = cells_from_mask(mask, str(where)).rename(columns={"cell_label": "cell_id"})
        rows += [{**row, **cell} for cell in cells.to_dict("records")]
    table = pd.DataFrame(rows)
    table.attrs["left_out"] = sorted(left_out)
    return table


def build_chammi_index(root: str | Path, subsets: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per single-cell tape of a CHAMMI download, with all its metadata.

    Args:
        root: The CHAMMI folder holding ``Allen/``, ``HPA/``, ``CP/``.
        subsets: Sub-datasets to include (default: every one with an ``enriched_meta.csv``).

    Returns:
        Columns ``path`` (relative to ``root``), ``root`` (the CHAMMI folder, absolute),
        ``channels`` (the sub-dataset's preset in on-disk order), ``channel_width``,
        ``dataset``, ``label`` (from ``Label``), then every
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
        table = pd.DataFrame({"path": paths, ROOT_COLUMN: str(root.resolve()), "channels": ";".join(names),
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
    root: str | None = None  # the folder to index (recorded, absolute, in the index's root column)
    out: str | None = None  # index file to write (.csv or .parquet)
    layout: Layout = Layout.files  # files: a file/Zarr per image | hpa: ID_red.png.. | phenix, jump: r01c01f01p01-ch1..
    channels: list[str] = field(default_factory=list)  # names in file order (files lacking them); layout/pattern: kept
    pattern: str | None = None  # regex grouping single-channel files (TIFF/PNG/JPEG) with a (?P<channel>...) group
    channel_width: int | None = None  # channel width of tapes (default: square channels)
    masks: str | None = None  # a row per cell: labels/<name> (OME-Zarr), _labels.tif (suffix), {image}_x.png (grouped)
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
        Flag(("-o", "--out"), "index.out"), Flag(("--layout", "--preset"), "index.layout"),
        Flag(("--channels",), "index.channels"),
        Flag(("--channel-map",), "data.channel_map"), Flag(("--pattern",), "index.pattern"),
        Flag(("--channel-width",), "index.channel_width"), Flag(("--masks",), "index.masks"),
        Flag(("--include",), "index.include"), Flag(("--no-recursive",), "index.recursive", False),
        Flag(("--subsets",), "index.subsets"),
    ),
    examples=(
        "python -m cellvit_ssl.data.index folder /data/plate1 --out plate1.csv --channels nucleus,rna,er,agp,mito",
        "python -m cellvit_ssl.data.index folder /data/hpa/train --layout hpa --out hpa.csv",
        "python -m cellvit_ssl.data.index folder /data/plate1 --layout jump --out plate1.csv "
        "--channel-map ch1=mito,ch2=agp,ch3=rna,ch4=er,ch5=nucleus",
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
                                   masks=idx.masks, include=idx.include, layout=idx.layout)
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
    root = Path(cfg.index.root).expanduser().resolve()
    print(f"paths are relative to {root} (the index's {ROOT_COLUMN!r} column): train and embed find the images "
          f"from any folder; if you move them, pass data.root=NEW_FOLDER (embed: --root)")
    for note in table.attrs.get("notes", []):
        print(f"note: {note}")
    if table.attrs.get("left_out"):
        print(f"note: left out files of channels {table.attrs['left_out']} (not among the kept channels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
