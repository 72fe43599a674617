"""Without a display (no DISPLAY, no Xvfb), the tests that open Qt windows are skipped with a reason;
Qt never gets to abort the pytest process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_window_tests_skip_with_a_reason_when_no_display_can_be_started(tmp_path):
    pytest.importorskip("pytestqt")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM",
                                                           "XAUTHORITY")}
    env.update(PATH=str(Path(sys.executable).parent), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # no Xvfb on PATH
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_napari_inspector.py", "-m", "display", "-q",
                           "-rs", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Fatal Python error" not in out
    assert "skipped" in out and "passed" not in out and "failed" not in out
    assert "no display: DISPLAY is unset and no Xvfb executable was found" in out
