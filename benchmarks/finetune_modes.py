"""Fine-tuning modes against the k-NN of the frozen embedding, on held-out synthetic cells.

    python -m benchmarks.finetune_modes --checkpoint runs/demo/teacher.pt --json benchmarks/results/finetune_modes.json
    python -m benchmarks.finetune_modes                       # pre-trains configs/demo.yaml first
    python -m benchmarks.quality --generators hpa --variants boc --workdir runs/quality   # its teacher, then
    python -m benchmarks.finetune_modes --generator hpa --checkpoint runs/quality/runs/hpa/boc/teacher.pt \
        --data-workdir runs/quality --json benchmarks/results/finetune_modes_hpa.json   # single-label
    python -m benchmarks.finetune_modes --generator mypkg.gen:generate --checkpoint ...   # any suite-protocol one

For each task it builds a labelled set with a train / val / test split, scores the 10-NN
(cosine) of the frozen embedding (fitted on the training rows, as ``evaluate``'s headline
classifier), then fine-tunes ``linear``, ``lora`` and ``full`` with ``python -m
cellvit_ssl.finetune`` and reads their held-out scores. It prints a table and writes JSON with
the issue's acceptance checks: every mode above the k-NN, LoRA training <= 2 % of the
parameters, its file <= 5 % of the full model's, and >= 90 % of full fine-tuning's macro-F1.

``--generator`` is the data source:

- ``demo`` (:func:`cellvit_ssl.data.synthetic.generate_demo`, the default): a set the
  demo pre-training never saw (``--n-images`` fields, seed ``--seed``, default 1; fields split
  3:1:1 into train / val / test). Tasks ``single`` (five localisations) and ``multi`` (two
  co-occurring localisations per cell, the only multi-label set here).
- a quality-suite generator (``hpa``, ``cellpainting``, ``wtc``, or ``module:callable``
  following the protocol of :mod:`cellvit_ssl.data.generators`, generated and cached as
  :func:`benchmarks.quality.generate_cached` does, ``--n-cells`` cells, seed ``--seed``,
  default 0 as the suite's): single-label only. Its ``test`` rows are the test rows; every
  5th image file of its ``train`` rows is the validation split. Rows with centroids are read
  as cells of a field (``data.mode=cells``), the others as whole-image crops (``image``).
  Give the teacher the suite pre-trained on the SAME generator and seed: its ``train`` rows
  are cells that pre-training saw without labels (the lab's setting: pre-train on your own
  images, then label some), its ``test`` rows cells it never saw; the JSON counts the rows of
  each split found in the teacher's training index (``seen_in_pretraining``).
- ``module:function`` taking ``localisations`` (the demo's form), called as
  ``function(folder, n_images=..., seed=..., localisations=..., image_size=...,
  cells_per_image=...)`` and returning an index CSV with ``path``, ``label`` (``;``-separated
  when multi-label) and ``image_id`` columns; split as the demo's.

Rows are read as fine-tuning reads them: the checkpoint's data settings and preprocessing
contract (:func:`cellvit_ssl.embed.sample_reader`), the set's sample mode.

``--qkv`` also times the forward + backward pass of the backbone with its fused qkv projection
against the split q / k / v one LoRA uses (and with the adapters), to size the split's cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks._common import format_table, versions, write_json

MODES = ("linear", "lora", "full")
#: Every this-many-th image file of a suite generator's ``train`` rows is the validation split.
VAL_EVERY_FILE = 5


@dataclass(frozen=True)
class LabelledSet:
    """A labelled index with a ``split`` column (``train`` / ``val`` / ``test``) and how its rows are read.

    Attributes:
        index: The index CSV.
        label_key: Its class column.
        root: Folder the rows' paths start from (None: the index's folder).
        mode: Sample mode of the rows (``cells`` / ``image``); None: the checkpoint's.
    """

    index: Path
    label_key: str = "label"
    root: Path | None = None
    mode: str | None = None


def is_demo_like(generator: str) -> bool:
    """Whether ``--generator`` names the demo or a demo-like ``module:function`` (one taking ``localisations``)."""
    if generator == "demo":
        return True
    module, sep, name = generator.partition(":")
    if not sep:
        return False
    fn = getattr(importlib.import_module(module), name, None)
    return callable(fn) and "localisations" in inspect.signature(fn).parameters


def labelled_set(folder: Path, generator: str, n_images: int, seed: int, localisations: int, image_size: int,
                 cells_per_image: int) -> LabelledSet:
    """A demo-like labelled set: fields 3:1:1 into train / val / test."""
    kwargs = {"n_images": n_images, "seed": seed, "localisations": localisations, "image_size": image_size,
              "cells_per_image": cells_per_image}
    if generator == "demo":
        from cellvit_ssl.data.synthetic import DemoSpec, generate_demo

        index = generate_demo(folder, DemoSpec(**kwargs))
    else:
        module, _, name = generator.partition(":")
        index = Path(getattr(importlib.import_module(module), name)(folder, **kwargs))
    table = pd.read_csv(index)
    table["split"] = np.array(["train", "train", "train", "val", "test"])[table["image_id"].to_numpy() % 5]
    out = folder / "labelled.csv"
    table.to_csv(out, index=False)
    return LabelledSet(out)


def suite_labelled_set(folder: Path, generator: str, workdir: Path, seed: int, n_cells: int | None) -> LabelledSet:
    """A quality-suite generator's set: its test rows, its train rows by image file into train / val.

    The data is generated (or reused) as the quality suite does, under ``workdir/data``; the
    labelled index written to ``folder`` keeps the generator's columns, with ``split`` rewritten:
    every :data:`VAL_EVERY_FILE`-th image file (in index order) of the ``train`` rows becomes
    ``val``, so that no field is cut between training and validation.

    Raises:
        DataError: If the generator wrote no train or no held-out rows, or its label column is empty.
    """
    from benchmarks.quality import generate_cached, heldout_split, sample_mode
    from cellvit_ssl.errors import DataError

    data = generate_cached(generator, workdir, seed, n_cells)
    table = pd.read_csv(data.index)
    split = heldout_split(table)
    train = split == "train"
    if not train.any() or train.all():
        raise DataError(f"{data.index}: needs 'train' and held-out rows in its split column")
    if table[data.label_key].isna().any():
        raise DataError(f"{data.index}: {int(table[data.label_key].isna().sum())} rows without a "
                        f"{data.label_key!r} label")
    files = {p: i for i, p in enumerate(pd.unique(table.loc[train, "path"]))}
    val = train & (table["path"].map(files) % VAL_EVERY_FILE == VAL_EVERY_FILE - 1)
    table["split"] = np.where(val, "val", np.where(train, "train", "test"))
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "labelled.csv"
    table.to_csv(out, index=False)
    return LabelledSet(out, data.label_key, data.index.parent, sample_mode(table))


def labelled_reader(encoder, labelled: LabelledSet, table: pd.DataFrame):
    """The reader of the set's rows, as fine-tuning's: the checkpoint's ``data`` settings and sample size
    (``encoder.config.data``, ``encoder.crop_size``), its contract, the set's root and sample mode."""
    from cellvit_ssl.config import SampleMode
    from cellvit_ssl.embed import sample_reader

    data = encoder.config.data
    data = dataclasses.replace(data, sample_size=encoder.crop_size,
                               mode=SampleMode(labelled.mode) if labelled.mode else data.mode)
    return sample_reader(table, labelled.root, data, encoder, allow_missing=False, mask_background=False,
                         source=str(labelled.index), default_root=labelled.index.parent)


