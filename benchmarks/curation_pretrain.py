"""Pre-training on a curated index vs the uncurated one, under the same steps: k-NN on rare and common classes.

    python -m benchmarks.curation_pretrain                            # hpa, seed 0, pixel and teacher curation
    python -m benchmarks.curation_pretrain --quick                    # tiny, seconds: checks the plumbing
    python -m benchmarks.curation_pretrain --workdir /tmp/w --seed 1  # keep (and reuse) generated data there

Issue 17's last acceptance item, on a quality-suite generator (:mod:`benchmarks.quality`):

1. **Pool.** From the generator's ``train`` rows, an imbalanced unlabelled pool: ``--common``
   classes (drawn by the seed) keep all their rows, the others keep ``1/--ratio`` as many
   (20:1 by default), and ``--copies`` of the common rows are added again as exact repeats
   (a collection that holds the same cells more than once). Labels build the pool and score
   the result; they are not in the index that curation or training reads.
2. **Curation** with ``python -m cellvit_ssl.curate`` (near-duplicates out, balanced sampling
   over a hierarchical k-means, to ``--target`` rows), once per ``--features`` kind:
   ``pixels`` (raw-pixel thumbnails: a lab without a model) and ``teacher`` (the teacher of
   the run pre-trained on the uncurated pool: DINOv2's order, a model first, then curation).
3. **Pre-training** with the quality suite's config (``configs/quality.yaml``, the code-default
   recipe) and the bag-of-channels model, on the uncurated pool and on each curated index,
   every index resampled to the same :data:`benchmarks.quality.EPOCH_ROWS` rows per epoch, so
   every run takes the same optimiser steps.
4. **Scoring** of every teacher on the generator's held-out rows (all classes, balanced):
   10-NN (cosine) by stratified 5-fold cross-validation, as the suite scores; macro-F1 over all
   classes, and F1 / recall per class, averaged over the rare and over the common classes.

Prints the table and writes ``benchmarks/results/curation_pretrain.json`` (``--json``) with
the command, machine, load, steps and the pool's composition before and after curation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import quality  # noqa: E402
from benchmarks._common import format_table, versions, write_json  # noqa: E402
from cellvit_ssl import curate as curate_cmd  # noqa: E402
from cellvit_ssl import evaluate as ev  # noqa: E402
from cellvit_ssl import protocols  # noqa: E402
from cellvit_ssl.config import load_config  # noqa: E402
from cellvit_ssl.data.generators import GeneratedSet  # noqa: E402
from cellvit_ssl.errors import CellVitSSLError  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "curation_pretrain.json"
FEATURE_KINDS = ("pixels", "teacher")
VARIANT = quality.DEFAULT_VARIANT
QUICK = {"ratio": 3, "target": 16}


# ----------------------------------------------------------------------------- pool
def build_pool(train: pd.DataFrame, label_key: str, n_common: int, ratio: float, copies: float, seed: int
               ) -> tuple[pd.DataFrame, dict]:
    """An imbalanced pool of ``train`` rows: common classes whole, the rest cut ``ratio``-fold, common rows repeated.

    Returns:
        ``(pool, composition)``: the pool keeps ``label_key`` (to score; drop it before curating)
        and gains ``injected_copy`` (True for the repeats); ``composition`` names the common and
        rare classes and counts rows per class.
    """
    rng = np.random.default_rng(seed)
    classes = sorted(train[label_key].astype(str).unique())
    order = [classes[i] for i in rng.permutation(len(classes))]
    common, rare = sorted(order[:n_common]), sorted(order[n_common:])
    labels = train[label_key].astype(str)
    parts = []
    for c in classes:
        rows = train[labels == c]
        if c in rare:
            keep = max(1, round(len(rows) / ratio))
            rows = rows.iloc[np.sort(rng.permutation(len(rows))[:keep])]
        parts.append(rows)
    pool = pd.concat(parts).assign(injected_copy=False)
    common_rows = pool[pool[label_key].astype(str).isin(common)]
    n_copies = round(copies * len(common_rows))
    repeats = common_rows.iloc[rng.choice(len(common_rows), n_copies, replace=False)].assign(injected_copy=True)
    pool = pd.concat([pool, repeats]).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return pool, {"common": common, "rare": rare, "ratio": ratio, "injected_copies": n_copies,
                  "rows": len(pool), "per_class": class_counts(pool[label_key], classes)}


def oracle_selection(pool: pd.DataFrame, label_key: str, target: int, seed: int) -> pd.DataFrame:
    """What a curation that knew the labels would keep: ``target`` distinct cells, as even over classes as they allow.

    Each class gets an equal share of ``target`` (a class with fewer distinct cells gives all of
    them, the rest is shared among the others); injected repeats are never kept. An upper
    reference for label-free curation, never a curation method.
    """
    rng = np.random.default_rng(seed)
    distinct = pool[~pool["injected_copy"]]
    groups = {c: g.index.to_numpy() for c, g in distinct.groupby(distinct[label_key].astype(str))}
    quota, left = {c: 0 for c in groups}, min(target, len(distinct))
    while left > 0:
        open_classes = [c for c in groups if quota[c] < len(groups[c])]
        share = max(1, left // len(open_classes))
        for c in open_classes:
            take = min(share, len(groups[c]) - quota[c], left)
            quota[c] += take
            left -= take
    keep = np.concatenate([rng.permutation(groups[c])[:quota[c]] for c in sorted(groups)])
    return pool.loc[np.sort(keep)]


def class_counts(labels: pd.Series, classes: list[str]) -> dict[str, int]:
    """Rows per class, in ``classes`` order."""
    values = labels.astype(str)
    return {c: int((values == c).sum()) for c in classes}


def write_index(table: pd.DataFrame, path: Path, root: Path, hidden: list[str]) -> Path:
    """Write ``table`` without the ``hidden`` columns, its paths made absolute (valid from any folder)."""
    out = table.drop(columns=[c for c in hidden if c in table.columns])
    out["path"] = [";".join(str((root / p).resolve()) for p in str(v).split(";")) for v in out["path"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(path, index=False)
    return path


# ----------------------------------------------------------------------------- curation
def curate_argv(pool_index: Path, features: str, out: Path, target: int, clusters: list[int], threshold: float,
                seed: int, sample_size: int, pooling: str = "default", pixel_channels: list[str] | None = None
                ) -> list[str]:
    """The ``python -m cellvit_ssl.curate`` arguments of one curation of the pool.

    ``pooling`` (checkpoint features) and ``pixel_channels`` (raw-pixel features) pick what the
    clusters are made of, as a lab would for its question (e.g. ``protein`` for localisation).
    """
    argv = [f"data.index={pool_index}", f"curate.features={features}", f"curate.out={out}",
            f"curate.target_size={target}", f"curate.clusters=[{','.join(map(str, clusters))}]",
            f"curate.dedup.threshold={threshold}", f"curate.seed={seed}", f"data.sample_size={sample_size}",
            "curate.embed.device=cpu", "curate.progress=false", "curate.overwrite=true"]
    if features == "pixels" and pixel_channels:
        argv.append(f"curate.pixels.channels=[{','.join(pixel_channels)}]")
    elif features != "pixels" and pooling != "default":
        argv.append(f"curate.embed.pooling={pooling}")
    return argv


def curate(argv: list[str], out: Path) -> tuple[pd.DataFrame, dict]:
    """Run ``python -m cellvit_ssl.curate argv`` (writing ``out``); returns every row's fate and the summary."""
    if curate_cmd.main(argv) != 0:
        raise CellVitSSLError(f"python -m cellvit_ssl.curate {' '.join(argv)} failed (see above)")
    paths = curate_cmd.output_paths(out)
    return pd.read_csv(paths["all_rows"]), json.loads(paths["summary"].read_text())


