"""Student/teacher meta-architecture: the only object that knows backbones, heads and the EMA.

It has DINOv2's shape: ``student`` and ``teacher`` are ``nn.ModuleDict`` s holding ``backbone``
(a :class:`~cellvit_ssl.models.base.ChannelAdaptiveViT`), ``dino_head`` (when ``ssl.dino``) and
``ibot_head`` (when ``ssl.ibot``), so parameter names read ``student.backbone.*``,
``teacher.dino_head.*``. Code outside asks it, never attribute names, for what it needs:

- ``meta(views, channel_ids, epoch=epoch)`` for a loss dict, ``cancel_last_layer_gradients(epoch)``
  before the optimiser step and ``update_teacher(m)`` after it;
- :meth:`DINOMetaArch.transformer_blocks` (every block; hierarchical attention's cross-channel
  blocks included), :meth:`~DINOMetaArch.backbones` and :meth:`~DINOMetaArch.heads` for FSDP
  wrapping, ``torch.compile`` and activation checkpointing;
- :meth:`DINOMetaArch.teacher_backbone_state_dict` for the encoder export (``teacher.pt``) and
  for :func:`teacher_backbone_state`, which ``load_encoder`` uses on training checkpoints.

The objective is DINOv2's:

- DINO on CLS tokens: teacher on the global views, student on all views;
- iBOT on masked patch tokens of the global views (block masks from lightly's
  ``random_block_mask``), with its own head (untied from the DINO head);
- KoLeo on the student's global CLS tokens (lightly ``KoLeoLoss``);
- teacher centring by lightly's running mean (lightly ``DINOLoss`` / ``IBOTPatchLoss``, which
  all-reduce their centres: two all-reduces a step with both terms) or by Sinkhorn-Knopp
  (:func:`cellvit_ssl.centering.sinkhorn_knopp_jointly`: ``ssl.sinkhorn_iterations + 1``
  all-reduces a step for DINO and iBOT together, and no centre at all). These are the
  objective's own collectives; the trainer adds one all-reduce of the step's loss terms, and
  DDP's gradient buckets or FSDP's gathers and reductions come on top.

Two later additions, both off by default:

- **distillation** (``distill.teacher``, DINOv2's recipe for small models): the targets come
  from a frozen, usually larger network (:class:`cellvit_ssl.distill.FrozenTeacher`, held
  outside the module tree: not in the state dict, the optimizer or the DDP / FSDP wrapper;
  run under ``torch.inference_mode``) instead of the EMA teacher. The EMA of the student is
  still kept in ``teacher`` and is what ``teacher.pt`` exports. As in DINOv2 the student sees
  unmasked global views and iBOT scores every patch token (``distill.masking`` keeps the
  block masks instead);
- **Gram anchoring** (``ssl.gram``, DINOv3): from ``ssl.gram.start_step`` on, the squared
  difference between the Gram matrix of the student's L2-normalised patch features and that of
  ``gram_teacher``, a snapshot of the EMA teacher's backbone taken at ``start_step`` and
  refreshed every ``refresh_every`` steps (:meth:`DINOMetaArch.refresh_gram_teacher`).

Every term is switchable in ``ssl``; the returned dict holds ``loss`` and each enabled term.
The key layout of checkpoints written before these module dicts is mapped by
:func:`cellvit_ssl.checkpoint.upgrade_state_layout`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import random_block_mask, update_momentum
from torch import Tensor, nn

from cellvit_ssl.centering import sinkhorn_knopp_jointly
from cellvit_ssl.channels import ChannelVocabulary
from cellvit_ssl.distributed import full_model_state_dict
from cellvit_ssl.models.channels import ChannelAdaptiveViT, build_model
from cellvit_ssl.models.sampling import sample_channel_subsets


def _head(input_dim: int, output_dim: int, cfg) -> DINOProjectionHead:
    # lightly builds the last layer with torch.nn.utils.weight_norm, which torch deprecates with a
    # FutureWarning on every run. Its state-dict keys (weight_g / weight_v) are the checkpoint
    # layout, so the head is kept as it is and only that warning is silenced here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.nn\.utils\.weight_norm` is deprecated",
                                category=FutureWarning)
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


def dino_cross_entropy(targets: list[Tensor], student_logits: list[Tensor], student_temp: float) -> Tensor:
    """The cross-entropy of lightly's ``DINOLoss``, with ready-made teacher targets and no centre.

    The mean over every (teacher view, student view) pair of different views of
    ``-sum(p_teacher * log_softmax(student / student_temp))``, averaged over the batch.

    Args:
        targets: Per global view, teacher probabilities ``(B, K)`` (rows sum to 1).
        student_logits: Per view (global views first), student head outputs ``(B, K)``.
        student_temp: Student temperature.
    """
    t = torch.stack(targets)
    s = F.log_softmax(torch.stack(student_logits) / student_temp, dim=-1)
    pairs = -torch.einsum("tbk,sbk->ts", t, s)
    other_view = ~torch.eye(*pairs.shape, dtype=torch.bool, device=pairs.device)
    return pairs[other_view].sum() / (int(other_view.sum()) * t.shape[1])


def ibot_cross_entropy(targets: Tensor, student_logits: Tensor, masks: Tensor, student_temp: float) -> Tensor:
    """The cross-entropy of lightly's ``IBOTPatchLoss``, with ready-made teacher targets and no centre.

    Each masked token's cross-entropy is weighted by one over its sample's number of masked
    tokens; the sum is divided by the number of samples (masked or not), as in DINOv2.

    Args:
        targets: Teacher probabilities ``(M, K)`` of the ``M`` masked tokens.
        student_logits: Student head outputs ``(M, K)`` of the same tokens.
        masks: Boolean ``(S, N)``, True at the masked tokens (``M`` of them, in row-major order).
        student_temp: Student temperature.
    """
    ce = -(targets * F.log_softmax(student_logits / student_temp, dim=-1)).sum(dim=-1)
    weight = (1.0 / masks.sum(dim=1, keepdim=True).clamp(min=1)).expand_as(masks)[masks]
    return (ce * weight.to(ce.dtype)).sum() / masks.shape[0]


def gram_loss(student_patches: Tensor, teacher_patches: Tensor) -> Tensor:
    """DINOv3's Gram anchoring term for patch features ``(S, N, D)`` of the same ``S`` samples.

    Each sample's patch features are L2-normalised, their Gram matrix ``X Xᵀ`` ``(N, N)`` (the
    cosine similarity of every pair of patches) is taken for both networks, and the term is
    the squared Frobenius distance of the two matrices divided by ``N²``, averaged over the
    samples. Only the similarity structure between patches counts, not the features
    themselves, so the student's features may move while their relations stay anchored.
    """
    s = F.normalize(student_patches.float(), dim=-1)
    t = F.normalize(teacher_patches.float(), dim=-1)
    diff = s @ s.transpose(1, 2) - t @ t.transpose(1, 2)
    return diff.pow(2).mean()


def _grid(view: Tensor, n_tokens: int) -> tuple[int, int]:
    """Patch grid ``(h, w)`` of a view whose samples have ``n_tokens`` patch tokens."""
    patch = math.isqrt(view.shape[-2] * view.shape[-1] // n_tokens)
    h, w = view.shape[-2] // patch, view.shape[-1] // patch
    if h * w != n_tokens:
        raise ValueError(f"cannot lay {n_tokens} patch tokens on a {tuple(view.shape[-2:])} view")
    return h, w


def mean_per_image(rows: Tensor, present: Tensor) -> Tensor:
    """``(S, D)`` rows in (image, channel) order → ``(B, D)``: each image's mean over its present channels."""
    image = present.nonzero()[:, 0]
    total = rows.new_zeros(present.shape[0], rows.shape[1]).index_add_(0, image, rows)
    return total / present.sum(1, keepdim=True).clamp_min(1).to(rows.dtype)


