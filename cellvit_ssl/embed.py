"""``python -m cellvit_ssl.embed``: embed an index or a list of images into AnnData / Zarr.

Examples:
    python -m cellvit_ssl.embed runs/demo/teacher.pt data.index=index.csv embed.out=cells.h5ad
    python -m cellvit_ssl.embed teacher.pt --index index.csv --out cells.h5ad --workers 4
    python -m cellvit_ssl.embed teacher.pt --images a.ome.zarr b.ome.tif --out fields.zarr
    python -m cellvit_ssl.embed teacher.pt --images a.ome.tif --labels a_labels.tif --out cells.h5ad
    python -m cellvit_ssl.embed teacher.pt --index index.csv --out protein.h5ad --pooling protein

Rows are read by the same reader as training (:class:`~cellvit_ssl.data.samples.SampleReader`:
centroid crops, boxes, whole images, tapes, pyramid level, Z, T) and preprocessed by the
contract stored in the checkpoint (:class:`~cellvit_ssl.preprocess.Preprocess`), so every row
is embedded as training saw it. A ``tiles`` row (a field without a centroid or box, for a model
trained on tiles) is embedded as the mean over a grid of ``data.sample_size`` tiles.

The output holds ``X`` (one embedding per row), ``obs`` (the index columns plus the region each
sample was read from, ``sample_y0, sample_x0, sample_y1, sample_x1``, and ``sample_kind``) and
``uns`` (``model``: checkpoint path, hash, architecture, channels; ``config``: the run config as
JSON; ``preprocess``: the contract; ``embed``: the settings of this run). Finished chunks are
kept in ``OUT.partial/`` until the end, so an interrupted run continues where it stopped when
the same command is given again; a finished output is never recomputed or appended to.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cellvit_ssl.cli import CommandLine, Flag
from cellvit_ssl.config import DataConfig, MissingChannels, SampleMode, ZProjection, config_to_dict
from cellvit_ssl.data.dataset import read_index
from cellvit_ssl.data.readers import open_labels
from cellvit_ssl.data.samples import RawSample, SampleReader, cells_from_mask
from cellvit_ssl.embed_io import ResumableWriter, file_sha256, table_sha256
from cellvit_ssl.encoder import Encoder, load_encoder, resolve_device
from cellvit_ssl.errors import CellVitSSLError, CheckpointError, ConfigError, DataError
from cellvit_ssl.io import check_writable, exclusive_lock


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of one embedding run (the ``embed`` section)."""

    checkpoint: str | None = None  # teacher.pt export or training checkpoint.pt
    out: str | None = None  # OUT.h5ad (AnnData) or OUT.zarr (AnnData Zarr store)
    images: list[str] = field(default_factory=list)  # image files / OME-Zarr folders instead of data.index
    labels: list[str] = field(default_factory=list)  # a segmentation mask per image: one row per cell
    channels: list[str] = field(default_factory=list)  # channel names, in file order, of images that lack them
    mask_background: bool = False  # zero pixels outside the cell (masks: labels, or labels_path + cell_label)
    allow_missing: bool = False  # embed images that lack some model channels (their blocks stay empty)
    pooling: str = "default"  # default | concat | mean | channel names, e.g. protein or protein,er
    chunk_rows: int = 512  # rows per saved chunk (the unit of resuming)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    overwrite: bool = False  # replace an output made from other inputs or settings
    progress: bool = True  # progress bar


@dataclass(frozen=True)
class EmbedCommand:
    """``python -m cellvit_ssl.embed``: the data section (defaults from the checkpoint) and ``embed``."""

    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)


#: Keys of ``data`` that say how rows are read; recorded in ``uns["embed"]`` so that evaluate's baselines
#: read the same samples.
READ_SETTINGS = ("sample_size", "mode", "level", "z_projection", "z_slice", "t_frame", "missing_chunks")

