"""Shared fixtures: tiny configs and synthetic data made inside the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

#: Fixtures that create a QApplication / window: their tests need a display (Xvfb via pytest-xvfb, or a desktop).
DISPLAY_FIXTURES = frozenset({"qtbot", "qapp", "make_napari_viewer", "make_napari_viewer_proxy"})


def display_unavailable() -> str | None:
    """Why Qt cannot open a window in this session (None when it can).

    Checked at collection, after pytest-xvfb has started Xvfb (and set ``DISPLAY``) if it could:
    without a display Qt aborts the whole pytest process ("Fatal Python error: Aborted"), so
    those tests are skipped instead, with this as the reason.
    """
    if os.environ.get("QT_QPA_PLATFORM", "").split(":")[0] in ("offscreen", "minimal", "wayland"):
        return None
    if os.environ.get("WAYLAND_DISPLAY"):
        return None
    display = os.environ.get("DISPLAY", "")
    if not display:
        return ("no display: DISPLAY is unset and no Xvfb executable was found for pytest-xvfb "
                "(apt-get install xvfb and the Qt xcb libraries, see .ci/run)")
    if display.startswith(":"):  # a local X server listens on /tmp/.X11-unix/X<n>
        number = display[1:].split(".")[0]
        if number.isdigit() and not Path(f"/tmp/.X11-unix/X{number}").exists():
            return f"no display: DISPLAY={display} but no X server listens there (install xvfb, see .ci/run)"
    return None


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_display = display_unavailable()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if DISPLAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.display)
            if no_display:
                item.add_marker(pytest.mark.skip(reason=no_display))


TINY_OVERRIDES = [
    "data.sample_size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.demo.enabled=true",
    "data.demo.n_images=2",
    "data.demo.image_size=96",
    "data.demo.cells_per_image=6",
    "views.global_crop_size=32",
    "views.local_crop_size=16",
    "views.n_local_views=2",
    "model.arch=custom",
    "model.patch_size=8",
    "model.img_size=32",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "ssl.head_hidden_dim=64",
    "ssl.head_bottleneck_dim=16",
    "ssl.head_output_dim=128",
    "train.epochs=1",
    "train.warmup_epochs=0",
    "train.device=cpu",
]


@pytest.fixture
def tiny_overrides(tmp_path):
    """Dotlist overrides for a 2-block, 32-px ViT on a little synthetic demo data."""
    return TINY_OVERRIDES + [
        f"data.demo.cache_dir={tmp_path / 'demo'}",
        f"train.output_dir={tmp_path / 'run'}",
    ]


@pytest.fixture
def tiny_cfg(tiny_overrides):
    from cellvit_ssl.config import load_config

    return load_config(None, tiny_overrides)
