"""The full objective (DINO + iBOT + KoLeo, Sinkhorn-Knopp) trains on demo data without collapsing.

Non-collapse statistic: the spread of the teacher's CLS embeddings of held-out cells,
``mean_d std_i(z_id) * sqrt(D)`` on L2-normalised ``z``. Isotropic embeddings give about 1;
a collapsed teacher (every cell the same vector) gives 0. The reference is the same network
at its random initialisation (about 0.2 on the demo cells): training must keep at least half
of that spread. A collapse to one point would drop it to ~0, well under the bar.
"""

import math

import numpy as np
import pytest
import torch
from lightly.utils.scheduler import cosine_schedule

from cellvit_ssl import load_config
from cellvit_ssl.data.dataset import IndexDataset
from cellvit_ssl.models.channels import build_model
from cellvit_ssl.ssl import DINOMetaArch
from cellvit_ssl.train import build_loader, lr_at, param_groups, resolve_index, seed_everything

FULL_OBJECTIVE = ["ssl.dino=true", "ssl.ibot=true", "ssl.koleo=true", "ssl.centering=sinkhorn_knopp"]


def embedding_spread(meta: DINOMetaArch, x: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean per-dimension std of the L2-normalised teacher CLS tokens, times sqrt(D)."""
    meta.eval()
    with torch.no_grad():
        z = torch.nn.functional.normalize(meta.teacher.forward_features(x, ids)["x_norm_clstoken"], dim=1)
    meta.train()
    return float(z.std(dim=0).mean() * math.sqrt(z.shape[1]))


def held_out_cells(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    index, root = resolve_index(cfg)
    ds = IndexDataset(index, list(cfg.data.channels), root=root, sample_size=cfg.data.sample_size)
    rows = [i for i in range(len(ds)) if ds.table["split"].iloc[i] == "test"] or list(range(len(ds)))
    x = torch.stack([ds.load(i) for i in rows])
    size = cfg.views.global_crop_size
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x, ds.channel_ids.expand(len(rows), -1)


def train(cfg, steps: int) -> tuple[list[float], float, float]:
    """``steps`` optimiser steps as in ``cellvit_ssl.train``; losses and spreads before/after."""
    torch.set_num_threads(1)
    seed_everything(cfg.train.seed)
    loader = build_loader(cfg)
    meta = DINOMetaArch(build_model(cfg.model, list(cfg.data.channels)), cfg.ssl)
    opt = torch.optim.AdamW(param_groups(meta, cfg.train.weight_decay))
    x, ids = held_out_cells(cfg)
    spread0 = embedding_spread(meta, x, ids)
    peak = cfg.train.base_lr * cfg.data.batch_size / 256
    losses, step = [], 0
    while step < steps:
        epoch = step // len(loader)
        for batch in loader:
            out = meta(batch["views"], batch["channel_ids"], epoch=epoch)
            opt.zero_grad()
            out["loss"].backward()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, min(10, steps // 5), peak, cfg.train.min_lr)
            torch.nn.utils.clip_grad_norm_(meta.student.parameters(), cfg.train.clip_grad)
            meta.cancel_last_layer_gradients(epoch)
            opt.step()
            meta.update_teacher(cosine_schedule(step, steps, cfg.ssl.momentum_start, cfg.ssl.momentum_end))
            losses.append(out["loss"].item())
            assert all(math.isfinite(v.item()) for v in out.values())
            step += 1
            if step == steps:
                break
    return losses, spread0, embedding_spread(meta, x, ids)


def test_full_objective_lowers_the_loss_and_keeps_the_spread_fast(tiny_overrides):
    cfg = load_config(None, tiny_overrides + FULL_OBJECTIVE + [
        "model.layerscale_init=null", "ssl.teacher_temp=0.04", "ssl.warmup_teacher_temp=0.04",
        "ssl.freeze_last_layer_epochs=0", "train.base_lr=0.005", "data.demo.n_images=2",
    ])
    losses, spread0, spread = train(cfg, steps=30)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert spread > 0.5 * spread0


@pytest.mark.slow
def test_full_objective_on_the_demo_data_for_hundreds_of_steps(tmp_path):
    cfg = load_config("configs/demo.yaml", FULL_OBJECTIVE + [
        f"data.demo.cache_dir={tmp_path / 'demo'}", f"train.output_dir={tmp_path / 'run'}",
        "data.batch_size=16",
    ])
    losses, spread0, spread = train(cfg, steps=300)
    print(f"loss first 20 steps {np.mean(losses[:20]):.3f}, last 20 {np.mean(losses[-20:]):.3f}; "
          f"teacher spread {spread0:.3f} at init, {spread:.3f} after {len(losses)} steps")
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 0.3
    assert spread > 0.5 * spread0
