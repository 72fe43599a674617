"""Training throughput: our DINO step against lightly's stock DINO recipe, side by side.

One run measures, on random data already on the device, for every channel count asked for:

- ``lightly``: lightly's stock recipe on a timm ``VisionTransformer`` with ``in_chans = C``
  (``DINOProjectionHead`` + ``DINOLoss``, teacher = deep-copied backbone + a freshly built head,
  multi-crop 2 × global + N × local, one forward per crop, ``update_momentum``);
- ``lightly_bag``: the same recipe on the bag of 1-channel images (batch B·C), the reference
  for the channel-adaptive variants that see every channel separately;
- ``ours/<variant>``: :func:`cellvit_ssl.models.build_model` + :class:`cellvit_ssl.ssl.DINOMetaArch`
  for every variant (a variant that cannot be built yet is reported as unavailable).

Per entry: images/s (multichannel images), step time, peak memory, FLOPs per step
(``torch.utils.flop_counter``), on CUDA the MFU against a bf16 square matmul measured in the
same run (on CPU no MFU is given: a small fp32 matmul is no peak to divide by), and ratios to
the matching lightly reference. On CUDA the steps run under bf16 autocast with fused AdamW;
``--compile`` compiles the backbones.

``--mode views`` (or ``both``) also measures the view pipeline with the full ``views`` config
of our step (every op on): samples/s delivered to the device by DataLoader workers running the
CPU transform, against normalised tiles moved once and cut by
:class:`cellvit_ssl.gpu_views.GPUMultiCrop` on the device (what ``views.device=device`` does).

Examples:
    python -m benchmarks.train_throughput --tiny --json /tmp/tiny.json
    python -m benchmarks.train_throughput --arch vit_small --batch 256 --channels 3 --json s16.json
    python -m benchmarks.train_throughput --arch vit_base --batch 128 --channels 3 4 5 --compile
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import update_momentum
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (  # noqa: E402
    count_flops,
    device_info,
    format_table,
    free_memory,
    matmul_peak_flops,
    peak_memory_gib,
    resolve_device,
    synchronize,
    time_per_call,
    versions,
    write_json,
)
from cellvit_ssl.channels import VOCABULARY, channel_ids
from cellvit_ssl.config import Variant, load_config
from cellvit_ssl.gpu_views import GPUMultiCrop
from cellvit_ssl.models import build_model
from cellvit_ssl.ssl import DINOMetaArch
from cellvit_ssl.transforms import MultichannelDINOTransform

#: (embed_dim, depth, num_heads, patch_size) per ``--arch``.
ARCHS = {
    "vit_small": (384, 12, 6, 16),
    "vit_base": (768, 12, 12, 16),
    "tiny": (64, 2, 2, 8),
}
MOMENTUM = 0.996
EPOCH = 1  # past the head's frozen first epoch, so the last layer is trained as in steady state

TINY = dict(arch="tiny", batch=4, channels=[3], global_size=32, local_size=16, n_local=2, steps=2, warmup=1,
            head_dim=256, head_hidden=64, head_bottleneck=16, device="cpu", tile_size=48, workers=0,
            views_batch=8, views_batches=2, matmul_size=256)


# ----- the two steps -------------------------------------------------------------------------


class LightlyDINO(nn.Module):
    """lightly's stock DINO recipe on a timm ViT (teacher sees the global views only)."""

    def __init__(self, arch: str, in_chans: int, global_size: int, head_dims: tuple[int, int, int]) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        dim, depth, heads, patch = ARCHS[arch]
        self.student_backbone = VisionTransformer(
            img_size=global_size, patch_size=patch, in_chans=in_chans, num_classes=0, embed_dim=dim,
            depth=depth, num_heads=heads, dynamic_img_size=True,
        )
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        hidden, bottleneck, out = head_dims
        self.student_head = DINOProjectionHead(dim, hidden, bottleneck, out, freeze_last_layer=1)
        # DINOProjectionHead uses weight norm and cannot be deep-copied: build a new one, copy weights.
        self.teacher_head = DINOProjectionHead(dim, hidden, bottleneck, out)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        for p in list(self.teacher_backbone.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.criterion = DINOLoss(output_dim=out, warmup_teacher_temp_epochs=5)

    def loss(self, views: list[Tensor]) -> Tensor:
        with torch.no_grad():
            teacher = [self.teacher_head(self.teacher_backbone(v)) for v in views[:2]]
        student = [self.student_head(self.student_backbone(v)) for v in views]
        return self.criterion(teacher, student, epoch=EPOCH)

    def update_teacher(self, m: float) -> None:
        update_momentum(self.student_backbone, self.teacher_backbone, m)
        update_momentum(self.student_head, self.teacher_head, m)

    def compile_backbones(self, backend: str = "inductor") -> None:
        self.student_backbone.compile(backend=backend)
        self.teacher_backbone.compile(backend=backend)


def ours_config(args: argparse.Namespace, variant: str, channels: int):
    """The run config our step is built from (CLI sizes + ``--override`` dotlist)."""
    dim, depth, heads, patch = ARCHS[args.arch]
    return load_config(None, [
        f"model.variant={variant}", "model.arch=custom", f"model.embed_dim={dim}", f"model.depth={depth}",
        f"model.num_heads={heads}", f"model.patch_size={patch}", f"model.img_size={args.global_size}",
        f"views.global_crop_size={args.global_size}", f"views.local_crop_size={args.local_size}",
        f"views.n_local_views={args.n_local}", f"ssl.head_output_dim={args.head_dim}",
        f"ssl.head_hidden_dim={args.head_hidden}", f"ssl.head_bottleneck_dim={args.head_bottleneck}",
        f"data.channels=[{','.join(VOCABULARY[:channels])}]", f"data.batch_size={args.batch}",
        *args.override,
    ])


class OursDINO(nn.Module):
    """Our training step's model: a channel-adaptive backbone in :class:`DINOMetaArch`."""

    def __init__(self, cfg, channels: int, batch: int, device: torch.device) -> None:
        super().__init__()
        names = list(cfg.data.channels)
        self.meta = DINOMetaArch(build_model(cfg.model, names), cfg.ssl)
        ids = torch.tensor(channel_ids(names), device=device)
        self.register_buffer("channel_ids", ids.expand(batch, channels).contiguous(), persistent=False)
        self.clip_grad = float(cfg.train.clip_grad)

    def loss(self, views: list[Tensor]) -> Tensor:
        return self.meta(views, self.channel_ids, epoch=EPOCH)["loss"]

    def update_teacher(self, m: float) -> None:
        self.meta.update_teacher(m)

    def compile_backbones(self, backend: str = "inductor") -> None:
        for net in self.meta.backbones():
            net.forward_features = torch.compile(net.forward_features, dynamic=False, backend=backend)


def make_step(model: nn.Module, views: list[Tensor], device: torch.device) -> tuple[Callable, Callable]:
    """``(step, loss_only)``: one optimiser step (loss, backward, clip, head freeze, AdamW, EMA), and
    forward + backward alone (what FLOPs are counted on). Neither reads anything back to the host."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04, fused=device.type == "cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    clip = getattr(model, "clip_grad", 0.0)
    head = model.meta if isinstance(model, OursDINO) else model.student_head  # both cancel last-layer grads
    last = {}

    def forward_backward() -> Tensor:
        with autocast():
            loss = model.loss(views)
        loss.backward()
        return loss

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = forward_backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        head.cancel_last_layer_gradients(EPOCH)
        opt.step()
        model.update_teacher(MOMENTUM)
        last["loss"] = loss.detach()

    step.last = last  # type: ignore[attr-defined]
    return step, forward_backward


# ----- measuring -----------------------------------------------------------------------------


def random_views(batch: int, channels: int, args: argparse.Namespace, device: torch.device) -> list[Tensor]:
    sizes = [args.global_size] * 2 + [args.local_size] * args.n_local
    return [torch.randn(batch, channels, s, s, device=device) for s in sizes]


def measure(name: str, build: Callable[[], nn.Module], views: list[Tensor], images: int, samples: int,
            args: argparse.Namespace, device: torch.device, peak_flops: float | None) -> dict:
    """Build, count FLOPs, optionally compile, warm up and time one entry; never raises."""
    row: dict = {"name": name, "batch_images": images, "samples_per_step": samples}
    free_memory(device)
    try:
        model = build().to(device)
    except Exception as exc:  # a variant not implemented yet, or not buildable at these sizes
        row["status"] = f"unavailable: {type(exc).__name__}: {exc}"
        return row
    try:
        step, forward_backward = make_step(model, views, device)
        row["flops_per_step"] = count_flops(forward_backward)
        model.zero_grad(set_to_none=True)
        if args.compile:
            model.compile_backbones(args.compile_backend)
        for _ in range(args.warmup):
            step()
        seconds = time_per_call(step, args.steps, device)
        loss = float(step.last["loss"])  # the only read-back, after the clock stopped
    except Exception as exc:  # out of memory, a variant failing at this size, ...
        row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        del model
        free_memory(device)
        return row
    peak = peak_memory_gib(device)
    row.update(
        status="ok" if math.isfinite(loss) else "non-finite loss",
        loss=loss,
        step_ms=seconds * 1e3,
        images_per_s=images / seconds,
        samples_per_s=samples / seconds,
        peak_mem_gib=peak,
        mem_per_image_mib=None if peak is None else peak * 1024 / images,
        tflops_per_step=row["flops_per_step"] / 1e12,
        mfu=None if peak_flops is None else row["flops_per_step"] / seconds / peak_flops,
    )
    del model, step, forward_backward
    free_memory(device)
    return row


def train_rows(args: argparse.Namespace, device: torch.device, peak_flops: float | None) -> list[dict]:
    rows = []
    head_dims = (args.head_hidden, args.head_bottleneck, args.head_dim)
    for c in args.channels:
        views = random_views(args.batch, c, args, device)
        bag = [v.reshape(-1, 1, *v.shape[-2:]) for v in views]
        entries = [
            ("lightly", lambda c=c: LightlyDINO(args.arch, c, args.global_size, head_dims), views, args.batch),
            ("lightly_bag", lambda: LightlyDINO(args.arch, 1, args.global_size, head_dims), bag, args.batch * c),
        ]
        for variant in args.variants:
            entries.append((f"ours/{variant}",
                            lambda v=variant, c=c: OursDINO(ours_config(args, v, c), c, args.batch, device),
                            views, args.batch * (c if variant == "boc" else 1)))
        group = []
        for name, build, v, samples in entries:
            row = measure(name, build, v, args.batch, samples, args, device, peak_flops)
            row["channels"] = c
            row["reference"] = "lightly" if name in ("lightly", "ours/fixed") else "lightly_bag"
            group.append(row)
        refs = {r["name"]: r for r in group}
        for row in group:
            ref = refs[row["reference"]]
            if row["name"].startswith("lightly") or ref.get("status") != "ok" or row.get("status") != "ok":
                continue
            row["images_per_s_ratio"] = row["images_per_s"] / ref["images_per_s"]
            if row.get("mem_per_image_mib") and ref.get("mem_per_image_mib"):
                row["mem_per_image_ratio"] = row["mem_per_image_mib"] / ref["mem_per_image_mib"]
            # Per-image step time against the other variants (the hierarchical bounds).
            row["time_per_image_vs"] = {
                other["name"].removeprefix("ours/"): other["images_per_s"] / row["images_per_s"]
                for other in group
                if other["name"].startswith("ours/") and other is not row and other.get("status") == "ok"
            }
        rows += group
        del views, bag
        free_memory(device)
    return rows


class RandomTiles(Dataset):
    """Random normalised tiles ``(C, T, T)``; with a transform, their multi-crop views."""

    def __init__(self, n: int, channels: int, size: int, transform: Callable | None = None) -> None:
        self.n, self.channels, self.size, self.transform = n, channels, size, transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        tile = torch.rand(self.channels, self.size, self.size, generator=torch.Generator().manual_seed(i))
        return self.transform(tile) if self.transform is not None else tile


def _delivered_per_s(loader: DataLoader, deliver: Callable, batches: int, batch: int,
                     device: torch.device) -> float:
    it = iter(loader)
    deliver(next(it))  # workers started, first batch through
    synchronize(device)
    seconds = time_per_call(lambda: deliver(next(it)), batches, device)
    return batch / seconds


def views_rows(args: argparse.Namespace, device: torch.device) -> dict:
    """Samples/s of multi-crop views delivered to ``device``: CPU transform in workers vs device views."""
    c = max(args.channels)
    # Both paths make the same views (same config, every op of the CPU transform on the device too).
    cfg = ours_config(args, "boc", c).views
    pin = device.type == "cuda"
    n = args.views_batch * (args.views_batches + 1)
    crops = GPUMultiCrop(cfg)
    g = torch.Generator(device=device).manual_seed(0)

    def cpu_deliver(batch):
        return [v.to(device, non_blocking=True) for v in batch]

    def gpu_deliver(batch):
        return crops(batch.to(device, non_blocking=True), generator=g)

    def loader(transform):
        return DataLoader(RandomTiles(n, c, args.tile_size, transform), batch_size=args.views_batch,
                          num_workers=args.workers, pin_memory=pin, persistent_workers=False)

    cpu = _delivered_per_s(loader(MultichannelDINOTransform(cfg)), cpu_deliver, args.views_batches,
                           args.views_batch, device)
    gpu = _delivered_per_s(loader(None), gpu_deliver, args.views_batches, args.views_batch, device)
    tiles = torch.rand(args.views_batch, c, args.tile_size, args.tile_size, device=device)
    crops(tiles, generator=g)
    kernel = args.views_batch / time_per_call(lambda: crops(tiles, generator=g), args.views_batches, device)
    return {
        "channels": c, "tile_size": args.tile_size, "batch": args.views_batch, "batches": args.views_batches,
        "workers": args.workers, "views_per_sample": 2 + args.n_local,
        "cpu_path_samples_per_s": cpu, "gpu_path_samples_per_s": gpu, "gpu_views_only_samples_per_s": kernel,
        "gpu_over_cpu": gpu / cpu,
    }


# ----- command line --------------------------------------------------------------------------


TRAIN_COLUMNS = [
    ("name", "entry", "s"), ("channels", "C", "d"), ("batch_images", "batch", "d"), ("state", "status", "s"),
    ("images_per_s", "img/s", ".1f"), ("step_ms", "step ms", ".1f"), ("peak_mem_gib", "peak GiB", ".2f"),
    ("mem_per_image_mib", "MiB/img", ".1f"), ("tflops_per_step", "TFLOP/step", ".4f"), ("mfu", "MFU", ".1%"),
    ("reference", "vs", "s"), ("images_per_s_ratio", "x img/s", ".2f"), ("mem_per_image_ratio", "x MiB/img", ".2f"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny CPU run (seconds): 2-block 32-px ViT, small head")
    p.add_argument("--mode", choices=["train", "views", "both"], default="both")
    p.add_argument("--arch", choices=sorted(ARCHS), default="vit_small")
    p.add_argument("--batch", type=int, default=256, help="multichannel images per step")
    p.add_argument("--channels", type=int, nargs="+", default=[3], help="one or more channel counts")
    p.add_argument("--variants", nargs="+", default=[v.value for v in Variant], choices=[v.value for v in Variant])
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--n-local", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=65536)
    p.add_argument("--head-hidden", type=int, default=2048)
    p.add_argument("--head-bottleneck", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per entry")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (more with --compile)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbones")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager' only traces)")
    p.add_argument("--device", default="auto")
    p.add_argument("--matmul-size", type=int, default=8192, help="side of the peak-FLOP/s matmul (CUDA only)")
    p.add_argument("--tile-size", type=int, default=256, help="raw tile side for the views benchmark")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers (views)")
    p.add_argument("--views-batch", type=int, default=256)
    p.add_argument("--views-batches", type=int, default=10)
    p.add_argument("--override", nargs="*", default=[], help="config key=value for our step (e.g. ssl.*)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        flags = [a for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")]
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in flags}
        for key, value in TINY.items():
            if key not in given:
                setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print the tables, write JSON when asked, and return the results."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # MFU needs the device's dense-matmul peak. On CPU a matmul of the sizes a quick run can
    # afford is no such peak (the model's larger matmuls beat it), so no MFU is given there.
    peak = matmul_peak_flops(device, args.matmul_size, torch.bfloat16) if device.type == "cuda" else None
    result = {
        "benchmark": "train_throughput",
        "env": {**device_info(device), **versions()},
        "args": vars(args),
        "precision": "bf16 autocast, fused AdamW" if device.type == "cuda" else "fp32",
        "peak_matmul": None if peak is None else {"dtype": "bfloat16", "size": args.matmul_size,
                                                  "tflops": peak / 1e12},
        "train": None,
        "views": None,
    }
    yardstick = (f"peak bf16 matmul {peak / 1e12:.1f} TFLOP/s (MFU yardstick)" if peak is not None
                 else "no MFU on CPU (no meaningful matmul peak)")
    print(f"device {result['env']['name']} ({device}); torch {result['env']['torch']}, "
          f"lightly {result['env']['lightly']}, timm {result['env']['timm']}; {result['precision']}; {yardstick}")
    if args.mode in ("train", "both"):
        result["train"] = train_rows(args, device, peak)
        print(f"\n{args.arch}, {args.global_size}px x2 + {args.local_size}px x{args.n_local}, head "
              f"{args.head_dim}, {args.steps} timed steps{', compiled' if args.compile else ''}")
        shown = [{**r, "state": r["status"].split(":")[0]} for r in result["train"]]
        print(format_table(shown, TRAIN_COLUMNS))
        unavailable = [r for r in result["train"] if r.get("status") != "ok"]
        for r in unavailable:
            print(f"  {r['name']} (C={r['channels']}): {r['status']}")
        for r in result["train"]:
            if r.get("time_per_image_vs"):
                versus = ", ".join(f"{k} {v:.2f}x" for k, v in r["time_per_image_vs"].items())
                print(f"  {r['name']} (C={r['channels']}) time per image vs {versus}")
    if args.mode in ("views", "both"):
        v = result["views"] = views_rows(args, device)
        print(f"\nviews delivered to {device} ({v['channels']}ch {v['tile_size']}px tiles, "
              f"{v['views_per_sample']} views, {v['workers']} workers): CPU transform "
              f"{v['cpu_path_samples_per_s']:.1f}/s, device views {v['gpu_path_samples_per_s']:.1f}/s "
              f"(x{v['gpu_over_cpu']:.2f}); device views alone {v['gpu_views_only_samples_per_s']:.1f}/s")
        ours = [r["images_per_s"] for r in result["train"] or [] if r["name"].startswith("ours/")
                and r.get("status") == "ok"]
        if ours:
            v["step_consumption_images_per_s"] = max(ours)
            v["feed_ratio_cpu"] = v["cpu_path_samples_per_s"] / max(ours)
            v["feed_ratio_gpu"] = v["gpu_path_samples_per_s"] / max(ours)
            # Device time the device views take per image, as a share of the fastest step's time per image.
            v["gpu_views_share_of_step"] = max(ours) / v["gpu_views_only_samples_per_s"]
            print(f"feed ratio (delivered / fastest step's consumption): CPU {v['feed_ratio_cpu']:.2f}, "
                  f"device {v['feed_ratio_gpu']:.2f}; device views cost {v['gpu_views_share_of_step']:.1%} of a step")
    if args.json:
        print(f"\nwrote {write_json(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
