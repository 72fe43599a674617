"""Representation quality on held-out synthetic cells: trained vs random-init vs raw pixels.

    python -m benchmarks.quality                       # every generator x every variant
    python -m benchmarks.quality --quick               # tiny, seconds: checks the plumbing
    python -m benchmarks.quality --generator my_pkg.gen:generate --variants boc
    python -m benchmarks.quality --generators hpa --set ssl.koleo_loss_weight=0   # an experiment

For every generator (built-in: :data:`cellvit_ssl.data.generators.GENERATOR_NAMES`, or any
``module:callable`` following the protocol in :mod:`cellvit_ssl.data.generators`) and every
model variant, under one config (``configs/quality.yaml``: scale only, the recipe is the
code default) and one step budget:

1. generate the data set once (cached in ``--workdir``); self-supervised training sees only
   its ``train`` rows (resampled to a fixed epoch of :data:`EPOCH_ROWS` cells, so that the
   step budget is the same for every generator), never a label;
2. train with the real trainer (:func:`cellvit_ssl.train.run`);
3. embed the held-out (``test``) rows with ``python -m cellvit_ssl.embed``;
4. score 1-NN / 10-NN (cosine) and linear-probe macro-F1 with :mod:`cellvit_ssl.evaluate`'s
   classifiers, for the trained encoder and its two baselines (the same architecture with
   random weights, and raw pixels), by stratified 5-fold cross-validation over the held-out
   cells (``cv``) and by leave-one-batch-out where the generator has batches (``lobo``); for
   bag-of-channels models also every channel's block of the embedding on its own;
5. check the gates of issue 13 on ``cv``: trained 10-NN >= raw pixels + 0.05 and
   >= random-init + 0.15, trained linear >= both baselines + 0.05.

Prints the table and writes ``benchmarks/results/quality.json`` (``--json``). Exit code 1 when
a gate fails for the default variant (``boc``), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import format_table, versions, write_json  # noqa: E402
from cellvit_ssl import embed as embed_cmd  # noqa: E402
from cellvit_ssl import evaluate as ev  # noqa: E402
from cellvit_ssl import protocols  # noqa: E402
from cellvit_ssl.config import Variant, load_config  # noqa: E402
from cellvit_ssl.data.generators import GENERATOR_NAMES, GeneratedSet, get_generator, run_generator  # noqa: E402
from cellvit_ssl.embed import encoder_featurizer  # noqa: E402
from cellvit_ssl.embed_io import read_embeddings  # noqa: E402
from cellvit_ssl.errors import CellVitSSLError, DataError  # noqa: E402
from cellvit_ssl.io import atomic_write_text  # noqa: E402
from cellvit_ssl.train import run as train_run  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quality.yaml"
VARIANTS = tuple(v.value for v in Variant)
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "quality.json"
DEFAULT_VARIANT = "boc"
#: Cells in one training epoch of the suite (rows resampled to this), so that a step budget
#: in epochs means the same number of steps for every generator.
EPOCH_ROWS = 640
#: Gates of issue 13 (on the ``cv`` protocol): margins of the trained encoder over the baselines.
GATES = {"knn_over_raw": 0.05, "knn_over_random": 0.15, "linear_over_baselines": 0.05}
CLASSIFIERS = {"1nn": "1nn_cosine", "knn": "{k}nn_cosine", "linear": "logreg"}
QUICK = {"n_cells": 72, "epoch_rows": 16, "overrides": [
    "data.batch_size=8", "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=8",
    "views.n_local_views=2", "ssl.head_hidden_dim=32", "ssl.head_bottleneck_dim=16", "ssl.head_output_dim=64",
    "train.epochs=1", "train.max_steps=2", "train.warmup_epochs=0"]}


# ----------------------------------------------------------------------------- data
def heldout_split(table: pd.DataFrame) -> pd.Series:
    """The rows' split, lower-cased: the ``split`` column, or without one every third image file held out."""
    if "split" not in table.columns:
        files = {p: i for i, p in enumerate(pd.unique(table["path"]))}
        return pd.Series(np.where(table["path"].map(files) % 3 == 2, "test", "train"), index=table.index)
    return table["split"].astype(str).str.lower()


def sample_mode(table: pd.DataFrame) -> str:
    """How a generator's rows are read: ``cells`` (centroids in a field) or ``image`` (the file is the cell)."""
    return "cells" if {"centroid_y", "centroid_x"} <= set(table.columns) else "image"