def seen_in_pretraining(checkpoint_config: dict, labelled: LabelledSet) -> dict[str, int] | None:
    """Rows of each split that the checkpoint's pre-training index holds (the same file, resolved, and centroid).

    None when pre-training had no index (the demo switch) or it is gone. A set generated into
    another folder than pre-training's data shares no file with it (all zero).
    """
    data = checkpoint_config.get("data", {})
    if not data.get("index") or not Path(data["index"]).is_file():
        return None
    seen = pd.read_csv(data["index"])
    root = Path(data.get("root") or Path(data["index"]).parent)

    def keys(table: pd.DataFrame, root: Path) -> pd.Series:
        key = table["path"].map(lambda p: str((root / p).resolve()))
        for column in ("centroid_y", "centroid_x"):
            if column in table.columns:
                key = key + "|" + table[column].round(2).astype(str)
        return key

    table = pd.read_csv(labelled.index)
    known = set(keys(seen, root))
    found = keys(table, labelled.root or labelled.index.parent).isin(known)
    return {str(s): int(found[table["split"] == s].sum()) for s in ("train", "val", "test")}


def frozen_knn(checkpoint: Path, labelled: LabelledSet, multi_label: bool, k: int = 10) -> tuple[dict, dict | None]:
    """10-NN (cosine) of the frozen embedding, fitted on the training rows, scored on the test rows.

    Returns:
        ``(k-NN scores, scores of evaluate's logistic-regression probe on the same split)``; the
        probe (un-augmented, standardised features, scikit-learn) is a reference for the
        ``linear`` mode; single-label only (None for multi-label).
    """
    from sklearn.neighbors import KNeighborsClassifier

    from cellvit_ssl.embed import encoder_featurizer, featurize_rows
    from cellvit_ssl.encoder import load_encoder
    from cellvit_ssl.labels import read_labels, scores

    encoder = load_encoder(checkpoint, device="cpu")
    table = pd.read_csv(labelled.index)
    reader = labelled_reader(encoder, labelled, table)
    z = featurize_rows(reader, list(range(len(table))), encoder_featurizer(encoder, None, 64))[0]
    labels = read_labels(table, [labelled.label_key], multi_label)
    train, test = (np.flatnonzero(table["split"] == s) for s in ("train", "test"))
    clf = KNeighborsClassifier(n_neighbors=min(k, len(train)), metric="cosine", algorithm="brute")
    clf.fit(z[train], labels.indicators(train) if multi_label else labels.targets[train])
    if multi_label:  # one column of neighbour votes per class
        probs = np.stack([p[:, 1] if p.shape[1] == 2 else np.zeros(len(test)) for p in clf.predict_proba(z[test])],
                         axis=1)
        return scores(labels, test, probs), None
    probs = np.zeros((len(test), len(labels.classes)))
    probs[:, clf.classes_] = clf.predict_proba(z[test])
    from cellvit_ssl.evaluate import linear_probe_predict

    predicted = linear_probe_predict(z[train], labels.targets[train], z[test])
    return scores(labels, test, probs), scores(labels, test, np.eye(len(labels.classes))[predicted])