def composition(pool: pd.DataFrame, all_rows: pd.DataFrame, label_key: str, classes: list[str]) -> dict:
    """Rows per class kept by curation, duplicates dropped, repeats left among the kept rows, the selection rule."""
    selected = all_rows["selected_by"].fillna("").astype(str).to_numpy() != ""
    dropped_dup = all_rows["dropped_by"].fillna("").astype(str).to_numpy() == "duplicate"
    source = all_rows["source_row"].to_numpy()
    labels = pool[label_key].astype(str).to_numpy()[source]
    paths = pool["path"].astype(str).to_numpy()[source]
    repeated = pd.Series(paths).duplicated(keep=False).to_numpy()  # a cell that is in the pool twice
    return {"rows": int(selected.sum()), "per_class": class_counts(pd.Series(labels[selected]), classes),
            "duplicates_dropped": int(dropped_dup.sum()),
            "distinct_cells_dropped_as_duplicates": int((dropped_dup & ~repeated).sum()),
            "repeats_selected": int(selected.sum() - len(set(paths[selected]))),
            "selected_by": sorted(set(all_rows["selected_by"].fillna("").astype(str)[selected]))}


# ----------------------------------------------------------------------------- scoring
def knn_report(adata, label_key: str, rare: list[str], common: list[str], k: int, seed: int) -> dict:
    """k-NN (cosine) macro-F1 on the held-out embeddings by stratified 5-fold cv, per class and per group."""
    obs = adata.obs.reset_index(drop=True)
    labels = obs[label_key].astype(str).to_numpy()
    tasks = protocols.build_tasks(obs, labels, folds=5, seed=seed)
    results = ev.evaluate_features("trained", np.asarray(adata.X, dtype=np.float32), labels, tasks, k, seed)
    knn = next(r for r in results if r.classifier == f"{k}nn_cosine")
    per_class = {c: {"f1": v["f1"], "recall": v["recall"], "support": v["support"]} for c, v in knn.per_class.items()}

    def mean(group: list[str], key: str) -> float:
        return float(np.mean([per_class[c][key] for c in group]))

    return {"macro_f1": knn.macro_f1, "accuracy": knn.accuracy, "task": knn.task, "per_class": per_class,
            "rare_f1": mean(rare, "f1"), "rare_recall": mean(rare, "recall"),
            "common_f1": mean(common, "f1"), "common_recall": mean(common, "recall")}


