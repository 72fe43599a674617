"""The training loop in one process: NaN stop, accumulation, activation checkpointing, bf16 path,
parameter groups, schedules, checkpoint rotation, metrics, export and resume bookkeeping."""

import functools
import json
import math

import pytest
import torch
from conftest import TINY_OVERRIDES
from torch._dynamo.testing import CompileCounter

from cellvit_ssl import train
from cellvit_ssl.channels import channel_ids
from cellvit_ssl.checkpoint import ENCODER_FORMAT, load_checkpoint, step_checkpoints
from cellvit_ssl.config import load_config
from cellvit_ssl.models.channels import build_model
from cellvit_ssl.optim import Schedules, param_groups
from cellvit_ssl.ssl import DINOMetaArch
from cellvit_ssl.train import _checkpointed_forward, compile_blocks, enable_activation_checkpointing, main, run

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
    key = "student.backbone.backbone.blocks.0.attn.qkv.weight"
    assert not torch.allclose(big[key], big[key.replace("student", "teacher")])


def _count_saved_tensors(counts: list[int], real_forward=DINOMetaArch.forward):
    """A forward of DINOMetaArch that appends how many tensors autograd saved for backward."""

    def forward(self, *args, **kwargs):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
            out = real_forward(self, *args, **kwargs)
        counts.append(len(saved))
        return out

    return forward


def test_activation_checkpointing_saves_fewer_activations_not_other_results(tmp_path, monkeypatch):
    common = ["train.epochs=2", "train.base_lr=0.05", "train.tensorboard=false"]
    saved = {"plain": [], "ac": []}
    for name, extra in (("plain", []), ("ac", ["train.activation_checkpointing=true"])):
        monkeypatch.setattr(DINOMetaArch, "forward", _count_saved_tensors(saved[name]))
        run(load_config(None, _overrides(tmp_path, name, *extra, *common)))
    assert len(saved["ac"]) == len(saved["plain"]) > 0
    assert all(a < p for a, p in zip(saved["ac"], saved["plain"])), saved
    plain, ac = _model_state(tmp_path, "plain"), _model_state(tmp_path, "ac")
    assert plain.keys() == ac.keys()
    for key, value in plain.items():
        torch.testing.assert_close(ac[key], value, atol=1e-6, rtol=0, msg=key)


def _tiny_meta(*extra):
    cfg = load_config(None, [*TINY_OVERRIDES, *extra])
    torch.manual_seed(0)
    return DINOMetaArch(build_model(cfg.model, list(cfg.data.channels)), cfg.ssl), cfg


def _saved_by_one_step(meta, cfg) -> int:
    counts = []
    g = torch.Generator().manual_seed(1)
    b, c = 2, len(cfg.data.channels)
    views = [torch.rand(b, c, 32, 32, generator=g) for _ in range(2)] + [torch.rand(b, c, 16, 16, generator=g)]
    ids = torch.tensor([channel_ids(list(cfg.data.channels))] * b)
    torch.manual_seed(2)
    out = _count_saved_tensors(counts)(meta, views, ids, epoch=0)
    out["loss"].backward()
    return counts[0]


@pytest.mark.parametrize("variant", ["fixed", "boc", "hierarchical", "channelvit"])
def test_activation_checkpointing_recomputes_every_student_block(variant):
    plain = _saved_by_one_step(*_tiny_meta(f"model.variant={variant}"))
    meta, cfg = _tiny_meta(f"model.variant={variant}")
    enable_activation_checkpointing(meta)
    checkpointed = _saved_by_one_step(meta, cfg)
    assert checkpointed < plain
    if variant == "hierarchical":
        # the cross-channel blocks are checkpointed too: fewer saved than with the ViT blocks alone
        meta, cfg = _tiny_meta(f"model.variant={variant}")
        for block in meta.student.backbone.backbone.blocks:
            block.forward = functools.partial(_checkpointed_forward, block.forward)
        assert checkpointed < _saved_by_one_step(meta, cfg)


def test_compile_blocks_compiles_every_block_and_the_step_runs_compiled():
    counter = CompileCounter()
    meta, cfg = _tiny_meta("model.variant=hierarchical")
    compile_blocks(meta, backend=counter)
    blocks = meta.transformer_blocks()
    assert len(blocks) == 2 * 2 * cfg.model.depth  # student and teacher; ViT and cross-channel blocks
    assert all(block._compiled_call_impl is not None for block in blocks)
    _saved_by_one_step(meta, cfg)
    assert counter.frame_count > 0, "no frame was compiled"


