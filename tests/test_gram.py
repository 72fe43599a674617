"""Gram anchoring (``ssl.gram``, DINOv3): the term, the Gram teacher's snapshots and their schedule,
and its place in a training run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_OVERRIDES

from cellvit_ssl.checkpoint import load_checkpoint
from cellvit_ssl.config import load_config
from cellvit_ssl.distributed import DistInfo
from cellvit_ssl.errors import ConfigError
from cellvit_ssl.models.channels import build_model
from cellvit_ssl.optim import param_groups
from cellvit_ssl.ssl import DINOMetaArch, gram_loss
from cellvit_ssl.train import Trainer

GRAM = ["ssl.gram.enabled=true", "ssl.gram.start_step=2", "ssl.gram.refresh_every=3"]


def test_gram_loss_compares_patch_similarities_not_features():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 8)
    assert float(gram_loss(x, x)) == 0.0
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    scale = torch.rand(3, 10, 1) + 0.5
    # other features, same cosine similarities between patches: nothing to anchor
    assert float(gram_loss(x @ rotation * scale, x)) == pytest.approx(0.0, abs=1e-6)
    y = torch.randn(3, 10, 8)
    xn, yn = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
    manual = ((xn @ xn.transpose(1, 2) - yn @ yn.transpose(1, 2)) ** 2).sum(dim=(1, 2)) / 100
    torch.testing.assert_close(gram_loss(x, y), manual.mean())


def _meta(extra=()):
    cfg = load_config(None, [*TINY_OVERRIDES, *extra])
    torch.manual_seed(0)
    return DINOMetaArch(build_model(cfg.model, list(cfg.data.channels)), cfg.ssl), cfg


def test_off_by_default_and_then_no_gram_teacher_at_all():
    meta, cfg = _meta()
    assert not cfg.ssl.gram.enabled and not hasattr(meta, "gram_teacher")
    assert not any(k.startswith("gram") for k in meta.state_dict())
    out = meta([torch.rand(2, 4, 32, 32)] * 2, torch.tensor([[0, 1, 2, 3]] * 2), epoch=0, step=100)
    assert "gram" not in out


def test_the_gram_teacher_is_a_snapshot_of_the_ema_teacher_refreshed_on_schedule():
    meta, _ = _meta(GRAM)
    assert {id(p) for p in meta.gram_teacher.parameters()}.isdisjoint(
        {id(p) for g in param_groups(meta, 0.04) for p in g["params"]})
    assert any(k.startswith("gram_teacher.") for k in meta.state_dict())  # resumed runs restore the snapshot
    assert meta.gram_teacher in meta.backbones()
    refreshed = []
    for step in range(12):
        for p in meta.teacher.parameters():  # the EMA teacher keeps moving
            p.data.add_(0.01)
        if meta.refresh_gram_teacher(step):
            refreshed.append(step)
            snapshot = {k: v.clone() for k, v in meta.teacher.backbone.state_dict().items()}
        if refreshed:
            for key, value in meta.gram_teacher.state_dict().items():
                torch.testing.assert_close(value, snapshot[key], msg=f"step {step}: {key}")
    assert refreshed == [2, 5, 8, 11]
    never_again, _ = _meta([*GRAM, "ssl.gram.refresh_every=0"])
    assert [s for s in range(12) if never_again.refresh_gram_teacher(s)] == [2]


def test_the_term_joins_the_loss_from_its_start_step_with_its_weight():
    views, ids = [torch.rand(2, 4, 32, 32)] * 2 + [torch.rand(2, 4, 16, 16)] * 2, torch.tensor([[0, 1, 2, 3]] * 2)
    losses = {}
    for weight in (0.0, 3.0):
        meta, _ = _meta([*GRAM, f"ssl.gram.weight={weight}", "ssl.ibot=false"])
        for p in meta.gram_teacher.parameters():  # an anchor unlike the student
            p.data.add_(torch.randn_like(p) * 0.1)
        assert "gram" not in meta(views, ids, epoch=0, step=1)
        torch.manual_seed(1)
        losses[weight] = meta(views, ids, epoch=0, step=2)
    gram = losses[3.0]["gram"]
    assert gram > 0
    torch.testing.assert_close(losses[3.0]["loss"] - losses[0.0]["loss"], 3.0 * gram)


def test_gradients_of_the_term_pull_the_student_towards_the_anchor():
    meta, _ = _meta([*GRAM, "ssl.dino=true", "ssl.ibot=false", "ssl.koleo=false", "ssl.dino_loss_weight=0"])
    for p in meta.gram_teacher.parameters():
        p.data.add_(torch.randn_like(p) * 0.2)
    views, ids = [torch.rand(4, 4, 32, 32)] * 2, torch.tensor([[0, 1, 2, 3]] * 4)
    optimizer = torch.optim.SGD(meta.student.backbone.parameters(), lr=0.5)
    first = None
    for _ in range(10):
        out = meta(views, ids, epoch=5, step=10)
        first = float(out["gram"]) if first is None else first
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert float(out["gram"]) < 0.8 * first


def test_bad_gram_settings_are_config_errors():
    with pytest.raises(ConfigError, match="ssl.gram"):
        load_config(None, ["ssl.gram.refresh_every=-1"])


def test_a_run_logs_the_term_from_the_start_step_and_checkpoints_the_snapshot(tiny_overrides, tmp_path):
    cfg = load_config(None, [*tiny_overrides, *GRAM, "data.demo.n_images=3", "train.epochs=2", "train.log_every=1",
                             "train.progress=false", "train.tensorboard=false", "train.resume=none"])
    Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu"))).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert ["gram" in r for r in records] == [False, False, True, True]  # steps 1-2 before, 3-4 from step index 2
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    snapshot = {k[len("gram_teacher."):]: v for k, v in ckpt["model"].items() if k.startswith("gram_teacher.")}
    assert snapshot and ckpt["config"]["ssl"]["gram"]["enabled"]
    teacher = {k[len("teacher.backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("teacher.backbone.")}
    assert snapshot.keys() == teacher.keys()
    assert any(not torch.equal(snapshot[k], teacher[k]) for k in teacher)  # taken at step 2, the teacher moved on


def test_a_run_written_without_gram_anchoring_resumes_with_it(tiny_overrides, tmp_path):
    """DINOv3 turns Gram anchoring on late: resuming a plain run with it takes the snapshot from its teacher."""
    common = [*tiny_overrides, "data.demo.n_images=3", "train.log_every=1", "train.progress=false",
              "train.tensorboard=false"]
    Trainer(load_config(None, [*common, "train.epochs=1"]), DistInfo(0, 1, 0, torch.device("cpu"))).fit()
    plain = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    later = ["train.epochs=2", "ssl.gram.enabled=true", "ssl.gram.start_step=3", "ssl.gram.refresh_every=0",
             "train.allow_config_change=[train.epochs,ssl.gram]"]  # a resumed run changes settings only when told
    trainer = Trainer(load_config(None, [*common, *later]), DistInfo(0, 1, 0, torch.device("cpu")))
    trainer.resume(tmp_path / "run" / "checkpoint.pt")
    for key, value in trainer.meta.gram_teacher.state_dict().items():
        torch.testing.assert_close(value, plain["model"][f"teacher.backbone.{key}"], msg=key)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "gram" in r] == [4]  # from step index 3: the last record
