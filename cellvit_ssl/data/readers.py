"""Lazy multichannel image readers behind one function, :func:`open_stack`.

Supported sources, each returned as a :class:`ChannelStack` (``(C, Y, X)`` + channel names):

- OME-TIFF and ImageJ hyperstacks (tifffile): the channel axis comes from the metadata; a Z
  axis is reduced by maximum projection or one chosen slice, a T axis by one chosen frame;
  pyramidal TIFFs expose their levels. A plain 3-D TIFF is read as ``(C, Y, X)``.
- A list of single-channel files (one file per channel: TIFF, PNG or JPEG, e.g. a Cell Painting
  site or an HPA ``ID_red.png`` / ``_green`` / ``_blue`` / ``_yellow`` set) as one stack.
- Zarr v2 / v3 arrays with a channel axis (axes from ``axes``, ``_ARRAY_DIMENSIONS`` or the
  v3 ``dimension_names``; 3-D arrays without them are ``(C, Y, X)``).
- OME-Zarr multiscale images (NGFF 0.4 on Zarr v2, 0.5 on Zarr v3, also inside a
  bioformats2raw container): pick the resolution level; channel names from ``omero``.
- CHAMMI "tapes": a 2-D PNG (or TIFF) holding the channels side by side, folded back into
  ``(C, Y, channel_width)``.

Nothing but metadata is read when a stack is opened. :meth:`ChannelStack.read` reads one
region of some channels; for chunked sources (Zarr, tiled TIFF) only the overlapping chunks
are touched. Zarr chunks that are missing from the store raise instead of being silently
filled with zeros (see :mod:`cellvit_ssl.data.zarr_store`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellvit_ssl.data.zarr_store import CheckedStore
from cellvit_ssl.errors import DataError

Region = tuple[int, int, int, int]  # (y0, x0, height, width)

#: File name endings read as single-plane tapes or images by Pillow.
PNG_SUFFIXES = (".png",)
TIFF_SUFFIXES = (".tif", ".tiff")
#: File name endings of single-plane images that can hold one channel of a per-channel file list.
PLANE_SUFFIXES = TIFF_SUFFIXES + PNG_SUFFIXES + (".jpg", ".jpeg")
ZARR_MARKERS = ("zarr.json", ".zattrs", ".zarray", ".zgroup")


class _TiffLogCapture(logging.Filter):
    """Keeps tifffile's log messages off the console while this package reads a TIFF (per thread).

    tifffile logs what it finds wrong with a file (truncated IFDs, bad offsets) instead of raising;
    :func:`_tifffile_messages` collects those messages so they become part of one named error.
    """

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        sink = getattr(self.local, "sink", None)
        if sink is None:
            return True
        sink.append(record.getMessage())
        return False


_TIFF_LOG = _TiffLogCapture()
logging.getLogger("tifffile").addFilter(_TIFF_LOG)


@contextlib.contextmanager
def _tifffile_messages() -> Iterator[list[str]]:
    """Collect (and silence) what tifffile logs in this block."""
    outer = getattr(_TIFF_LOG.local, "sink", None)
    sink: list[str] = []
    _TIFF_LOG.local.sink = sink
    try:
        yield sink
    finally:
        _TIFF_LOG.local.sink = outer
        if outer is not None:
            outer.extend(sink)


def _tiff_damage(path: str, messages: Sequence[str], data_end: int = 0) -> str | None:
    """Why a TIFF looks truncated or damaged (from tifffile's messages and its data offsets), or None."""
    size = os.path.getsize(path)
    offsets = [int(n) for m in messages for n in re.findall(r"offset(?: to first page)? (\d+)", m)]
    beyond = max([o for o in offsets if o >= size] + ([data_end] if data_end > size else []), default=0)
    if beyond:
        return (f"the file is truncated: it is {size} bytes long but refers to data at byte {beyond}; copy or "
                "export it again")
    if messages:
        return f"the file is damaged (tifffile: {messages[0]})"
    return None


@dataclass
class ChannelStack:
    """A lazily read ``(C, Y, X)`` image with channel names.

    Attributes:
        path: The file or folder it was opened from (``;``-joined for a list of files).
        channel_names: One name per channel, as stored in the file (or as given).
        shape: ``(C, Y, X)`` after Z / T reduction.
        dtype: Pixel type on disk.
        metadata: Format-specific extras (format, pyramid level and count, original axes and
            shape, Z / T choice).
        z: ``"max"`` (maximum projection over Z) or the index of the Z slice to read.
        t: Index of the time frame to read.
        store: For Zarr sources, the :class:`~cellvit_ssl.data.zarr_store.CheckedStore`
            that counts chunk reads; None otherwise.
    """

    path: str
    channel_names: list[str]
    shape: tuple[int, int, int]
    dtype: np.dtype
    _source: Any = field(repr=False)
    _axes: str = field(repr=False, default="CYX")
    metadata: dict = field(default_factory=dict)
    z: str | int = "max"
    t: int = 0
    store: CheckedStore | None = field(default=None, repr=False)

    @property
    def num_channels(self) -> int:
        """Number of channels."""
        return self.shape[0]

    def _selection(self, c: int | slice, y: slice, x: slice) -> tuple:
        index: dict[str, Any] = {"C": c, "Y": y, "X": x, "T": self.t}
        index["Z"] = slice(None) if self.z == "max" else int(self.z)
        return tuple(index[ax] for ax in self._axes)

    def _reduce(self, data: np.ndarray, channel_kept: bool) -> np.ndarray:
        kept = [ax for ax in self._axes if ax != "T" and not (ax == "Z" and self.z != "max")]
        if not channel_kept:
            kept.remove("C")
        if "Z" in kept:  # maximum projection over Z
            data = data.max(axis=kept.index("Z"))
            kept.remove("Z")
        if channel_kept:
            return np.moveaxis(data, [kept.index("C"), kept.index("Y"), kept.index("X")], [0, 1, 2])
        return np.moveaxis(data, [kept.index("Y"), kept.index("X")], [0, 1])

    def read(self, region: Region | None = None, channels: Sequence[int] | None = None) -> np.ndarray:
        """Read pixels as ``(C, h, w)`` in the on-disk dtype.

        Args:
            region: ``(y0, x0, height, width)``; the part outside the image is not read and
                must not be asked for. None reads the whole plane.
            channels: Channel positions to read, in the order wanted; None reads all. Only
                these channels are read from disk.

        Raises:
            DataError: If the region lies outside the image, a channel position does not
                exist, or the file cannot be read (truncated, corrupt, missing chunk).
        """
        n, height, width = self.shape
        y0, x0, h, w = region if region is not None else (0, 0, height, width)
        if y0 < 0 or x0 < 0 or h <= 0 or w <= 0 or y0 + h > height or x0 + w > width:
            raise DataError(
                f"{self.path}: region (y0={y0}, x0={x0}, h={h}, w={w}) is outside the image "
                f"of size {height}x{width}"
            )
        ys, xs = slice(y0, y0 + h), slice(x0, x0 + w)
        if channels is not None:
            channels = [int(c) for c in channels]
            bad = [c for c in channels if not 0 <= c < n]
            if bad:
                raise DataError(f"{self.path}: channel positions {bad} do not exist; the image has {n} channels")
        try:
            with _tifffile_messages():
                return self._read(ys, xs, h, w, channels)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                f"{self.path}: could not read pixels ({type(exc).__name__}: {exc}); the file may be "
                "truncated or corrupt"
            ) from exc

    def _read(self, ys: slice, xs: slice, h: int, w: int, channels: list[int] | None) -> np.ndarray:
        """:meth:`read` of a checked region and channel list."""
        if channels is None:
            return self._reduce(np.asarray(self._source[self._selection(slice(None), ys, xs)]), True)
        if not channels:
            return np.zeros((0, h, w), self.dtype)
        lo, hi = min(channels), max(channels) + 1
        if hi - lo <= 2 * len(set(channels)):  # one read of the covering range beats a read per channel
            block = self._reduce(np.asarray(self._source[self._selection(slice(lo, hi), ys, xs)]), True)
            return block[[c - lo for c in channels]]
        return np.stack([self._reduce(np.asarray(self._source[self._selection(c, ys, xs)]), False)
                         for c in channels])


