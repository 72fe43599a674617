"""Every GPU acceptance figure of issue 18 in one run, side by side with lightly.

    bash benchmarks/gpu_acceptance.sh              # one H100 / H200: under 8 minutes
    bash benchmarks/gpu_acceptance.sh --tiny       # the same code paths on the CPU: under 2 minutes

Each part is a subprocess with its own time budget (unused time passes on to the later parts),
so a slow or hanging part cannot eat the others' time; it is stopped at its limit and reported
as timed out. The parts, in order:

- ``gpu_tests``: the ``gpu``-marked tests (on a CPU they are all skipped: not measured);
- ``model_cost``: forward + backward time per image of boc, hierarchical and channelvit,
  ViT-S/16, C = 5, 224 and 448 px (``benchmarks/model_cost.py``);
- ``train_s16``: our ``fixed`` ViT-S/16 DINO step against lightly's stock DINO recipe, bf16
  eager, with peak memory per image; and the input pipeline: views per second delivered by
  CPU workers and by device views, against the step's consumption (``benchmarks/train_throughput.py``);
- ``train_b16``: the same for ViT-B/16, for the MFU against a bf16 matmul measured in that run;
- ``hpa_run``: 200 steps of ``configs/hpa.yaml`` through the trainer on generated data, views
  on the device (``benchmarks/hpa_training_run.py``);
- ``train_s16_compiled``: ``train_s16`` with ``torch.compile`` on both sides (last: its compile
  time is the least predictable).

Writes ``OUT/gpu_acceptance.json`` (every part's figures, the targets and what was not
measured) and ``OUT/gpu_acceptance.log`` (the parts' output), ``_tiny`` in the names with
``--tiny``; prints a summary table with PASS / FAIL per target. On a CPU, and for parts that
failed or timed out, the targets are listed as not measured. The exit status is 0 when every
part ran to completion, 1 otherwise (a FAIL against a target is a finding, not an error).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass(frozen=True)
class Part:
    """One subprocess of the run: its command (for the GPU and for ``--tiny``) and time budgets."""

    name: str
    budget_s: float  # on the GPU
    tiny_budget_s: float  # with --tiny on the CPU
    command: Callable[[Path, bool], list[str]]  # (JSON path, tiny) -> argv


def _gpu_test_files(tiny: bool) -> list[str]:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text())
    # On a CPU every gpu test is skipped: one file shows the part's path without collecting them all.
    return ["tests/test_gpu_views.py"] if tiny else files


def _tests(json_path: Path, tiny: bool) -> list[str]:
    return [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-W", "ignore",
            "--continue-on-collection-errors", "--junitxml", str(json_path.with_suffix(".xml")),
            *_gpu_test_files(tiny)]


def _model_cost(json_path: Path, tiny: bool) -> list[str]:
    sizes = (["--device", "cpu", "--sizes", "tiny", "--img-size", "32", "64", "--batch", "2", "--repeats", "2"]
             if tiny else ["--device", "cuda", "--sizes", "vit_s16", "--img-size", "224", "448", "--batch", "32",
                           "--repeats", "5"])
    return [PY, "benchmarks/model_cost.py", "--channels", "5", *sizes, "--json", str(json_path)]


def _train(arch: str, mode: str, compile_: bool) -> Callable[[Path, bool], list[str]]:
    def command(json_path: Path, tiny: bool) -> list[str]:
        argv = [PY, "-m", "benchmarks.train_throughput", "--variants", "fixed", "--channels", "3", "--mode", mode,
                "--json", str(json_path)]
        if tiny:
            argv += ["--tiny"] + (["--compile", "--compile-backend", "eager"] if compile_ else [])
        else:
            argv += ["--device", "cuda", "--arch", arch, "--batch", "128", "--steps", "10", "--warmup", "3",
                     "--workers", str(min(16, os.cpu_count() or 1)), "--views-batch", "128", "--views-batches", "8"]
            argv += ["--compile"] if compile_ else []
        return argv

    return command


def _hpa(json_path: Path, tiny: bool) -> list[str]:
    run_dir = json_path.parent / "hpa_run_files"
    steps = ["--steps", "3", "--tiny"] if tiny else ["--steps", "200"]
    # OME-TIFF demo data: the GPU machine's image has tifffile but not ome-zarr.
    return [PY, "benchmarks/hpa_training_run.py", *steps, "--out", str(run_dir), "--json", str(json_path),
            "data.demo.format=ome-tiff"]


PARTS = (  # GPU budgets sum to 450 s (7.5 minutes); the tiny ones to 110 s
    Part("gpu_tests", 60, 30, _tests),
    Part("model_cost", 45, 15, _model_cost),
    Part("train_s16", 65, 20, _train("vit_small", "both", False)),
    Part("train_b16", 60, 10, _train("vit_base", "train", False)),
    Part("hpa_run", 90, 20, _hpa),
    Part("train_s16_compiled", 130, 15, _train("vit_small", "train", True)),
)


@dataclass(frozen=True)
class Target:
    """A figure of the issue, where it is read from, and the bound it must meet."""

    name: str
    part: str
    bound: str  # e.g. ">= 2.0"
    read: Callable[[dict], float | None]
    note: str = ""


def _row(result: dict, name: str) -> dict:
    return next((r for r in result.get("train") or [] if r["name"] == name and r.get("status") == "ok"), {})


def _cost(result: dict, variant: str, size: int, key: str) -> float | None:
    """``key`` of ``variant`` at C = 5 and the ``size``-th crop size of the run (0: 224 px, 1: 448 px on the GPU)."""
    rows = [r for r in result.get("results", []) if r["variant"] == variant and r["channels"] == 5]
    sizes = sorted({r["img_size"] for r in rows})
    row = next((r for r in rows if len(sizes) > size and r["img_size"] == sizes[size]), {})
    return row.get(key)


def _tests_ok(result: dict) -> float | None:
    if not result.get("tests") or result["passed"] + result["failed"] + result["errors"] == 0:
        return None  # nothing ran (every test skipped: no CUDA)
    return 1.0 if result["failed"] == 0 and result["errors"] == 0 and result["passed"] > 0 else 0.0


TARGETS = (
    Target("fixed ViT-S/16 img/s vs lightly, bf16 eager", "train_s16", ">= 2.0",
           lambda r: _row(r, "ours/fixed").get("images_per_s_ratio")),
    Target("fixed ViT-S/16 img/s vs lightly, compiled", "train_s16_compiled", ">= 1.4",
           lambda r: _row(r, "ours/fixed").get("images_per_s_ratio")),
    Target("fixed ViT-S/16 peak memory per image vs lightly", "train_s16", "<= 0.7",
           lambda r: _row(r, "ours/fixed").get("mem_per_image_ratio")),
    Target("fixed ViT-B/16 MFU (bf16 matmul of the same run)", "train_b16", ">= 0.55",
           lambda r: _row(r, "ours/fixed").get("mfu"), "eager; lightly's MFU beside it in the part's JSON"),
    Target("hierarchical / boc time per image, 224 px, C=5", "model_cost", "<= 1.35",
           lambda r: _cost(r, "hierarchical", 0, "time_vs_boc")),
    Target("hierarchical / channelvit time per image, 448 px, C=5", "model_cost", "<= 0.65",
           lambda r: _cost(r, "hierarchical", 1, "time_vs_channelvit")),
    Target("device views delivered / step consumption (ViT-S/16 fixed)", "train_s16", ">= 2.0",
           lambda r: (r.get("views") or {}).get("feed_ratio_gpu"), "CPU workers' ratio beside it in the JSON"),
    Target("HPA run: every step done (200), finite loss", "hpa_run", ">= 1",
           lambda r: float(r["steps"] == r["steps_requested"] and r["finite_loss"])),
    Target("gpu-marked tests pass", "gpu_tests", ">= 1", _tests_ok),
)


def _meets(value: float, bound: str) -> bool:
    op, limit = bound.split()
    return value >= float(limit) if op == ">=" else value <= float(limit)


# ----- running the parts ---------------------------------------------------------------------


def run_part(argv: list[str], timeout_s: float, log, env: dict) -> tuple[str, float]:
    """Run ``argv`` in its own process group, copy its output to stdout and ``log``; stop it at ``timeout_s``."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        sys.stdout.flush()
        log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(timeout_s, 1.0))
        status = "ok" if rc == 0 else f"failed (exit status {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the part and the processes it started (loader workers)
        proc.wait()
        status = f"timed out after {timeout_s:.0f} s"
    reader.join(timeout=5)
    return status, time.perf_counter() - start


