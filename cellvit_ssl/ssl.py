"""Student/teacher meta-architecture: the only object that knows backbones, heads and the EMA.

The training loop calls ``forward(views, channel_ids, epoch)`` for a loss dict and
``update_teacher(m)`` after each optimiser step; it never reaches inside. Heads, loss, EMA
and schedules come from lightly.
"""

from __future__ import annotations

import copy

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import update_momentum
from torch import Tensor, nn

from cellvit_ssl.models.channels import ChannelAdaptiveViT


def _head(input_dim: int, cfg) -> DINOProjectionHead:
    return DINOProjectionHead(
        input_dim=input_dim,
        hidden_dim=cfg.head_hidden_dim,
        bottleneck_dim=cfg.head_bottleneck_dim,
        output_dim=cfg.head_output_dim,
        freeze_last_layer=1,
    )


class DINOMetaArch(nn.Module):
    """DINO student/teacher over a channel-adaptive backbone.

    Args:
        backbone: The student backbone; the teacher is a copy of it.
        cfg: The ``ssl`` section of the run config.

    The teacher sees the global views, the student all views; each training sample of the
    backbone (for ``boc``: each channel of each image) is one row of the DINO loss.
    """

    def __init__(self, backbone: ChannelAdaptiveViT, cfg) -> None:
        super().__init__()
        self.student = backbone
        self.teacher = copy.deepcopy(backbone)
        dim = backbone.embed_dim
        self.student_head = _head(dim, cfg)
        # lightly's head uses weight norm and cannot be deep-copied: build it anew and copy.
        self.teacher_head = _head(dim, cfg)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        for p in list(self.teacher.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.dino_loss = DINOLoss(
            output_dim=cfg.head_output_dim,
            warmup_teacher_temp=cfg.warmup_teacher_temp,
            teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
            student_temp=cfg.student_temp,
            center_momentum=cfg.center_momentum,
        )

    def _cls(self, net: ChannelAdaptiveViT, view: Tensor, channel_ids: Tensor) -> Tensor:
        return net.forward_features(view, channel_ids)["x_norm_clstoken"]

    def forward(self, views: list[Tensor], channel_ids: Tensor, epoch: int, n_global: int = 2) -> dict[str, Tensor]:
        """Loss dict for one batch of views.

        Args:
            views: ``n_global`` global views then local views, each ``(B, C, h, w)``.
            channel_ids: ``(B, C)`` vocabulary ids of the channels.
            epoch: Current epoch (drives the teacher-temperature warm-up).
            n_global: How many leading views are global (seen by the teacher).

        Returns:
            ``loss`` (to backpropagate) and every term detached (``dino``).
        """
        with torch.no_grad():
            teacher_out = [self.teacher_head(self._cls(self.teacher, v, channel_ids)) for v in views[:n_global]]
        student_out = [self.student_head(self._cls(self.student, v, channel_ids)) for v in views]
        loss = self.dino_loss(teacher_out, student_out, epoch=epoch)
        return {"loss": loss, "dino": loss.detach()}

    def cancel_last_layer_gradients(self, epoch: int) -> None:
        """Zero the head's last-layer gradients during the first epoch (DINO's recipe)."""
        self.student_head.cancel_last_layer_gradients(epoch)

    @torch.no_grad()
    def update_teacher(self, m: float) -> None:
        """EMA step: teacher ← m · teacher + (1 − m) · student (lightly ``update_momentum``)."""
        update_momentum(self.student, self.teacher, m)
        update_momentum(self.student_head, self.teacher_head, m)
