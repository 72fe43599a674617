"""Training entry point: ``python -m cellvit_ssl.train CONFIG [key=value ...]``.

Loads the config (code defaults ← YAML ← overrides), builds data, model and the
student/teacher objective, trains with AdamW under a warm-up + cosine learning rate and a
cosine teacher momentum, and writes atomic checkpoints plus a teacher export for inference
into ``train.output_dir`` beside the resolved ``config.yaml``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from lightly.utils.scheduler import cosine_schedule
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from cellvit_ssl.checkpoint import ENCODER_FORMAT, TRAINING_FORMAT, save_checkpoint
from cellvit_ssl.config import config_to_dict, load_config
from cellvit_ssl.data.dataset import IndexDataset
from cellvit_ssl.data.synthetic import DemoSpec, generate_demo
from cellvit_ssl.errors import CellVitSSLError, DataError
from cellvit_ssl.models.channels import build_model
from cellvit_ssl.ssl import DINOMetaArch
from cellvit_ssl.transforms import MultichannelDINOTransform


def resolve_index(cfg: DictConfig) -> tuple[Path, Path | None]:
    """Return (index path, root) for the run, generating the demo data when it is enabled.

    Raises:
        DataError: If no index is configured or it does not exist (naming it and pointing at
            the demo).
    """
    demo = cfg.data.demo
    if demo.enabled:
        spec = DemoSpec(n_images=demo.n_images, image_size=demo.image_size,
                        cells_per_image=demo.cells_per_image, seed=demo.seed)
        index = generate_demo(demo.cache_dir, spec, fmt=demo.format)
        return index, None
    hint = "To try the package on built-in synthetic data: python -m cellvit_ssl.train configs/demo.yaml"
    if not cfg.data.index:
        raise DataError(f"data.index is not set; point it at your index CSV. {hint}")
    index = Path(cfg.data.index).expanduser()
    if not index.is_file():
        raise DataError(f"data.index {str(index)!r} does not exist; download or build the data first. {hint}")
    root = Path(cfg.data.root).expanduser() if cfg.data.root else None
    return index, root


def select_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and tokens (1-D parameters)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("token", "tokens", "pos_embed")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine down to ``floor``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def build_loader(cfg: DictConfig) -> DataLoader:
    """DataLoader of multichannel DINO views over the configured index."""
    index, root = resolve_index(cfg)
    dataset = IndexDataset(
        index,
        channels=list(cfg.data.channels),
        root=root,
        sample_size=cfg.data.sample_size,
        transform=MultichannelDINOTransform(cfg.views),
        channel_map=dict(cfg.data.channel_map),
        percentiles=list(cfg.data.normalize_percentiles),
    )
    generator = torch.Generator().manual_seed(cfg.train.seed)
    return DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        drop_last=len(dataset) >= cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        generator=generator,
    )


def training_payload(cfg: DictConfig, meta: DINOMetaArch, opt: torch.optim.Optimizer,
                     epoch: int, step: int) -> dict:
    """Everything a checkpoint holds, as plain data."""
    return {"format": TRAINING_FORMAT, "config": config_to_dict(cfg), "model": meta.state_dict(),
            "optimizer": opt.state_dict(), "epoch": epoch, "step": step}


def encoder_payload(cfg: DictConfig, meta: DINOMetaArch) -> dict:
    """The teacher backbone alone, for inference (:func:`cellvit_ssl.load_encoder`)."""
    return {"format": ENCODER_FORMAT, "config": config_to_dict(cfg), "backbone": meta.teacher.state_dict()}


def run(cfg: DictConfig) -> Path:
    """Train with a loaded config; returns the path of the final teacher export."""
    seed_everything(cfg.train.seed)
    device = select_device(cfg.train.device)
    out = Path(cfg.train.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    loader = build_loader(cfg)
    meta = DINOMetaArch(build_model(cfg.model, list(cfg.data.channels)), cfg.ssl).to(device)
    opt = torch.optim.AdamW(param_groups(meta, cfg.train.weight_decay))
    steps_per_epoch = len(loader)
    total = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    peak_lr = cfg.train.base_lr * cfg.data.batch_size / 256
    warmup = min(cfg.train.warmup_epochs * steps_per_epoch, total)
    print(f"cellvit_ssl: {len(loader.dataset)} samples, {steps_per_epoch} steps/epoch, {total} steps, "
          f"model {cfg.model.variant}/{cfg.model.arch} on {device}, output {out}")
    step, epoch = 0, 0
    metrics = open(out / "metrics.jsonl", "a")
    for epoch in range(cfg.train.epochs):
        if step >= total:
            break
        meta.train()
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, disable=None)
        t0 = time.perf_counter()
        for batch in bar:
            if step >= total:
                break
            lr = lr_at(step, total, warmup, peak_lr, cfg.train.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            views = [v.to(device, non_blocking=True) for v in batch["views"]]
            out_dict = meta(views, batch["channel_ids"].to(device), epoch=epoch)
            loss = out_dict["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopping (last checkpoint kept)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.clip_grad:
                torch.nn.utils.clip_grad_norm_(meta.student.parameters(), cfg.train.clip_grad)
            meta.cancel_last_layer_gradients(epoch)
            opt.step()
            meta.update_teacher(cosine_schedule(step, total, cfg.ssl.momentum_start, cfg.ssl.momentum_end))
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
            if cfg.train.log_every and step % cfg.train.log_every == 0:
                metrics.write(json.dumps({"step": step, "epoch": epoch, "loss": losses[-1], "lr": lr}) + "\n")
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                save_checkpoint(training_payload(cfg, meta, opt, epoch, step), out / "checkpoint.pt")
        seconds = time.perf_counter() - t0
        n_images = len(losses) * cfg.data.batch_size
        print(f"epoch {epoch + 1}/{cfg.train.epochs}  loss {np.mean(losses):.4f}  "
              f"({n_images / max(seconds, 1e-9):.1f} images/s)", flush=True)
        metrics.write(json.dumps({"epoch": epoch + 1, "step": step, "epoch_loss": float(np.mean(losses))}) + "\n")
        metrics.flush()
        save_checkpoint(training_payload(cfg, meta, opt, epoch + 1, step), out / "checkpoint.pt")
    metrics.close()
    export = save_checkpoint(encoder_payload(cfg, meta), out / "teacher.pt")
    print(f"done: checkpoint {out / 'checkpoint.pt'}, encoder {export}")
    return export


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m cellvit_ssl.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config (only what differs from the defaults)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg)
    except CellVitSSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
