"""Embeddings for lab pipelines: :func:`load_encoder` and :class:`Encoder`.

Examples:
    >>> from cellvit_ssl import load_encoder  # doctest: +SKIP
    >>> enc = load_encoder("runs/demo/teacher.pt")  # doctest: +SKIP
    >>> z = enc.embed(stack, channels=["nucleus", "microtubules", "er", "protein"])  # doctest: +SKIP
    >>> grid = enc.patch_features(stack, channels=[...])  # (B, D, h, w)  # doctest: +SKIP
    >>> z, ids = enc.embed_cells(stack, labels, channels=[...])  # one row per cell  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cellvit_ssl.checkpoint import ENCODER_FORMAT, TRAINING_FORMAT, load_checkpoint
from cellvit_ssl.config import config_from_dict
from cellvit_ssl.crops import CropBox, box_around, cell_table, read_box
from cellvit_ssl.data.channels import canonical_name
from cellvit_ssl.data.channels import channel_ids as names_to_ids
from cellvit_ssl.data.dataset import normalize_percentiles
from cellvit_ssl.errors import CheckpointError, DataError
from cellvit_ssl.models.channels import ChannelAdaptiveViT, build_model
from cellvit_ssl.ssl import teacher_backbone_state
from cellvit_ssl.transforms import PerChannelStandardize

#: ``progress`` argument: False, True (a tqdm bar on stderr) or a callable ``(done, total)``
#: called after every batch (raise from it to cancel).
Progress = bool | Callable[[int, int], None]


def _progress_bar(progress: Progress, total: int, desc: str) -> Callable[[int], None]:
    """A per-batch advance function for ``progress`` (see :data:`Progress`)."""
    if callable(progress):
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            progress(done[0], total)

        return advance
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)

    def advance_bar(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return advance_bar


class _Batches:
    """Batch-wise reader over ``(C, H, W)`` / ``(B, C, H, W)`` numpy, torch, Zarr or dask arrays.

    Lazy arrays are sliced one batch at a time (``images[start:stop]``), so only that batch
    is ever read into memory.
    """

    def __init__(self, images) -> None:
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu()
        elif not hasattr(images, "shape") or not hasattr(images, "__getitem__"):
            images = np.asarray(images)
        shape = tuple(int(n) for n in images.shape)
        if len(shape) not in (3, 4):
            raise DataError(f"expected images shaped (C, H, W) or (B, C, H, W), got shape {shape}")
        if 0 in shape:
            raise DataError(f"the images are empty: shape {shape}")
        self.single = len(shape) == 3
        self.images = images
        self.shape = (1, *shape) if self.single else shape

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        chunk = self.images if self.single else self.images[start:stop]
        chunk = chunk.numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk)
        return chunk[None] if self.single else chunk


class Encoder:
    """A trained channel-adaptive backbone ready to embed images.

    Inference runs in eval mode under :func:`torch.inference_mode`, in batches, with bf16
    autocast on CUDA and plain fp32 on the CPU; outputs are always float32 numpy arrays.
    Channels are matched to the model by *name* (vocabulary names or their aliases, after the
    run's ``data.channel_map``), never by position.

    Args:
        model: The backbone (teacher weights).
        config: The run config it was trained with (channel names, crop size, normalisation).
        device: Where to run.
        source: Where the weights came from (a checkpoint path), kept for provenance.

    Attributes:
        channels: Channel names the model knows, in embedding order.
        output_dim: Width of one image embedding (:meth:`embed`).
        patch_dim: Width of one patch feature (:meth:`patch_features`).
        patch_size: Side of one patch in pixels.
        input_size: Side images are resized to by :meth:`embed` (the training crop size).
        crop_size: Default side of cell crops in :meth:`embed_cells` (``data.sample_size``).
    """

    def __init__(self, model: ChannelAdaptiveViT, config, device: str | torch.device,
                 source: str | None = None) -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.config = config
        self.source = source
        self.channels = list(model.channels)
        self.output_dim = int(model.output_dim)
        self.input_size = int(config.views.global_crop_size)
        self.crop_size = int(config.data.sample_size)
        self.patch_size = int(config.model.patch_size)
        self._slot_of_id = {vid: slot for slot, vid in enumerate(names_to_ids(self.channels))}
        self._per_channel = self._samples_are_channels()
        self.patch_dim = int(model.embed_dim) * (len(self.channels) if self._per_channel else 1)

    # ----------------------------------------------------------------- channels and input
    def _samples_are_channels(self) -> bool:
        """Whether ``forward_features`` yields one sample per (image, channel) (bag of channels)."""
        if len(self.channels) == 1 or not hasattr(self.model, "sample_shape"):
            return False
        p = self.patch_size
        x = torch.zeros(2, len(self.channels), p, p)
        ids = torch.tensor([list(self._slot_of_id)] * 2)
        return self.model.sample_shape(x, ids)[0] == 2 * len(self.channels)

    def resolve_channels(self, channels: Sequence[str] | None, n: int | None = None,
                         allow_missing: bool = False) -> torch.Tensor:
        """Vocabulary ids ``(C,)`` of the given channel names, checked against the model.

        Args:
            channels: Name of each input channel, in the order of the channel axis.
            n: Number of channels of the images (checked against ``len(channels)``).
            allow_missing: Accept inputs that lack some of the model's channels (their part
                of the embedding is then explicitly empty: zero blocks for ``boc``).

        Raises:
            DataError: On a count mismatch, an unknown or duplicated name, or (unless
                ``allow_missing``) a model channel absent from ``channels``; the message lists
                the channels the model knows.
        """
        known = f"this model knows {self.channels}"
        if channels is None or isinstance(channels, str):
            raise DataError(f"give the name of every image channel as a list (channels=[...]); {known}")
        channels = [str(c) for c in channels]
        if n is not None and len(channels) != n:
            raise DataError(f"the images have {n} channels but {len(channels)} channel names were given: {channels}; "
                            f"{known}")
        try:
            names = [canonical_name(c, self.config.data.channel_map) for c in channels]
            ids = names_to_ids(names)
        except DataError as exc:
            raise DataError(f"{exc}; {known}") from exc
        unknown = [c for c, name in zip(channels, names) if name not in self.channels]
        if unknown:
            raise DataError(f"channels {unknown} are not known to this model; {known}")
        missing = [c for c in self.channels if c not in names]
        if missing and not allow_missing:
            raise DataError(f"the images lack the model's channels {missing} (given {channels}); {known}. "
                            "Pass allow_missing=True to embed them anyway (absent channels stay empty).")
        return torch.tensor(ids, dtype=torch.long)

    def _normalize(self, x: np.ndarray) -> np.ndarray:
        low, high = self.config.data.normalize_percentiles
        return np.stack([normalize_percentiles(im, low, high, source=f"image {i}") for i, im in enumerate(x)])

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _resized(self, t: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
        size = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(t.shape[-2:]) == size:
            return t
        return F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)

    def _run(self, batches: Iterator[np.ndarray], total: int, ids: torch.Tensor,
             forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], progress: Progress,
             desc: str) -> np.ndarray:
        """Forward normalised float32 batches; concatenate float32 CPU outputs in order."""
        advance = _progress_bar(progress, total, desc)
        out = []
        with torch.inference_mode(), self._autocast():
            for x in batches:
                t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
                chunk_ids = ids.to(self.device).expand(t.shape[0], -1)
                out.append(forward(t, chunk_ids).float().cpu())
                advance(t.shape[0])
        return torch.cat(out).numpy()

    # ----------------------------------------------------------------- image embeddings
    def _standardized(self, t: torch.Tensor) -> torch.Tensor:
        """Per-image, per-channel zero mean / unit variance when the run trained on such views."""
        return PerChannelStandardize()(t) if self.config.views.standardize else t

    def _embed_forward(self, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(self._standardized(self._resized(t, self.input_size)), ids)

    def embed(self, images, channels: Sequence[str], batch_size: int = 64, progress: Progress = False,
              allow_missing: bool = False) -> np.ndarray:
        """One embedding per image.

        Images are normalised per image and channel as in training (percentile clip), resized
        to the training crop size (:attr:`input_size`) and, when the run used
        ``views.standardize``, standardised per channel. Channels are matched to the model by
        name, so their order does not matter.

        Args:
            images: ``(C, H, W)`` or ``(B, C, H, W)``: numpy, torch, or a lazy Zarr / dask
                array (read one batch at a time).
            channels: Name of each channel, in the order of the channel axis.
            batch_size: Images per forward pass.
            progress: True for a progress bar, or a callable ``(done, total)``.
            allow_missing: See :meth:`resolve_channels`.

        Returns:
            float32 array ``(B, output_dim)``, in input order.

        Raises:
            DataError: On a wrong shape, a channel-count mismatch, an unknown or missing
                channel name, or NaN / Inf pixels.
        """
        src = _Batches(images)
        ids = self.resolve_channels(channels, src.shape[1], allow_missing)
        batches = (self._normalize(src.read(s, s + batch_size)) for s in range(0, len(src), _positive(batch_size)))
        return self._run(batches, len(src), ids, self._embed_forward, progress, "embed")

    # ----------------------------------------------------------------- dense features
    def _patch_forward(self, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        b, _, height, width = t.shape
        h, w = height // self.patch_size, width // self.patch_size
        tokens = self.model.forward_features(t, ids)["x_norm_patchtokens"]  # (S, N, D)
        if tokens.shape[1] != h * w:
            raise CheckpointError(
                f"model variant {self.config.model.variant!r} gives {tokens.shape[1]} patch tokens per sample "
                f"for a {h}x{w} patch grid; patch_features needs one token per patch"
            )
        d = tokens.shape[-1]
        if not self._per_channel:
            return tokens.transpose(1, 2).reshape(b, d, h, w)
        # bag of channels: samples are (image, channel) pairs in row-major order; each channel's
        # grid goes to its slot in the model's channel order, absent channels stay zero.
        slots = torch.tensor([self._slot_of_id[int(i)] for i in ids[0]], device=t.device)
        grid = tokens.new_zeros(b, len(self.channels), h * w, d)
        grid[:, slots] = tokens.reshape(b, ids.shape[1], h * w, d)
        return grid.permute(0, 1, 3, 2).reshape(b, len(self.channels) * d, h, w)

    def patch_features(self, images, channels: Sequence[str], batch_size: int = 16, progress: Progress = False,
                       allow_missing: bool = False, size: int | tuple[int, int] | None = None) -> np.ndarray:
        """The patch-token grid of each image, for dense uses (overlays, segmentation heads).

        Images are normalised as in :meth:`embed` but *not* resized unless ``size`` is given;
        they are zero-padded at the bottom / right to a multiple of :attr:`patch_size`, so
        patch ``(i, j)`` covers pixels ``[i·p, (i+1)·p) × [j·p, (j+1)·p)`` (p = patch size).

        For the bag-of-channels model every channel is its own 1-channel ViT pass; its
        ``(D, h, w)`` grid is placed at the channel's position in :attr:`channels`, giving
        ``D_total = len(channels) · D`` (channel-major: features ``[k·D, (k+1)·D)`` belong to
        ``channels[k]``); a channel absent from the input is an all-zero block. Models whose
        samples are whole images (``fixed``; ``hierarchical`` and ``channelvit``, whose patch
        tokens are pooled over the present channels) give ``D_total = D``.

        Args:
            images: ``(C, H, W)`` or ``(B, C, H, W)`` array (numpy, torch, Zarr, dask).
            channels: Name of each channel, in the order of the channel axis.
            batch_size: Images per forward pass.
            progress: True for a progress bar, or a callable ``(done, total)``.
            allow_missing: See :meth:`resolve_channels`.
            size: Resize images to this side (or ``(H, W)``) before cutting patches.

        Returns:
            float32 array ``(B, patch_dim, ceil(H/p), ceil(W/p))``.

        Raises:
            DataError: As :meth:`embed`.
        """
        src = _Batches(images)
        ids = self.resolve_channels(channels, src.shape[1], allow_missing)
        p = self.patch_size

        def batches() -> Iterator[np.ndarray]:
            for s in range(0, len(src), _positive(batch_size)):
                t = torch.from_numpy(self._normalize(src.read(s, s + batch_size)))
                if size is not None:
                    t = self._resized(t, size)
                t = self._standardized(t)
                pad_h, pad_w = -t.shape[-2] % p, -t.shape[-1] % p
                yield F.pad(t, (0, pad_w, 0, pad_h)).numpy()

        return self._run(batches(), len(src), ids, self._patch_forward, progress, "patch features")

    # ----------------------------------------------------------------- cells
    def cell_crops(self, image, labels, crop_size: int | None = None, mask_background: bool = False,
                   cells: tuple[np.ndarray, np.ndarray] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Normalised ``(C, s, s)`` crops around each labelled cell, in ascending label order.

        Args:
            image: ``(C, H, W)`` array (lazy arrays are read crop by crop).
            labels: ``(H, W)`` integer segmentation mask; 0 is background.
            crop_size: Side of the square around each centroid (default :attr:`crop_size`,
                the training ``data.sample_size``); zero-padded at the image border.
            mask_background: Zero every pixel of the crop that is not this cell's (after
                normalisation); False keeps the neighbourhood, as in training.
            cells: ``(label ids, centroids)`` of ``labels`` when already computed
                (:func:`cellvit_ssl.crops.cell_table`).

        Yields:
            ``(label_id, crop)`` pairs.
        """
        if len(image.shape) != 3:
            raise DataError(f"embed_cells expects one (C, H, W) image, got shape {tuple(image.shape)}")
        labels = np.asarray(labels)
        if labels.shape != tuple(image.shape[-2:]):
            raise DataError(f"the label mask has shape {labels.shape} but the image is {tuple(image.shape[-2:])}")
        size = _positive(crop_size or self.crop_size)
        low, high = self.config.data.normalize_percentiles
        ids, centres = cells if cells is not None else cell_table(labels)
        for label_id, centre in zip(ids, centres):
            box = box_around(centre, size)
            crop = normalize_percentiles(read_box(image, box), low, high, source=f"cell {label_id}")
            if mask_background:
                crop = crop * (read_box(labels, box) == label_id)
            yield int(label_id), crop

    def embed_cells(self, image, labels, channels: Sequence[str], crop_size: int | None = None,
                    mask_background: bool = False, batch_size: int = 64, progress: Progress = False,
                    allow_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """One embedding per cell of a segmentation mask.

        Each cell is a fixed-size square crop around its centroid (see :meth:`cell_crops`),
        normalised per channel and embedded like :meth:`embed`.

        Args:
            image: ``(C, H, W)`` field of view (numpy, torch, Zarr, dask).
            labels: ``(H, W)`` integer mask; every id > 0 is one cell.
            channels: Name of each channel, in the order of the channel axis.
            crop_size: Crop side in pixels (default :attr:`crop_size`).
            mask_background: Zero the pixels outside the cell instead of keeping them.
            batch_size: Cells per forward pass.
            progress: True for a progress bar, or a callable ``(done, total)``.
            allow_missing: See :meth:`resolve_channels`.

        Returns:
            ``(embeddings (n_cells, output_dim) float32, label_ids (n_cells,) int64)``, rows in
            ascending label-id order.

        Raises:
            DataError: On shape mismatches, a non-integer mask, or bad channel names.
        """
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        if len(image.shape) != 3:
            raise DataError(f"embed_cells expects one (C, H, W) image, got shape {tuple(image.shape)}")
        ids = self.resolve_channels(channels, int(image.shape[0]), allow_missing)
        labels = np.asarray(labels)
        label_ids: list[int] = []
        if labels.shape != tuple(image.shape[-2:]):
            raise DataError(f"the label mask has shape {labels.shape} but the image is {tuple(image.shape[-2:])}")
        cells = cell_table(labels)
        crops = self.cell_crops(image, labels, crop_size, mask_background, cells)
        n_cells = len(cells[0])

        def batches() -> Iterator[np.ndarray]:
            batch: list[np.ndarray] = []
            for label_id, crop in crops:
                label_ids.append(label_id)
                batch.append(crop)
                if len(batch) == _positive(batch_size):
                    yield np.stack(batch)
                    batch = []
            if batch:
                yield np.stack(batch)

        if n_cells == 0:
            return np.zeros((0, self.output_dim), np.float32), np.zeros(0, np.int64)
        z = self._run(batches(), n_cells, ids, self._embed_forward, progress, "embed cells")
        return z, np.asarray(label_ids, dtype=np.int64)

    def embed_tiles(self, image, channels: Sequence[str], tile_size: int | None = None,
                    batch_size: int = 64, progress: Progress = False,
                    allow_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """One embedding per square tile of a field of view (for images without a segmentation).

        Tiles cover the image row by row without overlap; the last row / column is zero-padded
        at the border. Each tile is normalised and embedded like :meth:`embed`.

        Args:
            image: ``(C, H, W)`` field of view (numpy, torch, Zarr, dask; read tile by tile).
            channels: Name of each channel, in the order of the channel axis.
            tile_size: Tile side in pixels (default :attr:`crop_size`).
            batch_size: Tiles per forward pass.
            progress: True for a progress bar, or a callable ``(done, total)``.
            allow_missing: See :meth:`resolve_channels`.

        Returns:
            ``(embeddings (n_tiles, output_dim) float32, boxes (n_tiles, 4) int64)`` with each
            tile's ``(y0, x0, height, width)`` in pixels.
        """
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if len(image.shape) != 3:
            raise DataError(f"embed_tiles expects one (C, H, W) image, got shape {tuple(image.shape)}")
        ids = self.resolve_channels(channels, int(image.shape[0]), allow_missing)
        size = _positive(tile_size or self.crop_size)
        height, width = (int(n) for n in image.shape[-2:])
        boxes = np.array([(y, x, size, size) for y in range(0, height, size) for x in range(0, width, size)],
                         dtype=np.int64)
        low, high = self.config.data.normalize_percentiles

        def batches() -> Iterator[np.ndarray]:
            for s in range(0, len(boxes), _positive(batch_size)):
                tiles = [read_box(image, CropBox(int(y), int(x), size)) for y, x, _, _ in boxes[s : s + batch_size]]
                yield np.stack([normalize_percentiles(t, low, high, source=f"tile at ({y}, {x})")
                                for t, (y, x, _, _) in zip(tiles, boxes[s : s + batch_size])])

        return self._run(batches(), len(boxes), ids, self._embed_forward, progress, "embed tiles"), boxes


def _positive(n: int) -> int:
    if int(n) < 1:
        raise DataError(f"batch / crop size must be >= 1, got {n}")
    return int(n)


def load_encoder(path: str | Path, device: str | torch.device | None = None) -> Encoder:
    """Load an :class:`Encoder` from a training checkpoint or a teacher export.

    Args:
        path: ``checkpoint.pt`` (teacher weights are taken) or ``teacher.pt``.
        device: Defaults to CUDA when available, else CPU.

    Raises:
        CheckpointError: If the file is missing, corrupt or not a cellvit_ssl checkpoint.
    """
    payload = load_checkpoint(path)
    config = config_from_dict(payload["config"])
    model = build_model(config.model, list(config.data.channels), load_pretrained=False)
    try:
        if payload["format"] == ENCODER_FORMAT:
            state = payload["backbone"]
        else:
            assert payload["format"] == TRAINING_FORMAT
            state = teacher_backbone_state(payload["model"], config)
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its own config: {exc}") from exc
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return Encoder(model, config, device, source=str(path))


if __name__ == "__main__":
    import sys

    from cellvit_ssl.embed_cli import main

    sys.exit(main())