@torch.no_grad()
def target_entropy(probs: Tensor) -> Tensor:
    """Mean entropy of target distributions ``(S, K)`` over ``ln K``: 1 means uniform targets, no signal.

    A run whose DINO targets sit near 1 learns nothing from the teacher (temperature too high for
    the batch and prototype count); one near 0 has collapsed onto few prototypes.
    """
    p = probs.float()
    return -(p * p.clamp_min(1e-12).log()).sum(-1).mean() / math.log(p.shape[-1])


class DINOMetaArch(nn.Module):
    """DINOv2-style student/teacher over a channel-adaptive backbone.

    Args:
        backbone: The student backbone; the teacher's is a copy of it.
        cfg: The ``ssl`` section of the run config.
        frozen_teacher: Distillation: the frozen network whose head outputs are the targets
            (:class:`cellvit_ssl.distill.FrozenTeacher`); None trains against the EMA teacher.
        mask_student: Distillation only: iBOT-mask the student's global views (False: DINOv2's
            unmasked distillation, iBOT on every patch token).

    Attributes:
        student: ``nn.ModuleDict`` with ``backbone`` and, when enabled, ``dino_head`` and
            ``ibot_head`` (trained).
        teacher: The same keys; an EMA of the student, never trained, always in eval mode.
        gram_teacher: With ``ssl.gram.enabled``: the Gram teacher's backbone, a snapshot of
            the teacher's (in the state dict, so a resumed run has the same snapshot).

    Each training sample of the backbone (for ``boc``: each channel of each image) is one row
    of the DINO loss and one masked sequence of the iBOT loss.

    Examples:
        >>> from cellvit_ssl.config import load_config
        >>> from cellvit_ssl.models import build_model
        >>> cfg = load_config(None, ["model.arch=custom", "model.embed_dim=32", "model.depth=1",
        ...     "model.num_heads=2", "model.patch_size=8", "model.img_size=32",
        ...     "ssl.head_hidden_dim=32", "ssl.head_bottleneck_dim=16", "ssl.head_output_dim=64"])
        >>> meta = DINOMetaArch(build_model(cfg.model, ["nucleus", "protein"]), cfg.ssl)
        >>> sorted(meta.student), sorted(meta.teacher)
        (['backbone', 'dino_head', 'ibot_head'], ['backbone', 'dino_head', 'ibot_head'])
        >>> views = [torch.rand(4, 2, 32, 32)] * 2 + [torch.rand(4, 2, 16, 16)]
        >>> sorted(meta(views, torch.tensor([[0, 7]] * 4), epoch=0))
        ['dino', 'ibot', 'koleo', 'loss']
    """

    def __init__(self, backbone: ChannelAdaptiveViT, cfg, frozen_teacher: nn.Module | None = None,
                 mask_student: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.sinkhorn = cfg.centering == "sinkhorn_knopp"
        self.student = nn.ModuleDict({"backbone": backbone})
        self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone)})
        # A plain attribute, not a submodule: kept out of state_dict, parameters() (so out of the
        # optimizer and of DDP / FSDP) and checkpoints; _apply moves it with the rest.
        object.__setattr__(self, "frozen_teacher", frozen_teacher)
        self.mask_student = bool(mask_student) or frozen_teacher is None
        gram = getattr(cfg, "gram", None)
        self.gram_enabled = bool(gram is not None and gram.enabled)
        if self.gram_enabled:
            self.gram_teacher = copy.deepcopy(backbone).requires_grad_(False)
        dim = backbone.embed_dim
        if cfg.dino:
            self.student["dino_head"], self.teacher["dino_head"] = _head_pair(dim, cfg.head_output_dim, cfg)
            if not self.sinkhorn:
                self.dino_loss = DINOLoss(
                    output_dim=cfg.head_output_dim,
                    warmup_teacher_temp=cfg.warmup_teacher_temp,
                    teacher_temp=cfg.teacher_temp,
                    warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
                    student_temp=cfg.student_temp,
                    center_momentum=cfg.center_momentum,
                )
        if cfg.ibot:
            ibot_dim = cfg.ibot_head_output_dim or cfg.head_output_dim
            self.student["ibot_head"], self.teacher["ibot_head"] = _head_pair(dim, ibot_dim, cfg)
            if not self.sinkhorn:
                self.ibot_loss = IBOTPatchLoss(
                    output_dim=ibot_dim, teacher_temp=cfg.teacher_temp, student_temp=cfg.student_temp,
                    center_momentum=cfg.center_momentum,
                )
        if cfg.koleo:
            self.koleo_loss = KoLeoLoss()
        self.teacher.requires_grad_(False)
        for name in ("dino_head", "ibot_head") if frozen_teacher is not None else ():
            if name in self.student and (theirs := getattr(frozen_teacher, name).last_layer.out_features) != \
                    (ours := self.student[name].last_layer.out_features):
                raise ValueError(f"the frozen teacher's {name} has {theirs} prototypes, the student's {ours}: "
                                 "build the student from cellvit_ssl.distill.resolve_distill_config's config")

    # -- what wrapping, compiling and exporting code asks for ---------------------------------

    def backbones(self) -> tuple[ChannelAdaptiveViT, ...]:
        """The student's and the teacher's backbone (and the Gram teacher's, when enabled)."""
        nets = (self.student.backbone, self.teacher.backbone)
        return nets + (self.gram_teacher,) if self.gram_enabled else nets

    def heads(self) -> list[DINOProjectionHead]:
        """Every projection head, student's then teacher's (e.g. to shard each one under FSDP)."""
        return [net[name] for net in (self.student, self.teacher) for name in ("dino_head", "ibot_head")
                if name in net]

    def transformer_blocks(self, *, teacher: bool = True) -> list[nn.Module]:
        """Every transformer block of the student's backbone, then of the teacher's.

        Hierarchical attention's cross-channel blocks are included (see
        :meth:`~cellvit_ssl.models.base.ChannelAdaptiveViT.transformer_blocks`). These are the
        units FSDP shards and ``torch.compile`` compiles; activation checkpointing takes the
        student's alone (``teacher=False``), the teacher runs without gradients. The Gram
        teacher's blocks follow the teacher's; a frozen distillation teacher's are not here
        (it stays outside the wrapped module: see :meth:`frozen_teacher_blocks`).
        """
        blocks = self.student.backbone.transformer_blocks()
        if not teacher:
            return blocks
        blocks = blocks + self.teacher.backbone.transformer_blocks()
        return blocks + self.gram_teacher.transformer_blocks() if self.gram_enabled else blocks

    def teacher_backbone_state_dict(self) -> dict[str, Tensor]:
        """The teacher backbone's weights: what ``teacher.pt`` holds and an Encoder loads.

        Keys are those of the backbone alone (``backbone.blocks.0.attn.qkv.weight``, ...). The
        tensors are full and on the CPU also when FSDP shards the model; then every rank must
        call this (the shards are gathered).
        """
        return full_model_state_dict(self.teacher.backbone)

    def frozen_teacher_blocks(self) -> list[nn.Module]:
        """The transformer blocks of the frozen distillation teacher (none without distillation)."""
        return [] if self.frozen_teacher is None else self.frozen_teacher.backbone.transformer_blocks()

    # -- training ------------------------------------------------------------------------------

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.frozen_teacher is not None:  # .to(device) / .float() move the frozen teacher too
            self.frozen_teacher._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> DINOMetaArch:
        """Train mode for the student; the teachers always run in eval mode (no drop path)."""
        super().train(mode)
        self.teacher.eval()
        if self.gram_enabled:
            self.gram_teacher.eval()
        if self.frozen_teacher is not None:
            self.frozen_teacher.eval()
        return self

    def gram_active(self, step: int | None) -> bool:
        """Whether the Gram term is part of the loss at the run's optimiser step ``step``."""
        return self.gram_enabled and step is not None and step >= self.cfg.gram.start_step

    @torch.no_grad()
    def refresh_gram_teacher(self, step: int) -> bool:
        """Copy the EMA teacher's backbone into the Gram teacher when ``step`` is a refresh step.

        Refresh steps are ``ssl.gram.start_step`` and every ``refresh_every`` steps after it. The
        trainer calls this before each step's forward pass; a pure function of the step, so a
        resumed run refreshes at the same steps (and restores the snapshot of the last one from
        the checkpoint).

        Returns:
            True when the snapshot was taken.
        """
        if not self.gram_active(step):
            return False
        since = step - self.cfg.gram.start_step
        every = self.cfg.gram.refresh_every
        if since and not (every and since % every == 0):
            return False
        source = self.teacher.backbone
        for dst, src in zip(self.gram_teacher.parameters(), source.parameters(), strict=True):
            dst.copy_(src)
        for dst, src in zip(self.gram_teacher.buffers(), source.buffers(), strict=True):
            dst.copy_(src)
        return True

    def teacher_temperature(self, epoch: int) -> float:
        """Teacher temperature at ``epoch``: DINO's (and lightly ``DINOLoss``'s) warm-up.

        ``linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)[epoch]``,
        then ``teacher_temp``; the same value drives the DINO and the iBOT term. (lightly's
        ``linear_warmup_schedule`` is not this: it reaches ``teacher_temp`` one epoch later and
        refuses a warm-up that cools.)
        """
        c = self.cfg
        if epoch < c.warmup_teacher_temp_epochs:
            return float(torch.linspace(c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs)[epoch])
        return float(c.teacher_temp)

    def _masks(self, view: Tensor, channel_ids: Tensor, present: Tensor) -> Tensor:
        """Block masks ``(S, N)`` for iBOT on one global view (lightly ``random_block_mask``)."""
        n_samples, n_tokens = self.student.backbone.sample_shape(view, channel_ids, present)
        h, w = _grid(view, n_tokens)
        lo, hi = self.cfg.mask_ratio
        masks = random_block_mask(
            (n_samples, h, w),
            batch_mask_ratio=self.cfg.mask_sample_probability,
            min_image_mask_ratio=lo,
            max_image_mask_ratio=hi,
            # DINOv2's 4-patch minimum block is meant for 16x16 grids; small grids need 1.
            min_num_masks_per_block=4 if n_tokens >= 64 else 1,
            # lightly places the blocks in a Python loop that reads every block back (.item()): a
            # host sync per block on a GPU, free on the CPU. One non-blocking copy moves the masks.
            device="cpu",
        )
        masks = masks.flatten(1)
        if view.device.type == "cuda":
            return masks.pin_memory().to(view.device, non_blocking=True)
        return masks.to(view.device)

    def _targets(self, g: Tensor, g_ids: Tensor, g_present: Tensor, tokens: Tensor | None) -> dict[str, Tensor]:
        """Raw head outputs of the target network on the global views (no gradients).

        The EMA teacher's, or under distillation the frozen teacher's (run under
        ``torch.inference_mode``; the outputs are copied out of it so the loss can use them).

        Args:
            g: The global views, concatenated.
            g_ids: Their channel ids.
            g_present: Their present channels.
            tokens: Boolean ``(S, N)``, the patch tokens iBOT scores (None without iBOT).
        """
        if self.frozen_teacher is None:
            with torch.no_grad():
                return self._head_outputs(self.teacher, self.teacher.backbone.forward_features(g, g_ids, g_present),
                                          tokens, g_present)
        with torch.inference_mode():
            out = self._head_outputs(self.frozen_teacher, self.frozen_teacher.forward_features(g, g_ids, g_present),
                                     tokens, g_present)
        return {k: v.clone() for k, v in out.items()}

    def _cls(self, feats: dict[str, Tensor], present: Tensor) -> Tensor:
        """The tokens DINO and KoLeo see: every sample's CLS, or with ``ssl.cell_target`` each image's mean."""
        cls = feats["x_norm_clstoken"]
        if self.cfg.cell_target and cls.shape[0] != present.shape[0]:
            return mean_per_image(cls, present)
        return cls

    def _head_outputs(self, net: nn.Module, feats: dict[str, Tensor], tokens: Tensor | None,
                      present: Tensor) -> dict[str, Tensor]:
        out = {}
        if self.cfg.dino:
            out["dino"] = net.dino_head(self._cls(feats, present))
        if self.cfg.ibot:
            out["ibot"] = net.ibot_head(feats["x_norm_patchtokens"][tokens])
        return out

    def forward(
        self,
        views: list[Tensor],
        channel_ids: Tensor,
        epoch: int,
        n_global: int = 2,
        channel_mask: Tensor | None = None,
        step: int | None = None,
    ) -> dict[str, Tensor]:
        """Loss dict for one batch of views.

        Args:
            views: ``n_global`` global views then local views, each ``(B, C, h, w)``.
            channel_ids: ``(B, C)`` vocabulary ids of the channels.
            epoch: Current epoch (teacher-temperature warm-up).
            n_global: How many leading views are global (seen by the teacher).
            channel_mask: Optional ``(B, C)`` bool, True where a channel is present.
            step: The run's optimiser step (the Gram term's start); None leaves the Gram term out.

        Returns:
            ``loss`` (to backpropagate), every enabled term detached (``dino``, ``ibot``,
            ``koleo``, ``gram`` once active; unweighted) and ``dino_target_entropy`` (see
            :func:`target_entropy`).
        """
        cfg, student = self.cfg, self.student
        present = torch.ones_like(channel_ids, dtype=torch.bool) if channel_mask is None else channel_mask.bool()
        if cfg.channel_sampling == "hierarchical":
            # One subset per image, shared by all its views, so that teacher and student rows align.
            present = sample_channel_subsets(present)
        g = torch.cat(views[:n_global])
        g_ids, g_present = channel_ids.repeat(n_global, 1), present.repeat(n_global, 1)
        masks = tokens = None  # the student's iBOT masks; the patch tokens iBOT scores
        if cfg.ibot:
            if self.mask_student:
                masks = tokens = torch.cat([self._masks(v, channel_ids, present) for v in views[:n_global]])
            else:  # unmasked distillation: every patch token of every global view
                n_samples, n_tokens = student.backbone.sample_shape(g, g_ids, g_present)
                tokens = torch.ones(n_samples, n_tokens, dtype=torch.bool, device=g.device)
        temp = self.teacher_temperature(epoch)
        t_out = self._targets(g, g_ids, g_present, tokens)
        if self.sinkhorn:  # probabilities, both terms in one set of collectives
            with torch.no_grad():
                t_out = dict(zip(t_out, sinkhorn_knopp_jointly(list(t_out.values()), temp, cfg.sinkhorn_iterations)))
        s_feats = student.backbone.forward_features(g, g_ids, g_present, masks=masks)
        s_cls = self._cls(s_feats, g_present)  # what DINO and KoLeo see of the global views
        terms: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}  # diagnostics, logged beside the terms
        if cfg.dino:
            t_dino = list(t_out["dino"].chunk(n_global))
            s_logits = student.dino_head(s_cls).chunk(n_global)
            if len(views) > n_global:
                local = torch.cat(views[n_global:])
                n_local = len(views) - n_global
                l_present = present.repeat(n_local, 1)
                local_cls = self._cls(student.backbone.forward_features(local, channel_ids.repeat(n_local, 1),
                                                                        l_present), l_present)
                s_logits = s_logits + student.dino_head(local_cls).chunk(n_local)
            if self.sinkhorn:
                terms["dino"] = dino_cross_entropy(t_dino, list(s_logits), cfg.student_temp)
                stats["dino_target_entropy"] = target_entropy(t_out["dino"])
            else:
                terms["dino"] = self.dino_loss(t_dino, list(s_logits), teacher_temp=temp)
                center = self.dino_loss.center.to(t_out["dino"].dtype)
                stats["dino_target_entropy"] = target_entropy(torch.softmax((t_out["dino"] - center) / temp, -1))
        if cfg.ibot:
            s_patch = student.ibot_head(s_feats["x_norm_patchtokens"][tokens])
            if not tokens.any():  # nothing masked in this batch: a zero that keeps the graph
                terms["ibot"] = s_patch.sum() * 0.0
            elif self.sinkhorn:
                terms["ibot"] = ibot_cross_entropy(t_out["ibot"], s_patch, tokens, cfg.student_temp)
            else:
                h, w = _grid(g, tokens.shape[1])
                terms["ibot"] = self.ibot_loss(t_out["ibot"], s_patch, tokens.view(-1, h, w), teacher_temp=temp)
        if cfg.koleo:
            terms["koleo"] = sum(self.koleo_loss(c) for c in s_cls.chunk(n_global))
        if self.gram_active(step):
            with torch.no_grad():
                anchor = self.gram_teacher.forward_features(g, g_ids, g_present)["x_norm_patchtokens"]
            terms["gram"] = gram_loss(s_feats["x_norm_patchtokens"], anchor)
        weights = {"dino": cfg.dino_loss_weight, "ibot": cfg.ibot_loss_weight, "koleo": cfg.koleo_loss_weight,
                   "gram": cfg.gram.weight if self.gram_enabled else 0.0}
        loss = sum(weights[k] * v for k, v in terms.items())
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}, **stats}

    def cancel_last_layer_gradients(self, epoch: int) -> None:
        """Drop the heads' last-layer gradients during the first ``freeze_last_layer_epochs``."""
        for name in ("dino_head", "ibot_head"):
            if name in self.student:
                self.student[name].cancel_last_layer_gradients(epoch)

    @torch.no_grad()
    def update_teacher(self, m: float) -> None:
        """EMA step of backbone and heads: teacher ← m · teacher + (1 − m) · student.

        lightly's ``update_momentum`` over the two module dicts (same keys, same layout).
        """
        update_momentum(self.student, self.teacher, m)


