"""benchmarks/gpu_acceptance.sh: the tiny CPU run of every part, the verdicts, and the time limits."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_acceptance as ga

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("acceptance")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    # Generous limits: this checks that every part's code path runs, not how fast (a loaded CI
    # machine may be several times slower than the 2 minutes the tiny run takes on an idle one).
    proc = subprocess.run(["bash", "benchmarks/gpu_acceptance.sh", "--tiny", "--out", str(out), "--budget-scale", "5"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return proc, json.loads((out / "gpu_acceptance_tiny.json").read_text()), out


def test_tiny_run_completes_every_part_and_writes_the_report(tiny):
    proc, report, out = tiny
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {name: part["status"] for name, part in report["parts"].items()} == {p.name: "ok" for p in ga.PARTS}
    assert report["tiny"] and report["device"] == "cpu"
    assert (out / "gpu_acceptance_tiny.log").stat().st_size > 0
    # the summary table: every target, none judged on a CPU, each listed as not measured
    assert [t["target"] for t in report["targets"]] == [t.name for t in ga.TARGETS]
    assert all(t["verdict"] == "not measured (CPU run: code paths only)" for t in report["targets"])
    assert len(report["not_measured"]) == len(ga.TARGETS)
    assert "verdict" in proc.stdout and "not measured:" in proc.stdout


def test_tiny_parts_hold_their_figures_side_by_side_with_lightly(tiny):
    _, report, _ = tiny
    parts = {name: part["result"] for name, part in report["parts"].items()}
    for name in ("train_s16", "train_b16", "train_s16_compiled"):
        rows = {r["name"]: r for r in parts[name]["train"]}
        assert rows["lightly"]["status"] == rows["ours/fixed"]["status"] == "ok", name
        assert rows["ours/fixed"]["images_per_s_ratio"] > 0 and rows["ours/fixed"]["mfu"] is None  # no MFU on CPU
    assert parts["train_s16_compiled"]["args"]["compile"]
    views = parts["train_s16"]["views"]
    assert views["cpu_path_samples_per_s"] > 0 and views["feed_ratio_gpu"] > 0
    assert {r["variant"] for r in parts["model_cost"]["results"]} == {"boc", "hierarchical", "channelvit"}
    assert parts["hpa_run"]["steps"] == parts["hpa_run"]["steps_requested"] == 3
    assert parts["hpa_run"]["views"] == "batched on cpu" and parts["hpa_run"]["finite_loss"]
    assert parts["gpu_tests"]["skipped"] > 0 and parts["gpu_tests"]["passed"] == 0  # no CUDA: all skipped
    values = {t["target"]: t["value"] for t in report["targets"]}
    assert values["fixed ViT-S/16 img/s vs lightly, bf16 eager"] > 0
    assert values["hierarchical / boc time per image, 224 px, C=5"] > 0


def _parts(**results) -> dict:
    return {name: {"status": "ok", "result": result} for name, result in results.items()}


def test_verdicts_on_a_gpu_compare_each_figure_with_its_bound():
    fixed = {"name": "ours/fixed", "status": "ok", "images_per_s_ratio": 2.3, "mem_per_image_ratio": 0.8,
             "mfu": 0.61}
    cost = [{"variant": "hierarchical", "channels": 5, "img_size": 224, "time_vs_boc": 1.2},
            {"variant": "hierarchical", "channels": 5, "img_size": 448, "time_vs_channelvit": 0.7}]
    parts = _parts(train_s16={"train": [fixed], "views": {"feed_ratio_gpu": 2.5}}, train_b16={"train": [fixed]},
                   model_cost={"results": cost}, hpa_run={"steps": 200, "steps_requested": 200, "finite_loss": True},
                   gpu_tests={"tests": 9, "passed": 8, "failed": 1, "errors": 0, "skipped": 0, "failures": ["t"]})
    parts["train_s16_compiled"] = {"status": "timed out after 140 s", "result": None}
    rows, missing = ga.summarise(parts, cuda=True, tiny=False)
    verdicts = {r["target"]: r["verdict"] for r in rows}
    assert list(verdicts.values()) == ["PASS", "not measured (train_s16_compiled: timed out after 140 s)", "FAIL",
                                       "PASS", "PASS", "FAIL", "PASS", "PASS", "FAIL"]
    assert missing == ["fixed ViT-S/16 img/s vs lightly, compiled: not measured (train_s16_compiled: timed out "
                       "after 140 s)"]


def test_a_part_past_its_limit_is_stopped_with_its_children(tmp_path):
    log = io.StringIO()
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(child.pid)); print('started', flush=True); time.sleep(60)")
    start = time.perf_counter()
    status, seconds = ga.run_part([sys.executable, "-c", code], 3, log, dict(os.environ))
    assert status == "timed out after 3 s" and seconds < 20 and time.perf_counter() - start < 20
    assert "started" in log.getvalue()
    stat = Path(f"/proc/{pid_file.read_text()}/stat")
    time.sleep(0.5)
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] in "ZX", "the part's child was stopped too"
    status, _ = ga.run_part([sys.executable, "-c", "raise SystemExit(3)"], 30, io.StringIO(), dict(os.environ))
    assert status == "failed (exit status 3)"