def read_tests(xml_path: Path) -> dict:
    """Counts of a pytest JUnit XML report, and the failing tests' names."""
    if not xml_path.is_file():
        return {}
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    out = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for suite in suites:
        for key, attr in (("tests", "tests"), ("failed", "failures"), ("errors", "errors"), ("skipped", "skipped")):
            out[key] += int(suite.get(attr, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                out["failures"].append(f"{case.get('classname')}::{case.get('name')}")
    out["passed"] = out["tests"] - out["failed"] - out["errors"] - out["skipped"]
    return out


def summarise(parts: dict, cuda: bool, tiny: bool) -> tuple[list[dict], list[str]]:
    """Targets with their values and PASS / FAIL, and the list of what was not measured."""
    rows, missing = [], []
    for t in TARGETS:
        part = parts.get(t.part, {})
        value = None
        if part.get("status") == "ok":
            try:
                value = t.read(part.get("result") or {})
            except (KeyError, TypeError, ValueError):
                value = None
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
            value = None
        if not cuda or tiny:
            verdict = "not measured (CPU run: code paths only)"
        elif part.get("status") != "ok":
            verdict = f"not measured ({t.part}: {part.get('status', 'not run')})"
        elif value is None:
            verdict = "not measured (no figure)"
        else:
            verdict = "PASS" if _meets(value, t.bound) else "FAIL"
        if not verdict.startswith(("PASS", "FAIL")):
            missing.append(f"{t.name}: {verdict}")
        rows.append({"target": t.name, "bound": t.bound, "value": value, "part": t.part, "verdict": verdict,
                     "note": t.note})
    return rows, missing


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the same code paths on the CPU, tiny sizes")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder of the JSON and log")
    parser.add_argument("--parts", nargs="+", choices=[p.name for p in PARTS], help="run only these parts")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    args = parser.parse_args(argv)

    import torch  # after the argument check: --help stays quick

    cuda = torch.cuda.is_available() and not args.tiny
    stem = "gpu_acceptance_tiny" if args.tiny else "gpu_acceptance"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [p for p in PARTS if not args.parts or p.name in args.parts]
    budgets = [(p.tiny_budget_s if args.tiny else p.budget_s) * args.budget_scale for p in chosen]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",  # no Qt / napari plugins
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.tiny:
        env.setdefault("OMP_NUM_THREADS", "1")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"gpu_acceptance{' --tiny' if args.tiny else ''}: {device}, torch {torch.__version__}, "
          f"{len(chosen)} parts, budget {sum(budgets):.0f} s", flush=True)

    parts: dict[str, dict] = {}
    deadline = time.perf_counter() + sum(budgets)
    with tempfile.TemporaryDirectory(prefix="gpu_acceptance_") as work, open(out / f"{stem}.log", "w") as log:
        for i, part in enumerate(chosen):
            # Unused time of earlier parts passes on; later parts keep their own budgets.
            limit = deadline - time.perf_counter() - sum(budgets[i + 1 :])
            json_path = Path(work) / f"{part.name}.json"
            argv_ = part.command(json_path, args.tiny)
            banner = f"\n===== {part.name} (limit {limit:.0f} s): {' '.join(argv_[1:])}\n"
            print(banner, end="", flush=True)
            log.write(banner)
            status, seconds = run_part(argv_, limit, log, env)
            result = read_tests(json_path.with_suffix(".xml")) if part.name == "gpu_tests" else (
                json.loads(json_path.read_text()) if json_path.is_file() else None)
            if part.name == "gpu_tests" and status.startswith("failed") and result and result["failed"] + result[
                    "errors"] > 0:
                status = "ok"  # the run completed; the failures are the figure (reported as FAIL)
            parts[part.name] = {"status": status, "seconds": round(seconds, 1), "limit_s": round(limit, 1),
                                "command": argv_[1:], "result": result}
            print(f"===== {part.name}: {status} in {seconds:.0f} s", flush=True)

    targets, missing = summarise(parts, cuda, args.tiny)
    for name in (p.name for p in PARTS if p not in chosen):
        missing.append(f"part {name}: not run (--parts)")
    if "gpu_tests" in parts and (parts["gpu_tests"]["result"] or {}).get("failures"):
        missing.append("failing gpu tests: " + ", ".join(parts["gpu_tests"]["result"]["failures"]))

    width = max(len(t["target"]) for t in targets)
    lines = [f"{'target':<{width}}  {'bound':>7}  {'value':>8}  verdict", "-" * (width + 40)]
    lines += [f"{t['target']:<{width}}  {t['bound']:>7}  {_fmt(t['value']):>8}  {t['verdict']}" for t in targets]
    lines += ["", "parts: " + ", ".join(f"{k} {v['status']} ({v['seconds']:.0f} s)" for k, v in parts.items())]
    if missing:
        lines += ["not measured:"] + [f"  - {m}" for m in missing]
    print("\n" + "\n".join(lines))
    report = {"benchmark": "gpu_acceptance", "tiny": args.tiny, "device": device, "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "targets": targets, "not_measured": missing, "parts": parts}
    path = out / f"{stem}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(path)
    print(f"wrote {path} and {out / f'{stem}.log'}")
    return 0 if all(v["status"] == "ok" for v in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
