"""The one path from an index row to a raw crop, shared by training, ``embed``, ``evaluate`` and napari.

An index row names an image (``path``, optional ``channels`` in file order, ``channel_width``
for CHAMMI tapes) and, optionally, where in it the sample is (one box schema for every
command):

- ``box_y0, box_x0, box_y1, box_x1``: a region in pixels (rows ``[y0, y1)``, columns ``[x0, x1)``);
- ``centroid_y, centroid_x``: the centre of a cell;
- neither: the whole image.

:class:`SampleReader` turns a row into a :class:`RawSample` — raw intensities in the wanted
channel order, which channels are present, and the :class:`Box` that was read — honouring
every read option (``channel_width``, pyramid ``level``, ``z``, ``t``, missing chunks, missing
channels) in one place. How a row is sampled depends on ``data.mode`` and the row:

``cells``
    a ``sample_size`` square centred on the centroid (or the box centre), zero-padded at the
    image border;
``tiles``
    a random ``sample_size`` square of the image (training; redrawn while its foreground
    fraction is below ``min_foreground``); at inference the image is covered by a grid of
    such tiles (:meth:`SampleReader.tile_boxes`);
``image``
    the box, or the whole image (fitted into a square later, by
    :class:`~cellvit_ssl.preprocess.Preprocess`);
``auto``
    ``cells`` for rows with a centroid or box, ``image`` for CHAMMI tapes, ``tiles`` otherwise.

Where a relative ``path`` is found: in ``data.root`` when it is given (the one way to point at
images that moved); else in the row's ``root`` column, which the index builder writes (the
folder it indexed, absolute), while that folder exists; else in the index file's own folder.
So an index built by ``python -m cellvit_ssl.data.index`` works from any working folder, and an
index moved together with its images (the root column then names a folder that is gone) still
finds them beside it. Every "no such file" error names the folder it looked in and why.

Intensities are not changed here: normalisation is the preprocessing contract's job
(:mod:`cellvit_ssl.preprocess`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellvit_ssl.channels import BUILTIN, ChannelVocabulary
from cellvit_ssl.config import MissingChannels, SampleMode
from cellvit_ssl.data.normalize import check_pixels, normalize_with_bounds
from cellvit_ssl.data.readers import ChannelStack, open_labels, open_stack
from cellvit_ssl.errors import ConfigError, DataError

__all__ = ["BOX_COLUMNS", "CENTROID_COLUMNS", "ROOT_COLUMN", "Box", "RawSample", "SampleReader", "cells_from_mask",
           "read_region"]

#: Index columns of a region in pixels.
BOX_COLUMNS = ("box_y0", "box_x0", "box_y1", "box_x1")
#: Index columns of a cell centre in pixels.
CENTROID_COLUMNS = ("centroid_y", "centroid_x")
#: What to do about a file lacking a wanted channel / naming an unknown one, in training's keys.
TRAINING_REMEDIES = {
    "missing": "Fix data.channels or data.channel_map, or allow absent channels (data.missing_channels=pad)",
    "unknown": "",
}
#: Index column of the folder a row's relative ``path`` starts from (written by the index builder).
ROOT_COLUMN = "root"
#: Open stacks kept per process (least recently used are dropped; CHAMMI has ~220k files).
STACK_CACHE_SIZE = 256


@dataclass(frozen=True)
class Box:
    """A region in pixels: rows ``[y0, y1)``, columns ``[x0, x1)``; it may reach past the image.

    Pixels outside the image read as zeros.
    """

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        """Rows."""
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        """Columns."""
        return self.x1 - self.x0

    @classmethod
    def around(cls, centre: tuple[float, float], size: int) -> Box:
        """The ``size``-px square centred on ``centre`` ``(y, x)`` (half-pixel centres round half to even)."""
        y0, x0 = int(round(centre[0])) - size // 2, int(round(centre[1])) - size // 2
        return cls(y0, x0, y0 + size, x0 + size)

    @property
    def centre(self) -> tuple[float, float]:
        """``(y, x)`` centre."""
        return (self.y0 + self.y1) / 2, (self.x0 + self.x1) / 2

    def as_tuple(self) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)``."""
        return self.y0, self.x0, self.y1, self.x1


