"""The walking skeleton end to end: data → views → BoC model → DINO step → checkpoint → embed."""

import numpy as np
import pytest
import torch

from cellvit_ssl import CheckpointError, ConfigError, DataError, load_config, load_encoder
from cellvit_ssl.channels import channel_ids
from cellvit_ssl.checkpoint import load_checkpoint
from cellvit_ssl.data.dataset import IndexDataset
from cellvit_ssl.data.synthetic import DemoSpec, generate_demo
from cellvit_ssl.models.channels import build_model
from cellvit_ssl.ssl import DINOMetaArch
from cellvit_ssl.train import build_loader, main, run
from cellvit_ssl.transforms import MultichannelDINOTransform

CHANNELS = ["nucleus", "microtubules", "er", "protein"]


def test_demo_is_deterministic_and_cached(tmp_path):
    spec = DemoSpec(n_images=1, image_size=64, cells_per_image=3, seed=5)
    a = generate_demo(tmp_path / "a", spec).read_text()
    b = generate_demo(tmp_path / "b", spec).read_text()
    assert a == b
    index = generate_demo(tmp_path / "a", spec)
    mtime = index.stat().st_mtime_ns
    assert generate_demo(tmp_path / "a", spec).stat().st_mtime_ns == mtime  # reused, not rewritten


def test_views_shapes_and_channels(tiny_cfg):
    views = MultichannelDINOTransform(tiny_cfg.views)(torch.rand(5, 48, 48))
    assert [tuple(v.shape) for v in views] == [(5, 32, 32)] * 2 + [(5, 16, 16)] * 2


def test_loader_batches_views_with_channel_ids(tiny_cfg):
    batch = next(iter(build_loader(tiny_cfg)))
    assert len(batch["views"]) == 4
    assert batch["views"][0].shape == (4, 4, 32, 32) and batch["views"][0].dtype == torch.float32
    assert batch["channel_ids"].shape == (4, 4)
    assert batch["channel_ids"][0].tolist() == channel_ids(CHANNELS)


def test_dataset_reorders_channels_by_name(tiny_cfg, tmp_path):
    from cellvit_ssl.train import resolve_index

    index, _ = resolve_index(tiny_cfg)
    a = IndexDataset(index, CHANNELS, sample_size=32).load(0)
    b = IndexDataset(index, CHANNELS[::-1], sample_size=32).load(0)
    torch.testing.assert_close(a, b.flip(0))
    assert a.min() >= 0 and a.max() <= 1


def test_boc_embedding_width_and_channel_order(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg.model, CHANNELS).eval()
    x = torch.rand(2, 4, 32, 32)
    ids = torch.tensor([channel_ids(CHANNELS)] * 2)
    z = model.embed(x, ids)
    d = tiny_cfg.model.embed_dim
    assert z.shape == (2, 4 * d)
    perm = [2, 0, 3, 1]
    # channels and their ids permuted together: same embedding (blocks follow the vocabulary)
    torch.testing.assert_close(model.embed(x[:, perm], ids[:, perm]), z)
    # pixels permuted but ids kept: the blocks move with the pixels
    z_swapped = model.embed(x[:, perm], ids).reshape(2, 4, d)
    torch.testing.assert_close(z_swapped, z.reshape(2, 4, d)[:, perm])


def test_training_steps_change_student_and_move_teacher_by_ema(tiny_cfg):
    torch.manual_seed(0)
    meta = DINOMetaArch(build_model(tiny_cfg.model, CHANNELS), tiny_cfg.ssl)
    opt = torch.optim.AdamW([p for p in meta.parameters() if p.requires_grad], lr=1e-3)
    batch = next(iter(build_loader(tiny_cfg)))
    s0 = {k: v.clone() for k, v in meta.student.backbone.state_dict().items()}
    t0 = {k: v.clone() for k, v in meta.teacher.backbone.state_dict().items()}
    for _ in range(2):
        out = meta(batch["views"], batch["channel_ids"], epoch=1)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        s_before = {k: v.clone() for k, v in meta.student.state_dict().items()}
        t_before = {k: v.clone() for k, v in meta.teacher.state_dict().items()}
        meta.update_teacher(0.9)
        for k, t_new in meta.teacher.state_dict().items():
            if t_new.is_floating_point():
                torch.testing.assert_close(t_new, 0.9 * t_before[k] + 0.1 * s_before[k])
    key = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(meta.student.backbone.state_dict()[key], s0[key])
    assert not torch.equal(meta.teacher.backbone.state_dict()[key], t0[key])


def test_train_writes_loadable_checkpoints_and_embeds(tiny_cfg, tmp_path):
    export = run(tiny_cfg)
    ckpt = load_checkpoint(export.parent / "checkpoint.pt")
    assert ckpt["step"] > 0 and "teacher.backbone.backbone.cls_token" in ckpt["model"]
    assert (export.parent / "config.yaml").is_file()
    torch.load(export, weights_only=True)
    images = np.random.default_rng(0).random((3, 4, 40, 40)).astype(np.float32)
    for path in (export, export.parent / "checkpoint.pt"):
        enc = load_encoder(path, device="cpu")
        z = enc.embed(images, channels=CHANNELS)
        assert z.shape == (3, enc.output_dim) and z.dtype == np.float32
        # channel names in another order give the same embedding
        np.testing.assert_allclose(enc.embed(images[:, ::-1], channels=CHANNELS[::-1]), z, atol=1e-5)
    with pytest.raises(DataError, match="golgi"):
        enc.embed(images, channels=["nucleus", "microtubules", "er", "golgi"])
    with pytest.raises(DataError, match="4 channels but 3"):
        enc.embed(images, channels=CHANNELS[:3])


def test_checkpoint_truncated_is_refused(tiny_cfg, tmp_path):
    export = run(tiny_cfg)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(export.read_bytes()[: export.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_encoder(broken)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.epoch.*train.epochs"):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_dataset_configs_fail_clearly_without_data(capsys):
    code = main(["configs/hpa.yaml", "data.index=/nonexistent/hpa/index.csv"])
    assert code == 2
    err = capsys.readouterr().err
    assert "/nonexistent/hpa/index.csv" in err and "configs/demo.yaml" in err


@pytest.mark.parametrize("name", ["hpa", "wtc", "cellpainting", "demo"])
def test_shipped_configs_load(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.data.channels


def test_protected_channel_reaches_the_views_through_the_trainer(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["views.protected_channels=[protein]", "views.channel_drop_prob=0.9"])
    batch = next(iter(build_loader(cfg)))
    protein = CHANNELS.index("protein")
    for view in batch["views"]:
        # the protein channel is never dropped: it keeps its signal in every view of every image
        assert (view[:, protein].flatten(1).abs().sum(1) > 0).all()
    others = torch.cat([v[:, [c for c in range(4) if c != protein]].flatten(2).abs().sum(2) for v in batch["views"]])
    assert (others == 0).any()  # while the other channels are dropped
