"""The training loop in one process: NaN stop, accumulation, activation checkpointing, bf16 path,
parameter groups, schedules, checkpoint rotation, metrics, export and resume bookkeeping."""

import json
import math

import pytest
import torch
from conftest import TINY_OVERRIDES

from cellvit_ssl.checkpoint import ENCODER_FORMAT, load_checkpoint, step_checkpoints
from cellvit_ssl.config import load_config
from cellvit_ssl.models.channels import build_model
from cellvit_ssl.optim import Schedules, param_groups
from cellvit_ssl.ssl import DINOMetaArch
from cellvit_ssl.train import main, run

QUIET = ["train.progress=false", "train.resume=none"]


def _overrides(tmp_path, name="run", *extra):
    return [*TINY_OVERRIDES, *QUIET, f"data.demo.cache_dir={tmp_path / 'demo'}",
            f"train.output_dir={tmp_path / name}", *extra]


def _config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  tensorboard: false\n")
    return str(path)


def _model_state(tmp_path, name):
    return load_checkpoint(tmp_path / name / "checkpoint.pt")["model"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_forward = DINOMetaArch.forward
    calls = []

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4:  # step 4
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(DINOMetaArch, "forward", forward)
    code = main([_config_file(tmp_path), *_overrides(tmp_path, "run", "train.epochs=6", "train.checkpoint_every=2")])
    assert code == 3
    err = capsys.readouterr().err
    assert "loss is nan at step 4" in err and "checkpoint_00000002.pt" in err
    out = tmp_path / "run"
    assert [p.name for p in step_checkpoints(out)] == ["checkpoint_00000002.pt"]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "teacher.pt").exists()


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    # DINO's center moves once per forward pass, so micro-batches would see another center than
    # the full batch; a fixed center (momentum 1) isolates the accumulation arithmetic.
    # iBOT masks, KoLeo neighbours and Sinkhorn-Knopp are per forward pass as well: plain DINO here.
    common = ["ssl.center_momentum=1.0", "ssl.centering=mean", "ssl.ibot=false", "ssl.koleo=false",
              "train.epochs=2", "train.base_lr=0.05", "train.tensorboard=false"]
    run(load_config(None, _overrides(tmp_path, "big", "data.batch_size=4", *common)))
    run(load_config(None, _overrides(tmp_path, "acc", "data.batch_size=2", "train.accumulate_steps=2", *common)))
    big, acc = _model_state(tmp_path, "big"), _model_state(tmp_path, "acc")
    for key, value in big.items():
        torch.testing.assert_close(acc[key], value, atol=1e-6, rtol=0, msg=key)
    key = "student.backbone.blocks.0.attn.qkv.weight"
    assert not torch.allclose(big[key], big[key.replace("student", "teacher")])


def test_activation_checkpointing_changes_memory_not_results(tmp_path):
    common = ["train.epochs=2", "train.base_lr=0.05", "train.tensorboard=false"]
    run(load_config(None, _overrides(tmp_path, "plain", *common)))
    run(load_config(None, _overrides(tmp_path, "ac", "train.activation_checkpointing=true", *common)))
    plain, ac = _model_state(tmp_path, "plain"), _model_state(tmp_path, "ac")
    assert plain.keys() == ac.keys()
    for key, value in plain.items():
        torch.testing.assert_close(ac[key], value, atol=1e-6, rtol=0, msg=key)


def test_bf16_autocast_path_trains(tmp_path):
    # On CPU the default is fp32; bf16 is asked for explicitly to run the autocast path.
    run(load_config(None, _overrides(tmp_path, "bf16", "train.precision=bf16", "train.tensorboard=false")))
    records = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(math.isfinite(r["loss"]) for r in records)
    state = _model_state(tmp_path, "bf16")
    assert all(v.dtype != torch.bfloat16 for v in state.values()), "weights stay fp32 under autocast"


