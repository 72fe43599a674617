"""The channel vocabulary: a padding id that is no channel, mixed 3/4/5-channel batches, a lab's own stain."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from cellvit_ssl.channels import BUILTIN, PAD_CHANNEL_ID, VOCABULARY, ChannelVocabulary
from cellvit_ssl.config import load_config
from cellvit_ssl.data.collate import collate_channels
from cellvit_ssl.data.dataset import IndexDataset
from cellvit_ssl.errors import ConfigError, DataError
from cellvit_ssl.models.channels import build_model
from cellvit_ssl.ssl import DINOMetaArch
from cellvit_ssl.transforms import MultichannelDINOTransform
from tests.conftest import TINY_OVERRIDES

WTC = ["nucleus", "membrane", "protein"]
HPA = ["microtubules", "protein", "nucleus", "er"]
CP = ["nucleus", "rna", "er", "agp", "mito"]


def _ome_tiff(path, names, seed):
    rng = np.random.default_rng(seed)
    data = rng.gamma(2.0, 300.0, size=(len(names), 48, 48)).astype(np.uint16)
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX", "Channel": {"Name": list(names)}})


def test_padding_id_is_no_channel_and_is_never_looked_up():
    assert PAD_CHANNEL_ID < 0 and PAD_CHANNEL_ID not in range(len(VOCABULARY))
    cfg = load_config(None, TINY_OVERRIDES)
    model = build_model(cfg.model, ["microtubules", "protein"])  # no nucleus: id 0 is not the model's
    ids = torch.tensor([[VOCABULARY.index("protein"), PAD_CHANNEL_ID]])
    slots = model.slots(ids, torch.tensor([[True, False]]))
    assert slots.tolist() == [[1, -1]]
    with pytest.raises(ValueError, match="not among the model's channels"):
        model.slots(ids, torch.tensor([[True, True]]))  # a present unknown id is still an error


@pytest.mark.parametrize("variant", ["fixed", "boc", "hierarchical", "channelvit"])
def test_one_batch_mixing_wtc_hpa_and_cp_trains_every_variant_without_nucleus_in_the_model(tmp_path, variant):
    """3-, 4- and 5-channel images in one batch (padded with PAD_CHANNEL_ID) through every variant's loss."""
    for name, channels in (("wtc", WTC), ("hpa", HPA), ("cp", CP)):
        _ome_tiff(tmp_path / f"{name}.ome.tif", channels, seed=len(channels))
    table = pd.DataFrame([{"path": f"{n}.ome.tif", "centroid_y": 24, "centroid_x": 24} for n in ("wtc", "hpa", "cp")])
    # the model's channels: the union of all but nucleus (the old padding id was nucleus's id 0)
    model_channels = ["membrane", "protein", "microtubules", "er", "rna", "agp", "mito"]
    overrides = [*TINY_OVERRIDES, f"model.variant={variant}", f"data.channels=[{','.join(model_channels)}]",
                 "ssl.head_output_dim=64"]
    cfg = load_config(None, overrides)
    views = MultichannelDINOTransform(cfg.views)
    dataset = IndexDataset(table, None, root=tmp_path, sample_size=32, transform=views)  # each image its own set
    batch = collate_channels([dataset[i] for i in range(3)])
    assert batch["channel_ids"].shape == (3, 5)
    assert (batch["channel_ids"][~batch["channel_mask"]] == PAD_CHANNEL_ID).all()
    assert batch["channel_mask"].sum(1).tolist() == [3, 4, 5]
    # nucleus is not a model channel: drop it from the batch as a trainer with missing_channels=pad would
    nucleus = batch["channel_ids"] == VOCABULARY.index("nucleus")
    batch["channel_mask"] &= ~nucleus
    batch["channel_ids"][nucleus] = PAD_CHANNEL_ID
    torch.manual_seed(0)
    meta = DINOMetaArch(build_model(cfg.model, model_channels), cfg.ssl)
    out = meta(batch["views"], batch["channel_ids"], epoch=0, channel_mask=batch["channel_mask"])
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in meta.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_vocabulary_extends_from_config_and_round_trips():
    vocab = ChannelVocabulary.extended(["lipid", "cilia"], {"BODIPY": "lipid", "ARL13B": "cilia"})
    assert vocab.names[: len(VOCABULARY)] == VOCABULARY  # built-in ids never move
    assert vocab.ids(["bodipy", "ARL13B", "DAPI"]) == [len(VOCABULARY), len(VOCABULARY) + 1, 0]
    assert ChannelVocabulary.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
    with pytest.raises(DataError, match="already known channels"):
        ChannelVocabulary.extended(["DAPI"])
    with pytest.raises(DataError, match="data.extra_channels"):
        BUILTIN.canonical("bodipy")
    with pytest.raises(ConfigError, match="bodipy"):
        load_config(None, [*TINY_OVERRIDES, "data.channels=[nucleus,bodipy]"])


def test_a_new_stain_from_the_config_trains_and_embeds_on_another_install(tmp_path):
    """A lab's BODIPY (lipid) channel: named in the config only; the checkpoint carries the vocabulary."""
    names = ["DAPI", "BODIPY", "protein"]
    rows = []
    for i in range(4):
        _ome_tiff(tmp_path / f"f{i}.ome.tif", names, seed=i)
        rows += [{"path": f"f{i}.ome.tif", "centroid_y": y, "centroid_x": x} for y, x in ((16, 16), (30, 30))]
    pd.DataFrame(rows).to_csv(tmp_path / "index.csv", index=False)
    run = tmp_path / "run"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("data.demo.")] + [
        f"data.index={tmp_path / 'index.csv'}", "data.channels=[nucleus,lipid,protein]",
        "data.extra_channels=[lipid]", "data.channel_map={BODIPY: lipid}", f"train.output_dir={run}",
        "train.tensorboard=false", "train.progress=false"]
    code = subprocess.run([sys.executable, "-m", "cellvit_ssl.train", *overrides], capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    stored = torch.load(run / "teacher.pt", weights_only=True)["vocabulary"]
    assert stored["names"][-1] == "lipid" and stored["mapping"] == {"BODIPY": "lipid"}
    # embed in a fresh process that knows nothing of the run's config: the checkpoint's vocabulary resolves BODIPY
    out = tmp_path / "cells.h5ad"
    code = subprocess.run([sys.executable, "-m", "cellvit_ssl.embed", str(run / "teacher.pt"), "--index",
                           str(tmp_path / "index.csv"), "--out", str(out), "--no-progress", "--pooling", "lipid"],
                          capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    adata = anndata.read_h5ad(out)
    assert adata.n_obs == 8 and adata.X.shape[1] == 32 and np.isfinite(adata.X).all()  # the lipid block alone
