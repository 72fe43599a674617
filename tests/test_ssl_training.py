"""The full objective (DINO + iBOT + KoLeo, Sinkhorn-Knopp) trains on demo data without collapsing.

Non-collapse statistic: the spread of the teacher's CLS embeddings of held-out cells,
``mean_d std_i(z_id) * sqrt(D)`` on L2-normalised ``z``. Isotropic embeddings give about 1;
a collapsed teacher (every cell the same vector) gives 0. The reference is the same network
at its random initialisation (about 0.2 on the demo cells): training must keep at least half
of that spread. A collapse to one point would drop it to ~0, well under the bar.
"""

import json
import math

import numpy as np
import pytest
import torch

from cellvit_ssl import load_config
from cellvit_ssl.data.dataset import IndexDataset
from cellvit_ssl.distributed import DistInfo
from cellvit_ssl.ssl import DINOMetaArch
from cellvit_ssl.train import Trainer, resolve_index

FULL_OBJECTIVE = ["ssl.dino=true", "ssl.ibot=true", "ssl.koleo=true", "ssl.centering=sinkhorn_knopp"]


def embedding_spread(meta: DINOMetaArch, x: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean per-dimension std of the L2-normalised teacher CLS tokens, times sqrt(D)."""
    with torch.no_grad():
        z = torch.nn.functional.normalize(meta.teacher.backbone.forward_features(x, ids)["x_norm_clstoken"], dim=1)
    return float(z.std(dim=0).mean() * math.sqrt(z.shape[1]))


def held_out_cells(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    index, root = resolve_index(cfg)
    ds = IndexDataset(index, list(cfg.data.channels), root=root, sample_size=cfg.data.sample_size)
    rows = [i for i in range(len(ds)) if ds.table["split"].iloc[i] == "test"] or list(range(len(ds)))
    x = torch.stack([ds.load(i) for i in rows])
    size = cfg.views.global_crop_size
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x, ds.channel_ids.expand(len(rows), -1)


def train(path, overrides, tmp_path, steps: int) -> tuple[list[float], float, float]:
    """``steps`` steps of the project's trainer; per-step losses and spreads before / after."""
    torch.set_num_threads(1)
    cfg = load_config(path, list(overrides) + [
        f"train.max_steps={steps}", "train.epochs=10000", "train.log_every=1", "train.progress=false",
        f"train.output_dir={tmp_path / 'run'}",
    ])
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    x, ids = held_out_cells(cfg)
    spread0 = embedding_spread(trainer.meta, x, ids)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses)
    assert {"dino", "ibot", "koleo"} <= set(records[-1])
    return losses, spread0, embedding_spread(trainer.meta, x, ids)


def test_full_objective_lowers_the_loss_and_keeps_the_spread_fast(tiny_overrides, tmp_path):
    overrides = tiny_overrides + FULL_OBJECTIVE + [
        "model.layerscale_init=null", "ssl.teacher_temp=0.04", "ssl.warmup_teacher_temp=0.04",
        "ssl.freeze_last_layer_epochs=0", "train.base_lr=0.005", "train.warmup_epochs=0",
    ]
    losses, spread0, spread = train(None, overrides, tmp_path, steps=30)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert spread > 0.5 * spread0


@pytest.mark.slow
def test_full_objective_on_the_demo_data_for_hundreds_of_steps(tmp_path):
    overrides = FULL_OBJECTIVE + [f"data.demo.cache_dir={tmp_path / 'demo'}", "data.batch_size=16"]
    losses, spread0, spread = train("configs/demo.yaml", overrides, tmp_path, steps=300)
    print(f"loss first 20 steps {np.mean(losses[:20]):.3f}, last 20 {np.mean(losses[-20:]):.3f}; "
          f"teacher spread {spread0:.3f} at init, {spread:.3f} after {len(losses)} steps")
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 0.3
    assert spread > 0.5 * spread0
