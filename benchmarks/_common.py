"""Shared pieces of the benchmarks: environment, timing, FLOP counting, peak FLOP/s, output.

Timing never synchronises inside the measured loop: one synchronisation before the clock
starts and one after the last step, so host-device round trips inside a step stay visible.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

import torch
from torch.utils import flop_counter

_aten = torch.ops.aten


def _register_cpu_attention_flops() -> None:
    # torch counts the CUDA SDPA kernels but not the CPU flash kernel; without this the CPU
    # figures would leave attention out of the FLOPs.
    registry = flop_counter.flop_registry
    fwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in registry:
        flop_counter.register_flop_formula(fwd)(
            lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)
        )
    if bwd is not None and bwd not in registry:
        flop_counter.register_flop_formula(bwd)(
            lambda g, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(g, q, k, v)
        )


_register_cpu_attention_flops()


def versions() -> dict[str, str | None]:
    """Versions of the packages a figure depends on (None when not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "lightly", "timm", "xformers", "cellvit-ssl"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info(device: torch.device) -> dict:
    """Where the figures were taken: device name, CUDA / cuDNN versions, CPU count."""
    info = {"device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Release cached allocations and reset the peak-memory counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated device memory since the last :func:`free_memory` (None on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def time_per_call(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Mean wall-clock seconds of ``fn()`` over ``calls`` back-to-back calls."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything ``fn()`` runs, forward and backward (``torch.utils.flop_counter``)."""
    with flop_counter.FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak_flops(device: torch.device, size: int, dtype: torch.dtype, calls: int = 10) -> float:
    """Achieved FLOP/s of a square ``size³`` matmul in ``dtype`` on ``device`` (the MFU yardstick)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    seconds = time_per_call(lambda: torch.mm(a, b), calls, device)
    return 2 * size**3 / seconds


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` are ``(key, header, format)`` and missing values print as ``-``."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, fmt in columns:
            value = row.get(key)
            line.append("-" if value is None else format(value, fmt))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    text = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
