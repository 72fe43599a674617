"""Distillation (``distill.teacher``): the frozen teacher read from a training checkpoint, an encoder
export or a DINOv2-layout file; its place outside the optimizer, the state dict and autograd; the
targets it gives; refusals of pairs that do not line up; exact resume."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
from conftest import TINY_OVERRIDES

from cellvit_ssl.channels import ChannelVocabulary
from cellvit_ssl.checkpoint import ENCODER_FORMAT, STATE_LAYOUT, TRAINING_FORMAT, load_checkpoint, save_checkpoint
from cellvit_ssl.config import config_to_dict, load_config
from cellvit_ssl.distill import (
    build_frozen_teacher,
    dinov2_model_config,
    head_from_state,
    read_teacher_file,
    resolve_distill_config,
)
from cellvit_ssl.distributed import DistInfo
from cellvit_ssl.errors import CheckpointError, ConfigError
from cellvit_ssl.models.channels import build_model
from cellvit_ssl.ssl import DINOMetaArch
from cellvit_ssl.train import Trainer

QUIET = ["train.progress=false", "train.tensorboard=false", "train.log_every=1"]
# the student: narrower and shallower than the tiny teacher, heads of another width
STUDENT = ["model.embed_dim=16", "model.depth=1", "ssl.head_hidden_dim=32", "ssl.head_output_dim=64"]


def _teacher_files(tmp_path, overrides=(), seed=1):
    """A training checkpoint and an encoder export of a (randomly initialised) tiny teacher."""
    cfg = load_config(None, [*TINY_OVERRIDES, *overrides])
    torch.manual_seed(seed)
    vocab = ChannelVocabulary.from_config(cfg.data)
    meta = DINOMetaArch(build_model(cfg.model, list(cfg.data.channels), vocabulary=vocab), cfg.ssl)
    for p in meta.teacher.parameters():  # a teacher unlike the student's fresh weights
        p.data.add_(torch.randn_like(p) * 0.05)
    common = {"config": config_to_dict(cfg), "vocabulary": vocab.to_dict()}
    training = save_checkpoint({"format": TRAINING_FORMAT, "state_layout": STATE_LAYOUT, **common,
                                "model": meta.state_dict()}, tmp_path / "teacher_run" / "checkpoint.pt")
    export = save_checkpoint({"format": ENCODER_FORMAT, **common, "backbone": meta.teacher_backbone_state_dict()},
                             tmp_path / "teacher_run" / "teacher.pt")
    return cfg, meta, training, export


def _student_cfg(tmp_path, teacher, extra=()):
    return load_config(None, [*TINY_OVERRIDES, *STUDENT, *QUIET, f"data.demo.cache_dir={tmp_path / 'demo'}",
                              f"train.output_dir={tmp_path / 'student'}", f"distill.teacher={teacher}", *extra])


def test_a_training_checkpoint_gives_its_teacher_backbone_and_heads(tmp_path):
    _, meta, training, _ = _teacher_files(tmp_path)
    cfg = _student_cfg(tmp_path, training)
    frozen = build_frozen_teacher(cfg, ChannelVocabulary.from_config(cfg.data))
    assert frozen.heads_from == {"dino_head": "checkpoint", "ibot_head": "checkpoint"}
    for name in ("dino_head", "ibot_head"):
        for key, value in meta.teacher[name].state_dict().items():
            torch.testing.assert_close(getattr(frozen, name).state_dict()[key], value, msg=key)
    for key, value in meta.teacher.backbone.state_dict().items():
        torch.testing.assert_close(frozen.backbone.state_dict()[key], value, msg=key)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_the_frozen_teacher_stays_out_of_state_dict_optimizer_and_autograd(tmp_path):
    _, _, training, _ = _teacher_files(tmp_path)
    trainer = Trainer(_student_cfg(tmp_path, training, ["train.resume=none"]), DistInfo(0, 1, 0, torch.device("cpu")))
    frozen = trainer.meta.frozen_teacher
    assert frozen is not None and frozen.training is False
    frozen_ids = {id(p) for p in frozen.parameters()}
    assert frozen_ids and not frozen_ids & {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not frozen_ids & {id(p) for p in trainer.meta.parameters()}
    assert not any(k.startswith("frozen") for k in trainer.meta.state_dict())
    # the student's heads score the teacher's 128 prototypes; the resolved config says so
    assert trainer.cfg.ssl.head_output_dim == 128 and trainer.meta.student.dino_head.last_layer.out_features == 128
    assert trainer.meta.student.dino_head.layers[0].in_features == 16  # and read the student's features
    calls = []
    frozen.backbone.backbone.blocks[0].register_forward_hook(lambda *a: calls.append(torch.is_inference_mode_enabled()))
    ema_calls = []
    trainer.meta.teacher.backbone.backbone.blocks[0].register_forward_hook(lambda *a: ema_calls.append(1))
    trainer.fit()
    assert calls and all(calls), "the frozen teacher runs under torch.inference_mode"
    assert not ema_calls, "the EMA teacher gives no targets when distilling"
    saved = (tmp_path / "student" / "config.yaml").read_text()
    assert "head_output_dim: 128" in saved
    ckpt = load_checkpoint(tmp_path / "student" / "checkpoint.pt")
    assert ckpt["distill_teacher"]["path"] == str(training) and len(ckpt["distill_teacher"]["sha256"]) == 64
    assert not any("frozen" in k for k in ckpt["model"])
    # the export is the student's EMA, the student's size
    assert load_checkpoint(tmp_path / "student" / "teacher.pt")["backbone"]["backbone.pos_embed"].shape[-1] == 16


def test_the_student_heads_start_as_the_teachers_but_for_the_first_layer(tmp_path):
    _, _, training, _ = _teacher_files(tmp_path)
    cpu = DistInfo(0, 1, 0, torch.device("cpu"))
    trainer = Trainer(_student_cfg(tmp_path, training, ["train.resume=none"]), cpu)
    teacher = trainer.meta.frozen_teacher.dino_head.state_dict()
    assert (trainer.cfg.ssl.head_hidden_dim, trainer.cfg.ssl.head_bottleneck_dim) == (64, 16)  # the teacher's
    for net in (trainer.meta.student, trainer.meta.teacher):  # the student and its EMA
        head = net.dino_head.state_dict()
        assert head["layers.0.weight"].shape == (64, 16) and teacher["layers.0.weight"].shape == (64, 32)
        for key in ("layers.2.weight", "layers.4.weight", "last_layer.weight_v"):
            torch.testing.assert_close(head[key], teacher[key], msg=key)
    fresh = Trainer(_student_cfg(tmp_path, training, ["train.resume=none", "distill.init_student_heads=false"]), cpu)
    assert fresh.cfg.ssl.head_hidden_dim == 32  # the run's own widths, new weights
    assert fresh.meta.student.dino_head.layers[2].weight.shape == (32, 32)


def test_an_encoder_export_gets_fresh_frozen_heads_from_the_seed(tmp_path):
    _, _, _, export = _teacher_files(tmp_path)
    cfg = _student_cfg(tmp_path, export)
    vocab = ChannelVocabulary.from_config(cfg.data)
    a, b = build_frozen_teacher(cfg, vocab), build_frozen_teacher(cfg, vocab)
    assert a.heads_from["dino_head"].startswith("fresh")
    assert a.dino_head.layers[0].in_features == 32 and a.dino_head.last_layer.out_features == 64
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, msg=key)  # the same on every process
    other = build_frozen_teacher(load_config(None, [*TINY_OVERRIDES, *STUDENT, f"distill.teacher={export}",
                                                    "train.seed=5"]), vocab)
    assert not torch.equal(other.dino_head.layers[0].weight, a.dino_head.layers[0].weight)


def _dinov2_payload(vit_cfg_overrides, heads: bool, shared_head: bool = False):
    cfg = load_config(None, [*TINY_OVERRIDES, *vit_cfg_overrides])
    torch.manual_seed(2)
    vit = build_model(cfg.model, ["nucleus"]).backbone  # a 1-channel ViT with DINOv2's key names
    vit.patch_embed.proj = torch.nn.Conv2d(3, vit.embed_dim, vit.patch_size, vit.patch_size)  # RGB, as published
    state = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    if heads:
        meta = DINOMetaArch(build_model(cfg.model, ["nucleus"]), cfg.ssl)
        names = ("dino_head",) if shared_head else ("dino_head", "ibot_head")
        for name in names:  # DINOv2's DINOHead names its MLP "mlp"
            for k, v in meta.teacher[name].state_dict().items():
                state[f"{name}.{k.replace('layers.', 'mlp.')}"] = v
    return {"teacher": state}, vit, cfg


@pytest.mark.parametrize("extra", [[], ["model.ffn_layer=swiglu", "model.num_register_tokens=2",
                                        "model.layerscale_init=null", "model.qkv_bias=false"]])
def test_a_dinov2_checkpoint_is_read_off_its_shapes(tmp_path, extra):
    payload, vit, _ = _dinov2_payload(["model.embed_dim=64", "model.num_heads=1", "model.img_size=56",
                                       "model.patch_size=8", *extra], heads=True)
    path = tmp_path / "dinov2_teacher.pth"
    torch.save(payload, path)
    cfg = _student_cfg(tmp_path, path)
    found = read_teacher_file(path, cfg)
    model = found.model
    assert (found.kind, model.embed_dim, model.depth, model.num_heads, model.patch_size, model.img_size) == \
        ("dinov2", 64, 2, 1, 8, 56)
    spec = vit.spec
    assert (model.ffn_layer.value, model.num_register_tokens, model.layerscale_init is None, model.qkv_bias) == \
        (spec.ffn_layer, spec.num_register_tokens, spec.layerscale_init is None, spec.qkv_bias)
    assert model.variant == cfg.model.variant
    frozen = build_frozen_teacher(cfg, ChannelVocabulary.from_config(cfg.data))
    assert frozen.heads_from == {"dino_head": "checkpoint", "ibot_head": "checkpoint"}
    for key, value in vit.state_dict().items():
        if key != "patch_embed.proj.weight":
            torch.testing.assert_close(frozen.backbone.backbone.state_dict()[key], value, msg=key)
    torch.testing.assert_close(frozen.backbone.backbone.patch_embed.proj.weight,
                               vit.patch_embed.proj.weight.sum(1, keepdim=True))  # RGB folded to one channel
    assert dinov2_model_config(found.backbone, cfg.model).mlp_ratio == pytest.approx(4.0)


def test_a_dinov2_checkpoint_with_a_shared_head_uses_it_for_ibot_and_a_backbone_alone_gets_fresh_heads(tmp_path):
    payload, _, _ = _dinov2_payload([], heads=True, shared_head=True)
    torch.save(payload, tmp_path / "shared.pth")
    cfg = _student_cfg(tmp_path, tmp_path / "shared.pth")
    frozen = build_frozen_teacher(cfg, ChannelVocabulary.from_config(cfg.data))
    assert frozen.heads_from == {"dino_head": "checkpoint", "ibot_head": "checkpoint"}
    torch.testing.assert_close(frozen.ibot_head.layers[0].weight, frozen.dino_head.layers[0].weight)
    payload, _, _ = _dinov2_payload([], heads=False)
    torch.save(payload["teacher"], tmp_path / "backbone.pth")
    frozen = build_frozen_teacher(_student_cfg(tmp_path, tmp_path / "backbone.pth"),
                                  ChannelVocabulary.from_config(cfg.data))
    assert frozen.heads_from["dino_head"].startswith("fresh")


def test_head_state_that_is_no_dino_head_is_a_clear_error():
    with pytest.raises(CheckpointError, match="not a 3-layer DINO head"):
        head_from_state({"layers.0.weight": torch.zeros(4, 4)}, "somewhere")


def test_the_targets_are_the_frozen_teachers(tmp_path):
    """The DINO term equals the cross-entropy against Sinkhorn-Knopp targets of the frozen teacher's head."""
    from cellvit_ssl.centering import sinkhorn_knopp_jointly
    from cellvit_ssl.ssl import dino_cross_entropy

    _, _, training, _ = _teacher_files(tmp_path)
    cfg = _student_cfg(tmp_path, training, ["ssl.ibot=false", "ssl.koleo=false", "views.n_local_views=0"])
    vocab = ChannelVocabulary.from_config(cfg.data)
    frozen = build_frozen_teacher(cfg, vocab)
    cfg = resolve_distill_config(cfg, frozen)
    meta = DINOMetaArch(build_model(cfg.model, list(cfg.data.channels), vocabulary=vocab), cfg.ssl,
                        frozen_teacher=frozen, mask_student=False)
    views = [torch.rand(3, 4, 32, 32), torch.rand(3, 4, 32, 32)]
    ids = torch.tensor([vocab.ids(cfg.data.channels)] * 3)
    loss = meta(views, ids, epoch=5)["dino"]
    g = torch.cat(views)
    with torch.no_grad():
        target = frozen.dino_head(frozen.forward_features(g, ids.repeat(2, 1))["x_norm_clstoken"])
        (probs,) = sinkhorn_knopp_jointly([target], meta.teacher_temperature(5), cfg.ssl.sinkhorn_iterations)
        student = meta.student.dino_head(meta.student.backbone.forward_features(g, ids.repeat(2, 1))["x_norm_clstoken"])
    expected = dino_cross_entropy(list(probs.chunk(2)), list(student.chunk(2)), cfg.ssl.student_temp)
    torch.testing.assert_close(loss, expected)
    # near-uniform random heads make that cross-entropy about ln K whatever the targets: check them directly
    present = torch.ones_like(ids.repeat(2, 1), dtype=torch.bool)
    targets = meta._targets(g, ids.repeat(2, 1), present, None)["dino"]
    torch.testing.assert_close(targets, target)
    with torch.no_grad():
        ema = meta.teacher.dino_head(meta.teacher.backbone.forward_features(g, ids.repeat(2, 1))["x_norm_clstoken"])
    assert (ema - target).abs().max() > 1e-3