def test_rotation_metrics_export_and_config_beside_checkpoints(tmp_path):
    # One demo field holds 4 cells: one step per epoch at batch 4.
    export = run(load_config(None, _overrides(tmp_path, "run", "train.epochs=4", "train.checkpoint_every=1",
                                              "train.keep_last=2", "train.log_every=1", "data.demo.n_images=1")))
    out = tmp_path / "run"
    assert [p.name for p in step_checkpoints(out)] == ["checkpoint_00000003.pt", "checkpoint_00000004.pt"]
    latest = load_checkpoint(out / "checkpoint.pt")
    assert latest["step"] == 4 and (out / "checkpoint.pt").read_bytes() == (out / "checkpoint_00000004.pt").read_bytes()
    assert load_config(out / "config.yaml").train.keep_last == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "lr", "wd", "momentum", "grad_norm", "images_per_s"} <= records[0].keys()
    assert records[0]["lr"] == pytest.approx(5.0e-4 * 4 / 256), "base_lr scaled by the global batch"
    payload = torch.load(export, weights_only=True)
    assert payload["format"] == ENCODER_FORMAT
    assert set(payload) == {"format", "config", "backbone", "preprocess", "vocabulary"}
    for key, value in payload["backbone"].items():
        torch.testing.assert_close(value, latest["model"][f"teacher.{key}"])


def test_resume_auto_continues_and_a_finished_run_does_not_train_again(tmp_path, capsys):
    half = _overrides(tmp_path, "run", "train.epochs=4", "train.max_steps=2", "train.tensorboard=false",
                      "data.demo.n_images=1")  # 4 cells: one step per epoch
    run(load_config(None, half))
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    full = [o for o in half if o not in ("train.resume=none", "train.max_steps=2")]
    run(load_config(None, full))
    assert "resumed at step 2" in capsys.readouterr().out
    done = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert done["step"] == 4
    run(load_config(None, full))
    assert "resumed at step 4" in capsys.readouterr().out
    again = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert again["step"] == 4
    for key, value in done["model"].items():
        torch.testing.assert_close(again["model"][key], value, atol=0, rtol=0)


def test_missing_resume_path_is_a_clear_error(tmp_path, capsys):
    code = main([_config_file(tmp_path), *_overrides(tmp_path), f"train.resume={tmp_path / 'nope.pt'}"])
    assert code == 2
    assert "nope.pt" in capsys.readouterr().err


def test_channel_mask_of_a_batch_reaches_the_objective(tmp_path, monkeypatch):
    from cellvit_ssl.data.dataset import IndexDataset

    real_item = IndexDataset.__getitem__

    def item(self, i):
        out = real_item(self, i)
        out["channel_mask"] = torch.tensor([True, True, False, True])
        return out

    seen = []
    real_forward = DINOMetaArch.forward

    def forward(self, views, channel_ids, epoch, channel_mask=None, **kwargs):
        seen.append(channel_mask)
        return real_forward(self, views, channel_ids, epoch=epoch, **kwargs)

    monkeypatch.setattr(IndexDataset, "__getitem__", item)
    monkeypatch.setattr(DINOMetaArch, "forward", forward)
    run(load_config(None, _overrides(tmp_path, "run", "train.tensorboard=false")))
    assert seen and all(m is not None and m.shape == (4, 4) and not m[:, 2].any() for m in seen)


def test_param_groups_spare_norms_biases_tokens_and_decay_layers(tiny_cfg):
    meta = DINOMetaArch(build_model(tiny_cfg.model, list(tiny_cfg.data.channels)), tiny_cfg.ssl)
    names = {id(p): n for n, p in meta.named_parameters()}
    groups = param_groups(meta, weight_decay=0.05, layer_decay=0.5)
    grouped = {names[id(p)]: g for g in groups for p in g["params"]}
    assert not any(n.startswith(("teacher.", "teacher_")) for n in grouped), "the teacher is not optimised"
    assert set(grouped) == {n for n, p in meta.named_parameters() if p.requires_grad}
    for name in ("student.backbone.cls_token", "student.backbone.pos_embed", "student.backbone.norm.weight",
                 "student.backbone.blocks.0.attn.qkv.bias", "student.backbone.blocks.1.ls1.gamma"):
        assert grouped[name]["weight_decay"] == 0.0 and not grouped[name]["apply_wd"], name
    for name in ("student.backbone.blocks.0.attn.qkv.weight", "student.backbone.patch_embed.proj.weight"):
        assert grouped[name]["weight_decay"] == 0.05, name
    # depth 2: embeddings 0.5^3, block 0 0.5^2, block 1 0.5, final norm and head 1
    assert grouped["student.backbone.patch_embed.proj.weight"]["lr_scale"] == 0.125
    assert grouped["student.backbone.blocks.0.mlp.fc1.weight"]["lr_scale"] == 0.25
    assert grouped["student.backbone.blocks.1.mlp.fc1.weight"]["lr_scale"] == 0.5
    assert grouped["student.backbone.norm.weight"]["lr_scale"] == 1.0
    assert all(g["lr_scale"] == 1.0 for g in param_groups(meta, 0.05))


