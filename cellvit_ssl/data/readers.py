"""Lazy multichannel image readers: TIFF / OME-TIFF (tifffile), Zarr v2/v3 / OME-Zarr (zarr).

:func:`open_stack` opens a file and returns a :class:`ChannelStack`: shape, dtype and channel
names are known at once, pixels are read only by :meth:`ChannelStack.read`, optionally for a
region only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellvit_ssl.errors import DataError

Region = tuple[int, int, int, int]  # (y0, x0, height, width)


@dataclass
class ChannelStack:
    """A lazily read ``(C, Y, X)`` image with channel names.

    Attributes:
        path: The file or folder it was opened from.
        channel_names: One name per channel, as stored in the file (or as given).
        shape: ``(C, Y, X)``.
        dtype: Pixel type on disk.
        metadata: Format-specific extras (e.g. OME-Zarr level, original axes).
    """

    path: str
    channel_names: list[str]
    shape: tuple[int, int, int]
    dtype: np.dtype
    _source: Any = field(repr=False)
    _axes: str = field(repr=False, default="CYX")
    metadata: dict = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        """Number of channels."""
        return self.shape[0]

    def read(self, region: Region | None = None, channels: Sequence[int] | None = None) -> np.ndarray:
        """Read pixels as ``(C, h, w)`` in the on-disk dtype.

        Args:
            region: ``(y0, x0, height, width)``; the part outside the image is not read and
                must not be asked for. None reads the whole plane.
            channels: Channel positions to read, in the order wanted; None reads all.

        Raises:
            DataError: If the region lies outside the image or the file cannot be read.
        """
        _, height, width = self.shape
        y0, x0, h, w = region if region is not None else (0, 0, height, width)
        if y0 < 0 or x0 < 0 or h <= 0 or w <= 0 or y0 + h > height or x0 + w > width:
            raise DataError(
                f"{self.path}: region (y0={y0}, x0={x0}, h={h}, w={w}) is outside the image "
                f"of size {height}x{width}"
            )
        index: dict[str, Any] = {"Y": slice(y0, y0 + h), "X": slice(x0, x0 + w)}
        if "T" in self._axes:
            index["T"] = 0
        selection = tuple(index.get(ax, slice(None)) for ax in self._axes)
        try:
            data = np.asarray(self._source[selection])
        except Exception as exc:
            raise DataError(f"{self.path}: could not read pixels ({type(exc).__name__}: {exc})") from exc
        kept = [ax for ax in self._axes if ax != "T"]
        if "Z" in kept:  # maximum projection over Z
            data = data.max(axis=kept.index("Z"))
            kept.remove("Z")
        data = np.moveaxis(data, [kept.index("C"), kept.index("Y"), kept.index("X")], [0, 1, 2])
        if channels is not None:
            data = data[list(channels)]
        return data


def _checked_names(path: str, found: list[str] | None, given: Sequence[str] | None, n: int) -> list[str]:
    if given is not None:
        given = [str(c) for c in given]
        if len(given) != n:
            raise DataError(f"{path}: has {n} channels but {len(given)} channel names were given ({given})")
        return given
    if found is None or len(found) != n or any(not c for c in found):
        raise DataError(
            f"{path}: the file does not name its {n} channels; give channel names "
            "(the index's 'channels' column or open_stack(..., channel_names=[...]))"
        )
    return found


def _as_stack(path: str, source: Any, axes: str, names: list[str] | None,
              given: Sequence[str] | None, metadata: dict) -> ChannelStack:
    axes = axes.upper().replace("S", "C")
    if "C" not in axes or "Y" not in axes or "X" not in axes:
        raise DataError(
            f"{path}: image axes {axes!r} have no channel axis; expected a multichannel image "
            "with axes containing C, Y and X"
        )
    unknown = set(axes) - set("TCZYX")
    if unknown:
        raise DataError(f"{path}: unsupported axes {sorted(unknown)} in {axes!r}; expected T, C, Z, Y, X")
    shape = dict(zip(axes, source.shape))
    n = shape["C"]
    return ChannelStack(
        path=path,
        channel_names=_checked_names(path, names, given, n),
        shape=(n, shape["Y"], shape["X"]),
        dtype=np.dtype(source.dtype),
        _source=source,
        _axes=axes,
        metadata=metadata,
    )


def _open_tiff(path: str, given: Sequence[str] | None) -> ChannelStack:
    import tifffile
    import zarr

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            names = None
            if tif.is_ome:
                pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
                pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
                chans = pixels.get("Channel", [])
                chans = chans if isinstance(chans, list) else [chans]
                names = [str(c.get("Name", "")) for c in chans] or None
            elif tif.is_imagej and tif.imagej_metadata and "Labels" in tif.imagej_metadata:
                names = list(tif.imagej_metadata["Labels"])
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from exc
    source = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
    if hasattr(source, "keys") and not hasattr(source, "shape"):  # pyramidal: level 0
        source = source["0"]
    return _as_stack(path, source, axes, names, given, {"format": "tiff"})


def _ome_attrs(attrs: dict) -> dict:
    return attrs.get("ome", attrs)  # NGFF 0.5 nests under "ome"; 0.4 does not


def _open_zarr(path: str, given: Sequence[str] | None, level: int) -> ChannelStack:
    import zarr

    try:
        node = zarr.open(path, mode="r")
    except Exception as exc:
        raise DataError(f"{path}: not a readable Zarr store ({type(exc).__name__}: {exc})") from exc
    attrs = _ome_attrs(dict(node.attrs))
    if hasattr(node, "shape"):  # a plain array
        axes = attrs.get("axes") or attrs.get("_ARRAY_DIMENSIONS") or ("CYX" if node.ndim == 3 else None)
        if axes is None:
            raise DataError(f"{path}: a {node.ndim}-D Zarr array without 'axes'; expected (C, Y, X)")
        axes = "".join(a[0] if isinstance(a, str) else a["name"] for a in axes)
        names = attrs.get("channel_names")
        return _as_stack(path, node, axes, names, given, {"format": "zarr"})
    if "multiscales" not in attrs:
        raise DataError(f"{path}: a Zarr group without OME 'multiscales' metadata; expected an OME-Zarr image")
    ms = attrs["multiscales"][0]
    datasets = ms["datasets"]
    if not 0 <= level < len(datasets):
        raise DataError(f"{path}: resolution level {level} requested but the pyramid has {len(datasets)}")
    axes = "".join(a["name"] if isinstance(a, dict) else a for a in ms["axes"])
    names = None
    if "omero" in attrs:
        names = [c.get("label", "") for c in attrs["omero"].get("channels", [])] or None
    array = node[datasets[level]["path"]]
    meta = {"format": "ome-zarr", "level": level, "levels": len(datasets),
            "version": ms.get("version", attrs.get("version"))}
    return _as_stack(path, array, axes, names, given, meta)


def open_stack(
    path: str | Path, channel_names: Sequence[str] | None = None, level: int = 0
) -> ChannelStack:
    """Open a multichannel image lazily.

    Supported: OME-TIFF and ImageJ/plain TIFF (``.tif``/``.tiff``), Zarr v2/v3 arrays with a
    channel axis, OME-Zarr (NGFF 0.4 on Zarr v2, 0.5 on Zarr v3) multiscale images.

    Args:
        path: File or Zarr folder.
        channel_names: Names of the channels, in file order; required when the file does not
            store them, and checked against the count when it does (they take precedence).
        level: Pyramid level for OME-Zarr (0 = full resolution).

    Returns:
        A :class:`ChannelStack`; nothing but metadata has been read yet.

    Raises:
        DataError: If the path does not exist, the format is unknown or unreadable, the image
            has no channel axis, or channel names are missing or of the wrong count.

    Examples:
        >>> stack = open_stack("cells.ome.zarr")  # doctest: +SKIP
        >>> stack.channel_names, stack.read(region=(0, 0, 64, 64)).shape  # doctest: +SKIP
        (['nucleus', 'microtubules', 'er', 'protein'], (4, 64, 64))
    """
    p = Path(path)
    spath = str(p)
    if not p.exists():
        raise DataError(f"{spath}: no such file or folder")
    name = p.name.lower()
    if name.endswith((".tif", ".tiff")):
        return _open_tiff(spath, channel_names)
    if p.is_dir() and any((p / f).exists() for f in ("zarr.json", ".zattrs", ".zarray", ".zgroup")):
        return _open_zarr(spath, channel_names, level)
    raise DataError(
        f"{spath}: unknown image format; expected .tif/.tiff (OME-TIFF, ImageJ) or a Zarr / "
        "OME-Zarr folder"
    )

