"""DINOv2 checkpoints in the official key layout load into every variant."""

import pytest
import torch

from cellvit_ssl.config import load_config
from cellvit_ssl.errors import CheckpointError
from cellvit_ssl.models import build_model
from cellvit_ssl.models.pretrained import adapt_input_conv, load_pretrained
from cellvit_ssl.models.vit import VisionTransformer, ViTSpec
from tests.conftest import TINY_OVERRIDES

CHANNELS = ["nucleus", "microtubules", "er", "protein"]
D, DEPTH, PATCH = 32, 2, 14


def dinov2_state_dict(grid=37, registers=0, chunks=0, seed=0):
    """A state dict written key by key in DINOv2's layout (an RGB ViT with patch 14)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    sd = {
        "cls_token": t(1, 1, D),
        "pos_embed": t(1, 1 + grid * grid, D),
        "mask_token": t(1, D),
        "patch_embed.proj.weight": t(D, 3, PATCH, PATCH),
        "patch_embed.proj.bias": t(D),
        "norm.weight": 1 + t(D),
        "norm.bias": t(D),
    }
    if registers:
        sd["register_tokens"] = t(1, registers, D)
    for i in range(DEPTH):
        prefix = f"blocks.{i // (DEPTH // chunks)}.{i}." if chunks else f"blocks.{i}."
        for name, shape in {
            "norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
            "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "ls1.gamma": (D,), "norm2.weight": (D,),
            "norm2.bias": (D,), "mlp.fc1.weight": (4 * D, D), "mlp.fc1.bias": (4 * D,),
            "mlp.fc2.weight": (D, 4 * D), "mlp.fc2.bias": (D,), "ls2.gamma": (D,),
        }.items():
            sd[prefix + name] = t(*shape)
    return sd


def model_cfg(variant, *extra):
    return load_config(None, TINY_OVERRIDES + [
        f"model.variant={variant}", "model.patch_size=14", "model.img_size=224", "views.global_crop_size=224",
        "views.local_crop_size=98", *extra,
    ]).model


@pytest.mark.parametrize("variant", ["fixed", "boc", "hierarchical", "channelvit"])
@pytest.mark.parametrize("registers, chunks", [(0, 0), (4, 2)])
def test_dinov2_checkpoint_loads_into_every_variant(tmp_path, variant, registers, chunks):
    sd = dinov2_state_dict(registers=registers, chunks=chunks)
    path = tmp_path / "dinov2_vits14.pth"
    torch.save(sd, path)
    cfg = model_cfg(variant, f"model.num_register_tokens={registers}")
    model = build_model(cfg, CHANNELS, load_pretrained=False)
    report = load_pretrained(model, path)
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(model.backbone.state_dict())
    state = model.backbone.state_dict()
    source = "blocks.1.1.attn.qkv.weight" if chunks else "blocks.1.attn.qkv.weight"
    torch.testing.assert_close(state["blocks.1.attn.qkv.weight"], sd[source])
    assert state["pos_embed"].shape == (1, 1 + 16 * 16, D)  # 37x37 resampled to 16x16
    torch.testing.assert_close(state["pos_embed"][:, 0], sd["pos_embed"][:, 0])
    in_chans = 4 if variant == "fixed" else 1
    assert state["patch_embed.proj.weight"].shape == (D, in_chans, PATCH, PATCH)
    if variant == "hierarchical":
        assert "cross_blocks.0.ls.gamma" in report.new and "channel_embed" in report.new
    x = torch.randn(2, 4, 56, 70)  # rectangular crop, interpolated position embedding
    ids = torch.tensor([[0, 1, 2, 3]] * 2)
    z = model.embed(x, ids)
    assert z.shape == (2, model.output_dim) and torch.isfinite(z).all()


def test_build_model_loads_the_configured_checkpoint(tmp_path):
    path = tmp_path / "teacher_checkpoint.pth"
    # a DINOv2 training checkpoint: the teacher's backbone beside its heads
    sd = dinov2_state_dict()
    teacher = {f"backbone.{k}": v for k, v in sd.items()}
    teacher["dino_head.last_layer.weight"] = torch.ones(3)
    torch.save({"teacher": teacher}, path)
    model = build_model(model_cfg("boc", f"model.pretrained={path}"), CHANNELS)
    torch.testing.assert_close(model.backbone.norm.weight, sd["norm.weight"])
    torch.testing.assert_close(model.backbone.blocks[0].ls2.gamma, sd["blocks.0.ls2.gamma"])


def test_rgb_kernels_fold_so_grey_images_give_the_rgb_features():
    sd = dinov2_state_dict(grid=4)
    spec = dict(embed_dim=D, depth=DEPTH, num_heads=2, patch_size=PATCH, img_size=56)
    rgb = VisionTransformer(ViTSpec(in_chans=3, **spec)).eval()
    grey = VisionTransformer(ViTSpec(in_chans=1, **spec)).eval()
    rgb.load_state_dict(sd)  # same layout, nothing to adapt
    load_pretrained(grey, sd)
    x = torch.randn(2, 1, 56, 56)
    torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-4)
    w = sd["patch_embed.proj.weight"]
    five = adapt_input_conv(w, 5)
    assert five.shape == (D, 5, PATCH, PATCH)
    torch.testing.assert_close(five.sum(1), w.sum(1))  # equal channels give the grey response


def test_mismatches_are_reported_by_name(tmp_path):
    sd = dinov2_state_dict(registers=4)
    model = build_model(model_cfg("boc"), CHANNELS, load_pretrained=False)
    with pytest.raises(CheckpointError, match="unexpected keys \\[register_tokens\\]"):
        load_pretrained(model, sd)
    with pytest.warns(UserWarning, match="register_tokens"):
        report = load_pretrained(model, sd, strict=False)
    assert report.unexpected == ["register_tokens"]
    del sd["blocks.1.ls2.gamma"], sd["register_tokens"]
    with pytest.raises(CheckpointError, match="missing keys \\[blocks.1.ls2.gamma\\]"):
        load_pretrained(model, sd)
    wide = build_model(model_cfg("boc", "model.embed_dim=64", "model.num_heads=2"), CHANNELS, load_pretrained=False)
    with pytest.raises(CheckpointError, match="'cls_token' has shape \\(1, 1, 32\\), the model needs \\(1, 1, 64\\)"):
        load_pretrained(wide, dinov2_state_dict())


def test_wrong_files_raise_checkpoint_errors(tmp_path):
    model = build_model(model_cfg("boc"), CHANNELS, load_pretrained=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(model, tmp_path / "nope.pth")
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.ones(2, 3, 7, 7)}, other)
    with pytest.raises(CheckpointError, match="resnet.pth.*not a DINOv2"):
        load_pretrained(model, other)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        build_model(model_cfg("boc", f"model.pretrained={junk}"), CHANNELS)


def test_patch14_checkpoint_loads_into_a_patch16_model():
    sd = dinov2_state_dict()
    cfg = load_config(None, TINY_OVERRIDES + ["model.patch_size=16", "model.img_size=64", "views.global_crop_size=64",
                                              "views.local_crop_size=32"]).model
    model = build_model(cfg, CHANNELS, load_pretrained=False)
    report = load_pretrained(model, sd)
    assert report.missing == [] and report.unexpected == []
    # a 14-px patch and the same patch upsampled to 16 px embed alike
    grey = sd["patch_embed.proj.weight"].sum(1, keepdim=True)
    x14 = torch.randn(6, 1, 14, 14)
    x16 = torch.nn.functional.interpolate(x14, size=(16, 16), mode="bilinear", align_corners=False)
    w16 = model.backbone.patch_embed.proj.weight
    torch.testing.assert_close(x16.flatten(1) @ w16.flatten(1).T, x14.flatten(1) @ grey.flatten(1).T,
                               atol=1e-4, rtol=1e-4)
    assert model.backbone.pos_embed.shape == (1, 1 + 4 * 4, D)
    assert report.adapted == {
        "pos_embed": f"(1, {1 + 37 * 37}, {D}) -> (1, 17, {D})",
        "patch_embed.proj.weight": f"({D}, 3, 14, 14) -> ({D}, 1, 16, 16)",
    }


def test_encoder_loads_without_the_pretrained_file_it_started_from(tmp_path):
    from cellvit_ssl import load_encoder
    from cellvit_ssl.checkpoint import ENCODER_FORMAT, save_checkpoint
    from cellvit_ssl.config import config_to_dict

    path = tmp_path / "dinov2.pth"
    torch.save(dinov2_state_dict(), path)
    cfg = load_config(None, TINY_OVERRIDES + [
        "model.variant=boc", "model.patch_size=14", "model.img_size=224", "views.global_crop_size=224",
        "views.local_crop_size=98", f"model.pretrained={path}"])
    model = build_model(cfg.model, CHANNELS)
    export = save_checkpoint({"format": ENCODER_FORMAT, "config": config_to_dict(cfg),
                              "backbone": model.state_dict()}, tmp_path / "teacher.pt")
    path.unlink()  # the trained weights are in the export; the start point is not needed again
    enc = load_encoder(export, device="cpu")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(enc.model.state_dict()[name], value)


def test_a_cellvit_training_checkpoint_starts_a_model_from_its_teacher_backbone(tmp_path):
    from cellvit_ssl.checkpoint import TRAINING_FORMAT, save_checkpoint
    from cellvit_ssl.ssl import DINOMetaArch

    cfg = load_config(None, TINY_OVERRIDES + ["model.variant=hierarchical"])
    meta = DINOMetaArch(build_model(cfg.model, CHANNELS), cfg.ssl)
    with torch.no_grad():
        for p in meta.teacher.backbone.backbone.parameters():
            p.add_(1.0)  # teacher and student differ
    save_checkpoint({"format": TRAINING_FORMAT, "model": meta.state_dict()}, tmp_path / "checkpoint.pt")
    model = build_model(cfg.model, CHANNELS, load_pretrained=False)
    report = load_pretrained(model, tmp_path / "checkpoint.pt")
    assert not report.missing and not report.unexpected
    for key, value in meta.teacher.backbone.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value, msg=key)
