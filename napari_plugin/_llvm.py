"""Keep PyTorch from importing triton into a process whose OpenGL driver already loaded LLVM.

napari draws with OpenGL. Mesa's software renderer (llvmpipe: VMs, remote desktops, Xvfb) and
radeonsi load the system ``libLLVM``; triton ships its own LLVM, and loading the second one into
the same process crashes it (first-loaded symbols win). Nothing in the inspector needs triton
(``torch.compile`` would), but opening a checkpoint imports torchvision, whose ops import
``torch._dynamo``, which imports triton when it is installed. Marking triton as absent *before*
that import makes torch skip it.
"""

from __future__ import annotations

import sys
from pathlib import Path


def keep_triton_out_if_llvm_loaded(maps: str | Path = "/proc/self/maps") -> bool:
    """Mark triton unimportable when an LLVM library is already mapped and triton is not loaded.

    Args:
        maps: The process's memory map (Linux); elsewhere nothing is done.

    Returns:
        True when triton was marked absent.
    """
    if "triton" in sys.modules:
        return False
    try:
        mapped = Path(maps).read_text()
    except OSError:
        return False
    if "libLLVM" not in mapped:
        return False
    sys.modules["triton"] = None  # `import triton` now raises ImportError; torch treats it as not installed
    return True