def read_region(image, box: Box) -> np.ndarray:
    """Pixels of ``box`` from a ``(..., H, W)`` array-like, zero-padded outside the image.

    Only the part inside the image is read (``image[..., ys:ye, xs:xe]``), so Zarr / dask
    arrays load just the chunks the box touches.

    Raises:
        DataError: If the box lies entirely outside the image.
    """
    height, width = image.shape[-2:]
    ys, xs = max(box.y0, 0), max(box.x0, 0)
    ye, xe = min(box.y1, height), min(box.x1, width)
    if ye <= ys or xe <= xs:
        raise DataError(f"box (y0={box.y0}, x0={box.x0}, y1={box.y1}, x1={box.x1}) lies outside the "
                        f"{height}x{width} image")
    part = np.asarray(image[..., ys:ye, xs:xe])
    out = np.zeros(part.shape[:-2] + (box.height, box.width), dtype=part.dtype)
    out[..., ys - box.y0 : ye - box.y0, xs - box.x0 : xe - box.x0] = part
    return out


def cells_from_mask(mask: np.ndarray, source: str = "mask") -> pd.DataFrame:
    """One row per labelled object of a 2-D integer mask, in ascending label order.

    Columns: ``cell_label`` (the label id), ``centroid_y``, ``centroid_x`` (centre of mass),
    the bounding box ``box_y0, box_x0, box_y1, box_x1`` and ``area`` in pixels
    (``skimage.measure.regionprops_table``).

    Raises:
        DataError: If the mask is not a 2-D integer image.
    """
    from skimage.measure import regionprops_table

    mask = np.asarray(mask)
    while mask.ndim > 2 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2 or not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise DataError(f"{source}: expected a 2-D integer label image, got shape {mask.shape} dtype {mask.dtype}")
    if mask.dtype.kind in "ib" and mask.size and mask.min() < 0:
        raise DataError(f"{source}: negative label ids; expected 0 for background and positive ids for cells")
    props = regionprops_table(mask.astype(np.int64, copy=False), properties=("label", "centroid", "bbox", "area"))
    table = pd.DataFrame({
        "cell_label": props["label"].astype(np.int64),
        "centroid_y": props["centroid-0"].astype(np.float64),
        "centroid_x": props["centroid-1"].astype(np.float64),
        "box_y0": props["bbox-0"].astype(np.int64),
        "box_x0": props["bbox-1"].astype(np.int64),
        "box_y1": props["bbox-2"].astype(np.int64),
        "box_x1": props["bbox-3"].astype(np.int64),
        "area": props["area"].astype(np.int64),
    })
    return table.sort_values("cell_label", ignore_index=True)


@dataclass
class RawSample:
    """One row's raw pixels, before normalisation.

    Attributes:
        pixels: ``(C, h, w)`` float32 raw intensities, one plane per name in ``names``; zeros
            for absent channels.
        names: Canonical channel names of the planes.
        present: ``(C,)`` bool, False for channels the file lacks (``missing_channels=pad``).
        box: The region that was read (may reach past the image border: zero padding).
        kind: How the row was sampled (``cells``, ``tiles`` or ``image``).
        source: The file, for messages.
        row: The row number in the index.
    """

    pixels: np.ndarray
    names: list[str]
    present: np.ndarray
    box: Box
    kind: SampleMode
    source: str
    row: int

    @property
    def is_image(self) -> bool:
        """Whether the sample is a whole image / box to be fitted into a square."""
        return self.kind == SampleMode.image


def _blank(pixels: np.ndarray) -> bool:
    flat = pixels.reshape(pixels.shape[0], -1)
    return bool(flat.shape[1] == 0 or (flat.max(axis=1) == flat.min(axis=1)).all())