def _checked_names(path: str, found: Sequence[str] | None, given: Sequence[str] | None, n: int) -> list[str]:
    if given is not None:
        given = [str(c) for c in given]
        if len(given) != n:
            raise DataError(f"{path}: has {n} channels but {len(given)} channel names were given ({given})")
        return given
    if found is None or len(found) != n or any(not str(c).strip() for c in found):
        raise DataError(
            f"{path}: the file does not name its {n} channels; give channel names "
            "(the index's 'channels' column or open_stack(..., channel_names=[...]))"
        )
    return [str(c) for c in found]


def _normalise_axes(path: str, axes: str) -> str:
    axes = axes.upper()
    if "C" not in axes and axes.count("S") == 1:
        axes = axes.replace("S", "C")  # samples per pixel (planar or interleaved) are channels
    generic = [a for a in axes if a in "QI"]
    if "C" not in axes and len(generic) == 1:
        axes = axes.replace(generic[0], "C")  # a plain 3-D stack without metadata: (C, Y, X)
    if "Y" not in axes or "X" not in axes:
        raise DataError(f"{path}: image axes {axes!r} have no Y and X axes; expected a 2-D image plane")
    unknown = set(axes) - set("TCZYX")
    if unknown:
        raise DataError(f"{path}: unsupported axes {sorted(unknown)} in {axes!r}; expected T, C, Z, Y, X")
    if len(set(axes)) != len(axes):
        raise DataError(f"{path}: repeated axes in {axes!r}")
    return axes


