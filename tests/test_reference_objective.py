"""The objective against lightly's stock DINOv2 recipe, recomputed from the same weights.

A ``fixed`` 3-channel model with mean centering is run through the public call
``meta(views, channel_ids, epoch=...)``. The reference rebuilds both networks from the
meta-architecture's weights the way lightly's DINOv2 example builds them: a timm ViT (weights
through timm's own DINOv2 checkpoint filter) inside lightly's ``MaskedVisionTransformerTIMM``
(mask token replaces masked patch embeddings, then position embeddings), lightly's
``DINOProjectionHead`` for DINO and iBOT, and lightly's ``DINOLoss`` (its own teacher-temperature
warm-up by epoch), ``IBOTPatchLoss`` and ``KoLeoLoss``. Only the iBOT masks are taken from the
meta-architecture (they are random); everything else, the forward passes included, is
recomputed. Two steps run, so the second one checks the centres the first one moved, and the
gradients of the first step are compared too.

Adapting to a reshaped ``DINOMetaArch``: :func:`parts` finds the networks by type and by the
words ``student`` / ``teacher`` / ``dino`` / ``ibot`` in their module names, so it works for
``student_dino_head`` attributes and for ``student = ModuleDict(backbone, dino_head, ibot_head)``.
"""

from __future__ import annotations

import torch
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.modules.masked_vision_transformer_timm import MaskedVisionTransformerTIMM
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from cellvit_ssl import load_config
from cellvit_ssl.channels import channel_ids
from cellvit_ssl.models.channels import build_model
from cellvit_ssl.models.vit import VisionTransformer
from cellvit_ssl.ssl import DINOMetaArch

CHANNELS = ["nucleus", "microtubules", "er"]  # in vocabulary order: `fixed` feeds them as they come
OVERRIDES = [
    "model.variant=fixed", "model.arch=custom", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "model.patch_size=8", "model.img_size=32", "model.layerscale_init=0.5",
    "ssl.centering=mean", "ssl.center_momentum=0.8", "ssl.channel_sampling=none",
    "ssl.head_hidden_dim=48", "ssl.head_bottleneck_dim=16", "ssl.head_output_dim=80", "ssl.ibot_head_output_dim=72",
    "ssl.student_temp=0.1", "ssl.warmup_teacher_temp=0.04", "ssl.teacher_temp=0.07",
    "ssl.warmup_teacher_temp_epochs=4", "ssl.mask_sample_probability=0.5", "ssl.mask_ratio=[0.1,0.5]",
    "ssl.dino_loss_weight=1.0", "ssl.ibot_loss_weight=1.0", "ssl.koleo_loss_weight=0.1",
]
BATCH, N_LOCAL = 6, 3


def parts(meta: nn.Module) -> dict[str, nn.Module]:
    """``student`` / ``teacher`` ViT and ``{role}_{dino,ibot}_head`` modules of a meta-architecture."""
    found: dict[str, nn.Module] = {}
    for name, module in meta.named_modules():
        role = "student" if name.startswith("student") else "teacher" if name.startswith("teacher") else None
        if role is None:
            continue
        if isinstance(module, VisionTransformer):
            found.setdefault(role, module)
        elif isinstance(module, DINOProjectionHead):
            kind = "dino" if "dino" in name else "ibot" if "ibot" in name else None
            if kind:
                found[f"{role}_{kind}_head"] = module
    assert sorted(found) == sorted(
        ["student", "teacher", "student_dino_head", "teacher_dino_head", "student_ibot_head", "teacher_ibot_head"]
    ), f"found {sorted(found)}: adapt parts() to the meta-architecture's module names"
    return found


def reference_backbone(vit: VisionTransformer) -> MaskedVisionTransformerTIMM:
    """lightly's masked timm ViT holding ``vit``'s weights (timm converts the DINOv2 layout itself)."""
    s = vit.spec
    timm_vit = TimmViT(
        img_size=s.img_size, patch_size=s.patch_size, in_chans=s.in_chans, embed_dim=s.embed_dim, depth=s.depth,
        num_heads=s.num_heads, mlp_ratio=s.mlp_ratio, init_values=s.layerscale_init, num_classes=0,
        dynamic_img_size=True,
    )
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    timm_vit.load_state_dict(checkpoint_filter_fn(dict(state), timm_vit))
    mask_token = nn.Parameter(state["mask_token"].reshape(1, 1, -1))
    # as lightly's DINOv2 example: no antialiasing, which our default resize matches
    return MaskedVisionTransformerTIMM(
        timm_vit, mask_token=mask_token, weight_initialization="skip", antialias=False, pos_embed_initialization="skip",
    )


def reference_head(head: DINOProjectionHead, input_dim: int, hidden: int, bottleneck: int) -> DINOProjectionHead:
    copy = DINOProjectionHead(input_dim, hidden, bottleneck, head.last_layer.out_features)
    copy.load_state_dict(head.state_dict())
    return copy