def finetune_args(checkpoint: Path, labelled: LabelledSet, out: Path, mode: str, multi_label: bool,
                  extra: list[str]) -> list[str]:
    """The ``python -m cellvit_ssl.finetune`` command line of one mode on a labelled set."""
    args = [str(checkpoint), "--index", str(labelled.index), "--out", str(out), f"finetune.mode={mode}",
            f"finetune.label_columns=[{labelled.label_key}]", "train.device=cpu", "--no-progress",
            "train.resume=none"]
    if labelled.root is not None:
        args += ["--root", str(labelled.root)]
    if labelled.mode is not None:
        args.append(f"data.mode={labelled.mode}")
    if multi_label:
        args.append("finetune.task=multi_label")
    return [*args, *extra]


def finetune(checkpoint: Path, labelled: LabelledSet, out: Path, mode: str, multi_label: bool,
             extra: list[str]) -> dict:
    from cellvit_ssl import finetune as ft

    args = finetune_args(checkpoint, labelled, out, mode, multi_label, extra)
    start = time.perf_counter()
    cfg, payload = ft.load(args)
    if ft.run(cfg, payload).name != ft.CLASSIFIER_FILE:
        raise SystemExit(f"fine-tuning {out} was stopped (SIGTERM / SIGUSR1); run the benchmark again")
    seconds = time.perf_counter() - start
    evaluation = json.loads((out / "evaluation.json").read_text())
    return {"seconds": seconds, **evaluation}


def _backward_step(net: torch.nn.Module, x: torch.Tensor, ids: torch.Tensor) -> float:
    """Wall time of ``net.embed(x, ids).sum().backward()`` (gradients reach the input)."""
    net.zero_grad(set_to_none=True)
    start = time.perf_counter()
    net.embed(x, ids).sum().backward()
    return time.perf_counter() - start


