"""Embeddings for lab pipelines: :func:`load_encoder` and :class:`Encoder`.

Examples:
    >>> from cellvit_ssl import load_encoder  # doctest: +SKIP
    >>> enc = load_encoder("runs/demo/teacher.pt")  # doctest: +SKIP
    >>> z = enc.embed(stack, channels=["nucleus", "microtubules", "er", "protein"])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cellvit_ssl.checkpoint import ENCODER_FORMAT, TRAINING_FORMAT, load_checkpoint
from cellvit_ssl.config import config_from_dict
from cellvit_ssl.data.channels import canonical_name
from cellvit_ssl.data.channels import channel_ids as names_to_ids
from cellvit_ssl.data.dataset import normalize_percentiles
from cellvit_ssl.errors import CheckpointError, DataError
from cellvit_ssl.models.channels import ChannelAdaptiveViT, build_model


class Encoder:
    """A trained channel-adaptive backbone ready to embed images.

    Args:
        model: The backbone (teacher weights).
        config: The run config it was trained with (channel names, crop size, normalisation).
        device: Where to run.

    Attributes:
        channels: Channel names the model knows, in embedding order.
        output_dim: Width of one image embedding.
    """

    def __init__(self, model: ChannelAdaptiveViT, config, device: torch.device) -> None:
        self.model = model.eval().to(device)
        self.config = config
        self.device = device
        self.channels = list(model.channels)
        self.output_dim = model.output_dim
        self.input_size = int(config.views.global_crop_size)

    def _channel_ids(self, channels: Sequence[str], n: int) -> torch.Tensor:
        if len(channels) != n:
            raise DataError(
                f"the images have {n} channels but {len(channels)} channel names were given: {list(channels)}"
            )
        try:
            names = [canonical_name(c, self.config.data.channel_map) for c in channels]
            ids = names_to_ids(names)
        except DataError as exc:
            raise DataError(f"{exc}; this model knows {self.channels}") from exc
        unknown = [c for c, name in zip(channels, names) if name not in self.channels]
        if unknown:
            raise DataError(f"channels {unknown} are not known to this model; it knows {self.channels}")
        return torch.tensor(ids, dtype=torch.long)

    def _prepare(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise DataError(f"expected images shaped (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
        low, high = self.config.data.normalize_percentiles
        x = np.stack([normalize_percentiles(im, low, high, source=f"image {i}") for i, im in enumerate(x)])
        t = torch.from_numpy(x)
        if t.shape[-2:] != (self.input_size, self.input_size):
            t = F.interpolate(t, size=(self.input_size, self.input_size), mode="bilinear",
                              antialias=True, align_corners=False)
        return t

    @torch.inference_mode()
    def embed(self, images: np.ndarray | torch.Tensor, channels: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """One embedding per image.

        Images are normalised per channel as in training and resized to the training crop
        size. Channels are matched to the model by name, so their order does not matter.

        Args:
            images: ``(C, H, W)`` or ``(B, C, H, W)`` array (numpy or torch).
            channels: Name of each channel, in the order of the channel axis.
            batch_size: Images per forward pass.

        Returns:
            float32 array ``(B, output_dim)``.

        Raises:
            DataError: On a wrong shape, a channel-count mismatch or an unknown channel name.
        """
        x = self._prepare(images)
        ids = self._channel_ids(channels, x.shape[1])
        out = []
        for start in range(0, x.shape[0], batch_size):
            chunk = x[start : start + batch_size].to(self.device)
            chunk_ids = ids.to(self.device).expand(chunk.shape[0], -1)
            out.append(self.model.embed(chunk, chunk_ids).float().cpu())
        return torch.cat(out).numpy()


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
    model = build_model(config.model, list(config.data.channels))
    if payload["format"] == ENCODER_FORMAT:
        state = payload["backbone"]
    else:
        assert payload["format"] == TRAINING_FORMAT
        state = {k[len("teacher."):]: v for k, v in payload["model"].items() if k.startswith("teacher.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its own config: {exc}") from exc
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return Encoder(model, config, device)
