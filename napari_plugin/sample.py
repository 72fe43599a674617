"""Sample data: the built-in synthetic demo field with its cell segmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Where the sample is generated on first use (a few hundred KB, reused afterwards).
CACHE_DIR = Path("~/.cache/cellvit_ssl/napari_sample")
#: One 256-px field of 24 cells (same generator as the training demo, its own seed).
SAMPLE_SPEC = {"n_images": 1, "image_size": 256, "cells_per_image": 24, "seed": 7}
CHANNEL_COLORS = ("blue", "magenta", "yellow", "green")


def demo_sample(cache_dir: str | Path | None = None) -> list[tuple]:
    """The demo field as napari layer data: one image layer per channel and a ``cells`` Labels layer.

    The field is read back from the OME-Zarr the demo generator writes (image and its
    ``labels/cells`` group), so the sample exercises the same files a user would open.

    Args:
        cache_dir: Folder to generate into; defaults to :data:`CACHE_DIR`.

    Returns:
        napari ``LayerDataTuple`` list.
    """
    from cellvit_ssl.data.readers import open_labels, open_stack
    from cellvit_ssl.data.synthetic import DemoSpec, generate_demo

    out = Path(cache_dir or CACHE_DIR).expanduser()
    generate_demo(out, DemoSpec(**SAMPLE_SPEC), fmt="ome-zarr")
    path = out / "images" / "field_000.ome.zarr"
    stack = open_stack(path)
    image = stack.read()
    labels = np.asarray(open_labels(path / "labels" / "cells"))
    limits = [(float(np.quantile(ch, 0.05)), float(np.quantile(ch, 0.999)) + 1.0) for ch in image]
    image_meta = {
        "channel_axis": 0,
        "name": list(stack.channel_names),
        "colormap": list(CHANNEL_COLORS[: len(image)]),
        "blending": "additive",
        "contrast_limits": limits,
        "metadata": {"source_path": str(path), "channel_names": list(stack.channel_names)},
    }
    return [(image, image_meta, "image"), (labels, {"name": "cells", "opacity": 0.3}, "labels")]
