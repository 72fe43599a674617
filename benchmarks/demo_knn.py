"""kNN phenotype probe on the synthetic demo: trained teacher vs random init vs raw pixels.

Embeds every cell crop of the demo index the way training sees it (percentile-normalised,
resized to the global crop size, standardised when ``views.standardize``), fits a k-nearest-
neighbour classifier (cosine) on the ``train`` split and reports macro-F1 on ``test``.

    python benchmarks/demo_knn.py runs/demo/teacher.pt [--k 5] [--json out.json]

The run's own demo set is small (a few dozen test cells); ``--eval-images N --eval-cache DIR``
scores on a larger demo set from the same generator and seed instead (its first images are
the training ones, the rest are new).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

from cellvit_ssl.checkpoint import load_checkpoint
from cellvit_ssl.config import config_from_dict, config_to_dict
from cellvit_ssl.data.dataset import IndexDataset
from cellvit_ssl.embed import load_encoder
from cellvit_ssl.models.channels import build_model
from cellvit_ssl.train import resolve_index
from cellvit_ssl.transforms import PerChannelStandardize


def cell_inputs(cfg) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """All demo cells as model inputs, their channel ids, labels and split names."""
    index, root = resolve_index(cfg)
    ds = IndexDataset(index, list(cfg.data.channels), root=root, sample_size=cfg.data.sample_size,
                      channel_map=dict(cfg.data.channel_map), percentiles=list(cfg.data.normalize_percentiles))
    x = torch.stack([ds.load(i) for i in range(len(ds))])
    size = cfg.views.global_crop_size
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if cfg.views.standardize:
        x = torch.stack([PerChannelStandardize()(im) for im in x])
    ids = ds.channel_ids.expand(len(ds), -1)
    return x, ids, ds.table["label_id"].to_numpy(), ds.table["split"].to_numpy()


def spread(model, x: torch.Tensor, ids: torch.Tensor) -> float:
    """Non-collapse statistic: mean per-dimension std of L2-normalised per-sample CLS tokens
    times sqrt(D) (about 1 for isotropic embeddings, 0 when every sample maps to one point)."""
    z = F.normalize(model.forward_features(x, ids)["x_norm_clstoken"], dim=1)
    return float(z.std(dim=0).mean() * z.shape[1] ** 0.5)


def knn_f1(z: np.ndarray, labels: np.ndarray, split: np.ndarray, k: int) -> float:
    """Macro-F1 on ``test`` of a cosine kNN fitted on ``train``."""
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    train, test = split == "train", split == "test"
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(z[train], labels[train])
    return float(f1_score(labels[test], clf.predict(z[test]), average="macro"))


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="teacher.pt or checkpoint.pt of a demo run")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init model")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--eval-images", type=int, help="score on a demo set of this many fields")
    parser.add_argument("--eval-cache", help="cache folder for that larger demo set")
    args = parser.parse_args()
    trained = load_encoder(args.checkpoint, device="cpu").model
    cfg = config_from_dict(load_checkpoint(args.checkpoint)["config"])
    if args.eval_images:
        if not args.eval_cache:
            parser.error("--eval-images needs --eval-cache")
        data = config_to_dict(cfg)
        data["data"]["demo"].update(n_images=args.eval_images, cache_dir=args.eval_cache)
        cfg = config_from_dict(data)
    x, ids, labels, split = cell_inputs(cfg)
    torch.manual_seed(args.seed)
    random_init = build_model(cfg.model, list(cfg.data.channels)).eval()
    result = {
        "n_train": int((split == "train").sum()),
        "n_test": int((split == "test").sum()),
        "trained": knn_f1(trained.embed(x, ids).numpy(), labels, split, args.k),
        "random_init": knn_f1(random_init.embed(x, ids).numpy(), labels, split, args.k),
        "raw_pixels": knn_f1(x.flatten(1).numpy(), labels, split, args.k),
        "spread_trained": spread(trained, x, ids),
        "spread_random_init": spread(random_init, x, ids),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
