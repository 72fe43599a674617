"""The training-throughput benchmark: tiny CPU run end to end, JSON fields, FLOP counting."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils import flop_counter

from benchmarks import _common
from benchmarks import train_throughput as tt
from cellvit_ssl.config import Variant


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("bench") / "tiny.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = tt.main(["--tiny", "--json", str(path)])
    return result, json.loads(path.read_text()), printed.getvalue()


def test_tiny_run_writes_every_field(tiny_run):
    result, written, printed = tiny_run
    assert written["benchmark"] == "train_throughput"
    assert written["env"]["device"] == "cpu" and written["env"]["torch"] == torch.__version__.split("+")[0]
    assert written["precision"] == "fp32"
    assert written["peak_matmul"] is None  # no MFU on CPU: a small fp32 matmul is no peak
    assert "no MFU on CPU" in printed and "MFU yardstick" not in printed
    table = [line for line in printed.splitlines() if line.startswith(("lightly", "ours/"))]
    assert len(table) == len(written["train"]) and not any("%" in line for line in table)  # MFU column: "-"
    names = [r["name"] for r in written["train"]]
    assert names == ["lightly", "lightly_bag"] + [f"ours/{v}" for v in [v.value for v in Variant]]
    rows = {r["name"]: r for r in written["train"]}
    for name in ("lightly", "lightly_bag", "ours/boc"):
        assert rows[name]["status"] == "ok", rows[name]
    for row in written["train"]:
        assert row["status"] == "ok" or row["status"].startswith("unavailable: "), row
        if row["status"] != "ok":
            continue
        assert row["channels"] == 3 and row["batch_images"] == 4
        assert math.isfinite(row["loss"]) and row["flops_per_step"] > 0 and row["step_ms"] > 0
        assert row["images_per_s"] == pytest.approx(4 / (row["step_ms"] / 1e3))
        assert row["samples_per_s"] == pytest.approx(row["samples_per_step"] / (row["step_ms"] / 1e3))
        assert row["mfu"] is None and row["peak_mem_gib"] is None  # neither is measured on CPU
    boc, bag = rows["ours/boc"], rows["lightly_bag"]
    assert boc["reference"] == "lightly_bag" and rows["ours/fixed"]["reference"] == "lightly"
    assert boc["images_per_s_ratio"] == pytest.approx(boc["images_per_s"] / bag["images_per_s"])
    assert boc["samples_per_step"] == bag["samples_per_step"] == 12  # 4 images x 3 channels
    ok = [r for r in written["train"] if r["name"].startswith("ours/") and r["status"] == "ok"]
    for row in ok:
        assert set(row["time_per_image_vs"]) == {r["name"][5:] for r in ok if r is not row}
        for other in ok:
            if other is not row:
                ratio = row["time_per_image_vs"][other["name"][5:]]
                assert ratio == pytest.approx(other["images_per_s"] / row["images_per_s"])
    views = written["views"]
    for key in ("cpu_path_samples_per_s", "gpu_path_samples_per_s", "gpu_views_only_samples_per_s"):
        assert views[key] > 0
    assert views["gpu_over_cpu"] == pytest.approx(views["gpu_path_samples_per_s"] / views["cpu_path_samples_per_s"])
    fastest = max(r["images_per_s"] for r in written["train"] if r["name"].startswith("ours/") and r["status"] == "ok")
    assert views["step_consumption_images_per_s"] == fastest
    assert views["feed_ratio_gpu"] == pytest.approx(views["gpu_path_samples_per_s"] / fastest)
    share = fastest / views["gpu_views_only_samples_per_s"]
    assert views["gpu_views_share_of_step"] == pytest.approx(share)
    assert result["train"][0]["name"] == "lightly"


def test_boc_step_does_the_matmul_work_of_lightly_on_the_bag(tiny_run):
    # Same ViT size, same head, same crops, B*C one-channel samples: FLOPs agree. A step that
    # dropped the teacher, a view or the backward would miss this by a third or more.
    rows = {r["name"]: r for r in tiny_run[1]["train"]}
    assert rows["ours/boc"]["flops_per_step"] == pytest.approx(rows["lightly_bag"]["flops_per_step"], rel=0.05)


@pytest.mark.slow
def test_compiled_backbones_train():
    # The eager backend runs dynamo's tracing (graph breaks, patched forward_features) without
    # inductor's C++ build, which takes minutes on a small CPU.
    result = tt.main(["--tiny", "--mode", "train", "--variants", "boc", "--compile", "--compile-backend", "eager"])
    rows = {r["name"]: r for r in result["train"]}
    assert result["args"]["compile"]
    for name in ("lightly", "lightly_bag", "ours/boc"):
        assert rows[name]["status"] == "ok", rows[name]
    assert rows["ours/boc"]["flops_per_step"] == pytest.approx(rows["lightly_bag"]["flops_per_step"], rel=0.05)


def test_tiny_defaults_yield_to_explicit_flags():
    args = tt.parse_args(["--tiny", "--batch", "2", "--channels", "4", "5"])
    assert args.batch == 2 and args.channels == [4, 5]
    assert args.arch == "tiny" and args.device == "cpu" and args.head_dim == 256


def test_count_flops_counts_forward_backward_and_cpu_attention():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    assert _common.count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 5 * 16 * 8
    q = torch.randn(2, 3, 10, 8)
    expected = flop_counter.sdpa_flop_count(q.shape, q.shape, q.shape)
    assert _common.count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == expected


def test_lightly_reference_is_the_stock_recipe():
    model = tt.LightlyDINO("tiny", 2, 32, (32, 8, 64))
    for s, t in zip(model.student_head.state_dict().values(), model.teacher_head.state_dict().values()):
        assert torch.equal(s, t)
    assert not any(p.requires_grad for p in model.teacher_backbone.parameters())
    before = [p.clone() for p in model.teacher_backbone.parameters()]
    views = [torch.randn(2, 2, 32, 32)] * 2 + [torch.randn(2, 2, 16, 16)] * 2
    step, _ = tt.make_step(model, views, torch.device("cpu"))
    step()
    moved = [(a - p).abs().max().item() for a, p in zip(before, model.teacher_backbone.parameters())]
    assert max(moved) > 0  # EMA step towards the updated student
    assert math.isfinite(float(step.last["loss"]))


@pytest.mark.gpu
def test_tiny_run_on_cuda_uses_bf16_and_reports_memory(tmp_path):
    result = tt.main(["--tiny", "--device", "cuda", "--matmul-size", "2048", "--workers", "2",
                      "--variants", "boc", "--json", str(tmp_path / "cuda.json")])
    assert result["precision"].startswith("bf16") and result["peak_matmul"]["dtype"] == "bfloat16"
    rows = {r["name"]: r for r in result["train"]}
    for name in ("lightly", "lightly_bag", "ours/boc"):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["peak_mem_gib"] > 0 and 0 < rows[name]["mfu"] < 1
    assert rows["ours/boc"]["mem_per_image_ratio"] > 0
    assert result["views"]["gpu_views_only_samples_per_s"] > 0