def test_train_compile_runs_compiled_blocks(tmp_path, monkeypatch):
    counter = CompileCounter()
    monkeypatch.setattr(train, "compile_blocks", functools.partial(compile_blocks, backend=counter))
    run(load_config(None, _overrides(tmp_path, "run", "train.compile=true", "train.tensorboard=false",
                                     "train.max_steps=1")))
    assert counter.frame_count > 0, "train.compile=true ran no compiled frame"


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
        torch.testing.assert_close(value, latest["model"][f"teacher.backbone.{key}"])


def test_resume_auto_continues_and_a_finished_run_does_not_train_again(tmp_path, capsys):
    half = _overrides(tmp_path, "run", "train.epochs=4", "train.max_steps=2", "train.tensorboard=false",
                      "data.demo.n_images=1")  # 4 cells: one step per epoch
    run(load_config(None, half))
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    # max_steps changes the schedules' length: continuing past it is a change the command allows by name
    full = [o for o in half if o not in ("train.resume=none", "train.max_steps=2")]
    full.append("train.allow_config_change=[train.max_steps]")
    run(load_config(None, full))
    assert "resumed at step 2" in capsys.readouterr().out
    done = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert done["step"] == 4
    run(load_config(None, full))
    assert "is finished" in capsys.readouterr().out
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
    vit = "student.backbone.backbone"
    for name in (f"{vit}.cls_token", f"{vit}.pos_embed", f"{vit}.norm.weight", f"{vit}.blocks.0.attn.qkv.bias",
                 f"{vit}.blocks.1.ls1.gamma"):
        assert grouped[name]["weight_decay"] == 0.0 and not grouped[name]["apply_wd"], name
    for name in (f"{vit}.blocks.0.attn.qkv.weight", f"{vit}.patch_embed.proj.weight"):
        assert grouped[name]["weight_decay"] == 0.05, name
    # depth 2: embeddings 0.5^3, block 0 0.5^2, block 1 0.5, final norm and head 1
    assert grouped[f"{vit}.patch_embed.proj.weight"]["lr_scale"] == 0.125
    assert grouped[f"{vit}.blocks.0.mlp.fc1.weight"]["lr_scale"] == 0.25
    assert grouped[f"{vit}.blocks.1.mlp.fc1.weight"]["lr_scale"] == 0.5
    assert grouped[f"{vit}.norm.weight"]["lr_scale"] == 1.0
    assert grouped["student.dino_head.layers.0.weight"]["lr_scale"] == 1.0
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