def qkv_timing(checkpoint: Path, repeats: int = 7) -> list[dict]:
    """Forward + backward of a frozen backbone: fused qkv, split q/k/v, peft LoRA on the fused qkv, on split q/v.

    On the checkpoint's backbone (batch 32) and on a randomly initialised ViT-S/16 (``fixed``,
    1 channel, 224 px, batch 2), LoRA rank 8. The variants take turns, ``repeats`` rounds after
    a warm-up round, so that a changing machine load hits them alike; medians are reported.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    from cellvit_ssl.config import load_config
    from cellvit_ssl.encoder import load_encoder
    from cellvit_ssl.lora import LoRA, LoRASpec, split_qkv
    from cellvit_ssl.models import build_model

    def checkpoint_backbone():
        enc = load_encoder(checkpoint, device="cpu")
        x = torch.rand(32, len(enc.channels), enc.input_size, enc.input_size)
        return enc.model, x, enc.resolve_channels(enc.channels).expand(32, -1)

    def vit_small():
        cfg = load_config(None, ["model.variant=fixed", "model.arch=vit_small", "data.channels=[protein]"])
        torch.manual_seed(0)
        model = build_model(cfg.model, ["protein"])
        return model, torch.rand(2, 1, 224, 224), torch.tensor([model.vocabulary.ids(["protein"])] * 2)

    rows = []
    variants = ("fused", "split", "lora fused qkv", "lora split q,v")
    for name, make in (("checkpoint", checkpoint_backbone), ("vit_small", vit_small)):
        nets = {}
        for variant in variants:
            net, x, ids = make()
            net.train().requires_grad_(False)
            if variant == "split":
                split_qkv(net)
            elif variant == "lora fused qkv":
                names = [n for n, _ in net.named_modules() if n.endswith(".attn.qkv")]
                LoraModel(net, LoraConfig(r=8, lora_alpha=16, target_modules=names), "default")
            elif variant == "lora split q,v":
                LoRA(net, LoRASpec(rank=8, alpha=16, target="qv"))
            nets[variant] = net
        x = x.requires_grad_(True)  # a frozen backbone still back-propagates, as to earlier adapters
        times: dict[str, list[float]] = {v: [] for v in variants}
        for round_ in range(repeats + 1):
            for variant in variants:
                seconds = _backward_step(nets[variant], x, ids)
                if round_:
                    times[variant].append(seconds)
        base = float(np.median(times["fused"]))
        rows += [{"model": name, "variant": v, "ms_median": 1000 * float(np.median(t)),
                  "ms_min": 1000 * float(np.min(t)), "vs_fused": float(np.median(t)) / base}
                 for v, t in times.items()]
    return rows


def pretrain(workdir: Path) -> Path:
    from cellvit_ssl.config import load_config
    from cellvit_ssl.train import run

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "demo.yaml", [f"train.output_dir={workdir / 'pretrain'}",
                                                       f"data.demo.cache_dir={workdir / 'demo'}",
                                                       "train.progress=false", "train.tensorboard=false"])
    return run(cfg)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the report (also written to ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="pre-trained teacher.pt (default: train configs/demo.yaml first; a "
                                             "suite generator needs the teacher pre-trained on its train rows)")
    parser.add_argument("--generator", default="demo",
                        help="demo; a quality-suite generator (hpa, cellpainting, wtc, or module:callable of "
                             "cellvit_ssl.data.generators' protocol; single-label only); or a demo-like "
                             "module:function taking localisations (see the module docstring)")
    parser.add_argument("--n-images", type=int, default=60, help="demo-like generators: fields of the labelled set")
    parser.add_argument("--n-cells", type=int, default=None,
                        help="suite generators: cells of the labelled set (default: the generator's own, as the "
                             "quality suite)")
    parser.add_argument("--seed", type=int, default=None,
                        help="generator seed of the labelled set (default: 1 for demo-like generators, a set the "
                             "demo pre-training never saw; 0 for suite generators, the quality suite's, whose "
                             "teacher pre-trained on the same set's train rows)")
    parser.add_argument("--tasks", nargs="+", default=None, choices=["single", "multi"],
                        help="default: single and multi for demo-like generators; single for suite generators "
                             "(multi-label needs the demo generator's two co-occurring localisations)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="finetune overrides for every mode (e.g. train.epochs=20)")
    parser.add_argument("--lora", nargs="*", default=["finetune.lora.rank=2", "finetune.lora.alpha=4"],
                        metavar="KEY=VALUE",
                        help="overrides of the lora mode (rank 2: the package's rank 8 would train 4.4 %% of the "
                             "demo model's parameters, above the 2 %% gate; alpha = 2 x rank as the package's 8 / 16)")
    parser.add_argument("--qkv", action="store_true", help="also time fused vs split qkv")
    parser.add_argument("--workdir", help="keep data and runs here (default: a temporary folder)")
    parser.add_argument("--data-workdir",
                        help="suite generators: the quality suite's --workdir whose data/<name>_seed<seed> to reuse "
                             "(read only; default: --workdir, generated there when absent)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    demo_like = is_demo_like(args.generator)
    tasks = args.tasks or (["single", "multi"] if demo_like else ["single"])
    if not demo_like and "multi" in tasks:
        parser.error(f"--tasks multi: the suite generator {args.generator!r} is single-label; the multi-label task "
                     "runs on the demo generator (two co-occurring localisations per cell): --generator demo")
    if not demo_like and not args.checkpoint:
        parser.error(f"--generator {args.generator}: give --checkpoint, the teacher the quality suite pre-trained "
                     "on this generator and seed (the default pre-training is the demo's)")
    seed = args.seed if args.seed is not None else (1 if demo_like else 0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        start = time.perf_counter()
        checkpoint = Path(args.checkpoint) if args.checkpoint else pretrain(workdir)
        from cellvit_ssl.checkpoint import load_checkpoint

        stored = load_checkpoint(checkpoint)["config"]
        report = {"checkpoint": str(checkpoint), "generator": args.generator, "n_images": args.n_images,
                  "seed": seed, "overrides": args.set, "lora_overrides": args.lora, "tasks": {},
                  "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                              "load_average_start": list(os.getloadavg())}, "versions": versions()}
        if not demo_like:
            report.pop("n_images")
            report["n_cells"] = args.n_cells
        rows = []
        for task in tasks:
            multi = task == "multi"
            if demo_like:
                demo = stored["data"]["demo"]
                labelled = labelled_set(workdir / f"data_{task}", args.generator, args.n_images, seed,
                                        2 if multi else 1, demo["image_size"], demo["cells_per_image"])
            else:
                labelled = suite_labelled_set(workdir / f"data_{task}", args.generator,
                                              Path(args.data_workdir) if args.data_workdir else workdir, seed,
                                              args.n_cells)
                trained_mode = stored["data"].get("mode", "auto")
                if trained_mode not in ("auto", labelled.mode):
                    raise SystemExit(f"{checkpoint} was pre-trained with data.mode={trained_mode}, but the "
                                     f"{args.generator} rows are read as {labelled.mode}; use the teacher pre-trained "
                                     "on this generator")
            knn, logreg = frozen_knn(checkpoint, labelled, multi)
            result = {"rows": pd.read_csv(labelled.index)["split"].value_counts().to_dict(), "knn": knn}
            if not demo_like:
                result["data_root"] = str(labelled.root)
                result["sample_mode"] = labelled.mode
                result["label_key"] = labelled.label_key
                result["seen_in_pretraining"] = seen_in_pretraining(stored, labelled)
            rows.append({"task": task, "model": "10-NN frozen", **_row(knn)})
            if logreg is not None:
                result["logreg"] = logreg
                rows.append({"task": task, "model": "logreg frozen", **_row(logreg)})
            for mode in args.modes:
                extra = [*args.set, *(args.lora if mode == "lora" else [])]
                result[mode] = finetune(checkpoint, labelled, workdir / f"{task}_{mode}", mode, multi, extra)
                rows.append({"task": task, "model": mode, **_row(result[mode]["test"]),
                             "trained": 100 * result[mode]["parameters"]["trainable"]
                             / result[mode]["parameters"]["total"],
                             "kb": result[mode]["classifier_bytes"] / 1024, "seconds": result[mode]["seconds"],
                             "best_epoch": result[mode]["best_epoch"] + 1})
            result["checks"] = _checks(result, args.modes)
            report["tasks"][task] = result
        if args.qkv:
            report["qkv_timing"] = qkv_timing(checkpoint)
        report["machine"]["load_average_end"] = list(os.getloadavg())
        report["seconds"] = time.perf_counter() - start
    columns = [("task", "task", "s"), ("model", "model", "s"), ("macro_f1", "macro-F1", ".3f"),
               ("mAP", "mAP", ".3f"), ("accuracy", "accuracy", ".3f"), ("trained", "% trained", ".2f"),
               ("kb", "file kB", ".1f"), ("best_epoch", "best epoch", "d"), ("seconds", "s", ".0f")]
    print(format_table(rows, columns))
    for task, result in report["tasks"].items():
        print(f"{task}: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in result["checks"].items()))
    for row in report.get("qkv_timing", []):
        print(f"qkv {row['model']:<10} {row['variant']:<15} forward+backward {row['ms_median']:.1f} ms "
              f"(x{row['vs_fused']:.2f} of fused)")
    if args.json:
        write_json(args.json, report)
    return report


def _row(scores: dict) -> dict:
    return {k: scores[k] for k in ("macro_f1", "mAP", "accuracy") if k in scores}


def _checks(result: dict, modes: list[str]) -> dict:
    key = "macro_f1"
    checks = {f"{m} > k-NN": result[m]["test"][key] > result["knn"][key] for m in modes}
    if {"lora", "full"} <= set(modes):
        lora, full = result["lora"], result["full"]
        checks["lora trains <= 2%"] = lora["parameters"]["trainable"] <= 0.02 * lora["parameters"]["total"]
        checks["lora file <= 5% of full"] = lora["classifier_bytes"] <= 0.05 * full["classifier_bytes"]
        checks["lora >= 90% of full"] = lora["test"][key] >= 0.9 * full["test"][key]
    return checks


if __name__ == "__main__":
    main()
