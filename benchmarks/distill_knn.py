"""A tiny student distilled from a larger tiny teacher vs the same student trained from scratch.

    python -m benchmarks.distill_knn [--teacher RUN/checkpoint.pt] [--workdir /tmp/distill]
        [--json benchmarks/results/distill_knn.json]

The teacher is ``configs/demo.yaml``'s model (width 64, 4 blocks, 4 heads, 100 steps); without
``--teacher`` it is trained first (``WORKDIR/base``). The student is width 32, 4 blocks, 2 heads
(about a quarter of the teacher's block parameters), trained for the same ``--steps`` (default:
the demo's 100) three ways: from scratch with the demo recipe; distilled from the teacher's ``checkpoint.pt``
(its trained heads give the targets); distilled from its ``teacher.pt`` (no heads: fresh,
frozen ones). All are scored with the demo probe; the table and JSON report the gate of the
issue: the distilled student beats the scratch one and comes within 0.05 of the teacher.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks._common import format_table, write_json
from benchmarks._demo_runs import demo_data, knn_scores, machine, smoke, train_demo

#: Student sizes by name: width, blocks, attention heads (the teacher: 64, 4, 4).
STUDENTS = {"w32d4": (32, 4, 2), "w16d2": (16, 2, 2)}
GATE = 0.05  # the issue's: distilled within this of the teacher's k-NN macro-F1


def students(teacher: Path, fresh_heads: bool = True) -> list[tuple[str, str, list[str]]]:
    """``(row name, run folder, overrides)`` of the students trained against ``teacher`` (a ``checkpoint.pt``)."""
    export = teacher.with_name("teacher.pt")
    rows = [("student from scratch", "scratch", []),
            ("student distilled (checkpoint.pt: trained heads)", "distill_ckpt",
             [f"distill.teacher={teacher}", "distill.init_student_heads=true"]),
            ("  same, student heads new (as DINOv2)", "distill_ckpt_newheads",
             [f"distill.teacher={teacher}", "distill.init_student_heads=false"])]
    if fresh_heads:
        rows += [("student distilled (teacher.pt: fresh frozen heads)", "distill_export",
                  [f"distill.teacher={export}", "distill.init_student_heads=true"]),
                 ("  same, student heads new", "distill_export_newheads",
                  [f"distill.teacher={export}", "distill.init_student_heads=false"])]
    return rows


def run(work: Path, teacher: Path | None = None, steps: int = 100, fresh_heads: bool = True,
        teacher_epochs: int = 25, student: str = "w16d2") -> dict:
    """Train (or reuse) the teacher and the students in ``work``, probe them; rows and the gate.

    Args:
        work: Working folder (runs, probes, demo data).
        teacher: A demo run's ``checkpoint.pt``; None trains the demo model for ``teacher_epochs``
            (``work/base``, or ``work/base_e<epochs>``).
        steps: Optimiser steps of every student.
        fresh_heads: Also distil from ``teacher.pt`` (fresh, frozen heads).
        teacher_epochs: Length of the teacher's run (4 steps an epoch; 25: the demo's).
        student: A key of :data:`STUDENTS`.
    """
    width, depth, heads = STUDENTS[student]
    size = [f"model.embed_dim={width}", f"model.depth={depth}", f"model.num_heads={heads}"]
    rows = []
    cache = demo_data(work)
    teacher_s = None
    if teacher is None:
        name = "base" if teacher_epochs == 25 else f"base_e{teacher_epochs}"
        trained = train_demo(work / name, cache, [] if teacher_epochs == 25 else [f"train.epochs={teacher_epochs}"])
        teacher, teacher_s = work / name / "checkpoint.pt", trained["seconds"]
    rows.append({"model": f"teacher (64 wide, 4 blocks, {teacher_epochs * 4} steps)", "train_s": teacher_s,
                 **knn_scores(teacher.with_name("teacher.pt"), work / f"probe_{teacher.parent.name}")})
    budget = [f"train.max_steps={steps}", "train.epochs=1000"]
    tag = ("" if teacher.parent.name == "base" else f"_{teacher.parent.name}") + ("" if student == "w32d4" else
                                                                                  f"_{student}")
    for name, folder, extra in students(teacher, fresh_heads):
        folder = f"student_{folder}{tag}"
        trained = train_demo(work / folder, cache, [*size, *budget, *extra])
        rows.append({"model": name, "run": folder, "train_s": trained["seconds"],
                     **knn_scores(work / folder / "teacher.pt", work / f"probe_{folder}")})
    teacher_f1, scratch, distilled = rows[0]["trained"], rows[1]["trained"], rows[2]["trained"]
    gate = {"distilled_beats_scratch": distilled > scratch, "distilled_within_of_teacher": GATE,
            "teacher_minus_distilled": teacher_f1 - distilled,
            "passed": distilled > scratch and teacher_f1 - distilled <= GATE}
    return {"student": {"width": width, "depth": depth, "heads": heads}, "steps": steps, "rows": rows, "gate": gate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="checkpoint.pt of a demo run (its folder also has teacher.pt)")
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps of every student")
    parser.add_argument("--teacher-epochs", type=int, default=25, help="without --teacher: its run length")
    parser.add_argument("--student", default="w16d2", choices=sorted(STUDENTS), help="student size")
    parser.add_argument("--workdir", help="keep runs and probes here (default: a temp folder)")
    parser.add_argument("--json", default="benchmarks/results/distill_knn.json")
    parser.add_argument("--smoke", action="store_true", help="tiny runs: check that the script works")
    args = parser.parse_args()
    if args.smoke:
        smoke()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(args.workdir or tmp), Path(args.teacher) if args.teacher else None, args.steps,
                     teacher_epochs=args.teacher_epochs, student=args.student)
    print(format_table(result["rows"], [("model", "model", "s"), ("train_s", "train s", ".0f"),
                                        ("trained", "k-NN F1", ".3f"), ("random-init", "random F1", ".3f"),
                                        ("raw-pixels", "raw F1", ".3f")]))
    print(result["gate"])
    write_json(args.json, {"benchmark": "distill_knn", "machine": machine(),
                           "probe": "demo_knn: k-NN macro-F1, leave one field out, 48 unseen demo fields", **result})


if __name__ == "__main__":
    main()