def _recording(forward, seen):
    def recorded(*args, masks=None, **kwargs):
        seen.append(masks)
        return forward(*args, masks=masks, **kwargs)

    return recorded


def _record_rows(seen, module, inputs, output):
    seen.append(inputs[0].shape[0])


def test_unmasked_distillation_scores_every_patch_token_and_masking_restores_block_masks(tmp_path):
    _, _, training, _ = _teacher_files(tmp_path)
    vocab = ChannelVocabulary.from_config(load_config(None, TINY_OVERRIDES).data)
    seen = {}
    for masking in (False, True):
        cfg = _student_cfg(tmp_path, training, [f"distill.masking={masking}", "ssl.mask_sample_probability=1.0"])
        frozen = build_frozen_teacher(cfg, vocab)
        cfg = resolve_distill_config(cfg, frozen)
        meta = DINOMetaArch(build_model(cfg.model, list(cfg.data.channels), vocabulary=vocab), cfg.ssl,
                            frozen_teacher=frozen, mask_student=cfg.distill.masking)
        masks_seen, heads_seen = [], []
        meta.student.backbone.forward_features = _recording(meta.student.backbone.forward_features, masks_seen)
        frozen.ibot_head.register_forward_hook(functools.partial(_record_rows, heads_seen))
        meta([torch.rand(2, 4, 32, 32)] * 2, torch.tensor([vocab.ids(cfg.data.channels)] * 2), epoch=0)
        seen[masking] = (masks_seen[0], heads_seen[0])
    assert seen[False][0] is None and seen[False][1] == 2 * 2 * 4 * 16  # 2 views x 2 images x 4 channels x 16 tokens
    assert seen[True][0] is not None and seen[True][1] == int(seen[True][0].sum()) < 2 * 2 * 4 * 16


