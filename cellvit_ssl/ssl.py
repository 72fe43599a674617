"""Student/teacher meta-architecture: the only object that knows backbones, heads and the EMA.

The training loop calls ``meta(views, channel_ids, epoch=epoch)`` for a loss dict,
``cancel_last_layer_gradients(epoch)`` before the optimiser step and ``update_teacher(m)``
after it; it never reaches inside. The objective is DINOv2's:

- DINO on CLS tokens (lightly ``DINOLoss``): teacher on the global views, student on all views;
- iBOT on masked patch tokens of the global views (lightly ``IBOTPatchLoss``, block masks from
  lightly's ``random_block_mask``), with its own head (untied from the DINO head);
- KoLeo on the student's global CLS tokens (lightly ``KoLeoLoss``);
- teacher centering by lightly's running mean or by Sinkhorn-Knopp
  (:func:`cellvit_ssl.centering.sinkhorn_knopp`).

Every term is switchable in ``ssl``; the returned dict holds ``loss`` and each enabled term.
"""

from __future__ import annotations

import copy
import math

import torch
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import random_block_mask, update_momentum
from torch import Tensor, nn

from cellvit_ssl.centering import sinkhorn_knopp
from cellvit_ssl.models.channels import ChannelAdaptiveViT
from cellvit_ssl.models.sampling import sample_channel_subsets


def _head(input_dim: int, output_dim: int, cfg) -> DINOProjectionHead:
    return DINOProjectionHead(
        input_dim=input_dim,
        hidden_dim=cfg.head_hidden_dim,
        bottleneck_dim=cfg.head_bottleneck_dim,
        output_dim=output_dim,
        freeze_last_layer=cfg.freeze_last_layer_epochs,
    )


def _head_pair(input_dim: int, output_dim: int, cfg) -> tuple[DINOProjectionHead, DINOProjectionHead]:
    """Student and teacher heads with equal weights.

    lightly's heads hold a weight-normalised last layer, which ``copy.deepcopy`` cannot copy:
    the teacher head is built anew and loaded from the student's state.
    """
    student, teacher = _head(input_dim, output_dim, cfg), _head(input_dim, output_dim, cfg)
    teacher.load_state_dict(student.state_dict())
    return student, teacher


