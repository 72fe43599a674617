"""The mutation check's list fits the code (default suite), and every mutant is killed (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import mutation_check as mc

ROOT = Path(__file__).resolve().parents[1]


def test_every_mutant_snippet_exists_exactly_once():
    """Refactoring moved or changed a snippet: update benchmarks/mutation_check.py::MUTANTS."""
    assert mc.check_snippets(ROOT) == []
    assert len(mc.MUTANTS) >= 30
    areas = {m.area for m in mc.MUTANTS}
    assert {"objective", "centring", "views", "readers", "position embeddings", "checkpoint resume",
            "channel masks", "embed preprocessing", "dataset normalisation"} <= areas


def test_the_issue_23_offset_mutant_is_listed():
    m = next(m for m in mc.MUTANTS if m.name == "pos_embed_offset_ignored")
    assert (m.file, m.original, m.replacement) == ("cellvit_ssl/models/vit.py", "offset=self.spec.interpolate_offset",
                                                   "offset=0.0")


def test_a_missing_snippet_is_reported_by_name(tmp_path):
    (tmp_path / "cellvit_ssl").mkdir()
    (tmp_path / "cellvit_ssl" / "x.py").write_text("a = 1\na = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("")
    mutants = [mc.Mutant("gone", "area", "cellvit_ssl/x.py", "b = 2", "b = 3", ("tests/test_x.py",), "bug"),
               mc.Mutant("twice", "area", "cellvit_ssl/x.py", "a = 1", "a = 2", ("tests/test_y.py",), "bug")]
    problems = mc.check_snippets(tmp_path, mutants)
    assert any(p.startswith("gone: snippet found 0 times in cellvit_ssl/x.py") for p in problems)
    assert any(p.startswith("twice: snippet found 2 times") for p in problems)
    assert any("twice: test file tests/test_y.py does not exist" in p for p in problems)


def test_verdicts():
    assert mc.verdict({"rc": 1}) == mc.verdict({"rc": 2}) == mc.verdict({"rc": None}) == "killed"
    assert mc.verdict({"rc": 0}) == "survived"
    assert mc.verdict({"rc": 5}) == mc.verdict({"rc": 4}) == "error"  # nothing ran, or a bad selection


@pytest.mark.slow
def test_every_mutant_is_killed(tmp_path):
    out = tmp_path / "mutation_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.mutation_check", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())["mutants"]
    assert len(rows) == len(mc.MUTANTS) and all(r["verdict"] == "killed" for r in rows)
