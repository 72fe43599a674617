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


MODULE_CHECK = r"""
import ast, importlib, pathlib, sys

# every module of the package, imported in turn in this one interpreter; a module whose body runs twice
# (an import cycle through __main__, or a module imported under two names) is counted twice
runs = {}
real_exec = exec


def find_modules(root):
    for path in sorted(pathlib.Path(root).rglob("*.py")):
        parts = path.relative_to(pathlib.Path(root).parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


import importlib.abc, importlib.machinery


class Counter(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] not in ("cellvit_ssl", "napari_plugin"):
            return None
        runs[name] = runs.get(name, 0) + 1
        return None


sys.meta_path.insert(0, Counter())
for pkg in ("cellvit_ssl", "napari_plugin"):
    for module in find_modules(pkg):
        importlib.import_module(module)
print({k: v for k, v in runs.items() if v > 1})
"""


def test_every_module_imports_once_without_cycles():
    out = subprocess.run([sys.executable, "-c", MODULE_CHECK], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "{}", out.stdout


def test_import_graph_has_no_cycles():
    """Static check: no module of the package imports (at module level) one that imports it back."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    graph: dict[str, set[str]] = {}
    for path in sorted((root / "cellvit_ssl").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level only: function-level imports are lazy
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cellvit_ssl"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("cellvit_ssl")}
        graph[name] = {d for d in deps if d != name}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    cycles = sorted(name for name in graph if name in reach(name) and name != "cellvit_ssl")
    assert cycles == [], f"import cycles through {cycles}"


RUN_AS_MAIN = r"""
import runpy, sys
module = sys.argv[1]
sys.argv = [module, "--help"]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
# had the module imported itself (directly or through a cycle), its body would have run a second time
print("twice" if module in sys.modules else "once")
"""


def test_running_a_command_module_executes_its_body_once():
    """``python -m cellvit_ssl.embed`` must not run the module's body again under its own name."""
    for module in ("cellvit_ssl.embed", "cellvit_ssl.train", "cellvit_ssl.evaluate", "cellvit_ssl.data.index"):
        out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", RUN_AS_MAIN, module],
                             capture_output=True, text=True)
        assert out.returncode == 0, (module, out.stderr)
        assert out.stdout.strip().splitlines()[-1] == "once", module
