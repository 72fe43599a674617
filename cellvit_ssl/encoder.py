"""The embedding API for lab pipelines: :func:`load_encoder` and :class:`Encoder`.

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
from tqdm import tqdm

from cellvit_ssl.channels import ChannelVocabulary
from cellvit_ssl.checkpoint import ENCODER_FORMAT, TRAINING_FORMAT, load_checkpoint
from cellvit_ssl.config import Config, Normalization, config_from_dict
from cellvit_ssl.data.normalize import ChannelStats
from cellvit_ssl.data.samples import Box, cells_from_mask, read_region
from cellvit_ssl.errors import CheckpointError, ConfigError, DataError
from cellvit_ssl.models.channels import ChannelAdaptiveViT, build_model
from cellvit_ssl.preprocess import Preprocess
from cellvit_ssl.ssl import teacher_backbone_state

#: ``progress`` argument: False, True (a tqdm bar on stderr) or a callable ``(done, total)``
#: called after every batch (raise from it to cancel).
Progress = bool | Callable[[int, int], None]

#: Pooling keywords of :meth:`Encoder.embed` (anything else is one channel name or several,
#: comma-separated).
POOLINGS = ("default", "concat", "mean")


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


def _as_array(images, what: str = "images"):
    """A numpy / torch / lazy array, refusing what cannot be pixels (strings, ragged lists, bf16)."""
    if isinstance(images, torch.Tensor):
        if images.dtype in (torch.bfloat16, torch.float16):
            images = images.float()
        if images.is_complex() or images.dtype == torch.bool:
            raise DataError(f"{what} have dtype {images.dtype}; expected real-valued intensities")
        return images.detach().cpu()
    if isinstance(images, (str, bytes)):
        raise DataError(f"{what} must be an array (C, H, W) or (B, C, H, W), got a string")
    if not hasattr(images, "shape") or not hasattr(images, "__getitem__"):
        try:
            images = np.asarray(images)
        except ValueError as exc:  # ragged nested lists
            raise DataError(f"{what} are not a regular array ({exc}); give one (C, H, W) or (B, C, H, W) array")\
                from None
    dtype = np.dtype(getattr(images, "dtype", np.float32))
    if dtype.kind not in "uif":
        raise DataError(f"{what} have dtype {dtype}; expected integer or floating-point intensities")
    return images


class _Batches:
    """Batch-wise reader over ``(C, H, W)`` / ``(B, C, H, W)`` numpy, torch, Zarr or dask arrays.

    Lazy arrays are sliced one batch at a time (``images[start:stop]``), so only that batch
    is ever read into memory.
    """

    def __init__(self, images) -> None:
        images = _as_array(images)
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
    """A trained channel-adaptive backbone and its preprocessing contract, ready to embed images.

    Every input goes through the run's :class:`~cellvit_ssl.preprocess.Preprocess` (the
    normalisation, sample size and view size it was trained with, stored in the checkpoint),
    so the model sees what it saw in training. Inference runs in eval mode under
    :func:`torch.inference_mode`, in batches, with bf16 autocast on CUDA and plain fp32 on the
    CPU; outputs are always float32 numpy arrays. Channels are matched to the model by *name*
    (vocabulary names, aliases, or the run's ``data.channel_map``), never by position.

    Args:
        model: The backbone (teacher weights).
        config: The run config it was trained with.
        device: Where to run.
        source: Where the weights came from (a checkpoint path), kept for provenance.
        preprocess: The preprocessing contract (default: the one ``config`` implies).
        vocabulary: The channel vocabulary (default: the one ``config`` implies).

    Attributes:
        channels: Channel names the model knows, in embedding order.
        output_dim: Width of one image embedding (:meth:`embed` with the default pooling).
        channel_dim: Width of one channel's block (:meth:`embed_channels`).
        patch_dim: Width of one patch feature (:meth:`patch_features`).
        patch_size: Side of one patch in pixels.
        input_size: Side of the model input (the training view size).
        crop_size: Side of a sample (``data.sample_size``): cell crops and tiles.
    """

    def __init__(self, model: ChannelAdaptiveViT, config, device: str | torch.device,
                 source: str | None = None, preprocess: Preprocess | None = None,
                 vocabulary: ChannelVocabulary | None = None) -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.config = config
        self.source = source
        self.preprocess = preprocess or Preprocess.from_config(config)
        self.vocabulary = vocabulary or model.vocabulary
        self.channels = list(model.channels)
        self.output_dim = int(model.output_dim)
        self.input_size = int(self.preprocess.input_size)
        self.crop_size = int(self.preprocess.sample_size)
        self.patch_size = int(config.model.patch_size)
        self._slot_of_id = {vid: slot for slot, vid in enumerate(self.vocabulary.ids(self.channels))}
        self._per_channel = self._samples_are_channels()
        self.patch_dim = int(model.embed_dim) * (len(self.channels) if self._per_channel else 1)
        self.channel_dim = int(getattr(model, "block_dim", model.embed_dim * (2 if model.pool_patch_tokens else 1)))

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
            raise DataError(f"give the name of every image channel, in the order of the channel axis, as a list "
                            f"(channels=[...]); {known}")
        channels = [str(c) for c in channels]
        if n is not None and len(channels) != n:
            hint = (" (is the channel axis last? images must be (C, H, W) or (B, C, H, W))"
                    if len(channels) < n else "")
            raise DataError(f"the images have {n} channels but {len(channels)} channel names were given: "
                            f"{channels}{hint}; {known}")
        try:
            names = self.vocabulary.canonical_names(channels)
        except DataError as exc:
            raise DataError(f"{exc}; {known}") from exc
        unknown = [c for c, name in zip(channels, names) if name not in self.channels]
        if unknown:
            raise DataError(f"channels {unknown} are not known to this model; {known}")
        missing = [c for c in self.channels if c not in names]
        if missing and not allow_missing:
            raise DataError(f"the images lack the model's channels {missing} (given {channels}); {known}. "
                            "Embed them anyway with allow_missing=True (command line: embed.allow_missing=true); "
                            "absent channels stay empty.")
        return torch.tensor(self.vocabulary.ids(names), dtype=torch.long)

    def samples(self, images: np.ndarray, channels: Sequence[str], source: str = "image") -> torch.Tensor:
        """Arrays ``(B, C, H, W)`` → samples ``(B, C, S, S)`` by the preprocessing contract.

        Each image is normalised (as the run was) and fitted into a ``crop_size`` square,
        keeping its aspect ratio (see :func:`~cellvit_ssl.preprocess.fit_square`).
        """
        return torch.stack([self.preprocess.to_sample(im, channels, image_sample=True, source=f"{source} {i}")
                            for i, im in enumerate(np.asarray(images))])

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def forward_batches(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor | None]], total: int,
                        ids: torch.Tensor, forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None],
                                                             torch.Tensor],
                        progress: Progress, desc: str) -> np.ndarray:
        """Forward ``(samples, channel_mask)`` batches; concatenate float32 CPU outputs in order.

        Args:
            batches: ``(x (b, C, h, w), channel_mask (b, C) or None)`` pairs.
            total: Number of images in all batches (for progress).
            ids: Channel ids ``(C,)`` of the channel axis.
            forward: ``(x, ids (b, C), mask) -> (b, D)`` (e.g. :meth:`forward_samples`).
            progress: See :data:`Progress`.
            desc: Progress bar label.

        Raises:
            DataError: If the model produces NaN / Inf for finite inputs.
        """
        advance = _progress_bar(progress, total, desc)
        out = []
        with torch.inference_mode(), self._autocast():
            for x, mask in batches:
                t = x.to(self.device, dtype=torch.float32)
                chunk_ids = ids.to(self.device).expand(t.shape[0], -1)
                chunk_mask = None if mask is None else mask.to(self.device)
                out.append(forward(t, chunk_ids, chunk_mask).float().cpu())
                advance(t.shape[0])
        result = torch.cat(out).numpy()
        if not np.isfinite(result).all():
            raise DataError("the model produced NaN / Inf embeddings for finite inputs; the checkpoint may be "
                            "corrupt or trained into divergence")
        return result

    # ----------------------------------------------------------------- image embeddings
    def _pooling(self, pooling: str | Sequence[str] | None) -> tuple[str, list[int]]:
        """``(kind, model channel slots)`` of a pooling choice (see :meth:`embed`)."""
        if pooling is None or (isinstance(pooling, str) and pooling in POOLINGS):
            return (pooling or "default"), []
        names = [p.strip() for p in pooling.split(",")] if isinstance(pooling, str) else [str(p) for p in pooling]
        try:
            canon = self.vocabulary.canonical_names([n for n in names if n])
        except DataError as exc:
            raise DataError(f"pooling={pooling!r}: {exc}") from exc
        absent = [n for n in canon if n not in self.channels]
        if not canon or absent:
            raise DataError(f"pooling={pooling!r}: expected one of {list(POOLINGS)} or channel names among "
                            f"{self.channels}")
        return "subset", [self.channels.index(n) for n in canon]

    def pooled_dim(self, pooling: str | Sequence[str] | None = None) -> int:
        """Width of :meth:`embed`'s output for a pooling choice."""
        kind, slots = self._pooling(pooling)
        if kind == "default":
            return self.output_dim
        if kind == "concat":
            return len(self.channels) * self.channel_dim
        return self.channel_dim * (len(slots) if kind == "subset" else 1)

    def forward_samples(self, pooling: str | Sequence[str] | None = None
                        ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """The function from samples ``(B, C, S, S)``, ids and mask to pooled embeddings."""
        kind, slots = self._pooling(pooling)

        def forward(x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            x = self.preprocess.model_input(x)
            if kind == "default":
                return self.model.embed(x, ids, mask)
            blocks, present = self._channel_blocks(x, ids, mask)
            if kind == "concat":
                return blocks.flatten(1)
            if kind == "mean":
                w = present.to(blocks.dtype).unsqueeze(-1)
                return (blocks * w).sum(1) / w.sum(1).clamp_min(1)
            return blocks[:, slots].flatten(1)

        return forward

    def _channel_blocks(self, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.model.channel_embeddings(x, ids, mask)
        except NotImplementedError:
            raise DataError(f"model variant {self.config.model.variant.value!r} has no per-channel embeddings "
                            "(one token mixes all channels); use pooling='default'") from None

    def embed(self, images, channels: Sequence[str], batch_size: int = 64, progress: Progress = False,
              allow_missing: bool = False, pooling: str | Sequence[str] | None = None) -> np.ndarray:
        """One embedding per image.

        Images go through the preprocessing contract (normalised as in training, fitted into
        the training sample size, resized to the view size, standardised if the run was).
        Channels are matched to the model by name, so their order does not matter.

        Args:
            images: ``(C, H, W)`` or ``(B, C, H, W)``: numpy, torch, or a lazy Zarr / dask
                array (read one batch at a time).
            channels: Name of each channel, in the order of the channel axis.
            batch_size: Images per forward pass.
            progress: True for a progress bar, or a callable ``(done, total)``.
            allow_missing: See :meth:`resolve_channels`.
            pooling: How channels combine into one vector: ``"default"`` / None (the model's
                own: concatenated channel blocks for ``boc``, the pooled token for the
                others), ``"concat"`` (every channel's block in :attr:`channels` order, zeros
                for absent ones), ``"mean"`` (mean of the present channels' blocks), or
                channel names (``"protein"``, ``"protein,er"`` or a list: those blocks,
                concatenated). Per-channel blocks exist for ``boc``, ``hierarchical`` and
                ``channelvit``.

        Returns:
            float32 array ``(B, pooled_dim(pooling))``, in input order.

        Raises:
            DataError: On a wrong shape or dtype, a channel-count mismatch, an unknown or
                missing channel name, NaN / Inf pixels, or a pooling the model cannot do.
        """
        src = _Batches(images)
        batch_size = _positive(batch_size, "batch_size")
        ids = self.resolve_channels(channels, src.shape[1], allow_missing)
        forward = self.forward_samples(pooling)
        batches = ((self.samples(src.read(s, s + batch_size), channels), None)
                   for s in range(0, len(src), batch_size))
        return self.forward_batches(batches, len(src), ids, forward, progress, "embed")

    def embed_channels(self, images, channels: Sequence[str], batch_size: int = 64, progress: Progress = False,
                       allow_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel embeddings: one block per model channel and image.

        Args:
            images: As :meth:`embed`.
            channels: Name of each channel, in the order of the channel axis.
            batch_size: Images per forward pass.
            progress: True for a progress bar, or a callable ``(done, total)``.
            allow_missing: See :meth:`resolve_channels`.

        Returns:
            ``(embeddings (B, len(channels), channel_dim) float32, present (B, len(channels)) bool)``
            in :attr:`channels` order; absent channels are zero blocks with ``present`` False.

        Raises:
            DataError: As :meth:`embed`, or for a ``fixed`` model (no per-channel tokens).
        """
        flat = self.embed(images, channels, batch_size, progress, allow_missing, pooling="concat")
        given = set(self.vocabulary.canonical_names([str(c) for c in channels]))
        present = np.array([c in given for c in self.channels])
        blocks = flat.reshape(len(flat), len(self.channels), -1)
        return blocks, np.broadcast_to(present, (len(flat), len(present))).copy()

    # ----------------------------------------------------------------- dense features
    def _patch_forward(self, t: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, _, height, width = t.shape
        h, w = height // self.patch_size, width // self.patch_size
        tokens = self.model.forward_features(t, ids, mask)["x_norm_patchtokens"]  # (S, N, D)
        if tokens.shape[1] != h * w:
            raise CheckpointError(
                f"model variant {self.config.model.variant.value!r} gives {tokens.shape[1]} patch tokens per "
                f"sample for a {h}x{w} patch grid; patch_features needs one token per patch"
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
            DataError: As :meth:`embed`, or a ``size`` below one patch.
        """
        src = _Batches(images)
        batch_size = _positive(batch_size, "batch_size")
        ids = self.resolve_channels(channels, src.shape[1], allow_missing)
        p = self.patch_size
        if size is not None:
            sizes = (size, size) if isinstance(size, int) else tuple(size)
            if len(sizes) != 2 or any(int(v) < p for v in sizes):
                raise DataError(f"patch_features size={size!r}; expected a side (or (H, W)) of at least one "
                                f"patch ({p} px)")
            size = tuple(int(v) for v in sizes)

        def batches() -> Iterator[tuple[torch.Tensor, None]]:
            for s in range(0, len(src), batch_size):
                chunk = src.read(s, s + batch_size)
                t = torch.stack([torch.from_numpy(self.preprocess.normalized(im, channels, source=f"image {s + i}"))
                                 for i, im in enumerate(chunk)])
                if size is not None and tuple(t.shape[-2:]) != size:
                    t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", antialias=True,
                                                        align_corners=False)
                if self.preprocess.standardize:
                    from cellvit_ssl.preprocess import standardize_channels

                    t = standardize_channels(t)
                pad_h, pad_w = -t.shape[-2] % p, -t.shape[-1] % p
                yield torch.nn.functional.pad(t, (0, pad_w, 0, pad_h)), None

        return self.forward_batches(batches(), len(src), ids, self._patch_forward, progress, "patch features")

    # ----------------------------------------------------------------- cells and tiles
    def cell_crops(self, image, labels, crop_size: int | None = None, mask_background: bool = False,
                   cells=None) -> Iterator[tuple[int, np.ndarray]]:
        """Raw ``(C, s, s)`` crops around each labelled cell, in ascending label order.

        The crop is the square training cuts around a centroid
        (:meth:`Box.around <cellvit_ssl.data.samples.Box.around>`), zero-padded at the border.

        Args:
            image: ``(C, H, W)`` array (lazy arrays are read crop by crop).
            labels: ``(H, W)`` integer segmentation mask; 0 is background.
            crop_size: Side of the square around each centroid (default :attr:`crop_size`,
                the training ``data.sample_size``).
            mask_background: Zero every pixel of the crop that is not this cell's (before
                normalisation); False keeps the neighbourhood, as in training.
            cells: The :func:`~cellvit_ssl.data.samples.cells_from_mask` table of ``labels``
                when already computed.

        Yields:
            ``(label_id, crop)`` pairs.
        """
        if len(image.shape) != 3:
            raise DataError(f"embed_cells expects one (C, H, W) image, got shape {tuple(image.shape)}")
        labels = np.asarray(labels)
        if labels.shape != tuple(image.shape[-2:]):
            raise DataError(f"the label mask has shape {labels.shape} but the image is {tuple(image.shape[-2:])}")
        size = _positive(self.crop_size if crop_size is None else crop_size, "crop_size")
        table = cells if cells is not None else cells_from_mask(labels, "labels")
        for label_id, cy, cx in zip(table["cell_label"], table["centroid_y"], table["centroid_x"]):
            box = Box.around((cy, cx), size)
            crop = read_region(image, box).astype(np.float32, copy=False)
            if mask_background:
                crop = crop * (read_region(labels, box) == label_id)
            yield int(label_id), crop

    def embed_cells(self, image, labels, channels: Sequence[str], crop_size: int | None = None,
                    mask_background: bool = False, batch_size: int = 64, progress: Progress = False,
                    allow_missing: bool = False, pooling: str | Sequence[str] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """One embedding per cell of a segmentation mask.

        Each cell is a fixed-size square crop around its centroid (see :meth:`cell_crops`),
        then embedded like :meth:`embed`.

        Args:
            image: ``(C, H, W)`` field of view (numpy, torch, Zarr, dask).
            labels: ``(H, W)`` integer mask; every id > 0 is one cell.
            channels: Name of each channel, in the order of the channel axis.
            crop_size: Crop side in pixels (default :attr:`crop_size`).
            mask_background: Zero the pixels outside the cell instead of keeping them.
            batch_size: Cells per forward pass.
            progress: True for a progress bar, or a callable ``(done, total)``.
            allow_missing: See :meth:`resolve_channels`.
            pooling: See :meth:`embed`.

        Returns:
            ``(embeddings (n_cells, pooled_dim) float32, label_ids (n_cells,) int64)``, rows in
            ascending label-id order.

        Raises:
            DataError: On shape mismatches, a non-integer mask, or bad channel names.
        """
        image = _as_array(image, "the image")
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        if len(image.shape) != 3:
            raise DataError(f"embed_cells expects one (C, H, W) image, got shape {tuple(image.shape)}")
        ids = self.resolve_channels(channels, int(image.shape[0]), allow_missing)
        labels = np.asarray(labels)
        if labels.shape != tuple(image.shape[-2:]):
            raise DataError(f"the label mask has shape {labels.shape} but the image is {tuple(image.shape[-2:])}")
        table = cells_from_mask(labels, "labels")
        if table.empty:
            return np.zeros((0, self.pooled_dim(pooling)), np.float32), np.zeros(0, np.int64)
        crops = self.cell_crops(image, labels, crop_size, mask_background, table)
        batch_size = _positive(batch_size, "batch_size")

        def batches() -> Iterator[tuple[torch.Tensor, None]]:
            batch: list[np.ndarray] = []
            for _, crop in crops:
                batch.append(crop)
                if len(batch) == batch_size:
                    yield self.samples(np.stack(batch), channels, "cell"), None
                    batch = []
            if batch:
                yield self.samples(np.stack(batch), channels, "cell"), None

        z = self.forward_batches(batches(), len(table), ids, self.forward_samples(pooling), progress, "embed cells")
        return z, table["cell_label"].to_numpy(np.int64)

    def embed_tiles(self, image, channels: Sequence[str], tile_size: int | None = None,
                    batch_size: int = 64, progress: Progress = False,
                    allow_missing: bool = False, pooling: str | Sequence[str] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """One embedding per square tile of a field of view (for images without a segmentation).

        Tiles cover the image row by row without overlap; the last row / column is zero-padded
        at the border. Each tile is embedded like :meth:`embed`.

        Args:
            image: ``(C, H, W)`` field of view (numpy, torch, Zarr, dask; read tile by tile).
            channels: Name of each channel, in the order of the channel axis.
            tile_size: Tile side in pixels (default :attr:`crop_size`).
            batch_size: Tiles per forward pass.
            progress: True for a progress bar, or a callable ``(done, total)``.
            allow_missing: See :meth:`resolve_channels`.
            pooling: See :meth:`embed`.

        Returns:
            ``(embeddings (n_tiles, pooled_dim) float32, boxes (n_tiles, 4) int64)`` with each
            tile's ``(y0, x0, height, width)`` in pixels.
        """
        image = _as_array(image, "the image")
        if len(image.shape) != 3:
            raise DataError(f"embed_tiles expects one (C, H, W) image, got shape {tuple(image.shape)}")
        ids = self.resolve_channels(channels, int(image.shape[0]), allow_missing)
        size = _positive(self.crop_size if tile_size is None else tile_size, "tile_size")
        batch_size = _positive(batch_size, "batch_size")
        height, width = (int(n) for n in image.shape[-2:])
        boxes = np.array([(y, x, size, size) for y in range(0, height, size) for x in range(0, width, size)],
                         dtype=np.int64)

        def batches() -> Iterator[tuple[torch.Tensor, None]]:
            for s in range(0, len(boxes), batch_size):
                tiles = [read_region(image, Box(int(y), int(x), int(y) + size, int(x) + size))
                         for y, x, _, _ in boxes[s : s + batch_size]]
                yield self.samples(np.stack(tiles).astype(np.float32, copy=False), channels, "tile"), None

        z = self.forward_batches(batches(), len(boxes), ids, self.forward_samples(pooling), progress, "embed tiles")
        return z, boxes


def _positive(n, name: str = "size") -> int:
    try:
        value = int(n)
    except (TypeError, ValueError):
        raise DataError(f"{name}={n!r}; expected a whole number >= 1") from None
    if isinstance(n, bool) or value != n or value < 1:
        raise DataError(f"{name}={n!r}; expected a whole number >= 1")
    return value


def preprocess_of(payload: dict, config, source: str) -> Preprocess:
    """The checkpoint's preprocessing contract; for checkpoints older than stored contracts, the config's.

    Raises:
        CheckpointError: If an old ``data.normalize=dataset`` checkpoint's statistics cannot be
            found (they were only in a cache file then).
    """
    if "preprocess" in payload:
        return Preprocess.from_dict(payload["preprocess"], source)
    if config.data.normalize != Normalization.dataset:
        return Preprocess.from_config(config)
    cache = config.data.stats_cache
    if cache and Path(cache).expanduser().is_file():
        return Preprocess.from_config(config, ChannelStats.load(cache))
    raise CheckpointError(
        f"{source} was trained with data.normalize=dataset by a version that kept the statistics only in a cache "
        f"file ({cache or 'the default cache'}), which is not here. Copy that JSON file here and point "
        "data.stats_cache at it in the checkpoint's config, or retrain to store the statistics in the checkpoint"
    )


def vocabulary_of(payload: dict, config) -> ChannelVocabulary:
    """The checkpoint's channel vocabulary; for older checkpoints, the one its config implies."""
    if "vocabulary" in payload:
        return ChannelVocabulary.from_dict(payload["vocabulary"])
    return ChannelVocabulary.from_config(config.data)


def pretrained_backbone(payload: dict, path: str | Path, state: dict | None = None
                        ) -> tuple[ChannelAdaptiveViT, Config, ChannelVocabulary, Preprocess]:
    """The backbone a checkpoint holds, with its run config, channel vocabulary and preprocessing contract.

    Args:
        payload: The checkpoint's content (:func:`~cellvit_ssl.checkpoint.load_checkpoint`): a
            teacher export (its ``backbone``), a training checkpoint (the teacher's weights), or
            any payload with a ``config`` when ``state`` is given.
        path: The file, for messages.
        state: Backbone weights to load instead of the payload's own.

    Returns:
        ``(model on the CPU, config, vocabulary, preprocess)``.

    Raises:
        CheckpointError: If the payload holds no config or its weights do not fit its config.
    """
    if "config" not in payload:
        raise CheckpointError(f"{path}: the checkpoint holds no run config; it was not written by cellvit_ssl")
    config = config_from_dict(payload["config"])
    vocabulary = vocabulary_of(payload, config)
    model = build_model(config.model, list(config.data.channels), vocabulary=vocabulary, load_pretrained=False)
    try:
        if state is None and payload["format"] == ENCODER_FORMAT:
            state = payload["backbone"]
        elif state is None:
            if payload["format"] != TRAINING_FORMAT:
                raise CheckpointError(f"{path}: a {payload['format']!r} file holds no backbone to load")
            state = teacher_backbone_state(payload["model"], config, vocabulary)
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its own config: {exc}") from exc
    return model, config, vocabulary, preprocess_of(payload, config, str(path))


def load_encoder(path: str | Path, device: str | torch.device | None = None, payload: dict | None = None) -> Encoder:
    """Load an :class:`Encoder` from a training checkpoint or a teacher export.

    Args:
        path: ``checkpoint.pt`` (teacher weights are taken) or ``teacher.pt``.
        device: ``cpu``, ``cuda`` or ``cuda:N``; default CUDA when available, else CPU.
        payload: The file's content when already loaded (:func:`~cellvit_ssl.checkpoint.load_checkpoint`).

    Raises:
        CheckpointError: If the file is missing, corrupt or not a cellvit_ssl checkpoint.
        ConfigError: If the device does not exist here.
    """
    device = resolve_device(device)
    payload = payload if payload is not None else load_checkpoint(path)
    model, config, vocabulary, preprocess = pretrained_backbone(payload, path)
    return Encoder(model, config, device, source=str(path), preprocess=preprocess, vocabulary=vocabulary)


def resolve_device(device: str | torch.device | None, key: str = "device") -> torch.device:
    """``None`` / ``"auto"`` → CUDA when available, else CPU; anything else is checked.

    Args:
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a :class:`torch.device`.
        key: How the caller names the setting in messages (e.g. ``embed.device``).

    Raises:
        ConfigError: On an unknown device string or a CUDA device this machine does not have.
    """
    from cellvit_ssl.config import check_device

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(str(device), key)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={str(device)!r} but no CUDA GPU is available here; use cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={str(device)!r} but this machine has {torch.cuda.device_count()} GPU(s)")
    return dev

