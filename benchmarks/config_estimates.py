"""How long the dataset configs take: one training step measured at tiny scale, then extrapolated.

    python -m benchmarks.config_estimates [configs/hpa.yaml ...] [--batch 2] [--steps 3] [--samples 100000]

For each config (default: ``configs/demo.yaml``, ``hpa.yaml``, ``wtc.yaml``,
``cellpainting.yaml``) it builds the config's own model and objective (same architecture,
crops, heads and losses), times full training steps (forward, backward, AdamW, teacher EMA) on
random views of a small batch on this CPU, and counts the step's FLOPs
(``torch.utils.flop_counter``). Data loading and augmentation are not included.

Everything past the measured step time is an **extrapolation**, labelled as such in the table
and the JSON:

- CPU: seconds per image × samples per epoch × ``train.epochs`` (assumes time grows linearly
  with the number of images, which holds once the batch fills the cores). Seconds per image
  are the step's CPU time (``time.process_time``) divided by the torch threads and the batch:
  what the step takes on cores it does not share. On a loaded machine wall time is longer
  (recorded as ``wall_seconds_per_image``, with the load average);
- GPU: FLOPs per image ÷ an *assumed* sustained throughput. The default assumptions are 40 %
  of the dense bf16 peak of an A100 (312 TFLOP/s) and of an H100 SXM (989 TFLOP/s); the real
  fraction depends on the model size, batch, data loading and ``train.compile``. Measure your
  own with ``python -m benchmarks.train_throughput`` on the GPU.

Writes a table and JSON (``--json``) with the machine, its load average and every assumption.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import count_flops, versions
from cellvit_ssl.channels import ChannelVocabulary
from cellvit_ssl.config import load_config
from cellvit_ssl.models.channels import build_model
from cellvit_ssl.ssl import DINOMetaArch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ("configs/demo.yaml", "configs/hpa.yaml", "configs/wtc.yaml", "configs/cellpainting.yaml")
#: Assumed sustained training throughput of a GPU: (name, dense bf16 peak TFLOP/s, assumed fraction of it).
GPU_ASSUMPTIONS = (("A100", 312.0, 0.4), ("H100 SXM", 989.0, 0.4))


def step_cost(config: str | Path, batch: int, steps: int) -> dict:
    """Median seconds and FLOPs of one training step of ``config``'s model on ``batch`` random images (CPU)."""
    cfg = load_config(ROOT / config if not Path(config).is_absolute() else config, ["train.device=cpu"])
    channels = list(cfg.data.channels)
    vocabulary = ChannelVocabulary.from_config(cfg.data)
    torch.manual_seed(0)
    meta = DINOMetaArch(build_model(cfg.model, channels, vocabulary=vocabulary, load_pretrained=False), cfg.ssl)
    meta.train()
    optimizer = torch.optim.AdamW([p for p in meta.parameters() if p.requires_grad], lr=1e-4)
    v = cfg.views
    views = [torch.rand(batch, len(channels), v.global_crop_size, v.global_crop_size) for _ in range(2)]
    views += [torch.rand(batch, len(channels), v.local_crop_size, v.local_crop_size) for _ in range(v.n_local_views)]
    ids = torch.tensor([vocabulary.ids(channels)] * batch)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        meta(views, ids, epoch=1)["loss"].backward()
        optimizer.step()
        meta.update_teacher(0.996)

    step()  # warm-up: allocations, first-call overheads
    seconds, cpu_seconds = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - start_cpu)
    flops = count_flops(step)
    params = sum(p.numel() for p in meta.student.backbone.parameters())
    return {"config": str(config), "variant": cfg.model.variant.value, "arch": cfg.model.arch,
            "channels": len(channels), "global_crop": v.global_crop_size, "local_crop": v.local_crop_size,
            "n_local_views": v.n_local_views, "epochs": cfg.train.epochs, "backbone_params_m": round(params / 1e6, 2),
            "batch": batch, "step_seconds": [round(s, 3) for s in seconds],
            "step_cpu_seconds": [round(s, 3) for s in cpu_seconds], "threads": torch.get_num_threads(),
            "wall_seconds_per_image": statistics.median(seconds) / batch,
            # CPU time used, spread over the threads: what the step takes when the cores are not shared
            "seconds_per_image": statistics.median(cpu_seconds) / torch.get_num_threads() / batch,
            "flops_per_image": flops / batch}