def test_schedules_warm_up_then_cosine():
    s = Schedules(total_steps=100, warmup_steps=10, peak_lr=1.0, min_lr=0.01, weight_decay=0.04,
                  weight_decay_end=0.4, momentum_start=0.996, momentum_end=1.0)
    assert s.lr(0) == pytest.approx(0.1) and s.lr(9) == pytest.approx(1.0)
    assert s.lr(10) == pytest.approx(1.0) and s.lr(55) == pytest.approx(0.505)
    assert s.lr(99) > s.lr(100) == pytest.approx(0.01)
    assert all(s.lr(i) >= s.lr(i + 1) for i in range(10, 100))
    assert s.wd(0) == pytest.approx(0.04) and s.wd(99) == pytest.approx(0.4)
    assert s.momentum(0) == pytest.approx(0.996) and s.momentum(99) == pytest.approx(1.0)


def test_without_tensorboard_metrics_still_go_to_jsonl(tmp_path, monkeypatch, capsys):
    import sys

    from cellvit_ssl.train import MetricsLog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    log = MetricsLog(tmp_path, enabled=True, tensorboard=True)
    log.write({"step": 1, "epoch": 0, "loss": 2.5})
    log.close()
    assert "TensorBoard logging is off" in capsys.readouterr().err
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.5
    assert not (tmp_path / "tb").exists()


def test_tensorboard_scalars_beside_the_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from cellvit_ssl.train import MetricsLog

    log = MetricsLog(tmp_path, enabled=True, tensorboard=True)
    log.write({"step": 3, "epoch": 0, "loss": 2.5, "lr": 1e-3})
    log.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr"}
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 2.5)]


@pytest.mark.gpu
def test_gpu_run_uses_bf16_autocast_and_reports_memory(tmp_path, capsys):
    run(load_config(None, _overrides(tmp_path, "gpu", "train.device=cuda", "train.epochs=2", "train.log_every=1",
                                     "train.tensorboard=false")))
    assert "bf16" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and r["max_memory_gib"] > 0 for r in records)
    assert all(v.dtype == torch.float32 for v in _model_state(tmp_path, "gpu").values() if v.is_floating_point())


def test_resumed_log_drops_the_records_a_killed_run_wrote_past_its_checkpoint(tmp_path):
    from cellvit_ssl.train import MetricsLog

    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 6)] + ['{"step": 6, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    log = MetricsLog(tmp_path, enabled=True, tensorboard=False, resumed_step=3)
    log.write({"step": 4, "epoch": 0, "loss": 0.5})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 0.5)]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(tmp_path):
    common = ["train.epochs=2", "train.base_lr=0.05", "train.tensorboard=false"]
    run(load_config(None, _overrides(tmp_path, "eager", *common)))
    run(load_config(None, _overrides(tmp_path, "compiled", "train.compile=true", *common)))
    eager, compiled = _model_state(tmp_path, "eager"), _model_state(tmp_path, "compiled")
    assert eager.keys() == compiled.keys(), "compiling keeps parameter names (checkpoints stay portable)"
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, atol=1e-4, rtol=0, msg=key)


def test_sigusr1_checkpoints_at_the_next_step_boundary_and_returns(tmp_path, monkeypatch):
    import os
    import signal

    from cellvit_ssl.train import Trainer

    real_step = Trainer._train_step

    def step(self, *args, **kwargs):
        record = real_step(self, *args, **kwargs)
        if self.step == 1:  # during the second step
            os.kill(os.getpid(), signal.SIGUSR1)
        return record

    monkeypatch.setattr(Trainer, "_train_step", step)
    before = signal.getsignal(signal.SIGUSR1)
    path = run(load_config(None, _overrides(tmp_path, "run", "train.epochs=6", "train.tensorboard=false")))
    assert path.name == "checkpoint_00000003.pt" and load_checkpoint(path)["step"] == 3
    assert not (tmp_path / "run" / "teacher.pt").exists()
    assert signal.getsignal(signal.SIGUSR1) is before, "the handler is removed when training ends"


def test_missing_data_leaves_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code = main([_config_file(tmp_path), *_overrides(tmp_path), "data.demo.enabled=false",
                 f"data.index={tmp_path / 'none.csv'}"])
    assert code == 2 and "none.csv" in capsys.readouterr().err
    assert not out.exists()
