"""Synthetic microscopy generators with known labels, for benchmarks and tests.

Three generators, each unlike the demo's (:mod:`cellvit_ssl.data.synthetic`) and unlike each
other:

- ``hpa`` (:mod:`~cellvit_ssl.data.generators.hpa`): HPA-like 4-channel single-cell crops
  (nucleus, microtubules, er, protein); the label is where the protein sits (8 compartments);
  the three reference channels carry no label.
- ``cellpainting`` (:mod:`~cellvit_ssl.data.generators.cellpainting`): Cell-Painting-like
  5-channel fields (nucleus, rna, er, agp, mito) with several cells each; the label is a
  treatment that changes several channels at once; plates differ in gain, background,
  illumination and focus.
- ``wtc`` (:mod:`~cellvit_ssl.data.generators.wtc`): WTC-11-like 3-channel single-cell
  crops (nucleus, membrane, protein); the label is the cell-cycle stage, seen in the nucleus
  and membrane; each "cell line" tags another structure in the protein channel.

The protocol
------------
A generator is any callable ``generate(out_dir, *, seed=0, n_cells=None) -> GeneratedSet``
(or one returning just the index path). It writes image files under ``out_dir`` and an
index CSV with one row per cell:

========================  ====================================================================
``path``                  image file, relative to the index's folder (or absolute)
``channels``              ``;``-separated channel names in file order (vocabulary names)
``label``                 the class to recover (never used in training)
``batch``                 imaging batch / plate / line; optional, for leave-one-batch-out
``split``                 ``train`` (self-supervised training) or ``test`` (held-out scoring);
                          optional: without it the benchmark holds out every third image file
``centroid_y/_x``         optional: the cell's centre in a multi-cell field (``cells`` mode);
                          without them the whole file is the cell (``image`` mode)
========================  ====================================================================

Output is a deterministic function of ``seed`` (and ``n_cells``). ``python -m
benchmarks.quality --generator my_module:my_generate`` scores any callable that follows it.
"""

from __future__ import annotations

import csv
import importlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellvit_ssl.errors import DataError
from cellvit_ssl.io import atomic_path, atomic_write_text

INDEX_NAME = "index.csv"


@dataclass(frozen=True)
class GeneratedSet:
    """What a generator wrote.

    Attributes:
        name: Short name of the generator.
        index: The index CSV (one row per cell).
        channels: Channel names, in file order.
        label_key: Index column holding the class.
        batch_key: Index column holding the batch / plate, or None.
        classes: The class names.
    """

    name: str
    index: Path
    channels: tuple[str, ...]
    label_key: str = "label"
    batch_key: str | None = "batch"
    classes: tuple[str, ...] = field(default_factory=tuple)


Generator = Callable[..., "GeneratedSet | Path | str"]


def write_ome_tiff(path: Path, image: np.ndarray, channels: Sequence[str]) -> None:
    """Write a ``(C, H, W)`` image as OME-TIFF with channel names, atomically."""
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, image, ome=True, metadata={"axes": "CYX", "Channel": {"Name": list(channels)}})


def write_index(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    """Write the index CSV atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, text.getvalue())


def write_single_cells(out_dir: str | Path, name: str, channels: Sequence[str], classes: Sequence[str],
                       columns: Sequence[str], labels: np.ndarray,
                       render: Callable[[int, int], tuple[np.ndarray, dict]]) -> GeneratedSet:
    """Write one OME-TIFF per cell and the index; the third, sixth, ... cell of every class is held out.

    Args:
        out_dir: Folder for ``images/`` and the index (created).
        name: The set's name.
        channels: Channel names in file order.
        classes: Class names, indexed by label id.
        columns: Index columns, in order.
        labels: One class id per cell.
        render: ``(cell number, class id) -> (image (C, H, W), extra index columns)``.
    """
    out = Path(out_dir)
    rows = []
    seen = np.zeros(len(classes), int)
    for i, label in enumerate(int(v) for v in labels):
        image, extra = render(i, label)
        rel = f"images/cell_{i:05d}.ome.tif"
        write_ome_tiff(out / rel, image, channels)
        rows.append({"path": rel, "channels": ";".join(channels), "label": classes[label], "label_id": label,
                     "split": "test" if seen[label] % 3 == 2 else "train", "cell_id": i, **extra})
        seen[label] += 1
    index = write_index(out / INDEX_NAME, rows, columns)
    return GeneratedSet(name, index, tuple(channels), "label", "batch", tuple(classes))


def balanced_labels(rng: np.random.Generator, n: int, n_classes: int) -> np.ndarray:
    """``n`` class ids, as equal in count as possible, in random order."""
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    return labels


def _builtin() -> dict[str, Generator]:
    from cellvit_ssl.data.generators import cellpainting, hpa, wtc

    return {"hpa": hpa.generate, "cellpainting": cellpainting.generate, "wtc": wtc.generate}


#: Names of the built-in generators, in benchmark order.
GENERATOR_NAMES: tuple[str, ...] = ("hpa", "cellpainting", "wtc")


def get_generator(spec: str) -> tuple[str, Generator]:
    """A generator by built-in name (``hpa``) or as ``package.module:callable``.

    Returns:
        ``(name, callable)``; the name of an imported one is its callable's name.

    Raises:
        DataError: If the name is unknown or the module / attribute cannot be imported.
    """
    builtin = _builtin()
    if spec in builtin:
        return spec, builtin[spec]
    if ":" not in spec:
        raise DataError(f"unknown generator {spec!r}; expected one of {sorted(builtin)} or 'module:callable'")
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataError(f"generator {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DataError(f"generator {spec!r}: module {module_name!r} has no callable {attr!r}")
    return attr, fn


def run_generator(name: str, fn: Generator, out_dir: Path, seed: int = 0, n_cells: int | None = None) -> GeneratedSet:
    """Call a generator and normalise what it returns to a :class:`GeneratedSet`.

    A callable that returns only an index path gets its channels from the index's first row
    and ``batch`` as batch column when present.

    Raises:
        DataError: If the index lacks ``path`` / ``channels`` / ``label``.
    """
    import pandas as pd

    kwargs = {"seed": seed}
    if n_cells is not None:
        kwargs["n_cells"] = n_cells
    out = fn(Path(out_dir), **kwargs)
    if isinstance(out, GeneratedSet):
        return out
    index = Path(out)
    table = pd.read_csv(index, nrows=1000)
    missing = [c for c in ("path", "channels", "label") if c not in table.columns]
    if missing:
        raise DataError(f"generator {name!r} wrote {index} without the columns {missing} "
                        "(see cellvit_ssl.data.generators for the protocol)")
    channels = tuple(str(table["channels"].iloc[0]).split(";"))
    batch = "batch" if "batch" in table.columns else None
    return GeneratedSet(name, index, channels, "label", batch, tuple(sorted(table["label"].astype(str).unique())))