def _lr_before_lightly(step, total, warmup, peak, low):
    """The hand-written learning-rate schedule lightly's replaced (as of commit 43b04fc)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * progress))


def _cosine_before_lightly(step, total, start, end):
    """The hand-written weight-decay schedule lightly's replaced (as of commit 43b04fc)."""
    progress = min(step / max(total - 1, 1), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("total", [1, 2, 3, 10, 97, 1000])
def test_lightly_schedules_equal_the_hand_written_ones_they_replaced(total):
    for warmup in sorted({0, 1, total // 10, total // 2, total}):
        s = Schedules(total_steps=total, warmup_steps=warmup, peak_lr=2e-3, min_lr=1e-6, weight_decay=0.04,
                      weight_decay_end=0.4, momentum_start=0.996, momentum_end=1.0)
        for step in range(total):
            assert s.lr(step) == pytest.approx(_lr_before_lightly(step, total, warmup, 2e-3, 1e-6), rel=1e-12)
            # A one-step run's single step is its last: lightly's cosine gives the end value there,
            # the old formula gave the start; every longer run is the same.
            if total > 1:
                assert s.wd(step) == pytest.approx(_cosine_before_lightly(step, total, 0.04, 0.4), rel=1e-12)


_LAYOUT_2_TO_1 = (("student.dino_head.", "student_dino_head."), ("teacher.dino_head.", "teacher_dino_head."),
                  ("student.ibot_head.", "student_ibot_head."), ("teacher.ibot_head.", "teacher_ibot_head."),
                  ("student.backbone.", "student."), ("teacher.backbone.", "teacher."))


def _as_layout_1(payload: dict) -> dict:
    """A training checkpoint written in the key layout of checkpoints from before ``state_layout``."""
    def old(key):
        return next((o + key[len(n):] for n, o in _LAYOUT_2_TO_1 if key.startswith(n)), key)

    model = {old(k): v for k, v in payload["model"].items()}
    ssl = payload["config"]["ssl"]
    if ssl["centering"] == "sinkhorn_knopp":  # lightly's losses with a centre frozen at zero
        model["dino_loss.center"] = torch.zeros(1, 1, ssl["head_output_dim"])
        model["ibot_loss.center.center"] = torch.zeros(1, ssl["ibot_head_output_dim"] or ssl["head_output_dim"])
    optim = payload["optimizer"]
    optim = {**optim, "state": {old(k): v for k, v in optim["state"].items()},
             "param_groups": [{**g, "params": [old(k) for k in g["params"]]} for g in optim["param_groups"]]}
    return {**{k: v for k, v in payload.items() if k != "state_layout"}, "model": model, "optimizer": optim}


@pytest.mark.parametrize("extra", [["ssl.centering=sinkhorn_knopp", "model.variant=hierarchical"],
                                   ["ssl.centering=mean"]], ids=["sinkhorn-hierarchical", "mean-boc"])
def test_a_checkpoint_of_the_old_key_layout_resumes_exactly_and_loads_as_an_encoder(tmp_path, extra):
    import numpy as np

    from cellvit_ssl import load_encoder
    from cellvit_ssl.checkpoint import save_checkpoint

    full = [o for o in _overrides(tmp_path, "full", "train.epochs=4", "train.tensorboard=false", "data.demo.n_images=1",
                                  "train.checkpoint_every=1", "train.keep_last=4", *extra)
            if o != "train.resume=none"]  # one step per epoch, every step checkpointed
    run(load_config(None, full))
    done = tmp_path / "full"
    images = np.random.default_rng(0).random((2, 4, 32, 32)).astype(np.float32)
    channels = list(load_config(None, full).data.channels)

    def embeddings(path):
        return load_encoder(path, device="cpu").embed(images, channels=channels)

    old = tmp_path / "old"
    for step, name in ((2, "checkpoint.pt"), (4, "final.pt")):
        payload = _as_layout_1(torch.load(done / f"checkpoint_{step:08d}.pt", weights_only=True))
        assert "student_dino_head.last_layer.weight_v" in payload["model"] and "state_layout" not in payload
        save_checkpoint(payload, old / name)
    np.testing.assert_array_equal(embeddings(old / "checkpoint.pt"), embeddings(done / "checkpoint_00000002.pt"))
    np.testing.assert_array_equal(embeddings(old / "final.pt"), embeddings(done / "teacher.pt"))

    run(load_config(None, [o.replace("/full", "/old") for o in full]))  # resume=auto from old/checkpoint.pt
    resumed, reference = load_checkpoint(old / "checkpoint.pt"), load_checkpoint(done / "checkpoint.pt")
    assert resumed["step"] == reference["step"] == 4
    assert resumed["model"].keys() == reference["model"].keys()
    for key, value in reference["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, atol=1e-6, rtol=0, msg=key)
    for name, state in reference["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(resumed["optimizer"]["state"][name][key], value, atol=1e-6, rtol=0)


def test_layer_decay_puts_cross_channel_blocks_at_their_depth():
    meta, _ = _tiny_meta("model.variant=hierarchical")
    names = {id(p): n for n, p in meta.named_parameters()}
    grouped = {names[id(p)]: g for g in param_groups(meta, weight_decay=0.05, layer_decay=0.5) for p in g["params"]}
    assert grouped["student.backbone.cross_blocks.0.attn.qkv.weight"]["lr_scale"] == 0.25
    assert grouped["student.backbone.cross_blocks.1.attn.qkv.weight"]["lr_scale"] == 0.5
    assert grouped["student.backbone.channel_embed"]["lr_scale"] == 0.125


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


@pytest.mark.parametrize("during, stop_step", [("forward", 2), ("optimiser update", 3)])
def test_sigusr1_checkpoints_at_the_end_of_the_current_step_and_returns(tmp_path, monkeypatch, during, stop_step):
    """As StopRequest documents: a signal during step 2's forward / backward ends the run after
    step 2; one during its optimiser and teacher update (after the ranks agreed) after step 3."""
    import os
    import signal

    def send_during_step_2(real):
        def method(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGUSR1)
            return real(self, *args, **kwargs)
        return method

    calls = []
    if during == "forward":
        monkeypatch.setattr(DINOMetaArch, "forward", send_during_step_2(DINOMetaArch.forward))
    else:
        monkeypatch.setattr(DINOMetaArch, "update_teacher", send_during_step_2(DINOMetaArch.update_teacher))
    before = signal.getsignal(signal.SIGUSR1)
    path = run(load_config(None, _overrides(tmp_path, "run", "train.epochs=6", "train.tensorboard=false")))
    assert path.name == f"checkpoint_{stop_step:08d}.pt" and load_checkpoint(path)["step"] == stop_step
    assert len(calls) == stop_step, "no step runs after the one that ends the run"
    assert not (tmp_path / "run" / "teacher.pt").exists()
    assert signal.getsignal(signal.SIGUSR1) is before, "the handler is removed when training ends"


def test_missing_data_leaves_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code = main([_config_file(tmp_path), *_overrides(tmp_path), "data.demo.enabled=false",
                 f"data.index={tmp_path / 'none.csv'}"])
    assert code == 2 and "none.csv" in capsys.readouterr().err
    assert not out.exists()