def pretrain(name: str, index: Path, data: GeneratedSet, heldout: dict, workdir: Path, config: Path,
             base: list[str], epoch_rows: int, seed: int) -> tuple[Path, object, dict]:
    """Resample ``index`` to ``epoch_rows`` rows, train on it and embed the held-out rows with its teacher."""
    table = pd.read_csv(index)
    train_path = workdir / name / "train.csv"
    train_path.parent.mkdir(parents=True, exist_ok=True)
    quality.resample_rows(table, epoch_rows, seed).to_csv(train_path, index=False)
    prepared = {**heldout, "train": train_path}
    print(f"== {name}: training on {train_path} ({len(table)} index rows resampled to {epoch_rows})",
          flush=True)
    _, teacher, adata, seconds = quality.train_and_embed(data, prepared, VARIANT, workdir / name / "run", config,
                                                         base)
    return teacher, adata, {"index": str(index), "index_rows": len(table), "train_index": str(train_path),
                            "train_s": round(seconds, 1)}


# ----------------------------------------------------------------------------- report
def table(runs: dict) -> str:
    """One line per pre-training run: macro-F1 and the rare / common classes' mean F1 and recall."""
    rows = [{"run": name, "rows": r["index_rows"], "macro": r["knn"]["macro_f1"], "rare_f1": r["knn"]["rare_f1"],
             "rare_rec": r["knn"]["rare_recall"], "common_f1": r["knn"]["common_f1"],
             "common_rec": r["knn"]["common_recall"]} for name, r in runs.items()]
    return format_table(rows, [("run", "pre-trained on", "s"), ("rows", "index rows", "d"),
                               ("macro", "10nn macro-F1", ".3f"), ("rare_f1", "rare F1", ".3f"),
                               ("rare_rec", "rare recall", ".3f"), ("common_f1", "common F1", ".3f"),
                               ("common_rec", "common recall", ".3f")])