def extrapolate(cost: dict, samples: int) -> dict:
    """Hours per epoch and per run for ``samples`` images per epoch: CPU (measured rate) and GPUs (assumed)."""
    per_run = samples * cost["epochs"]
    out = {"samples_per_epoch": samples, "kind": "extrapolation",
           "cpu_hours_per_epoch": samples * cost["seconds_per_image"] / 3600,
           "cpu_hours_per_run": per_run * cost["seconds_per_image"] / 3600, "gpu": {}}
    for name, peak, fraction in GPU_ASSUMPTIONS:
        seconds = cost["flops_per_image"] / (peak * 1e12 * fraction)
        out["gpu"][name] = {"assumed_tflops": peak * fraction, "assumption": f"{fraction:.0%} of {peak:g} TFLOP/s bf16",
                            "hours_per_epoch": samples * seconds / 3600, "hours_per_run": per_run * seconds / 3600}
    return out


def _hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.0f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h / 24:.0f} d"


def markdown_table(rows: list[dict]) -> str:
    """The figures as a Markdown table (for docs/own_data.md); extrapolated columns are starred."""
    gpus = [n for n, _, _ in GPU_ASSUMPTIONS]
    lines = ["| config | model | GFLOP / image | CPU s / image (measured) | CPU / epoch* | "
             + " | ".join(f"{n} / epoch* | {n} / run*" for n in gpus) + " |",
             "|" + "---|" * (5 + 2 * len(gpus))]
    for r in rows:
        e = r["extrapolation"]
        gpu = " | ".join(f"{_hours(e['gpu'][n]['hours_per_epoch'])} | {_hours(e['gpu'][n]['hours_per_run'])}"
                         for n in gpus)
        lines.append(f"| `{Path(r['config']).name}` | {r['variant']}/{r['arch']}, {r['channels']} ch, "
                     f"{r['global_crop']}/{r['local_crop']} px, {r['epochs']} epochs | "
                     f"{r['flops_per_image'] / 1e9:.1f} | {r['seconds_per_image']:.2f} | "
                     f"{_hours(e['cpu_hours_per_epoch'])} | {gpu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--batch", type=int, default=2, help="images per measured step")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (median), after one warm-up step")
    parser.add_argument("--samples", type=int, default=100_000, help="samples (index rows) per epoch to extrapolate to")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    for config in args.configs:
        print(f"measuring {config} ...", file=sys.stderr, flush=True)
        cost = step_cost(config, args.batch, args.steps)
        rows.append({**cost, "extrapolation": extrapolate(cost, args.samples)})
    load_after = os.getloadavg()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "") if Path("/proc/cpuinfo").exists() else ""
    machine = {"cpu": cpu, "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after]}
    print(f"\nMeasured: one training step (batch {args.batch}, fp32, no data loading) on {machine['cpu']}, "
          f"{machine['torch_threads']} torch threads, load average {load_before[0]:.1f} -> {load_after[0]:.1f}.")
    print(f"EXTRAPOLATED to {args.samples:,} samples per epoch and each config's train.epochs; GPU columns ASSUME "
          + ", ".join(f"{n} at {f:.0%} of {p:g} TFLOP/s" for n, p, f in GPU_ASSUMPTIONS) + ".\n")
    head = ["config", "model", "GFLOP/img", "CPU s/img", "wall s/img", "CPU/epoch*", "CPU/run*"]
    head += [f"{n}/epoch*" for n, _, _ in GPU_ASSUMPTIONS] + [f"{n}/run*" for n, _, _ in GPU_ASSUMPTIONS]
    lines = [head]
    for r in rows:
        e = r["extrapolation"]
        lines.append([Path(r["config"]).name, f"{r['variant']}/{r['arch']} C={r['channels']} x{r['epochs']}ep",
                      f"{r['flops_per_image'] / 1e9:.1f}", f"{r['seconds_per_image']:.2f}",
                      f"{r['wall_seconds_per_image']:.2f}", _hours(e["cpu_hours_per_epoch"]),
                      _hours(e["cpu_hours_per_run"]),
                      *[_hours(e["gpu"][n]["hours_per_epoch"]) for n, _, _ in GPU_ASSUMPTIONS],
                      *[_hours(e["gpu"][n]["hours_per_run"]) for n, _, _ in GPU_ASSUMPTIONS]])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    for row in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print("* extrapolated, not measured")
    if args.json:
        import json

        from cellvit_ssl.io import atomic_write_text

        atomic_write_text(args.json, json.dumps({"what": "training step measured at tiny scale on CPU; every time "
                                                 "per epoch / run is an extrapolation", "machine": machine,
                                                 "versions": versions(), "batch": args.batch, "rows": rows},
                                                indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