def resample_rows(table: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    """``rows`` rows of ``table`` in their order: a random subset, or drawn with replacement when it has fewer."""
    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(table))[:rows] if len(table) >= rows else rng.choice(len(table), rows, replace=True)
    return table.iloc[np.sort(picks)]


def prepare_data(data: GeneratedSet, out: Path, epoch_rows: int, seed: int) -> dict:
    """Write the training index (``train`` rows, resampled to ``epoch_rows``) and the held-out index.

    Without a ``split`` column every third image file is held out. Returns the paths, the
    sampling mode (``cells`` for rows with centroids, ``image`` for whole-file cells) and sizes.

    Raises:
        DataError: If there are no training or no held-out rows, or fewer than 2 classes held out.
    """
    table = pd.read_csv(data.index)
    split = heldout_split(table)
    table = table.assign(split=table.get("split", split))  # the held-out index keeps a split column
    train, test = table[split == "train"], table[split != "train"]
    if train.empty or test.empty:
        raise DataError(f"{data.index}: needs 'train' and held-out rows in its split column")
    if test[data.label_key].nunique() < 2:
        raise DataError(f"{data.index}: the held-out rows hold fewer than 2 classes")
    train = resample_rows(train, epoch_rows, seed).drop(columns=[data.label_key])  # labels never reach training
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.csv", "test": out / "heldout.csv"}
    train.to_csv(paths["train"], index=False)
    test.to_csv(paths["test"], index=False)
    return {"train": paths["train"], "test": paths["test"], "root": data.index.parent,
            "mode": sample_mode(table), "n_train_rows": int((split == "train").sum()),
            "n_test": len(test)}


def generate_cached(spec: str, workdir: Path, seed: int, n_cells: int | None) -> GeneratedSet:
    """Run a generator into ``workdir/data/<name>_seed<seed>[_n<n>]`` unless that folder holds its output."""
    name, fn = get_generator(spec)
    folder = workdir / "data" / (f"{name}_seed{seed}" + (f"_n{n_cells}" if n_cells else ""))
    stamp = folder / ".generated.json"
    if stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved.pop("spec") == spec:
            return GeneratedSet(**{**saved, "index": Path(saved["index"]), "channels": tuple(saved["channels"]),
                                   "classes": tuple(saved["classes"])})
    data = run_generator(name, fn, folder, seed, n_cells)
    atomic_write_text(stamp, json.dumps({"spec": spec, **asdict(data), "index": str(data.index)}))
    return data


# ----------------------------------------------------------------------------- one run
def run_overrides(data: GeneratedSet, prepared: dict, variant: str, out: Path, base: list[str], config: Path
                  ) -> list[str]:
    """Config overrides for one (generator, variant) run: data paths and the variant, nothing else.

    A config asking for bag-of-channels views (``views.channel_mode=boc``) or hierarchical
    channel sampling gets the setting the other variants can take (``joint`` / ``none``),
    since those are properties of the variant, not of the recipe.
    """
    channels = "[" + ",".join(data.channels) + "]"
    over = [f"data.index={prepared['train']}", f"data.root={prepared['root']}", f"data.channels={channels}",
            f"data.mode={prepared['mode']}", f"model.variant={variant}", f"train.output_dir={out}",
            "train.resume=none"]
    probe = load_config(config, base + [f"data.channels={channels}"])
    if variant != "boc" and probe.views.channel_mode.value == "boc":
        over.append("views.channel_mode=joint")
    if variant == "fixed" and probe.ssl.channel_sampling.value != "none":
        over.append("ssl.channel_sampling=none")
    return base + over


def _scores(results: list[ev.Result], k: int) -> dict[str, dict[str, float]]:
    by = {(r.task, r.classifier): r.macro_f1 for r in results}
    tasks = sorted({r.task for r in results})
    out = {}
    for task in tasks:
        out[task] = {short: by.get((task, name.format(k=k))) for short, name in CLASSIFIERS.items()}
    return out


def _protocols(obs: pd.DataFrame, labels: np.ndarray, batch_key: str | None, seed: int
               ) -> dict[str, list[protocols.Task]]:
    tasks = {"cv": protocols.build_tasks(obs, labels, folds=5, seed=seed)}
    if batch_key and batch_key in obs.columns and obs[batch_key].nunique() > 1:
        tasks["lobo"] = protocols.build_tasks(obs, labels, group_key=batch_key, seed=seed)
    return tasks


