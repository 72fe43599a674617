"""benchmarks/model_cost.py still runs (on a tiny shape) and writes its JSON."""

import importlib.util
import json
from pathlib import Path


def test_model_cost_benchmark_writes_a_row_per_variant(tmp_path, capsys):
    path = Path(__file__).parents[1] / "benchmarks" / "model_cost.py"
    spec = importlib.util.spec_from_file_location("model_cost", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "cost.json"
    assert bench.main(["--device", "cpu", "--channels", "3", "--img-size", "16", "--repeats", "1",
                       "--batch", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["boc", "hierarchical", "channelvit"]
    assert all(r["ms_per_image"] > 0 and r["saved_activations_MiB"] > 0 for r in rows)
    # hierarchical keeps more activations than boc: its cross-channel blocks are extra layers
    assert rows[1]["saved_activations_MiB"] > rows[0]["saved_activations_MiB"]
    assert "hierarchical" in capsys.readouterr().out
