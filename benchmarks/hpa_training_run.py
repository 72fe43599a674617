"""Training throughput of an HPA-sized run on synthetic HPA-like data.

Runs ``configs/hpa.yaml`` (ViT-S/16 bag of channels, 2 x 224 + 6 x 96 crops, batch 64 per
process) on generated demo data for a few hundred steps and prints images/s and peak GPU
memory; writes the figures as JSON. Single GPU:

    python benchmarks/hpa_training_run.py --steps 300 --out /tmp/bench

Several GPUs: ``torchrun --standalone --nproc_per_node 8 benchmarks/hpa_training_run.py``.
Extra ``key=value`` arguments override the config (e.g. ``train.strategy=fsdp``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cellvit_ssl import distributed as D
from cellvit_ssl.config import load_config
from cellvit_ssl.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="/tmp/cellvit_ssl_bench")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    cfg = load_config("configs/hpa.yaml", [
        "data.demo.enabled=true", f"data.demo.cache_dir={out / 'demo'}", "data.demo.n_images=64",
        "data.demo.image_size=512", f"train.output_dir={out / 'run'}", f"train.max_steps={args.steps}",
        "train.resume=none", "train.log_every=10", "train.checkpoint_every=0", "train.warmup_epochs=0",
        "train.epochs=1000", *args.overrides,
    ])
    info = D.init_distributed(cfg.train.device, cfg.train.dist_backend)
    try:
        trainer = Trainer(cfg, info)
        trainer.fit()
    finally:
        D.cleanup()
    if not info.is_main:
        return
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = [r["images_per_s"] for r in records[len(records) // 3 :] if "images_per_s" in r]
    result = {
        "device": info.device.type, "processes": info.world_size, "steps": trainer.step,
        "global_batch": trainer.global_batch, "precision": "bf16" if trainer.bf16 else "fp32",
        "strategy": cfg.train.strategy,
        "images_per_s": sum(steady) / max(len(steady), 1),
        "max_memory_gib": max((r.get("max_memory_gib", 0.0) for r in records), default=0.0),
        "final_loss": records[-1]["loss"],
    }
    print("| " + " | ".join(result) + " |")
    print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in result.values()) + " |")
    (out / "train_throughput.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