def test_student_and_teacher_that_do_not_line_up_are_refused(tmp_path):
    _, _, training, _ = _teacher_files(tmp_path)
    with pytest.raises(ConfigError, match="use variants with the same layout"):
        Trainer(_student_cfg(tmp_path, training, ["model.variant=hierarchical", "train.resume=none"]),
                DistInfo(0, 1, 0, torch.device("cpu")))
    with pytest.raises(ConfigError, match="iBOT pairs them token by token"):
        Trainer(_student_cfg(tmp_path, training, ["model.patch_size=4", "model.img_size=32", "train.resume=none"]),
                DistInfo(0, 1, 0, torch.device("cpu")))
    _teacher_files(tmp_path / "other", ["data.channels=[nucleus,protein]"])
    with pytest.raises(ConfigError, match=r"knows the channels \['nucleus', 'protein'\]"):
        build_frozen_teacher(_student_cfg(tmp_path, tmp_path / "other" / "teacher_run" / "teacher.pt"),
                             ChannelVocabulary())
    with pytest.raises(CheckpointError, match="does not exist"):
        build_frozen_teacher(_student_cfg(tmp_path, tmp_path / "missing.pt"), ChannelVocabulary())


def _fit(cfg):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu"))).fit()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("views_device", ["workers", "device"])
def test_a_distillation_run_resumes_exactly_and_refuses_another_teacher(tmp_path, views_device):
    _, _, training, _ = _teacher_files(tmp_path)
    run = ["data.demo.n_images=3", "train.epochs=3", "train.deterministic=true", "model.drop_path_rate=0.2",
           "train.checkpoint_every=2", "train.keep_last=10", f"views.device={views_device}"]
    _fit(_student_cfg(tmp_path, training, run))
    full = load_checkpoint(tmp_path / "student" / "checkpoint.pt")
    assert full["step"] == 6
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(tmp_path / "student" / "checkpoint_00000004.pt", resumed / "checkpoint.pt")
    _fit(_student_cfg(tmp_path, training, [*run, f"train.output_dir={resumed}"]))
    again = load_checkpoint(resumed / "checkpoint.pt")
    assert again["step"] == 6
    for key, value in full["model"].items():
        torch.testing.assert_close(again["model"][key], value, atol=1e-6, rtol=0, msg=key)
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all("dino" in r and "ibot" in r for r in records)

    # another teacher file is a changed setting; other weights at the same path, another teacher
    _, _, other, _ = _teacher_files(tmp_path / "other", seed=2)  # same layout, other weights
    shutil.copy(tmp_path / "student" / "checkpoint_00000004.pt", resumed / "checkpoint.pt")
    with pytest.raises(ConfigError, match="distill.teacher"):
        _fit(_student_cfg(tmp_path, other, [*run, f"train.output_dir={resumed}"]))
    shutil.copy(other, training)
    with pytest.raises(CheckpointError, match="other content"):
        _fit(_student_cfg(tmp_path, training, [*run, f"train.output_dir={resumed}"]))


def test_shipped_distillation_config_loads():
    cfg = load_config("configs/distill_hpa_vits16_from_vitl16.yaml")
    assert cfg.distill.teacher and cfg.model.arch == "vit_small" and cfg.model.variant == "boc"


@pytest.mark.gpu
def test_on_gpu_the_frozen_teacher_runs_in_bf16_under_inference_mode(tmp_path):
    _, _, training, _ = _teacher_files(tmp_path)
    cfg = _student_cfg(tmp_path, training, ["train.device=cuda", "train.precision=bf16", "train.resume=none",
                                            "data.demo.n_images=3", "train.max_steps=2"])
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cuda")))
    seen = []
    trainer.meta.frozen_teacher.backbone.backbone.blocks[0].register_forward_hook(
        lambda m, inp, out: seen.append((out.dtype, out.device.type, torch.is_inference_mode_enabled())))
    trainer.fit()
    assert seen and set(seen) == {(torch.bfloat16, "cuda", True)}