class LightlyDINOv2:
    """lightly's DINOv2 training step (its example's structure) on rebuilt networks."""

    def __init__(self, meta: nn.Module, ssl_cfg) -> None:
        p = parts(meta)
        c = ssl_cfg
        dims = (p["student"].embed_dim, c.head_hidden_dim, c.head_bottleneck_dim)
        self.student, self.teacher = reference_backbone(p["student"]), reference_backbone(p["teacher"])
        self.heads = {k: reference_head(p[k], *dims) for k in p if k.endswith("_head")}
        for module in [self.teacher, self.heads["teacher_dino_head"], self.heads["teacher_ibot_head"]]:
            module.requires_grad_(False)
        self.dino = DINOLoss(
            output_dim=c.head_output_dim, warmup_teacher_temp=c.warmup_teacher_temp, teacher_temp=c.teacher_temp,
            warmup_teacher_temp_epochs=c.warmup_teacher_temp_epochs, student_temp=c.student_temp,
            center_momentum=c.center_momentum,
        )
        self.ibot = IBOTPatchLoss(
            output_dim=c.ibot_head_output_dim, teacher_temp=c.teacher_temp, student_temp=c.student_temp,
            center_momentum=c.center_momentum,
        )
        self.koleo = KoLeoLoss()
        self.cfg = c

    def step(self, views: list[torch.Tensor], block_mask: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """Loss terms; ``block_mask`` is boolean ``(2·B, h, w)`` over the global views' patches."""
        global_views, local_views = torch.cat(views[:2]), torch.cat(views[2:])
        mask = torch.zeros(block_mask.shape[0], 1 + block_mask[0].numel(), dtype=torch.bool)
        mask[:, 1:] = block_mask.flatten(1)
        with torch.no_grad():
            t_tokens = self.teacher.encode(global_views)
            t_cls = self.heads["teacher_dino_head"](t_tokens[:, 0])
            t_masked = self.heads["teacher_ibot_head"](t_tokens[mask])
        s_tokens = self.student.encode(global_views, mask=mask)
        s_global_cls = s_tokens[:, 0]
        s_cls = self.heads["student_dino_head"](s_global_cls)
        s_masked = self.heads["student_ibot_head"](s_tokens[mask])
        s_local = self.heads["student_dino_head"](self.student.encode(local_views)[:, 0])
        student_out = torch.cat([s_cls, s_local]).chunk(len(views))
        dino = self.dino(list(t_cls.chunk(2)), list(student_out), epoch=epoch)
        # iBOT uses the DINO term's teacher temperature at this epoch (lightly's schedule)
        temp = float(self.dino.teacher_temp_schedule[epoch]) if epoch < self.cfg.warmup_teacher_temp_epochs \
            else self.cfg.teacher_temp
        ibot = self.ibot(t_masked, s_masked, block_mask, teacher_temp=temp)
        koleo = sum(self.koleo(c) for c in s_global_cls.chunk(2))
        c = self.cfg
        loss = c.dino_loss_weight * dino + c.ibot_loss_weight * ibot + c.koleo_loss_weight * koleo
        return {"loss": loss, "dino": dino, "ibot": ibot, "koleo": koleo}


def record_ibot_masks(vit: VisionTransformer) -> list[torch.Tensor]:
    """The iBOT masks the student ViT receives (the only random input the reference reuses)."""
    seen: list[torch.Tensor] = []
    forward = vit.forward_features

    def spy(x, masks=None):
        if masks is not None:
            seen.append(masks.clone())
        return forward(x, masks)

    vit.forward_features = spy
    return seen


def batch(seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    views = [torch.rand(BATCH, 3, 32, 32, generator=g) for _ in range(2)]
    views += [torch.rand(BATCH, 3, 16, 16, generator=g) for _ in range(N_LOCAL)]
    return views, torch.tensor([channel_ids(CHANNELS)] * BATCH)


def test_fixed_model_objective_equals_lightlys_dinov2_recipe():
    cfg = load_config(None, OVERRIDES)
    torch.manual_seed(0)
    meta = DINOMetaArch(build_model(cfg.model, CHANNELS), cfg.ssl)
    with torch.no_grad():  # a teacher that differs from the student, as after some EMA steps
        for p in parts(meta)["teacher"].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    meta.train()
    ref = LightlyDINOv2(meta, cfg.ssl)
    masks = record_ibot_masks(parts(meta)["student"])
    grid = (4, 4)
    for step, (seed, epoch) in enumerate([(1, 1), (2, 6)]):  # in the warm-up, then after it
        views, ids = batch(seed)
        torch.manual_seed(100 + step)
        ours = meta(views, ids, epoch=epoch)
        assert len(masks) == step + 1
        block_mask = masks[-1].reshape(-1, *grid)
        assert block_mask.any() and not block_mask.all(dim=0).all()
        want = ref.step(views, block_mask, epoch)
        for term in ("dino", "ibot", "koleo", "loss"):
            torch.testing.assert_close(ours[term], want[term], atol=1e-6, rtol=1e-5,
                                       msg=lambda m, t=term, s=step: f"step {s}, {t}: {m}")
        if step == 0:
            meta.zero_grad()
            ours["loss"].backward()
            want["loss"].backward()
            p = parts(meta)
            for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "patch_embed.proj.weight"):
                mine = dict(p["student"].named_parameters())[name].grad
                theirs = dict(ref.student.vit.named_parameters())[name].grad
                torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-4, msg=name)
            for head in ("student_dino_head", "student_ibot_head"):
                mine = p[head].layers[0].weight.grad
                torch.testing.assert_close(mine, ref.heads[head].layers[0].weight.grad, atol=1e-6, rtol=1e-4)
            assert all(q.grad is None for q in p["teacher"].parameters())