def score_features(features: dict[str, np.ndarray], labels: np.ndarray, protocols: dict[str, list[protocols.Task]],
                   k: int, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """``{protocol: {feature set: {1nn, knn, linear}}}`` macro-F1."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for proto, tasks in protocols.items():
        out[proto] = {}
        for name, x in features.items():
            s = _scores(ev.evaluate_features(name, x, labels, tasks, k, seed), k)
            out[proto][name] = next(iter(s.values()))
    return out


def gates(scores: dict[str, dict[str, float]]) -> dict[str, dict]:
    """The issue's gates on one protocol's scores (trained vs random-init vs raw pixels)."""
    t, r, p = scores["trained"], scores["random-init"], scores["raw-pixels"]
    checks = {
        "knn_over_raw": (t["knn"], p["knn"] + GATES["knn_over_raw"]),
        "knn_over_random": (t["knn"], r["knn"] + GATES["knn_over_random"]),
        "linear_over_baselines": (t["linear"], max(r["linear"], p["linear"]) + GATES["linear_over_baselines"]),
    }
    return {name: {"value": round(v, 4), "needed": round(need, 4), "pass": bool(v >= need - 1e-9)}
            for name, (v, need) in checks.items()}


def channel_blocks(x: np.ndarray, channels: list[str]) -> dict[str, np.ndarray]:
    """A bag-of-channels embedding cut into its per-channel blocks (model channel order)."""
    width = x.shape[1] // len(channels)
    return {c: x[:, i * width:(i + 1) * width] for i, c in enumerate(channels)}


def block_geometry(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How one channel block shapes the cosine k-NN of a concatenated embedding.

    With blocks of equal norm (each a layer-normed CLS token), the cosine similarity of two
    concatenated embeddings is the mean of their blocks' cosine similarities, so the block whose
    pairwise similarities vary most (``spread``, their standard deviation) rules the neighbours.
    ``separation`` is the mean same-class minus the mean different-class similarity, in units
    of ``spread``: how much of that variation is the label.
    """
    z = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    sim = z @ z.T
    off = ~np.eye(len(z), dtype=bool)
    same = (labels[:, None] == labels[None, :]) & off
    spread = float(sim[off].std())
    gap = float(sim[same].mean() - sim[~same & off].mean())
    return {"spread": round(spread, 4), "separation": round(gap / max(spread, 1e-12), 4)}


@dataclass(frozen=True)
class HeldoutCells:
    """A suite run's held-out cells, read once exactly as ``embed`` read them.

    Attributes:
        adata: The run's ``heldout.h5ad`` (the teacher's embeddings, ``obs``, the run settings).
        rows: The raw samples of its rows, in ``obs`` order.
        preprocess: The run's preprocessing contract.
    """

    adata: object
    rows: list
    preprocess: object

    @classmethod
    def read(cls, path: Path) -> HeldoutCells:
        """Read ``path`` (a suite run's ``heldout.h5ad``) and its rows.

        Raises:
            DataError: If the file does not exist.
        """
        if not path.is_file():
            raise DataError(f"{path}: not found (a quality-suite run's heldout.h5ad)")
        adata = read_embeddings(path)
        reader, encoder, _ = ev._baseline_inputs(adata, None, 0, "cpu")
        return cls(adata, [reader.read(i) for i in range(len(reader))], encoder.preprocess)

    @property
    def obs(self) -> pd.DataFrame:
        return self.adata.obs.reset_index(drop=True)

    def samples(self) -> tuple[torch.Tensor, list[str]]:
        """The cells as model samples ``(B, C, s, s)``, with their channel names."""
        x = [self.preprocess.to_sample(r.pixels, r.names, r.present, image_sample=r.is_image, source=r.source)
             for r in self.rows]
        return torch.stack(x), list(self.rows[0].names)

    def embed(self, encoder) -> np.ndarray:
        """``encoder``'s default embedding of the cells, through its own preprocessing contract."""
        return encoder_featurizer(encoder, None, 64)(self.rows)


def train_and_embed(data: GeneratedSet, prepared: dict, variant: str, out: Path, config: Path, base: list[str]
                    ) -> tuple:
    """Train on ``prepared["train"]`` and embed the held-out rows with the teacher.

    Returns:
        ``(config, teacher.pt path, held-out embeddings as AnnData, training seconds)``.

    Raises:
        CellVitSSLError: If embedding fails.
    """
    t0 = time.perf_counter()
    cfg = load_config(config, run_overrides(data, prepared, variant, out, base, config))
    teacher = train_run(cfg)
    t_train = time.perf_counter() - t0
    h5ad = out / "heldout.h5ad"
    if embed_cmd.main([str(teacher), "--index", str(prepared["test"]), "--root", str(prepared["root"]),
                       "--out", str(h5ad), "--overwrite", "--no-progress", "--device", "cpu"]) != 0:
        raise CellVitSSLError(f"embedding {prepared['test']} with {teacher} failed (see above)")
    return cfg, teacher, read_embeddings(h5ad), t_train


def run_one(data: GeneratedSet, prepared: dict, variant: str, out: Path, config: Path, base: list[str], k: int,
            seed: int) -> dict:
    """Train, embed the held-out rows and score them for one (generator, variant)."""
    t0 = time.perf_counter()
    cfg, _, adata, t_train = train_and_embed(data, prepared, variant, out, config, base)
    obs = adata.obs.reset_index(drop=True)
    labels = obs[data.label_key].astype(str).to_numpy()
    features = {"trained": np.asarray(adata.X, dtype=np.float32),
                "random-init": ev.random_init_features(adata, seed=seed, device="cpu")}
    features["raw-pixels"] = ev.raw_pixel_features(adata, seed=seed)
    protocols = _protocols(obs, labels, data.batch_key, seed)
    scores = score_features(features, labels, protocols, k, seed)
    row = {"generator": data.name, "variant": variant, "n_test": len(labels), "n_classes": int(len(set(labels))),
           "scores": scores, "gates": gates(scores["cv"]), "train_s": round(t_train, 1)}
    row["pass"] = all(g["pass"] for g in row["gates"].values())
    model_channels = list(cfg.data.channels)
    if cfg.model.variant.value == "boc":
        blocks = {}
        for name in ("trained", "random-init"):
            for ch, x in channel_blocks(features[name], model_channels).items():
                blocks[f"{name}/{ch}"] = x
        row["blocks"] = score_features(blocks, labels, {"cv": protocols["cv"]}, k, seed)["cv"]
        for key, x in blocks.items():
            row["blocks"][key].update(block_geometry(x, labels))
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


# ----------------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    """The results table: trained / random-init / raw-pixel macro-F1 per generator, variant, protocol."""
    flat = []
    for r in rows:
        for proto, s in r["scores"].items():
            line = {"gen": r["generator"], "variant": r["variant"], "proto": proto, "n": r["n_test"]}
            for feat, short in (("trained", "t"), ("random-init", "r"), ("raw-pixels", "p")):
                for clf in ("1nn", "knn", "linear"):
                    line[f"{short}_{clf}"] = s[feat][clf]
            line["gate"] = ("PASS" if r["pass"] else "FAIL") if proto == "cv" else ""
            flat.append(line)
    cols = [("gen", "generator", "s"), ("variant", "variant", "s"), ("proto", "protocol", "s"), ("n", "n", "d"),
            ("t_1nn", "1nn", ".3f"), ("t_knn", "10nn", ".3f"), ("t_linear", "linear", ".3f"),
            ("r_knn", "rand 10nn", ".3f"), ("r_linear", "rand lin", ".3f"),
            ("p_knn", "raw 10nn", ".3f"), ("p_linear", "raw lin", ".3f"), ("gate", "gates", "s")]
    return format_table(flat, cols)


def block_table(rows: list[dict]) -> str:
    """Per-channel blocks of bag-of-channels embeddings (``cv``): 10-NN / linear, trained and random-init."""
    flat = []
    for r in rows:
        for key, s in r.get("blocks", {}).items():
            feat, ch = key.split("/", 1)
            flat.append({"gen": r["generator"], "variant": r["variant"], "feat": feat, "ch": ch,
                         "knn": s["knn"], "linear": s["linear"], "spread": s.get("spread", float("nan")),
                         "separation": s.get("separation", float("nan"))})
    cols = [("gen", "generator", "s"), ("variant", "variant", "s"), ("feat", "features", "s"),
            ("ch", "channel block", "s"), ("knn", "10nn", ".3f"), ("linear", "linear", ".3f"),
            ("spread", "cos spread", ".3f"), ("separation", "label sep", ".2f")]
    return format_table(flat, cols)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the suite's config (scale only)")
    p.add_argument("--generators", nargs="+", default=list(GENERATOR_NAMES), metavar="NAME",
                   help=f"built-in generators {list(GENERATOR_NAMES)} or module:callable")
    p.add_argument("--generator", action="append", default=[], metavar="MODULE:CALLABLE",
                   help="score this generator (protocol: cellvit_ssl.data.generators) instead of the built-in ones")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config overrides for an experiment (recorded in the JSON)")
    p.add_argument("--n-cells", type=int, help="cells per generated set (default: each generator's own)")
    p.add_argument("--epoch-rows", type=int, default=EPOCH_ROWS, help="training rows per epoch")
    p.add_argument("--quick", action="store_true", help="tiny sets, tiny model, 2 steps: a plumbing check")
    p.add_argument("--seed", type=int, default=0, help="generator seed (and evaluation seed)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--jobs", type=int, default=1,
                   help="(generator, variant) runs at once, each in its own process with a share of the cores")
    p.add_argument("--workdir", help="keep generated data and runs here (default: a temporary folder)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help="results JSON")
    return p


def _run_job(job: tuple, epoch_rows: int, threads: int | None = None) -> dict:
    data, prepared, variant = job[:3]
    if threads:
        import torch

        torch.set_num_threads(threads)
    print(f"== {data.name} / {variant}: training on {epoch_rows} rows per epoch "
          f"({prepared['n_train_rows']} training cells), scoring {prepared['n_test']} held-out cells", flush=True)
    row = run_one(*job)
    print(table([row]), flush=True)
    return row


def run_jobs(jobs: list[tuple], n_jobs: int, epoch_rows: int) -> list[dict]:
    """Run every (generator, variant) job, ``n_jobs`` at a time in their own processes; rows in job order.

    Each process gets an equal share of the CPU cores as torch threads (runs of this size
    scale better across processes than across threads).
    """
    if n_jobs <= 1:
        return [_run_job(job, epoch_rows) for job in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    with ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_run_job, job, epoch_rows, threads) for job in jobs]
        return [f.result() for f in futures]


def run(args: argparse.Namespace) -> dict:
    """Run the suite; returns the JSON payload (also written to ``args.json``)."""
    start, load_before = time.perf_counter(), os.getloadavg()
    base = list(args.overrides)
    n_cells, epoch_rows = args.n_cells, args.epoch_rows
    if args.quick:
        base = QUICK["overrides"] + base
        n_cells, epoch_rows = n_cells or QUICK["n_cells"], QUICK["epoch_rows"]
    specs = args.generator or args.generators
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        jobs = []
        for spec in specs:
            data = generate_cached(spec, workdir, args.seed, n_cells)
            prepared = prepare_data(data, workdir / "runs" / data.name, epoch_rows, args.seed)
            for variant in args.variants:
                out = workdir / "runs" / data.name / variant
                jobs.append((data, prepared, variant, out, Path(args.config), base, args.k, args.seed))
        rows = run_jobs(jobs, args.jobs, epoch_rows)
    wall = time.perf_counter() - start
    payload = {
        "benchmark": "quality",
        "command": "python -m benchmarks.quality " + " ".join(sys.argv[1:]),
        "config": str(args.config), "overrides": base, "quick": bool(args.quick), "seed": args.seed, "k": args.k,
        "epoch_rows": epoch_rows, "jobs": args.jobs, "steps": count_steps(Path(args.config), base, epoch_rows),
        "gates": GATES, "default_variant": DEFAULT_VARIANT,
        "machine": {"cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "platform": platform.platform(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": versions(), "wall_s": round(wall, 1), "rows": rows,
    }
    print()
    print(table(rows))
    if any("blocks" in r for r in rows):
        print()
        print(block_table(rows))
    for r in rows:
        failed = [n for n, g in r["gates"].items() if not g["pass"]]
        print(f"{'PASS' if r['pass'] else 'FAIL'}  {r['generator']:<14} {r['variant']:<13}"
              + (f" failed: {', '.join(failed)}" if failed else ""))
    print(f"wall time {wall / 60:.1f} min on {os.cpu_count()} CPUs (load {load_before[0]:.2f} -> "
          f"{os.getloadavg()[0]:.2f})")
    write_json(args.json, payload)
    print(f"wrote {args.json}", file=sys.stderr)
    return payload


def count_steps(config: Path, base: list[str], epoch_rows: int) -> int:
    """Optimiser steps of one run of ``config`` with ``base`` overrides and ``epoch_rows`` rows per epoch."""
    cfg = load_config(config, base)
    total = cfg.train.epochs * (epoch_rows // cfg.data.batch_size)
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        payload = run(args)
    except CellVitSSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in payload["rows"] if r["variant"] == DEFAULT_VARIANT and not r["pass"]]
    return 1 if failed and not args.quick else 0


if __name__ == "__main__":
    sys.exit(main())
