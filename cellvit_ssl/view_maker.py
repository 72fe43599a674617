"""Where a training step's views are made: per sample in the loader's workers, or per batch on the device.

``views.device`` chooses (:func:`build_view_maker`):

- ``workers``: the dataset applies :class:`~cellvit_ssl.transforms.MultichannelDINOTransform`
  to every sample in the DataLoader's CPU workers; the step moves the collated views to the
  device.
- ``device``: the workers only read and normalise the samples (the dataset's ``transform=None``
  path); the step moves the batch of samples once (pinned memory, non-blocking) and
  :class:`~cellvit_ssl.gpu_views.GPUMultiCrop` cuts every view of every sample there in one
  batched pass, with the same view distribution and without a host-device synchronisation.
  On a CPU run this is the same code on CPU tensors.
- ``auto``: ``device`` when training on CUDA, else ``workers``.

Both are reproducible and resume exactly. Worker views are drawn per (seed, epoch, sample)
by :class:`~cellvit_ssl.train.SeededViews`, so they do not depend on the number of processes.
Device views are drawn per (seed, epoch, rank, batch number within the epoch) from one
generator on the device, re-seeded for every micro-batch (:func:`batch_seed`): a resumed run
makes the same views as the uninterrupted one on the same number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from cellvit_ssl.channels import PAD_CHANNEL_ID
from cellvit_ssl.config import ViewsDevice
from cellvit_ssl.gpu_views import GPUMultiCrop
from cellvit_ssl.transforms import MultichannelDINOTransform

#: Keeps batch seeds apart from the per-sample seeds of the same (seed, epoch, number).
_BATCH_STREAM = 0x5EED_BA7C


def views_on_device(views_device: str, device: torch.device) -> bool:
    """Whether ``views.device`` puts the views on the training device (``auto``: on CUDA)."""
    if views_device == ViewsDevice.auto:
        return device.type == "cuda"
    return views_device == ViewsDevice.device


def batch_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """Seed of one micro-batch's device views: a well-mixed function of (run seed, epoch, rank, batch)."""
    state = np.random.SeedSequence([seed, epoch, rank, batch, _BATCH_STREAM]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> 1)


class WorkerViews:
    """Views made per sample by the CPU transform in the loader's workers; the step only moves them.

    Args:
        cfg: The ``views`` section of the run config.
        channels: ``data.channels`` (for ``views.protected_channels``).
        device: The training device.
    """

    on_device = False

    def __init__(self, cfg, channels: Sequence[str], device: torch.device) -> None:
        #: What the dataset applies to every sample.
        self.sample_transform: Callable | None = MultichannelDINOTransform(cfg, channels=list(channels))
        self.device = device

    def __call__(self, batch: dict, channel_ids: Tensor, epoch: int, batch_number: int) -> list[Tensor]:
        """The batch's views on the device (``channel_ids``, ``epoch`` and ``batch_number`` are not needed)."""
        return [v.to(self.device, non_blocking=True) for v in batch["views"]]


class DeviceViews:
    """Views made per batch on the training device from the batch's normalised samples.

    Args:
        cfg: The ``views`` section of the run config.
        channels: ``data.channels`` (for ``views.protected_channels``).
        device: The training device (where the views are cut).
        seed: The run seed (``train.seed``).
        rank: This process's rank.
    """

    on_device = True

    def __init__(self, cfg, channels: Sequence[str], device: torch.device, seed: int, rank: int) -> None:
        #: The dataset yields normalised samples (``image``), no views.
        self.sample_transform: Callable | None = None
        self.crops = GPUMultiCrop(cfg, channels=list(channels))
        self.device, self.seed, self.rank = device, int(seed), int(rank)
        self.generator = torch.Generator(device=device)

    def __call__(self, batch: dict, channel_ids: Tensor, epoch: int, batch_number: int) -> list[Tensor]:
        """Move the batch's samples to the device and cut its views there.

        Args:
            batch: A collated batch with ``image`` ``(B, C, H, W)`` (pinned when on CUDA).
            channel_ids: ``(B, C)`` channel ids already on the device (padding is found there).
            epoch: The epoch of the batch.
            batch_number: The micro-batch's number within the epoch on this rank.
        """
        images = batch["image"].to(self.device, non_blocking=True)
        self.generator.manual_seed(batch_seed(self.seed, epoch, self.rank, batch_number))
        padding = channel_ids == PAD_CHANNEL_ID if "channel_mask" in batch else None
        return self.crops(images, generator=self.generator, padding=padding)


def build_view_maker(cfg, device: torch.device, rank: int = 0, seed: int | None = None) -> WorkerViews | DeviceViews:
    """The run's view maker for ``views.device`` (see the module docstring).

    Args:
        cfg: The run config (``views``, ``data.channels``, ``train.seed``).
        device: The training device.
        rank: This process's rank.
        seed: Seed of the device views (default ``train.seed``; a later training phase has its own).

    Raises:
        ConfigError: On views settings that neither view maker accepts (see
            :func:`~cellvit_ssl.transforms.check_view_settings`).
    """
    channels = list(cfg.data.channels)
    if views_on_device(cfg.views.device, device):
        return DeviceViews(cfg.views, channels, device, cfg.train.seed if seed is None else seed, rank)
    return WorkerViews(cfg.views, channels, device)