def _as_stack(path: str, source: Any, axes: str, names: Sequence[str] | None, given: Sequence[str] | None,
              metadata: dict, z: str | int = "max", t: int = 0, store: CheckedStore | None = None) -> ChannelStack:
    axes = _normalise_axes(path, axes)
    if "C" not in axes:
        raise DataError(
            f"{path}: image axes {axes!r} have no channel axis; expected a multichannel image "
            "with axes containing C, Y and X (a single 2-D plane is not a multichannel image)"
        )
    shape = dict(zip(axes, source.shape))
    if any(v == 0 for v in source.shape):
        raise DataError(f"{path}: the image is empty (shape {tuple(source.shape)} for axes {axes!r})")
    z, t = _checked_zt(path, shape, z, t)
    n = shape["C"]
    return ChannelStack(
        path=path,
        channel_names=_checked_names(path, names, given, n),
        shape=(n, shape["Y"], shape["X"]),
        dtype=np.dtype(source.dtype),
        _source=source,
        _axes=axes,
        metadata={**metadata, "axes": axes, "source_shape": tuple(int(s) for s in source.shape),
                  "file_channel_names": [str(c) for c in names] if names else None},
        z=z,
        t=t,
        store=store,
    )


def _checked_zt(path: str, shape: dict, z: str | int, t: int) -> tuple[str | int, int]:
    if isinstance(z, str) and z.strip().lower() == "max":
        z = "max"
    else:
        try:
            z = int(z)
        except (TypeError, ValueError):
            raise DataError(f"{path}: z={z!r}; expected 'max' (maximum projection) or a slice index") from None
        if not 0 <= z < shape.get("Z", 1):
            raise DataError(f"{path}: Z slice {z} requested but the image has {shape.get('Z', 1)} Z slices")
    t = int(t)
    if not 0 <= t < shape.get("T", 1):
        raise DataError(f"{path}: time frame {t} requested but the image has {shape.get('T', 1)} frames")
    return z, t


def _imagej_channel_names(meta: dict, shape: dict) -> list[str] | None:
    labels = meta.get("Labels")
    if not labels:
        return None
    n = shape.get("C", 1)
    if len(labels) == n:
        return list(labels)
    if len(labels) == n * shape.get("Z", 1) * shape.get("T", 1):
        return list(labels[:n])  # ImageJ orders planes C fastest: the first C labels are z=0, t=0
    return None


def _ome_tiff_channel_names(ome_xml: str) -> list[str] | None:
    import tifffile

    image = tifffile.xml2dict(ome_xml)["OME"]["Image"]
    pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
    chans = pixels.get("Channel", [])
    chans = chans if isinstance(chans, list) else [chans]
    return [str(c.get("Name", "")) for c in chans] or None