def as_log_targets(probs: Tensor) -> Tensor:
    """Probabilities as logits that lightly's losses turn back into the same probabilities.

    With temperature 1 and a zero centre, lightly's ``softmax((t - centre) / T)`` of
    ``log(p)`` is ``p`` again; the clamp keeps exact zeros finite (an error below 1e-37).
    """
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def _grid(view: Tensor, n_tokens: int) -> tuple[int, int]:
    """Patch grid ``(h, w)`` of a view whose samples have ``n_tokens`` patch tokens."""
    patch = math.isqrt(view.shape[-2] * view.shape[-1] // n_tokens)
    h, w = view.shape[-2] // patch, view.shape[-1] // patch
    if h * w != n_tokens:
        raise ValueError(f"cannot lay {n_tokens} patch tokens on a {tuple(view.shape[-2:])} view")
    return h, w


class DINOMetaArch(nn.Module):
    """DINOv2-style student/teacher over a channel-adaptive backbone.

    Args:
        backbone: The student backbone; the teacher is a copy of it.
        cfg: The ``ssl`` section of the run config.

    Each training sample of the backbone (for ``boc``: each channel of each image) is one row
    of the DINO loss and one masked sequence of the iBOT loss.

    Examples:
        >>> from cellvit_ssl.config import load_config
        >>> from cellvit_ssl.models import build_model
        >>> cfg = load_config(None, ["model.arch=custom", "model.embed_dim=32", "model.depth=1",
        ...     "model.num_heads=2", "model.patch_size=8", "model.img_size=32",
        ...     "ssl.head_hidden_dim=32", "ssl.head_bottleneck_dim=16", "ssl.head_output_dim=64"])
        >>> meta = DINOMetaArch(build_model(cfg.model, ["nucleus", "protein"]), cfg.ssl)
        >>> views = [torch.rand(4, 2, 32, 32)] * 2 + [torch.rand(4, 2, 16, 16)]
        >>> sorted(meta(views, torch.tensor([[0, 7]] * 4), epoch=0))
        ['dino', 'ibot', 'koleo', 'loss']
    """

    def __init__(self, backbone: ChannelAdaptiveViT, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = backbone
        self.teacher = copy.deepcopy(backbone)
        dim = backbone.embed_dim
        sk = cfg.centering == "sinkhorn_knopp"
        # Under Sinkhorn-Knopp the losses get ready-made targets: a frozen zero centre.
        center_momentum = 1.0 if sk else cfg.center_momentum
        if cfg.dino:
            self.student_dino_head, self.teacher_dino_head = _head_pair(dim, cfg.head_output_dim, cfg)
            self.dino_loss = DINOLoss(
                output_dim=cfg.head_output_dim,
                warmup_teacher_temp=cfg.warmup_teacher_temp,
                teacher_temp=cfg.teacher_temp,
                warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
                student_temp=cfg.student_temp,
                center_momentum=center_momentum,
            )
        if cfg.ibot:
            ibot_dim = cfg.ibot_head_output_dim or cfg.head_output_dim
            self.student_ibot_head, self.teacher_ibot_head = _head_pair(dim, ibot_dim, cfg)
            self.ibot_loss = IBOTPatchLoss(
                output_dim=ibot_dim, teacher_temp=cfg.teacher_temp, student_temp=cfg.student_temp,
                center_momentum=center_momentum,
            )
        if cfg.koleo:
            self.koleo_loss = KoLeoLoss()
        for p in self._teacher_modules().parameters():
            p.requires_grad_(False)

    def _teacher_modules(self) -> nn.ModuleList:
        return nn.ModuleList(
            [self.teacher] + [getattr(self, f"teacher_{t}_head") for t in ("dino", "ibot") if getattr(self.cfg, t)]
        )

    def _student_heads(self) -> list[DINOProjectionHead]:
        return [getattr(self, f"student_{t}_head") for t in ("dino", "ibot") if getattr(self.cfg, t)]

    def heads(self) -> list[DINOProjectionHead]:
        """Every projection head, student and teacher (e.g. to shard each one under FSDP)."""
        return [getattr(self, f"{who}_{t}_head") for t in ("dino", "ibot") if getattr(self.cfg, t)
                for who in ("student", "teacher")]

    def train(self, mode: bool = True) -> DINOMetaArch:
        """Train mode for the student; the teacher always runs in eval mode (no drop path)."""
        super().train(mode)
        self._teacher_modules().eval()
        return self

    def teacher_temperature(self, epoch: int) -> float:
        """Teacher temperature at ``epoch``: DINO's (and lightly ``DINOLoss``'s) warm-up.

        ``linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)[epoch]``,
        then ``teacher_temp``; the same value drives the DINO and the iBOT term.
        """
        c = self.cfg
        if epoch < c.warmup_teacher_temp_epochs:
            return float(torch.linspace(c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs)[epoch])
        return float(c.teacher_temp)

    def _masks(self, view: Tensor, channel_ids: Tensor, present: Tensor) -> Tensor:
        """Block masks ``(S, N)`` for iBOT on one global view (lightly ``random_block_mask``)."""
        n_samples, n_tokens = self.student.sample_shape(view, channel_ids, present)
        h, w = _grid(view, n_tokens)
        lo, hi = self.cfg.mask_ratio
        masks = random_block_mask(
            (n_samples, h, w),
            batch_mask_ratio=self.cfg.mask_sample_probability,
            min_image_mask_ratio=lo,
            max_image_mask_ratio=hi,
            # DINOv2's 4-patch minimum block is meant for 16x16 grids; small grids need 1.
            min_num_masks_per_block=4 if n_tokens >= 64 else 1,
            device=view.device,
        )
        return masks.flatten(1)

    def _targets(self, logits: Tensor, temp: float) -> tuple[Tensor, float | None]:
        """Teacher logits and temperature to hand to a lightly loss, per centering mode."""
        if self.cfg.centering == "sinkhorn_knopp":
            return as_log_targets(sinkhorn_knopp(logits, temp, self.cfg.sinkhorn_iterations)), 1.0
        return logits, temp

    def forward(
        self,
        views: list[Tensor],
        channel_ids: Tensor,
        epoch: int,
        n_global: int = 2,
        channel_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Loss dict for one batch of views.

        Args:
            views: ``n_global`` global views then local views, each ``(B, C, h, w)``.
            channel_ids: ``(B, C)`` vocabulary ids of the channels.
            epoch: Current epoch (teacher-temperature warm-up).
            n_global: How many leading views are global (seen by the teacher).
            channel_mask: Optional ``(B, C)`` bool, True where a channel is present.

        Returns:
            ``loss`` (to backpropagate) and every enabled term detached (``dino``, ``ibot``,
            ``koleo``, unweighted).
        """
        cfg = self.cfg
        present = torch.ones_like(channel_ids, dtype=torch.bool) if channel_mask is None else channel_mask.bool()
        if cfg.channel_sampling == "hierarchical":
            # One subset per image, shared by all its views, so that teacher and student rows align.
            present = sample_channel_subsets(present)
        g = torch.cat(views[:n_global])
        g_ids, g_present = channel_ids.repeat(n_global, 1), present.repeat(n_global, 1)
        masks = None
        if cfg.ibot:
            masks = torch.cat([self._masks(v, channel_ids, present) for v in views[:n_global]])
        with torch.no_grad():
            teacher = self.teacher.forward_features(g, g_ids, g_present)
        student = self.student.forward_features(g, g_ids, g_present, masks=masks)
        temp = self.teacher_temperature(epoch)
        terms: dict[str, Tensor] = {}
        if cfg.dino:
            with torch.no_grad():
                t_logits = self.teacher_dino_head(teacher["x_norm_clstoken"])
            s_logits = self.student_dino_head(student["x_norm_clstoken"]).chunk(n_global)
            if len(views) > n_global:
                local = torch.cat(views[n_global:])
                n_local = len(views) - n_global
                local_cls = self.student.forward_features(
                    local, channel_ids.repeat(n_local, 1), present.repeat(n_local, 1)
                )["x_norm_clstoken"]
                s_logits = s_logits + self.student_dino_head(local_cls).chunk(n_local)
            t_in, t_temp = self._targets(t_logits, temp)
            terms["dino"] = self.dino_loss(list(t_in.chunk(n_global)), list(s_logits), teacher_temp=t_temp)
        if cfg.ibot:
            with torch.no_grad():
                t_patch = self.teacher_ibot_head(teacher["x_norm_patchtokens"][masks])
            s_patch = self.student_ibot_head(student["x_norm_patchtokens"][masks])
            t_in, t_temp = self._targets(t_patch, temp)
            h, w = _grid(g, masks.shape[1])
            if masks.any():
                terms["ibot"] = self.ibot_loss(t_in, s_patch, masks.view(-1, h, w), teacher_temp=t_temp)
            else:  # nothing masked in this batch: a zero that keeps the graph
                terms["ibot"] = s_patch.sum() * 0.0
        if cfg.koleo:
            cls = student["x_norm_clstoken"].chunk(n_global)
            terms["koleo"] = sum(self.koleo_loss(c) for c in cls)
        weights = {"dino": cfg.dino_loss_weight, "ibot": cfg.ibot_loss_weight, "koleo": cfg.koleo_loss_weight}
        loss = sum(weights[k] * v for k, v in terms.items())
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}

    def cancel_last_layer_gradients(self, epoch: int) -> None:
        """Drop the heads' last-layer gradients during the first ``freeze_last_layer_epochs``."""
        for head in self._student_heads():
            head.cancel_last_layer_gradients(epoch)

    @torch.no_grad()
    def update_teacher(self, m: float) -> None:
        """EMA step: teacher ← m · teacher + (1 − m) · student (lightly ``update_momentum``)."""
        update_momentum(self.student, self.teacher, m)
        for t in ("dino", "ibot"):
            if getattr(self.cfg, t):
                update_momentum(getattr(self, f"student_{t}_head"), getattr(self, f"teacher_{t}_head"), m)
