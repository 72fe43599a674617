import subprocess
import sys


def test_import_does_not_pull_gui_libraries():
    code = (
        "import sys, cellvit_ssl; "
        "bad = [m for m in ('napari', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy', 'matplotlib', 'umap') "
        "if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