def class_table(runs: dict, pool: dict) -> str:
    """Per-class 10-NN F1 of every run, with each class's rows in the pool and in each curated index."""
    rows = []
    for c in pool["common"] + pool["rare"]:
        line = {"class": c, "group": "common" if c in pool["common"] else "rare", "pool": pool["per_class"][c]}
        for name, r in runs.items():
            line[f"{name}_f1"] = r["knn"]["per_class"][c]["f1"]
            line[f"{name}_n"] = r.get("composition", {}).get("per_class", {}).get(c)
        rows.append(line)
    cols = [("class", "class", "s"), ("group", "group", "s"), ("pool", "pool rows", "d")]
    for name in runs:
        if name != "uncurated":
            cols.append((f"{name}_n", f"{name} rows", "d"))
    cols += [(f"{name}_f1", f"F1 {name}", ".3f") for name in runs]
    return format_table(rows, cols)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.curation_pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default="hpa", help="a built-in generator or module:callable (benchmarks.quality)")
    p.add_argument("--config", default=str(quality.DEFAULT_CONFIG), help="training config (the quality suite's)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="training overrides for both runs (recorded in the JSON)")
    p.add_argument("--common", type=int, default=3, help="classes kept whole in the pool; the others are rare")
    p.add_argument("--ratio", type=float, default=20.0, help="rows of a common class per row of a rare one")
    p.add_argument("--copies", type=float, default=0.2, help="fraction of the common rows added again as repeats")
    p.add_argument("--target", type=int, default=80, help="rows kept by curation's balanced sampling")
    p.add_argument("--threshold", type=float, default=0.995,
                   help="near-duplicate cosine threshold (this generator's distinct cells: median nearest 0.98 "
                        "in raw pixels, so the curate default 0.95 would drop most of them)")
    p.add_argument("--clusters", type=int, nargs="*", default=[], help="k-means levels, finest first (none: auto)")
    p.add_argument("--features", nargs="*", default=list(FEATURE_KINDS), choices=FEATURE_KINDS,
                   help="curation features: raw pixels, and/or the uncurated run's teacher (none: only --oracle)")
    p.add_argument("--oracle", action="store_true",
                   help="also pre-train on the target-size selection a curation knowing the labels would make "
                        "(every class as even as its cells allow, no repeats): the most curation can give")
    p.add_argument("--pooling", default="default",
                   help="teacher features: embed's pooling (default | concat | mean | channel names, e.g. protein)")
    p.add_argument("--pixel-channels", nargs="+", default=[], metavar="CHANNEL",
                   help="pixel features: only these channels (default: all)")
    p.add_argument("--epoch-rows", type=int, default=quality.EPOCH_ROWS, help="training rows per epoch (every run)")
    p.add_argument("--n-cells", type=int, help="cells in the generated set (default: the generator's own)")
    p.add_argument("--quick", action="store_true", help="tiny set, tiny model, 2 steps: a plumbing check")
    p.add_argument("--seed", type=int, default=0, help="generator, pool, curation and evaluation seed")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--workdir", help="keep generated data and runs here (default: a temporary folder)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help="results JSON")
    return p


