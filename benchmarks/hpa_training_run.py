"""Training throughput of an HPA-sized run on synthetic HPA-like data.

Runs ``configs/hpa.yaml`` (ViT-S/16 bag of channels, 2 x 224 + 6 x 96 crops, batch 64 per
process) through the trainer on generated demo data for a few hundred steps and prints
images/s and peak GPU memory; writes the figures as JSON. Single GPU:

    python benchmarks/hpa_training_run.py --steps 300 --out /tmp/bench --json hpa.json

Several GPUs: ``torchrun --standalone --nproc_per_node 8 benchmarks/hpa_training_run.py``.
Extra ``key=value`` arguments override the config (e.g. ``train.strategy=fsdp``,
``views.device=workers``). ``--tiny`` runs the same trainer on a tiny model and tiny crops on
the CPU, with the views made batched on the CPU (``views.device=device``), in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cellvit_ssl import distributed as D  # noqa: E402
from cellvit_ssl.config import load_config  # noqa: E402
from cellvit_ssl.train import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "train.device=cpu", "data.num_workers=0", "data.batch_size=4", "data.sample_size=48", "data.demo.n_images=4",
    "data.demo.image_size=128", "views.global_crop_size=32", "views.local_crop_size=16", "views.n_local_views=2",
    "views.device=device", "model.arch=custom", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "model.patch_size=8", "model.img_size=32", "ssl.head_hidden_dim=64", "ssl.head_bottleneck_dim=16",
    "ssl.head_output_dim=128",
]


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="/tmp/cellvit_ssl_bench", help="folder of the demo data and the run")
    parser.add_argument("--json", help="write the figures here (default: OUT/train_throughput.json)")
    parser.add_argument("--tiny", action="store_true", help="tiny model and crops on the CPU (seconds)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    out = Path(args.out)
    cfg = load_config(ROOT / "configs" / "hpa.yaml", [
        "data.demo.enabled=true", f"data.demo.cache_dir={out / 'demo'}", "data.demo.n_images=64",
        "data.demo.image_size=512", f"train.output_dir={out / 'run'}", f"train.max_steps={args.steps}",
        "train.resume=none", "train.log_every=10", "train.checkpoint_every=0", "train.warmup_epochs=0",
        "train.epochs=1000", "train.progress=false", "train.tensorboard=false", *(TINY if args.tiny else []),
        *args.overrides,
    ])
    info = D.init_distributed(cfg.train.device, cfg.train.dist_backend)
    start = time.perf_counter()
    try:
        trainer = Trainer(cfg, info)
        trainer.fit()
    finally:
        D.cleanup()
    if not info.is_main:
        return None
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = [r["images_per_s"] for r in records[len(records) // 3 :] if "images_per_s" in r]
    result = {
        "benchmark": "hpa_training_run",
        "device": info.device.type, "processes": info.world_size, "steps": trainer.step, "steps_requested": args.steps,
        "global_batch": trainer.global_batch, "precision": "bf16" if trainer.bf16 else "fp32",
        "strategy": cfg.train.strategy, "variant": cfg.model.variant, "arch": cfg.model.arch,
        "views": f"batched on {info.device.type}" if trainer.view_maker.on_device else "loader workers",
        "images_per_s": sum(steady) / max(len(steady), 1),
        "max_memory_gib": max((r.get("max_memory_gib", 0.0) for r in records), default=0.0),
        "final_loss": records[-1]["loss"],
        "finite_loss": all(math.isfinite(r["loss"]) for r in records),
        "wall_s": time.perf_counter() - start,
        "overrides": list(args.overrides),
    }
    print("| " + " | ".join(result) + " |")
    print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in result.values()) + " |")
    path = Path(args.json) if args.json else out / "train_throughput.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