def _open_tiff(path: str, given: Sequence[str] | None, level: int, z: str | int, t: int) -> ChannelStack:
    import tifffile
    import zarr

    with _tifffile_messages() as messages:
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                axes = series.axes
                levels = len(series.levels)
                first = series.pages[0] if len(series.pages) else None
                data_end = max((o + n for o, n in zip(getattr(first, "dataoffsets", ()),
                                                       getattr(first, "databytecounts", ()))), default=0)
                shape = dict(zip(_normalise_axes(path, axes), series.shape))
                names, fmt = None, "tiff"
                if tif.is_ome:
                    names, fmt = _ome_tiff_channel_names(tif.ome_metadata), "ome-tiff"
                elif tif.is_imagej and tif.imagej_metadata:
                    names, fmt = _imagej_channel_names(tif.imagej_metadata, shape), "imagej-tiff"
            source = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
        except DataError:
            raise
        except Exception as exc:
            found = _tiff_damage(path, messages) or "not a readable TIFF"
            raise DataError(f"{path}: {found} ({type(exc).__name__}: {exc})") from exc
    damage = _tiff_damage(path, messages, data_end)
    if damage and "truncated" in damage:  # what is left may still parse, as another image than was written
        raise DataError(f"{path}: {damage}")
    try:
        if not 0 <= level < levels:
            raise DataError(f"{path}: resolution level {level} requested but the TIFF has {levels}")
        if hasattr(source, "keys") and not hasattr(source, "shape"):  # pyramidal: a group of levels
            source = source[str(level)]
        meta = {"format": fmt, "level": level, "levels": levels}
        return _as_stack(path, source, axes, names, given, meta, z, t)
    except DataError as exc:
        if damage:  # what tifffile found explains what went wrong here
            raise DataError(f"{exc}; {damage}") from exc
        raise


class _FileListSource:
    """Single-channel files presented as one array with a leading channel axis."""

    def __init__(self, paths: list[str], arrays: list[Any]) -> None:
        self.paths = paths
        self.arrays = arrays
        self.shape = (len(arrays), *arrays[0].shape)
        self.dtype = arrays[0].dtype

    def __getitem__(self, selection: tuple) -> np.ndarray:
        c, rest = selection[0], selection[1:]
        if isinstance(c, slice):
            return np.stack([np.asarray(self.arrays[i][rest]) for i in range(*c.indices(len(self.arrays)))])
        return np.asarray(self.arrays[c][rest])


#: Pillow modes of single-channel planes and their pixel types.
_PIL_GRAY_MODES = {"L": np.uint8, "I;16": np.uint16, "I;16B": np.uint16, "I;16L": np.uint16, "I": np.int32,
                   "F": np.float32, "1": np.bool_}
#: Colour modes read as one channel: the maximum over the colour components (per-channel files
#: exported tinted, e.g. HPA's blue nucleus JPEG, hold the whole signal in their brightest component).
_PIL_COLOUR_MODES = {"RGB": np.uint8, "RGBA": np.uint8, "P": np.uint8}


class _PlaneFile:
    """One PNG / JPEG plane, decoded when read (these formats cannot be read in parts)."""

    def __init__(self, path: str) -> None:
        from PIL import Image

        self.path = path
        with Image.open(path) as img:
            if img.mode in _PIL_GRAY_MODES:
                dtype = _PIL_GRAY_MODES[img.mode]
            elif img.mode in _PIL_COLOUR_MODES:
                dtype = _PIL_COLOUR_MODES[img.mode]
            else:
                raise DataError(f"{path}: image mode {img.mode!r}; expected a single-channel (grayscale) plane")
            self.mode = img.mode
            self.shape = (img.height, img.width)
        self.dtype = np.dtype(dtype)

    def __getitem__(self, selection) -> np.ndarray:
        from PIL import Image

        with Image.open(self.path) as img:
            if self.mode in _PIL_COLOUR_MODES:
                plane = np.asarray(img.convert("RGB")).max(axis=-1)
            else:
                plane = np.asarray(img)
        return plane[selection]


def _open_plane(p: str):
    """``(axes, lazy array)`` of one per-channel file."""
    if p.lower().endswith(TIFF_SUFFIXES):
        import tifffile
        import zarr

        with tifffile.TiffFile(p) as tif:
            axes = tif.series[0].axes.upper()
        array = zarr.open(tifffile.imread(p, aszarr=True), mode="r")
        if hasattr(array, "keys") and not hasattr(array, "shape"):
            array = array["0"]
        return axes, array
    return "YX", _PlaneFile(p)


