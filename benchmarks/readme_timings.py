"""The README's timings, measured the way a reader runs them, with the machine and its load.

    python -m benchmarks.readme_timings [--json benchmarks/results/readme_timings.json] [--probe-test]

Runs, each in its own process from the repository root, into a temporary folder (nothing in
``runs/`` or ``~/.cache`` is touched):

1. the Quick start demo, ``python -m cellvit_ssl.train configs/demo.yaml`` (data generation
   included: the cache folder starts empty);
2. the phenotype probe on that run, ``python -m benchmarks.demo_knn TEACHER``;
3. with ``--probe-test``, ``pytest --runslow tests/test_demo_probe.py`` (the demo and the probe
   again, as the test suite runs them).

Every figure comes with the machine (CPU model, logical CPUs this process may use, memory),
the package versions, and the load average before, during (sampled every 5 s) and after each
command: on a shared machine the same command takes several times longer under load, so a
timing without its load says little. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """CPU model, usable CPUs, memory and package versions of this machine."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("torch", "lightly", "cellvit-ssl"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable, "memory_gib": memory_gib,
            "platform": platform.platform(), "versions": versions}


class LoadSampler:
    """Samples the 1-minute load average every ``every`` seconds while a command runs."""

    def __init__(self, every: float = 5.0) -> None:
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def timed(name: str, argv: list[str], env: dict) -> dict:
    """Run one command from the repository root; its wall time and the load around it."""
    print(f"[{name}] {' '.join(argv)}", file=sys.stderr, flush=True)
    before = os.getloadavg()
    start = time.perf_counter()
    with LoadSampler() as load:
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = os.getloadavg()
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"[{name}] failed with exit status {proc.returncode}")
    during = load.samples or [after[0]]
    print(f"[{name}] {seconds:.0f} s, load average {sum(during) / len(during):.1f}", file=sys.stderr, flush=True)
    return {"name": name, "command": " ".join(argv), "seconds": round(seconds, 1),
            "load_before": [round(v, 2) for v in before], "load_after": [round(v, 2) for v in after],
            "load_during_mean": round(sum(during) / len(during), 2), "load_during_max": round(max(during), 2),
            "stdout_tail": proc.stdout[-600:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/readme_timings.json", help="where the figures go")
    parser.add_argument("--probe-test", action="store_true", help="also time pytest --runslow tests/test_demo_probe.py")
    args = parser.parse_args(argv)
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, cache = Path(tmp) / "demo_run", Path(tmp) / "demo_cache"
        runs.append(timed("demo", [sys.executable, "-m", "cellvit_ssl.train", "configs/demo.yaml",
                                   f"train.output_dir={run_dir}", f"data.demo.cache_dir={cache}"], env))
        runs.append(timed("probe", [sys.executable, "-m", "benchmarks.demo_knn", str(run_dir / "teacher.pt"),
                                    "--json", str(Path(tmp) / "demo_knn.json")], env))
        probe = json.loads((Path(tmp) / "demo_knn.json").read_text())
        if args.probe_test:
            runs.append(timed("probe test", [sys.executable, "-m", "pytest", "--runslow", "-q", "-p",
                                             "no:cacheprovider", "tests/test_demo_probe.py"], env))
    report = {"what": "wall-clock seconds of the README's commands, each in a fresh process; the machine is "
                      "shared when load_during_mean exceeds usable_cpus",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "runs": runs, "probe_macro_f1": probe.get("macro_f1")}
    from cellvit_ssl.io import atomic_write_text

    out = atomic_write_text(ROOT / args.json if not Path(args.json).is_absolute() else args.json,
                            json.dumps(report, indent=1))
    m = report["machine"]
    print(f"\n{m['cpu']}, {m['usable_cpus']} usable CPUs, {m['memory_gib']} GiB")
    print(f"{'command':<12} {'time':>9} {'load avg (during, max)':>24}")
    for r in runs:
        minutes, seconds = divmod(int(round(r["seconds"])), 60)
        print(f"{r['name']:<12} {minutes:>3} min {seconds:02d} s {r['load_during_mean']:>12.1f}, "
              f"{r['load_during_max']:.1f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