def with_gram_teacher(model_state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """A training state with a Gram teacher: the given one, or a copy of its EMA teacher's backbone.

    Lets a run written without Gram anchoring be resumed with it (DINOv3 turns it on late in
    training): the snapshot is then the teacher at the resumed step.

    Returns:
        The state and whether the Gram teacher was added.
    """
    if any(k.startswith("gram_teacher.") for k in model_state):
        return dict(model_state), False
    added = {f"gram_teacher.{k[len('teacher.backbone.'):]}": v.clone() for k, v in model_state.items()
             if k.startswith("teacher.backbone.")}
    return {**model_state, **added}, True


def teacher_backbone_state(model_state: Mapping[str, Tensor], config,
                           vocabulary: ChannelVocabulary | None = None) -> dict[str, Tensor]:
    """The teacher backbone's weights from the ``model`` state of a training checkpoint.

    The meta-architecture the checkpoint's config describes is rebuilt (without loading
    ``model.pretrained``), given ``model_state`` and asked for
    :meth:`DINOMetaArch.teacher_backbone_state_dict`, as the trainer's export does.

    Args:
        model_state: The checkpoint's ``model`` entry, in the current key layout (what
            :func:`cellvit_ssl.checkpoint.load_checkpoint` returns).
        config: The checkpoint's run config.
        vocabulary: The checkpoint's channel vocabulary (default: the one its config implies).

    Raises:
        RuntimeError: If the state does not fit the model the config describes.
    """
    backbone = build_model(config.model, list(config.data.channels), load_pretrained=False,
                           vocabulary=vocabulary or ChannelVocabulary.from_config(config.data))
    meta = DINOMetaArch(backbone, config.ssl)
    meta.load_state_dict(model_state)
    return meta.teacher_backbone_state_dict()