#: What to do about a file lacking one of the model's channels / naming an unknown one, in embed's keys and flags.
EMBED_REMEDIES = {
    "missing": "Embed it anyway with --allow-missing (embed.allow_missing=true): absent channels stay empty; or fix "
               "the channel names (the index's 'channels' column, or --channels)",
    "unknown": "data.channel_map belongs to the checkpoint here: rename the channel in the index's 'channels' column "
               "(or --channels) to a name the model knows",
}

#: Keys of ``data`` that belong to the model's preprocessing contract: taken from the checkpoint.
CONTRACT_KEYS = ("channels", "channel_map", "extra_channels", "normalize", "normalize_percentiles",
                 "stats_cache", "stats_samples")

COMMAND_LINE = CommandLine(
    prog="python -m cellvit_ssl.embed",
    description="Embed the rows of an index (or a list of images) with a trained checkpoint into AnnData. The "
                "data.* defaults are the checkpoint's own (its preprocessing contract cannot be changed here).",
    schema=EmbedCommand,
    positionals=("embed.checkpoint",),
    flags=(
        Flag(("--index",), "data.index"), Flag(("--root",), "data.root"), Flag(("--out",), "embed.out"),
        Flag(("--images",), "embed.images"), Flag(("--labels",), "embed.labels"),
        Flag(("--channels",), "embed.channels"), Flag(("--crop-size",), "data.sample_size"),
        Flag(("--mode",), "data.mode"), Flag(("--pooling",), "embed.pooling"),
        Flag(("--mask-background",), "embed.mask_background", True),
        Flag(("--allow-missing",), "embed.allow_missing", True),
        Flag(("--batch-size",), "data.batch_size"), Flag(("--chunk-rows",), "embed.chunk_rows"),
        Flag(("--workers",), "data.num_workers"), Flag(("--device",), "embed.device"),
        Flag(("--overwrite",), "embed.overwrite", True), Flag(("--no-progress",), "embed.progress", False),
    ),
    examples=(
        "python -m cellvit_ssl.embed runs/demo/teacher.pt --index cells.csv --out cells.h5ad",
        "python -m cellvit_ssl.embed teacher.pt data.index=cells.csv embed.out=cells.h5ad data.num_workers=4",
        "python -m cellvit_ssl.embed teacher.pt --images a.ome.tif --labels a_labels.tif --out cells.h5ad",
    ),
)


def images_table(images: list[str], labels: list[str], channels: list[str]) -> pd.DataFrame:
    """Index rows for ``embed.images``: one per image, or one per labelled cell with ``embed.labels``.

    Raises:
        DataError: If the number of masks differs from the number of images, or a mask does
            not have its image's shape.
    """
    from cellvit_ssl.data.readers import open_stack

    extra = {"channels": ";".join(channels)} if channels else {}
    if not labels:
        return pd.DataFrame([{"path": str(Path(i).expanduser().resolve()), **extra} for i in images])
    if len(labels) != len(images):
        raise DataError(f"{len(labels)} embed.labels masks given for {len(images)} embed.images; give one per image")
    rows = []
    for image, mask_path in zip(images, labels):
        mask = np.asarray(open_labels(mask_path))
        stack = open_stack(image, channel_names=channels or None)
        if mask.shape != stack.shape[1:]:
            raise DataError(f"label mask {mask_path} has shape {mask.shape} but image {image} is "
                            f"{stack.shape[1]}x{stack.shape[2]}; give the mask of this image (at the same level)")
        cells = cells_from_mask(mask, str(mask_path))
        rows += [{"path": str(Path(image).expanduser().resolve()), **extra,
                  "labels_path": str(Path(mask_path).expanduser().resolve()), "cell_label": int(c.cell_label),
                  "centroid_y": round(float(c.centroid_y), 3), "centroid_x": round(float(c.centroid_x), 3)}
                 for c in cells.itertuples()]
    if not rows:
        raise DataError(f"the masks {labels} hold no labelled cells")
    return pd.DataFrame(rows)