def _open_file_list(paths: Sequence[str | Path], given: Sequence[str] | None, z: str | int, t: int) -> ChannelStack:
    paths = [str(Path(p)) for p in paths]
    joined = ";".join(paths)
    if not paths:
        raise DataError("open_stack was given an empty list of files")
    arrays, axes_seen = [], None
    for p in paths:
        if not Path(p).is_file():
            raise DataError(f"{p}: no such file (one channel of {joined})")
        if not p.lower().endswith(PLANE_SUFFIXES):
            raise DataError(f"{p}: a per-channel file list must hold single-plane images "
                            f"({', '.join(PLANE_SUFFIXES)})")
        with _tifffile_messages() as messages:
            try:
                axes, array = _open_plane(p)
            except DataError:
                raise
            except Exception as exc:
                found = _tiff_damage(p, messages) or "not a readable image"
                raise DataError(f"{p}: {found} ({type(exc).__name__}: {exc})") from exc
        damage = _tiff_damage(p, messages)
        if damage and "truncated" in damage:
            raise DataError(f"{p}: {damage}")
        if "C" in axes or "S" in axes:
            raise DataError(f"{p}: has a channel axis ({axes!r}); a per-channel file list expects one channel per file")
        if axes_seen is None:
            axes_seen, first = axes, (tuple(array.shape), np.dtype(array.dtype))
        elif (axes, tuple(array.shape), np.dtype(array.dtype)) != (axes_seen, *first):
            raise DataError(
                f"{p}: axes {axes!r}, shape {tuple(array.shape)}, dtype {array.dtype} differ from the first "
                f"channel {paths[0]} ({axes_seen!r}, {first[0]}, {first[1]}); channels must match"
            )
        arrays.append(array)
    meta = {"format": "file-list", "files": paths}
    return _as_stack(joined, _FileListSource(paths, arrays), "C" + axes_seen, None, given, meta, z, t)