def run(args: argparse.Namespace) -> dict:
    """Build the pool, curate it, pre-train on every index and score; returns the JSON payload."""
    start, load_before, cpu_before = time.perf_counter(), os.getloadavg(), time.process_time()
    base, epoch_rows, ratio, target, n_cells = list(args.overrides), args.epoch_rows, args.ratio, args.target, \
        args.n_cells
    if args.quick:
        base = quality.QUICK["overrides"] + base
        n_cells, epoch_rows = n_cells or quality.QUICK["n_cells"], quality.QUICK["epoch_rows"]
        ratio, target = QUICK["ratio"], QUICK["target"]
    config = Path(args.config)
    sample_size = load_config(config, base).data.sample_size
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        data = quality.generate_cached(args.generator, workdir, args.seed, n_cells)
        runs_dir = workdir / "curation_pretrain" / f"{data.name}_seed{args.seed}"
        heldout = quality.prepare_data(data, runs_dir / "heldout", epoch_rows, args.seed)
        generated = pd.read_csv(data.index)
        train = generated[generated["split"].astype(str).str.lower() == "train"]
        pool, before = build_pool(train, data.label_key, args.common, ratio, args.copies, args.seed)
        classes = sorted(before["per_class"])
        hidden = [data.label_key, "label_id", "injected_copy"]  # what curation and training never see
        pool_index = write_index(pool, runs_dir / "pool.csv", data.index.parent, hidden)
        print(f"pool: {before['rows']} rows, common {before['common']}, rare {before['rare']}, "
              f"{before['injected_copies']} injected repeats; per class {before['per_class']}", flush=True)

        def train_and_score(name: str, index: Path) -> tuple[Path, dict, dict]:
            """Pre-train on ``index``; its teacher, run info and held-out k-NN report."""
            teacher, adata, info = pretrain(name, index, data, heldout, runs_dir, config, base, epoch_rows, args.seed)
            return teacher, info, knn_report(adata, data.label_key, before["rare"], before["common"], args.k,
                                             args.seed)

        runs: dict[str, dict] = {}
        teacher, info, knn = train_and_score("uncurated", pool_index)
        runs["uncurated"] = {**info, "knn": knn}
        for kind in args.features:
            features = "pixels" if kind == "pixels" else str(teacher)
            out = runs_dir / f"curated_{kind}" / "curated.csv"
            t = time.perf_counter()
            argv = curate_argv(pool_index, features, out, target, args.clusters, args.threshold, args.seed,
                               sample_size, args.pooling, args.pixel_channels)
            all_rows, summary = curate(argv, out)
            curate_s = time.perf_counter() - t
            after = composition(pool, all_rows, data.label_key, classes)
            print(f"curated ({kind}): {after['rows']} rows, {after['duplicates_dropped']} duplicates dropped "
                  f"({after['distinct_cells_dropped_as_duplicates']} of them cells the pool holds once; "
                  f"{before['injected_copies']} repeats injected); "
                  f"per class {after['per_class']}", flush=True)
            _, info, knn = train_and_score(f"curated_{kind}", out)
            runs[f"curated_{kind}"] = {
                **info, "curate_command": "python -m cellvit_ssl.curate " + " ".join(argv),
                "curate_s": round(curate_s, 1), "composition": after,
                "clusters": [lv["clusters"] for lv in summary["levels"]],
                "nearest_similarity_quantiles": summary["dedup"]["nearest_similarity_quantiles"], "knn": knn}
        if args.oracle:
            chosen = oracle_selection(pool, data.label_key, target, args.seed)
            out = write_index(chosen, runs_dir / "curated_oracle" / "curated.csv", data.index.parent, hidden)
            after = {"rows": len(chosen), "per_class": class_counts(chosen[data.label_key], classes),
                     "repeats_selected": 0, "selected_by": ["labels (oracle)"]}
            print(f"oracle: {after['rows']} rows, per class {after['per_class']}", flush=True)
            _, info, knn = train_and_score("curated_oracle", out)
            runs["curated_oracle"] = {**info, "composition": after, "knn": knn}
    wall = time.perf_counter() - start
    payload = {
        "benchmark": "curation_pretrain",
        "command": "python -m benchmarks.curation_pretrain " + " ".join(sys.argv[1:] if args.argv is None
                                                                        else args.argv),
        "generator": data.name, "variant": VARIANT, "config": str(config), "overrides": base,
        "quick": bool(args.quick), "seed": args.seed, "k": args.k, "epoch_rows": epoch_rows,
        "steps": quality.count_steps(config, base, epoch_rows), "target_size": target, "threshold": args.threshold,
        "scoring": f"{args.k}-NN cosine on the held-out rows ({heldout['n_test']}), stratified 5-fold cv; "
                   "rare / common: mean over those classes",
        "pool": before, "runs": runs,
        "machine": {"cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "platform": platform.platform(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": versions(), "wall_s": round(wall, 1), "cpu_s": round(time.process_time() - cpu_before, 1),
    }
    print()
    print(table(runs))
    print()
    print(class_table(runs, before))
    print(f"{payload['steps']} steps per run; wall time {wall / 60:.1f} min, CPU {payload['cpu_s'] / 60:.1f} min on "
          f"{os.cpu_count()} CPUs (load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f})")
    write_json(args.json, payload)
    print(f"wrote {args.json}", file=sys.stderr)
    return payload


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        run(args)
    except CellVitSSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