def provenance(encoder: Encoder, checkpoint: str, sha: str) -> dict:
    """``uns['model']``, ``uns['config']`` and ``uns['preprocess']`` for an embeddings file."""
    cfg = encoder.config.model
    return {
        "model": {"checkpoint": str(Path(checkpoint).resolve()), "sha256": sha, "variant": cfg.variant.value,
                  "arch": cfg.arch, "patch_size": int(cfg.patch_size), "embed_dim": int(encoder.model.embed_dim),
                  "output_dim": encoder.output_dim, "channel_dim": encoder.channel_dim,
                  "channels": list(encoder.channels),
                  "input_size": encoder.input_size},
        "config": json.dumps(config_to_dict(encoder.config)),
        "preprocess": json.dumps(encoder.preprocess.to_dict()),
    }


def _package_version() -> str:
    try:
        return version("cellvit-ssl")
    except PackageNotFoundError:
        from cellvit_ssl import __version__

        return __version__


def sample_reader(table: pd.DataFrame, root: Path | None, data: DataConfig, encoder: Encoder, *, allow_missing: bool,
                  mask_background: bool, source: str, default_root: Path | None = None) -> SampleReader:
    """The reader ``embed`` (and evaluate's baselines) read rows with: the training reader, the model's channels.

    ``root`` overrides the index's ``root`` column (``data.root``); ``default_root`` serves rows
    without one (the index's folder).
    """
    return SampleReader(
        table, root=root, default_root=default_root, channels=encoder.channels, vocabulary=encoder.vocabulary,
        sample_size=data.sample_size,
        mode=data.mode, missing_channels=MissingChannels.pad if allow_missing else MissingChannels.error,
        level=data.level, z=data.z_slice if data.z_projection == ZProjection.slice else "max", t=data.t_frame,
        missing_chunks=data.missing_chunks, percentiles=data.normalize_percentiles,
        foreground_threshold=data.foreground_threshold, bounds=encoder.preprocess.bounds,
        mask_background=mask_background, source=source, remedies=EMBED_REMEDIES,
    )


def read_row(reader: SampleReader, i: int) -> list[RawSample]:
    """Row ``i``'s raw samples: one, or for a ``tiles`` row every non-blank tile of its grid."""
    if reader.kind(i) != SampleMode.tiles:
        return [reader.read(i)]
    samples = []
    for box in reader.tile_boxes(i):
        try:
            samples.append(reader.read(i, box=box))
        except DataError as exc:
            if "is blank" not in str(exc):
                raise
    if not samples:
        path = reader.resolve(str(reader.table.iloc[i]["path"]))
        raise DataError(f"{path} ({reader.source} row {i}): every {reader.sample_size}px tile of the image is blank "
                        "(every channel constant); expected image content")
    return samples


class _Rows(torch.utils.data.Dataset):
    """Raw samples of some rows, for DataLoader workers; errors travel back as values, not tracebacks."""

    def __init__(self, reader: SampleReader, rows: list[int]) -> None:
        self.reader, self.rows = reader, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        try:
            return read_row(self.reader, self.rows[k])
        except CellVitSSLError as exc:
            return exc


def read_rows(reader: SampleReader, rows: list[int], workers: int) -> list[list[RawSample]]:
    """:func:`read_row` of each row in order; ``workers`` > 0 reads in DataLoader worker processes.

    Raises:
        DataError: The first bad row's error, as raised in the worker (without its traceback).
    """
    if workers <= 0 or len(rows) < 2:
        return [read_row(reader, i) for i in rows]
    loader = torch.utils.data.DataLoader(_Rows(reader, rows), batch_size=None, num_workers=min(workers, len(rows)),
                                         collate_fn=_identity)
    out = list(loader)
    for item in out:
        if isinstance(item, BaseException):
            raise item
    return out


def _identity(item):
    return item


