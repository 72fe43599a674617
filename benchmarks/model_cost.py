"""Forward+backward cost of the channel-adaptive variants: ms per image and memory.

    PYTHONPATH=. python benchmarks/model_cost.py                # GPU: ViT-S/16, 224 and 448 px, bf16
    PYTHONPATH=. python benchmarks/model_cost.py --device cpu   # CPU: a tiny ViT on small crops, fp32
    PYTHONPATH=. python benchmarks/model_cost.py --device cpu --sizes vit_s16 --channels 5 --batch 1  # CPU, real size

Prints a table and writes JSON (``--json``). Memory is the CUDA peak allocated during the
step on GPU; on CPU (no allocator statistics) it is the activation memory saved for the
backward pass, counted once per storage with autograd saved-tensor hooks (reported on GPU too).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cellvit_ssl.channels import VOCABULARY
from cellvit_ssl.config import ModelConfig
from cellvit_ssl.models import build_model

VARIANTS = ("boc", "hierarchical", "channelvit")
TINY = dict(arch="custom", embed_dim=96, depth=4, num_heads=3, patch_size=8)
VIT_S16 = dict(arch="vit_small", patch_size=16)


def saved_bytes(step, model: torch.nn.Module) -> int:
    """Bytes of distinct non-parameter storages autograd keeps for backward during ``step``'s forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step(backward=False)
    loss.backward()
    return sum(seen.values())


def make_step(variant: str, c: int, img: int, batch: int, sizes: dict, device: torch.device):
    """A model of ``variant`` and a closure running one forward(+backward) step on random data."""
    cfg = OmegaConf.structured(ModelConfig(variant=variant, img_size=img, **sizes))
    model = build_model(cfg, list(VOCABULARY[:c])).to(device).train()
    x = torch.randn(batch, c, img, img, device=device)
    ids = torch.arange(c, device=device).expand(batch, -1)
    use_bf16 = device.type == "cuda"

    def step(backward: bool = True):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model.forward_features(x, ids)
            loss = out["x_norm_clstoken"].float().square().mean() + out["x_norm_patchtokens"].float().square().mean()
        if backward:
            loss.backward()
            model.zero_grad(set_to_none=True)
        return loss

    return model, step


def measure_group(c: int, img: int, batch: int, sizes: dict, device: torch.device, repeats: int) -> list[dict]:
    """Time the variants round-robin on the same input shape, so load changes hit them alike."""
    gpu = device.type == "cuda"

    def sync():
        if gpu:
            torch.cuda.synchronize()

    steps = {v: make_step(v, c, img, batch, sizes, device) for v in VARIANTS}
    peaks, acts, times = {}, {}, {v: [] for v in VARIANTS}
    for variant, (model, step) in steps.items():
        for _ in range(2):
            step()
        sync()
        if gpu:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            sync()
            peaks[variant] = torch.cuda.max_memory_allocated() - base
        acts[variant] = saved_bytes(step, model)
        model.zero_grad(set_to_none=True)
    for _ in range(repeats):
        for variant, (_, step) in steps.items():
            t0 = time.perf_counter()
            step()
            sync()
            times[variant].append(time.perf_counter() - t0)
    return [
        {
            "variant": v, "channels": c, "img_size": img, "batch": batch,
            "ms_per_image": round(statistics.median(times[v]) * 1000 / batch, 3),
            "peak_mem_MiB": round(peaks[v] / 2**20, 1) if gpu else None,
            "saved_activations_MiB": round(acts[v] / 2**20, 2),
            "tokens_per_channel": (img // sizes["patch_size"]) ** 2,
        }
        for v in VARIANTS
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--channels", type=int, nargs="+", default=[3, 4, 5, 8])
    parser.add_argument("--sizes", choices=("tiny", "vit_s16"),
                        help="model size (default: vit_s16 on GPU, tiny on CPU; vit_s16 on CPU is slow but real)")
    parser.add_argument("--img-size", type=int, nargs="+", help="default: 224 448 for vit_s16, 32 64 for tiny")
    parser.add_argument("--batch", type=int, help="images per step (default: 32 on GPU, 4 on CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="model_cost.json", help="where to write the results")
    args = parser.parse_args(argv)
    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = torch.device("cpu" if name == "auto" else name)
    gpu = device.type == "cuda"
    big = args.sizes == "vit_s16" if args.sizes else gpu
    sizes = VIT_S16 if big else TINY
    imgs = args.img_size or ([224, 448] if big else [32, 64])
    batch = args.batch or (32 if gpu else 4)
    rows = []
    for img in imgs:
        for c in args.channels:
            rows.extend(measure_group(c, img, batch, sizes, device, args.repeats))
            if gpu:
                torch.cuda.empty_cache()
    by = {(r["variant"], r["channels"], r["img_size"]): r for r in rows}
    header = (f"{'img':>4} {'C':>2} {'variant':<13}{'ms/img':>9}{'peak MiB':>10}{'saved MiB':>10}"
              f"{'/boc':>7}{'HA/cvit':>9}")
    print(f"device: {torch.cuda.get_device_name() if gpu else platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, sizes {sizes}, batch {batch}, "
          f"{'bf16 autocast' if gpu else 'fp32'}")
    print(header)
    for r in rows:
        key = (r["channels"], r["img_size"])
        rel = r["ms_per_image"] / by[("boc",) + key]["ms_per_image"]
        r["time_vs_boc"] = round(rel, 3)
        if r["variant"] == "hierarchical":
            r["time_vs_channelvit"] = round(r["ms_per_image"] / by[("channelvit",) + key]["ms_per_image"], 3)
        peak = "-" if r["peak_mem_MiB"] is None else f"{r['peak_mem_MiB']:.1f}"
        ha = f"{r['time_vs_channelvit']:.2f}" if "time_vs_channelvit" in r else ""
        print(f"{r['img_size']:>4} {r['channels']:>2} {r['variant']:<13}{r['ms_per_image']:>9.2f}{peak:>10}"
              f"{r['saved_activations_MiB']:>10.2f}{rel:>7.2f}{ha:>9}")
    meta = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "sizes": sizes, "batch": batch, "dtype": "bf16 autocast" if gpu else "fp32"}
    Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