class SampleReader:
    """Raw samples for the rows of an index table; the only code that reads an index row.

    Args:
        table: The index (one row per image, box or cell; column ``path`` required).
        root: Folder relative paths are resolved against, overriding the rows' ``root``
            column (``data.root``: the images moved); None to use the column.
        default_root: Folder for rows without a usable ``root`` column (the index file's
            folder; default: the working folder).
        channels: Wanted channel names in output order; None keeps every row's own channels.
        vocabulary: Channel vocabulary (with the run's ``data.channel_map``).
        sample_size: Side of cell and tile samples in pixels.
        mode: ``auto`` | ``cells`` | ``tiles`` | ``image`` (see the module docstring).
        missing_channels: ``error`` when a file lacks a wanted channel, or ``pad`` (zeros,
            ``present`` False).
        level: Pyramid level (OME-Zarr, pyramidal TIFF); centroids and boxes are in that
            level's pixels.
        z: ``"max"`` (maximum projection) or a Z slice.
        t: Time frame.
        missing_chunks: ``error`` or ``fill`` for chunks absent from a Zarr store.
        percentiles: Tiles: percentiles that scale an image to judge foreground.
        foreground_threshold: Tiles: a pixel is foreground when a channel scaled to [0, 1]
            exceeds this.
        min_foreground: Tiles: redraw tiles with a smaller foreground fraction (0 = off).
        tile_attempts: Tiles: draws per sample before keeping the best.
        bounds: Channel → ``(low, high)`` dataset bounds, used instead of image percentiles
            to judge tile foreground.
        mask_background: Zero the pixels of a cell crop outside its cell (needs
            ``labels_path`` and ``cell_label`` columns).
        source: Name of the index in messages.
        remedies: What a user can do about a file that lacks a wanted channel (``missing``) or
            names a channel the vocabulary does not know (``unknown``), in the caller's terms
            (config keys and flags); defaults are training's.

    Raises:
        DataError: If the table has no ``path`` column, or background masking lacks its columns.
    """

    def __init__(self, table: pd.DataFrame, *, root: str | Path | None = None,
                 default_root: str | Path | None = None, channels: Sequence[str] | None = None,
                 vocabulary: ChannelVocabulary | None = None,
                 sample_size: int = 64, mode: SampleMode | str = SampleMode.auto,
                 missing_channels: MissingChannels | str = MissingChannels.error, level: int = 0,
                 z: str | int = "max", t: int = 0, missing_chunks: str = "error",
                 percentiles: Sequence[float] = (1.0, 99.8), foreground_threshold: float = 0.1,
                 min_foreground: float = 0.0, tile_attempts: int = 10,
                 bounds: Mapping[str, tuple[float, float]] | None = None, mask_background: bool = False,
                 source: str = "index", remedies: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.remedies = {**TRAINING_REMEDIES, **(remedies or {})}
        if "path" not in table.columns:
            raise DataError(f"{source}: no 'path' column (columns: {list(table.columns)})")
        if mask_background and not {"labels_path", "cell_label"} <= set(table.columns):
            raise DataError(f"{source}: background masking needs 'labels_path' and 'cell_label' columns "
                            f"(columns: {list(table.columns)})")
        self.table = table.reset_index(drop=True)
        self.root = Path(root).expanduser() if root is not None and str(root) != "" else None
        self.default_root = Path(default_root).expanduser() if default_root is not None else Path.cwd()
        self._row_roots = ROOT_COLUMN in self.table.columns
        self._root_exists: dict[str, bool] = {}
        self.vocabulary = vocabulary or BUILTIN
        self.channels = None if channels is None else self.vocabulary.canonical_names(channels, source="data.channels")
        self.sample_size = int(sample_size)
        self.mode = SampleMode(mode)
        self.missing_channels = MissingChannels(missing_channels)
        self.read_options = {"level": int(level), "z": z, "t": int(t), "missing_chunks": str(missing_chunks)}
        self.percentiles = tuple(float(p) for p in percentiles)
        self.foreground_threshold = float(foreground_threshold)
        self.min_foreground = float(min_foreground)
        self.tile_attempts = max(1, int(tile_attempts))
        self.bounds = dict(bounds) if bounds else None
        self.mask_background = bool(mask_background)
        self._has_centroids = all(c in self.table.columns for c in CENTROID_COLUMNS)
        self._has_boxes = all(c in self.table.columns for c in BOX_COLUMNS)
        self._stacks: OrderedDict[tuple, tuple[ChannelStack, list[str]]] = OrderedDict()
        self._labels: OrderedDict[str, np.ndarray] = OrderedDict()
        self._reference: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.table)

    # ----------------------------------------------------------------------------- files
    def base(self, i: int | None = None) -> tuple[Path, str]:
        """The folder row ``i``'s relative paths start from, and why (for messages).

        ``data.root`` when given, else the row's ``root`` column while that folder exists, else
        the index's folder (see the module docstring).
        """
        if self.root is not None:
            return self.root, "data.root / --root"
        recorded = self.table.iloc[i][ROOT_COLUMN] if self._row_roots and i is not None else None
        if isinstance(recorded, str) and recorded.strip():
            if recorded not in self._root_exists:
                self._root_exists[recorded] = Path(recorded).expanduser().is_dir()
            if self._root_exists[recorded]:
                return Path(recorded).expanduser(), f"the index's {ROOT_COLUMN!r} column"
            return self.default_root, (f"the index's folder, as its {ROOT_COLUMN!r} column names {recorded}, "
                                       "which does not exist")
        return self.default_root, "the index's folder"

    def row_bases(self) -> pd.Series:
        """The folder (absolute) every row's relative paths start from, by the rules of :meth:`base`."""
        if self.root is not None:
            return pd.Series(str(self.root.resolve()), index=self.table.index, dtype=object)
        default = str(self.default_root.resolve())
        if not self._row_roots:
            return pd.Series(default, index=self.table.index, dtype=object)

        def usable(recorded) -> str:
            if not isinstance(recorded, str) or not recorded.strip():
                return default
            if recorded not in self._root_exists:
                self._root_exists[recorded] = Path(recorded).expanduser().is_dir()
            return str(Path(recorded).expanduser().resolve()) if self._root_exists[recorded] else default

        return self.table[ROOT_COLUMN].map(usable).astype(object)

    def resolve(self, path: str, i: int | None = None) -> str:
        """A row's ``path`` (``;``-separated for one file per channel) made absolute (see :meth:`base`)."""
        base = self.base(i)[0]
        parts = []
        for part in str(path).split(";"):
            p = Path(part.strip()).expanduser()
            parts.append(str(p if p.is_absolute() else base / p))
        return ";".join(parts)

    def roots(self) -> dict:
        """Where relative paths are looked up: the override, the recorded roots, the fallback (fingerprints)."""
        recorded = sorted({str(r) for r in self.table[ROOT_COLUMN].dropna().unique()}) if self._row_roots else []
        return {"root": str(self.root.resolve()) if self.root is not None else None, "recorded": recorded,
                "default": str(self.default_root.resolve())}

    def missing_file_hint(self, i: int) -> str:
        """Where row ``i``'s relative paths were looked up, and how to point elsewhere."""
        base, why = self.base(i)
        fix = ("point data.root (--root) at the folder the index's paths start from" if self.root is None
               else "check data.root (--root)")
        return f"{self._where(i)}; relative paths are resolved against {base} ({why}): {fix}"

    def check_files(self, rows: Sequence[int] | None = None) -> None:
        """Check that the files of some rows exist (default: the first and the last), without opening them.

        A cheap check before a long run, so that a wrong root fails at once, naming where it looked.

        Raises:
            DataError: On the first missing file.
        """
        n = len(self.table)
        for i in sorted({r % n for r in (rows if rows is not None else (0, -1))}) if n else ():
            raw = self.table.iloc[i]["path"]
            if not isinstance(raw, str) or not raw.strip():
                continue
            for part in self.resolve(raw, i).split(";"):
                if part and not Path(part).exists():
                    raise DataError(f"{part}: no such file or folder ({self.missing_file_hint(i)})")

    def _where(self, i: int) -> str:
        return f"{self.source} row {i}"

    def open(self, i: int) -> tuple[ChannelStack, list[str]]:
        """Row ``i``'s image (cached) and the canonical names of its channels in file order.

        Raises:
            DataError: If the file is missing or unreadable, a channel name is unknown, the
                index's names contradict the names stored in the file, or (``missing_channels=
                error``) a wanted channel is absent.
        """
        row = self.table.iloc[i]
        raw_path = row["path"]
        if not isinstance(raw_path, str) or not raw_path.strip():
            raise DataError(f"{self._where(i)}: empty 'path'; expected an image file or folder")
        path = self.resolve(raw_path, i)
        width = row.get("channel_width")
        width = _as_int(width, "channel_width", self._where(i)) if width is not None and pd.notna(width) else None
        names = row.get("channels")
        names = [n for n in str(names).split(";") if n] if isinstance(names, str) and names else None
        key = (path, width, tuple(names or ()))
        if key in self._stacks:
            self._stacks.move_to_end(key)
            return self._stacks[key]
        try:
            stack = open_stack(path, channel_names=names, channel_width=width, **self.read_options)
        except DataError as exc:
            if "no such file" in str(exc):
                raise DataError(f"{exc} ({self.missing_file_hint(i)})") from exc
            raise DataError(f"{exc} ({self._where(i)})") from exc
        try:
            found = self.vocabulary.canonical_names(stack.channel_names, source=stack.path)
        except DataError as exc:
            unknown = self.remedies["unknown"]
            raise DataError(f"{exc} ({self._where(i)}{'; ' + unknown if unknown else ''})") from exc
        self._check_file_names(stack, found, i)
        if self.channels is not None and self.missing_channels == MissingChannels.error:
            missing = [c for c in self.channels if c not in found]
            if missing:
                raise DataError(
                    f"{stack.path}: has {len(found)} channels {stack.channel_names} but the config asks for "
                    f"{len(self.channels)} {self.channels}; missing {missing} ({self._where(i)}). "
                    f"{self.remedies['missing']}"
                )
        self._stacks[key] = (stack, found)
        if len(self._stacks) > STACK_CACHE_SIZE:
            self._stacks.popitem(last=False)
        return stack, found

    def _check_file_names(self, stack: ChannelStack, found: list[str], i: int) -> None:
        """Refuse index channel names that contradict the names stored in the file itself."""
        stored = stack.metadata.get("file_channel_names")
        if not stored or stored == stack.channel_names:
            return
        try:
            stored_canon = self.vocabulary.canonical_names(stored)
        except DataError:  # placeholder names such as "C0", "Channel:0:1": the index's names stand
            return
        if stored_canon != found:
            raise DataError(
                f"{stack.path}: the file names its channels {stored} ({stored_canon}) but the index says "
                f"{stack.channel_names} ({found}); the channels would be swapped. Fix the index's 'channels' "
                f"column (or --channels), or relabel with data.channel_map ({self._where(i)})"
            )

    def layout(self, found: list[str]) -> tuple[list[str], list[int | None]]:
        """Output channel names and, for each, its position in the file (None = absent)."""
        if self.channels is None:
            return found, list(range(len(found)))
        return self.channels, [found.index(c) if c in found else None for c in self.channels]

    # ----------------------------------------------------------------------------- where
    def _centroid(self, i: int) -> tuple[float, float] | None:
        if not self._has_centroids:
            return None
        row = self.table.iloc[i]
        values = [row[c] for c in CENTROID_COLUMNS]
        if all(pd.isna(v) for v in values):  # a row of another kind in a mixed index (a field, a tape)
            return None
        return (_as_float(values[0], "centroid_y", self._where(i)), _as_float(values[1], "centroid_x",
                                                                              self._where(i)))

    def _box_column(self, i: int) -> Box | None:
        if not self._has_boxes:
            return None
        row = self.table.iloc[i]
        values = [row[c] for c in BOX_COLUMNS]
        if all(pd.isna(v) for v in values):
            return None
        y0, x0, y1, x1 = (int(round(_as_float(v, c, self._where(i)))) for v, c in zip(values, BOX_COLUMNS))
        if y1 <= y0 or x1 <= x0:
            raise DataError(f"{self._where(i)}: box ({y0}, {x0}, {y1}, {x1}) is empty; expected y0 < y1 and x0 < x1")
        return Box(y0, x0, y1, x1)

    def kind(self, i: int) -> SampleMode:
        """How row ``i`` is sampled (``auto`` resolved by the row)."""
        if self.mode != SampleMode.auto:
            return self.mode
        if self._centroid(i) is not None or self._box_column(i) is not None:
            return SampleMode.cells
        width = self.table.iloc[i].get("channel_width")
        if width is not None and pd.notna(width):
            return SampleMode.image
        return SampleMode.tiles

    def box(self, i: int, stack: ChannelStack | None = None) -> Box:
        """The region row ``i`` reads in ``cells`` or ``image`` mode.

        Raises:
            DataError: If a ``cells`` row has neither a centroid nor a box.
        """
        kind = self.kind(i)
        _, height, width = (stack or self.open(i)[0]).shape
        given = self._box_column(i)
        if kind == SampleMode.cells:
            centre = self._centroid(i) or (given.centre if given is not None else None)
            if centre is None:
                raise DataError(f"{self._where(i)}: no centroid_y/centroid_x or box columns; data.mode=cells needs "
                                "them (or use data.mode=tiles / image)")
            return Box.around(centre, self._positive_size(kind))
        if kind == SampleMode.image:
            return given if given is not None else Box(0, 0, height, width)
        raise DataError(f"{self._where(i)}: tiles are drawn at random (read with an rng) or on a grid (tile_boxes)")

    def tile_boxes(self, i: int) -> list[Box]:
        """A grid of non-overlapping ``sample_size`` tiles covering row ``i``'s image, row by row."""
        stack, _ = self.open(i)
        _, height, width = stack.shape
        size = self._positive_size(SampleMode.tiles)
        return [Box(y, x, y + size, x + size) for y in range(0, height, size) for x in range(0, width, size)]

    def _positive_size(self, kind: SampleMode) -> int:
        if self.sample_size <= 0:
            raise ConfigError(f"data.sample_size={self.sample_size}; {kind.value} mode needs a positive crop size "
                              "(0 = native size is for whole images only)")
        return self.sample_size

    # ----------------------------------------------------------------------------- pixels
    def read(self, i: int, rng: np.random.Generator | None = None, box: Box | None = None) -> RawSample:
        """Row ``i`` as raw pixels.

        Args:
            i: Row number.
            rng: Random generator for ``tiles`` rows (required there unless ``box`` is given).
            box: Read this region instead of the row's own (e.g. one tile of :meth:`tile_boxes`).

        Raises:
            DataError: On an unreadable file or row, NaN / Inf pixels, or a blank sample.
        """
        stack, found = self.open(i)
        names, positions = self.layout(found)
        present = np.array([p is not None for p in positions], dtype=bool)
        read_at = [p for p in positions if p is not None]
        kind = self.kind(i)
        if box is None and kind == SampleMode.tiles:
            if rng is None:
                raise DataError(f"{self._where(i)}: a tiles row needs a random generator or a box")
            part, box = self._random_tile(stack, [n for n, p in zip(names, positions) if p is not None], read_at,
                                          rng)
        else:
            box = box or self.box(i, stack)
            part = self._read_box(stack, box, read_at, i)
        try:
            check_pixels(part, stack.path)
        except DataError as exc:
            raise DataError(f"{exc} ({self._where(i)})") from exc
        if self.mask_background:
            part = part * (read_region(self._label_image(i), box) == int(self.table.iloc[i]["cell_label"]))
        if _blank(part):
            value = part.reshape(-1)[0] if part.size else "no pixels"
            raise DataError(f"{stack.path}: the {kind.value} sample of {self._where(i)} is blank (every channel "
                            f"constant at {value}); expected image content")
        pixels = np.zeros((len(names), *part.shape[1:]), np.float32)
        pixels[present] = part
        return RawSample(pixels, list(names), present, box, kind, stack.path, i)

    def _read_box(self, stack: ChannelStack, box: Box, positions: list[int], i: int) -> np.ndarray:
        try:
            return read_region(_Region(stack, positions), box)
        except DataError as exc:
            if "lies outside" in str(exc):
                raise DataError(f"{stack.path} ({self._where(i)}): {exc}") from exc
            raise

    def _label_image(self, i: int):
        path = self.resolve(str(self.table.iloc[i]["labels_path"]), i)
        if path not in self._labels:
            self._labels[path] = open_labels(path, level=self.read_options["level"])
            if len(self._labels) > 8:
                self._labels.popitem(last=False)
        return self._labels[path]

    def _reference_bounds(self, stack: ChannelStack, names: list[str], positions: list[int],
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Image-level (or dataset) intensity bounds, for judging whether a tile is foreground."""
        if self.bounds is not None and all(n in self.bounds for n in names):
            return (np.array([self.bounds[n][0] for n in names], np.float32),
                    np.array([self.bounds[n][1] for n in names], np.float32))
        key = stack.path
        if key not in self._reference:
            levels = stack.metadata.get("levels", 1)
            _, h, w = stack.shape
            if levels > 1:  # the coarsest pyramid level is a cheap overview of the whole image
                coarse = open_stack(stack.path, stack.channel_names, **{**self.read_options, "level": levels - 1})
                pixels = coarse.read()
            elif h * w <= 2048 * 2048:
                pixels = stack.read()
            else:
                size = self._positive_size(SampleMode.tiles)
                pixels = np.concatenate([self._tile_at(stack, range(stack.num_channels), rng, size)[0]
                                         for _ in range(8)], axis=2)
            check_pixels(pixels, stack.path)
            lo, hi = np.percentile(pixels.astype(np.float32), self.percentiles, axis=(1, 2))
            self._reference[key] = (lo, hi)
        lo, hi = self._reference[key]
        return lo[positions], hi[positions]

    def _tile_at(self, stack: ChannelStack, positions, rng: np.random.Generator, size: int) -> tuple[np.ndarray, Box]:
        _, height, width = stack.shape
        y0 = int(rng.integers(0, max(height - size, 0) + 1))
        x0 = int(rng.integers(0, max(width - size, 0) + 1))
        box = Box(y0, x0, y0 + size, x0 + size)
        return read_region(_Region(stack, list(positions)), box), box

    def _random_tile(self, stack: ChannelStack, names: list[str], positions: list[int],
                     rng: np.random.Generator) -> tuple[np.ndarray, Box]:
        size = self._positive_size(SampleMode.tiles)
        best, best_fg = None, -1.0
        bounds = None
        for _ in range(self.tile_attempts):
            tile, box = self._tile_at(stack, positions, rng, size)
            check_pixels(tile, stack.path)
            if _blank(tile):
                continue
            if self.min_foreground <= 0:
                return tile, box
            if bounds is None:
                bounds = self._reference_bounds(stack, names, positions, rng)
            scaled = normalize_with_bounds(tile, *bounds)
            fg = float((scaled.max(axis=0) > self.foreground_threshold).mean())
            if fg >= self.min_foreground:
                return tile, box
            if fg > best_fg:
                best, best_fg = (tile, box), fg
        if best is None:
            raise DataError(f"{stack.path}: {self.tile_attempts} random {size}px tiles were all blank "
                            "(every channel constant); expected image content")
        return best


class _Region:
    """``view[..., ys:ye, xs:xe]`` on some channels of a :class:`ChannelStack`, reading only that region."""

    def __init__(self, stack: ChannelStack, positions: list[int]) -> None:
        self.stack, self.positions = stack, positions
        self.shape = (len(positions), *stack.shape[1:])

    def __getitem__(self, key) -> np.ndarray:
        ys, xs = key[-2], key[-1]
        return self.stack.read((ys.start, xs.start, ys.stop - ys.start, xs.stop - xs.start), self.positions)


def _as_float(value, column: str, where: str) -> float:
    shown = value.item() if isinstance(value, np.generic) else value
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {column}={shown!r} is not a number") from None
    if not math.isfinite(out):
        raise DataError(f"{where}: {column}={shown!r} is not a finite number")
    return out


def _as_int(value, column: str, where: str) -> int:
    out = _as_float(value, column, where)
    if out != int(out) or out <= 0:
        raise DataError(f"{where}: {column}={value!r}; expected a positive whole number")
    return int(out)
