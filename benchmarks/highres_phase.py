"""A demo run that ends with a high-resolution phase vs the same steps without it.

    python -m benchmarks.highres_phase [--workdir /tmp/highres] [--json benchmarks/results/highres_phase.json]

Both runs train ``configs/demo.yaml`` for its 100 steps (134 cells, batch 32). The second
declares ``train.phases=[{start: 0.9, crop_scale: 2, sample_scale: 1}]``: its last 10 steps cut
64-px global and 32-px local views (instead of 32 / 16) from the same 48-px samples, at a
quarter of the per-process batch (8), with their own warm-up + cosine learning rate and
teacher momentum.
The script checks, from ``metrics.jsonl``, that the phase trained at the larger views, that
every grid the runs saw gets the position embedding resampled exactly from the stored native
grid, and that the exported contract (``teacher.pt``) is the phase's; then it scores both
encoders with the demo probe and prints the table. A control row embeds the plain run's model
at the phase's input size (64 px) without having trained at it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks._common import format_table, write_json
from benchmarks._demo_runs import demo_data, knn_scores, machine, smoke, train_demo
from cellvit_ssl import load_encoder
from cellvit_ssl.checkpoint import save_checkpoint
from cellvit_ssl.models.vit import resample_grid

PHASE = "train.phases=[{start: 0.9, crop_scale: 2, sample_scale: 1}]"


def positional_check(teacher: Path, grids: set[tuple[int, int]]) -> dict:
    """Max difference between the backbone's position encoding at each grid and a direct resample.

    At the native grid the stored embedding must come back untouched; elsewhere it must be the
    bicubic resample of the stored grid to exactly that grid (``(1, 1 + h*w, D)``).
    """
    vit = load_encoder(teacher, device="cpu").model.backbone.requires_grad_(False)
    worst = 0.0
    for grid in sorted(grids):
        got = vit.interpolate_pos_encoding(grid)
        want = torch.cat([vit.pos_embed[:, :1], resample_grid(vit.pos_embed[:, 1:], vit.native_grid, grid)], dim=1)
        assert got.shape == (1, 1 + grid[0] * grid[1], vit.embed_dim), (grid, got.shape)
        if grid == vit.native_grid:
            assert got is vit.pos_embed
        worst = max(worst, float((got - want).abs().max()))
    return {"grids": [list(g) for g in sorted(grids)], "max_abs_difference": worst,
            "native_grid": list(vit.native_grid)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="keep runs and probes here (default: a temp folder)")
    parser.add_argument("--json", default="benchmarks/results/highres_phase.json")
    parser.add_argument("--smoke", action="store_true", help="tiny runs: check that the script works")
    args = parser.parse_args()
    if args.smoke:
        smoke()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        rows, checks = [], {}
        cache = demo_data(work)
        for name, extra in (("highres", [PHASE]), ("base", [])):  # base last: another benchmark may train it
            run = work / name
            trained = train_demo(run, cache, extra)
            records = trained["records"]
            sizes = sorted({(r.get("phase", 0), r["global_crop"], r["local_crop"], r["micro_batch"]) for r in records})
            patch = load_encoder(run / "teacher.pt", device="cpu").patch_size
            grids = {(s // patch, s // patch) for _, g, loc, _ in sizes for s in (g, loc)}
            contract = torch.load(run / "teacher.pt", weights_only=True)["preprocess"]
            checks[name] = {"view_sizes_by_phase": [dict(zip(("phase", "global_crop", "local_crop", "micro_batch"), s))
                                                    for s in sizes],
                            "first_step_of_last_phase": min(r["step"] for r in records
                                                            if r.get("phase", 0) == sizes[-1][0]),
                            "exported_contract": {k: contract[k] for k in ("sample_size", "input_size")},
                            "positional_encoding": positional_check(run / "teacher.pt", grids)}
            scores = knn_scores(run / "teacher.pt", work / f"probe_{name}")
            rows.insert(0, {"run": name, "steps": records[-1]["step"], "train_s": trained["seconds"], **scores})
        # control: the base model embedded at the phase's input size without having trained at it
        control = work / "base_at_phase_size" / "teacher.pt"
        payload = torch.load(work / "base" / "teacher.pt", weights_only=True)
        phase_input = checks["highres"]["exported_contract"]["input_size"]
        payload["preprocess"] = {**payload["preprocess"], "input_size": phase_input}
        save_checkpoint(payload, control)
        rows.append({"run": f"base, embedded at {phase_input} px", "steps": rows[0]["steps"], "train_s": None,
                     **knn_scores(control, work / "probe_base_at_phase_size")})
    print(format_table(rows, [("run", "run", "s"), ("steps", "steps", "d"), ("train_s", "train s", ".0f"),
                              ("trained", "trained F1", ".3f"), ("random-init", "random F1", ".3f"),
                              ("raw-pixels", "raw F1", ".3f")]))
    print(json.dumps(checks, indent=1))
    write_json(args.json, {"benchmark": "highres_phase", "phase": PHASE, "machine": machine(),
                           "probe": "demo_knn: k-NN macro-F1, leave one field out, 48 unseen demo fields", "rows": rows,
                           "checks": checks})


if __name__ == "__main__":
    main()