def featurize_rows(reader: SampleReader, rows: list[int], featurize, workers: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features of some rows of an index, in order; a ``tiles`` row is the mean over its tiles.

    Args:
        reader: The rows' reader.
        rows: Row numbers.
        featurize: ``list[RawSample] -> (n, D)`` features of raw samples.
        workers: Reader processes (0: read in this process).

    Returns:
        ``(features (len(rows), D) float32, regions (len(rows), 4) int64 as y0, x0, y1, x1, kinds)``.
    """
    read = read_rows(reader, rows, workers)
    samples = [r for row_samples in read for r in row_samples]
    owner = np.repeat(np.arange(len(read)), [len(row_samples) for row_samples in read])
    z = np.asarray(featurize(samples), np.float32)
    out = np.stack([z[owner == k].mean(axis=0) for k in range(len(rows))]).astype(np.float32)
    regions, kinds = [], []
    for row_samples in read:
        boxes = np.array([r.box.as_tuple() for r in row_samples])  # a tiles row: the extent its tiles cover
        regions.append((boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()))
        kinds.append(row_samples[0].kind.value)
    return out, np.asarray(regions, dtype=np.int64).reshape(-1, 4), kinds


def encoder_featurizer(encoder: Encoder, pooling: str | None, batch_size: int, reader_name: str = "index"):
    """``list[RawSample] -> (n, D)``: samples through the encoder's preprocessing contract and model."""
    ids = encoder.resolve_channels(encoder.channels)
    forward = encoder.forward_samples(pooling)

    def featurize(samples: list[RawSample]) -> np.ndarray:
        def batches():
            for s in range(0, len(samples), batch_size):
                part = samples[s : s + batch_size]
                x = torch.stack([encoder.preprocess.to_sample(r.pixels, r.names, r.present, image_sample=r.is_image,
                                                              source=f"{r.source} ({reader_name} row {r.row})")
                                 for r in part])
                yield x, torch.from_numpy(np.stack([r.present for r in part]))

        return encoder.forward_batches(batches(), len(samples), ids, forward, False, "embed")

    return featurize


def _plain(value):
    return value.value if hasattr(value, "value") else value


def _refuse_output_over_inputs(out: Path, inputs: list[Path], section: str = "embed") -> None:
    resolved = out.expanduser().resolve()
    for path in inputs:
        p = path.expanduser().resolve()
        if resolved == p or p in resolved.parents or resolved in p.parents:
            raise DataError(f"{section}.out={str(out)!r} would be written over the input {str(path)!r}; choose "
                            "another output path")


def check_run_inputs(data: DataConfig, e, section: str, model: str | None, model_hint: str) -> None:
    """The checks ``embed`` and ``predict`` share, before anything is read.

    Args:
        data: The command's ``data`` section.
        e: Its own section (``out``, ``images``, ``labels``, ``chunk_rows``, ``device``).
        section: ``embed`` or ``predict`` (names the keys in messages).
        model: The model file given.
        model_hint: What to give when ``model`` is missing.

    Raises:
        ConfigError: On a missing model, output or input, contradictory inputs, a count out of
            range or a device that does not exist.
        DataError: If the output would overwrite an input.
    """
    if not model:
        raise ConfigError(f"give {model_hint} as the first argument")
    if not e.out:
        raise ConfigError(f"give the output file: {section}.out=OUT.h5ad (or --out OUT.zarr)")
    if data.index and e.images:
        raise ConfigError(f"give either data.index (--index) or {section}.images (--images), not both")
    if not data.index and not e.images:
        raise ConfigError(f"give what to {section}: data.index=INDEX.csv (--index) or {section}.images=[...] "
                          "(--images)")
    if e.labels and not e.images:
        raise ConfigError(f"{section}.labels goes with {section}.images (an index names its masks in a "
                          "'labels_path' column)")
    for key, flag, value, least in ((f"{section}.chunk_rows", "--chunk-rows", e.chunk_rows, 1),
                                    ("data.batch_size", "--batch-size", data.batch_size, 1),
                                    ("data.num_workers", "--workers", data.num_workers, 0)):
        if value < least:
            raise ConfigError(f"{key}={value} ({flag}); expected >= {least}")
    resolve_device(e.device, f"{section}.device (--device)")
    inputs = [Path(model), *(Path(p) for p in e.images), *(Path(p) for p in e.labels)]
    if data.index:
        inputs.append(Path(data.index))
    _refuse_output_over_inputs(Path(e.out), inputs, section)


def write_rows(section: str, data: DataConfig, e, encoder: Encoder, model: str, make_featurize, settings: dict,
               make_uns, columns=None, var_names=None) -> Path | None:
    """Read every row, featurize it chunk by chunk (resumable, locked) and write the AnnData output.

    The shared body of ``embed`` and ``predict``.

    Args:
        section: ``embed`` or ``predict``: the command's section (messages, ``uns`` key).
        data: The ``data`` section.
        e: The command's section (``out``, ``images``, ``labels``, ``channels``, ``mask_background``,
            ``allow_missing``, ``chunk_rows``, ``overwrite``, ``progress``).
        encoder: The model reading the rows (its channels, vocabulary and contract).
        model: The model file (its SHA-256 is part of the run's fingerprint).
        make_featurize: ``reader source name -> (list[RawSample] -> (n, D))``.
        settings: The run's settings, recorded in ``uns[section]`` and the fingerprint.
        make_uns: ``sha256 of model -> dict`` of provenance entries of ``uns``.
        columns: ``X -> DataFrame`` of obs columns derived from the output (see
            :meth:`~cellvit_ssl.embed_io.ResumableWriter.finish`).
        var_names: Names of ``X``'s columns.

    Returns:
        The output path, or None when it was already complete.
    """
    out = check_writable(e.out, what=f"{section}.out")  # before any row is read
    if data.index:
        table = read_index(data.index)
        root = Path(data.root).expanduser() if data.root else None
        default_root = Path(data.index).expanduser().parent
    else:  # --images rows hold absolute paths
        table, root, default_root = images_table(list(e.images), list(e.labels), list(e.channels)), None, Path(".")
    index_sha = table_sha256(table)  # of the index as stored, so that evaluate can tell if it changed
    if e.channels and data.index and "channels" not in table.columns:
        table["channels"] = ";".join(e.channels)
    sha = file_sha256(model)
    reader = sample_reader(table, root, data, encoder, allow_missing=e.allow_missing,
                           mask_background=e.mask_background, source=str(data.index or f"{section}.images"),
                           default_root=default_root)
    reader.check_files()  # a wrong root fails here, before anything is written
    # --images rows hold absolute paths: the working folder does not change what is read
    fingerprint = {"checkpoint_sha256": sha, "index_sha256": index_sha, "channels": list(e.channels),
                   "root": reader.roots() if data.index else "", **settings}
    featurize = make_featurize(reader.source)
    writer = ResumableWriter(out, fingerprint, overwrite=e.overwrite, section=section)
    with exclusive_lock(out):
        if writer.up_to_date():
            print(f"{out} is complete ({len(table)} rows); nothing to do", file=sys.stderr)
            return None
        for note in writer.begin():
            print(f"note: {note}", file=sys.stderr)
        starts = list(range(0, len(table), e.chunk_rows))
        with tqdm(total=len(table), desc=section, unit="row", disable=not e.progress) as bar:
            for start in starts:
                stop = min(start + e.chunk_rows, len(table))
                if not writer.done(start):
                    x, boxes, kinds = featurize_rows(reader, list(range(start, stop)), featurize, data.num_workers)
                    writer.save(start, x, boxes, kinds)
                bar.update(stop - start)
        uns = make_uns(sha)
        roots = reader.roots()
        uns[section] = {"index": str(Path(data.index).resolve()) if data.index else "", "root": roots["root"] or "",
                        "default_root": roots["default"], **settings, "cellvit_ssl_version": _package_version()}
        return writer.finish(table, starts, uns, columns=columns, var_names=var_names)


def run(cfg: EmbedCommand, payload: dict | None = None) -> Path | None:
    """Embed every row and write the output; returns its path (None when already up to date).

    Args:
        cfg: The command's config.
        payload: The checkpoint's content when already loaded.

    Raises:
        DataError / ConfigError / CheckpointError: On any bad input, named.
    """
    e, data = cfg.embed, cfg.data
    check_run_inputs(data, e, "embed", e.checkpoint,
                     "the checkpoint to embed with (teacher.pt or checkpoint.pt)")
    if data.sample_size < 0 or (data.sample_size == 0 and data.mode != SampleMode.image):
        raise ConfigError(f"data.sample_size={data.sample_size} (--crop-size); expected a side in pixels >= 1 (0, the "
                          "native size, only with data.mode=image)")
    encoder = load_encoder(e.checkpoint, device=e.device, payload=payload)
    encoder.pooled_dim(e.pooling)  # refuse a bad pooling before reading anything
    if data.sample_size != encoder.crop_size:
        print(f"note: cutting {data.sample_size}px samples for a model trained on {encoder.crop_size}px ones "
              "(data.sample_size); the model sees cells at another scale than in training", file=sys.stderr)
    settings = {**{k: _plain(getattr(data, k)) for k in READ_SETTINGS}, "mask_background": e.mask_background,
                "allow_missing": e.allow_missing, "pooling": e.pooling, "chunk_rows": e.chunk_rows}
    return write_rows("embed", data, e, encoder, e.checkpoint,
                      lambda source: encoder_featurizer(encoder, e.pooling, data.batch_size, source), settings,
                      lambda sha: provenance(encoder, e.checkpoint, sha))


def checkpoint_data(payload: dict, sources: list, what: str) -> list[tuple[str, dict]]:
    """The ``data`` defaults a checkpoint stores, as a config source below the command line's.

    The sample size is the preprocessing contract's (a run that ended with a high-resolution phase cut
    larger samples than its config's first value). The index and its root are the command's own.

    Raises:
        ConfigError: If the command line sets a key of the preprocessing contract.
    """
    stored = dict(payload.get("config", {}).get("data", {}))
    if isinstance(payload.get("preprocess"), dict) and "sample_size" in payload["preprocess"]:
        stored["sample_size"] = payload["preprocess"]["sample_size"]
    given = {k for _, src in sources for k in (src.get("data") or {}).keys()}
    fixed = sorted(given & set(CONTRACT_KEYS))
    if fixed:
        raise ConfigError(f"data.{fixed[0]} is part of the model's preprocessing contract (stored in the {what}); "
                          "using another value would not match training")
    return [(f"{what} config", {"data": {k: v for k, v in stored.items() if k not in ("demo", "index", "root")}})]


def load(argv: list[str]) -> tuple[EmbedCommand, dict | None]:
    """The embed command's config from the command line (data defaults from the checkpoint) and the checkpoint."""
    sources = COMMAND_LINE.parse(argv)
    first = COMMAND_LINE.load(sources)
    base, payload = [], None
    if first.embed.checkpoint:
        from cellvit_ssl.checkpoint import load_checkpoint

        payload = load_checkpoint(first.embed.checkpoint)
        if "config" not in payload:
            raise CheckpointError(f"{first.embed.checkpoint}: the checkpoint holds no run config; it was not written "
                                  "by cellvit_ssl")
        base = checkpoint_data(payload, sources, "checkpoint")
    return COMMAND_LINE.load(sources, base), payload


def run_command(load_command: Callable, run_command_body: Callable, out_of: Callable, argv: list[str] | None
                ) -> int:
    """Run a row-writing command (embed, predict); returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out_hint = "OUT"
    try:
        cfg, payload = load_command(argv)
        out_hint = out_of(cfg) or out_hint
        out = run_command_body(cfg, payload)
    except CellVitSSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; finished chunks are kept in {out_hint}.partial. Run the same command again to "
              "resume.", file=sys.stderr)
        return 130
    if out is not None:
        print(f"wrote {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    return run_command(load, run, lambda cfg: cfg.embed.out, argv)


if __name__ == "__main__":
    sys.exit(main())