class _TapeSource:
    """A 2-D image holding ``C`` channels side by side, folded to ``(C, Y, channel_width)`` on read."""

    def __init__(self, path: str, height: int, width: int, dtype: np.dtype, channel_width: int) -> None:
        self.path = path
        self.channel_width = channel_width
        self.shape = (width // channel_width, height, channel_width)
        self.dtype = dtype

    def _decode(self) -> np.ndarray:
        if self.path.lower().endswith(TIFF_SUFFIXES):
            import tifffile

            with _tifffile_messages():
                return np.asarray(tifffile.imread(self.path))
        from PIL import Image

        with Image.open(self.path) as img:
            img.load()
            return np.asarray(img)

    def __getitem__(self, selection: tuple) -> np.ndarray:
        plane = self._decode()
        c, h, w = self.shape
        folded = plane.reshape(h, c, w).transpose(1, 0, 2)
        return folded[selection]


def _open_tape(path: str, given: Sequence[str] | None, channel_width: int | None, **tiff_options) -> ChannelStack:
    try:
        if path.lower().endswith(TIFF_SUFFIXES):
            import tifffile

            with _tifffile_messages(), tifffile.TiffFile(path) as tif:
                shape, dtype = tif.series[0].shape, np.dtype(tif.series[0].dtype)
            if len(shape) != 2:  # already a (C, Y, X) stack, not a tape: channel_width does not apply
                return _open_tiff(path, given, **tiff_options)
        else:
            from PIL import Image

            with Image.open(path) as img:
                modes = {"L": np.uint8, "I;16": np.uint16, "I;16B": np.uint16, "I": np.int32, "F": np.float32,
                         "1": np.bool_}
                if img.mode not in modes:
                    raise DataError(f"{path}: PNG mode {img.mode!r}; expected a grayscale tape (L or I;16)")
                shape, dtype = (img.height, img.width), np.dtype(modes[img.mode])
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
    if len(shape) != 2:
        raise DataError(f"{path}: a channel tape must be a 2-D image (channels side by side); got shape {shape}")
    height, width = shape
    if height == 0 or width == 0:
        raise DataError(f"{path}: the image is empty (shape {shape})")
    cw = int(channel_width) if channel_width else height  # CHAMMI crops are square per channel
    if cw <= 0 or width % cw:
        raise DataError(
            f"{path}: tape width {width} is not a multiple of channel_width={cw}; expected "
            "C channels of equal width side by side"
        )
    meta = {"format": "tape", "channel_width": cw, "tape_shape": (height, width)}
    return _as_stack(path, _TapeSource(path, height, width, dtype, cw), "CYX", None, given, meta)


def _ome_attrs(attrs: dict) -> dict:
    return attrs.get("ome", attrs)  # NGFF 0.5 nests under "ome"; 0.4 does not


def _axis_names(axes: Sequence) -> str:
    return "".join((a["name"] if isinstance(a, dict) else str(a))[0] for a in axes)


def _open_zarr(path: str, given: Sequence[str] | None, level: int, z: str | int, t: int,
               missing_chunks: str) -> ChannelStack:
    import zarr

    store = CheckedStore.local(path, missing_chunks=missing_chunks)
    try:
        node = zarr.open(store=store, mode="r")
    except Exception as exc:
        raise DataError(f"{path}: not a readable Zarr store ({type(exc).__name__}: {exc})") from exc
    if hasattr(node, "shape"):  # a plain array
        attrs = _ome_attrs(dict(node.attrs))
        dims = getattr(node.metadata, "dimension_names", None)
        axes = attrs.get("axes") or attrs.get("_ARRAY_DIMENSIONS") or dims or ("CYX" if node.ndim == 3 else None)
        if axes is None or any(a is None for a in axes):
            raise DataError(
                f"{path}: a {node.ndim}-D Zarr array without axis names; expected (C, Y, X) or an "
                "'axes' attribute such as ['c', 'y', 'x']"
            )
        return _as_stack(path, node, _axis_names(axes), attrs.get("channel_names"), given,
                         {"format": "zarr", "zarr_format": node.metadata.zarr_format}, z, t, store)
    if "multiscales" not in _ome_attrs(dict(node.attrs)) and "0" in node:  # bioformats2raw: series under "0"
        node = node["0"]
    array, meta = multiscale_level(node, level, path)
    attrs = _ome_attrs(dict(node.attrs))
    names = None
    if "omero" in attrs:
        names = [c.get("label", "") for c in attrs["omero"].get("channels", [])] or None
    return _as_stack(path, array, meta.pop("axes"), names, given, {"format": "ome-zarr", **meta}, z, t, store)


def multiscale_level(node, level: int, path: str) -> tuple[Any, dict]:
    """The array of one resolution level of an OME-Zarr multiscale group (image or label image).

    The one place that reads NGFF ``multiscales`` metadata (0.4 flat, 0.5 under ``ome``).

    Returns:
        The (lazy) Zarr array and ``{"axes", "level", "levels", "version"}``.

    Raises:
        DataError: If ``node`` has no multiscales metadata or the level does not exist.
    """
    attrs = _ome_attrs(dict(node.attrs))
    if "multiscales" not in attrs:
        raise DataError(f"{path}: a Zarr group without OME 'multiscales' metadata; expected an OME-Zarr image")
    ms = attrs["multiscales"][0]
    datasets = ms["datasets"]
    if not 0 <= level < len(datasets):
        raise DataError(f"{path}: resolution level {level} requested but the pyramid has {len(datasets)}")
    try:
        array = node[datasets[level]["path"]]
    except Exception as exc:
        raise DataError(f"{path}: pyramid level {level} ({datasets[level]['path']!r}) cannot be opened: {exc}") from exc
    axes = _axis_names(ms["axes"]) if "axes" in ms else "YX"[-array.ndim:]
    return array, {"axes": axes, "level": level, "levels": len(datasets), "version": ms.get("version",
                                                                                             attrs.get("version"))}


def open_labels(path: str | Path, level: int = 0, name: str | None = None):
    """A segmentation mask ``(Y, X)`` as a lazy array: TIFF / PNG, a Zarr array, or OME-Zarr labels.

    Accepts a label image file, a Zarr array, an OME-Zarr label image (``.../labels/cells``), an
    OME-Zarr image that holds a ``labels`` group (its label ``name``, or the first one), or the
    ``labels`` group itself. Singleton leading axes (``(1, 1, Y, X)``) are dropped.

    Args:
        path: File or folder.
        level: Pyramid level of an OME-Zarr label image (must match the image's level).
        name: Which label image of an OME-Zarr ``labels`` group (default: the first listed).

    Raises:
        DataError: If it is missing, unreadable, or not 2-D after dropping singleton axes.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"label mask {str(p)!r}: no such file or folder")
    try:
        if p.is_file():
            if p.name.lower().endswith(TIFF_SUFFIXES):
                import tifffile

                with _tifffile_messages() as messages:
                    mask = np.asarray(tifffile.imread(p))
                damage = _tiff_damage(str(p), messages)
                if damage:
                    raise DataError(f"label mask {str(p)!r}: {damage}")
            else:
                from PIL import Image

                with Image.open(p) as img:
                    mask = np.asarray(img)
        else:
            import zarr

            node = zarr.open(str(p), mode="r")
            for _ in range(3):  # image -> labels group -> label image
                if hasattr(node, "shape"):
                    break
                attrs = _ome_attrs(dict(node.attrs))
                if "multiscales" in attrs and ("image-label" in attrs or "labels" not in node):
                    node, _meta = multiscale_level(node, level, str(p))
                elif "labels" in attrs:
                    listed = list(attrs["labels"])
                    if name is not None and name not in listed:
                        raise DataError(f"{p}: no label image {name!r}; it has {listed}")
                    node = node[name or listed[0]]
                elif "labels" in node:
                    node = node["labels"]
                else:
                    break
            if not hasattr(node, "shape"):
                raise DataError(f"{p}: no label array found (expected a Zarr array, an OME-Zarr label image "
                                "or an image with a labels group)")
            mask = node
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"label mask {str(p)!r} could not be read ({type(exc).__name__}: {exc})") from exc
    while mask.ndim > 2 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise DataError(f"label mask {str(p)!r} has shape {tuple(mask.shape)}; expected a 2-D (Y, X) mask")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise DataError(f"label mask {str(p)!r} holds {mask.dtype} values; expected integer label ids")
    return mask


def open_stack(
    path: str | Path | Sequence[str | Path],
    channel_names: Sequence[str] | None = None,
    level: int = 0,
    *,
    z: str | int = "max",
    t: int = 0,
    channel_width: int | None = None,
    missing_chunks: str = "error",
) -> ChannelStack:
    """Open a multichannel image lazily.

    Args:
        path: A file or Zarr folder; or a list of single-channel files (TIFF, PNG or JPEG,
            one per channel, in channel order), also accepted as one ``;``-separated string.
        channel_names: Names of the channels, in file order; required when the file does not
            store them, and checked against the count when it does (they take precedence).
        level: Pyramid level for OME-Zarr and pyramidal TIFF (0 = full resolution).
        z: ``"max"`` for a maximum projection over Z, or the index of one Z slice.
        t: Index of the time frame to read.
        channel_width: Width of one channel in a tape (CHAMMI PNG); giving it makes a 2-D
            TIFF a tape too (a multi-dimensional TIFF is read normally). PNG tapes default to
            square channels (``channel_width = height``).
        missing_chunks: ``"error"`` raises on a chunk absent from a Zarr store; ``"fill"``
            accepts it (stores written with ``write_empty_chunks=False``).

    Returns:
        A :class:`ChannelStack`; nothing but metadata has been read yet.

    Raises:
        DataError: If the path does not exist, the format is unknown or unreadable, the image
            is empty or has no channel axis, channel names are missing or of the wrong count,
            or the level / Z slice / frame does not exist.

    Examples:
        >>> stack = open_stack("cells.ome.zarr")  # doctest: +SKIP
        >>> stack.channel_names, stack.read(region=(0, 0, 64, 64)).shape  # doctest: +SKIP
        (['nucleus', 'microtubules', 'er', 'protein'], (4, 64, 64))
    """
    if isinstance(path, str) and ";" in path:
        path = [p for p in path.split(";") if p]
    if not isinstance(path, (str, Path)):
        return _open_file_list(list(path), channel_names, z, t)
    p = Path(path).expanduser()
    spath = str(p)
    if not p.exists():
        raise DataError(f"{spath}: no such file or folder")
    name = p.name.lower()
    if name.endswith(PNG_SUFFIXES) or (channel_width and name.endswith(TIFF_SUFFIXES)):
        return _open_tape(spath, channel_names, channel_width, level=level, z=z, t=t)
    if name.endswith(TIFF_SUFFIXES):
        return _open_tiff(spath, channel_names, level, z, t)
    if p.is_dir() and any((p / f).exists() for f in ZARR_MARKERS):
        return _open_zarr(spath, channel_names, level, z, t, missing_chunks)
    raise DataError(
        f"{spath}: unknown image format; expected .tif/.tiff (OME-TIFF, ImageJ), a .png channel tape, "
        "or a Zarr / OME-Zarr folder"
    )
