"""Drawing and imaging helpers shared by the synthetic generators.

Cells are drawn as float images in arbitrary "dye" units (about 0..1.5), then "acquired":
optical blur, per-channel gain, background and illumination, Poisson photon noise and
Gaussian read noise, cast to uint16 as a camera would. Everything draws from the ``rng``
it is given, so a generator is a deterministic function of its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class Shape:
    """A cell or nucleus outline on a canvas.

    Attributes:
        rho: Normalised radial coordinate (0 at the centre, 1 on the outline) per pixel.
        theta: Polar angle around the centre per pixel.
        centre: ``(y, x)`` in pixels.
        radius: Mean radius in pixels.
    """

    rho: np.ndarray
    theta: np.ndarray
    centre: tuple[float, float]
    radius: float

    @property
    def mask(self) -> np.ndarray:
        return self.rho < 1.0


def grid(size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates ``(yy, xx)`` of a canvas."""
    h, w = (size, size) if isinstance(size, int) else size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy, xx


def blob(rng: np.random.Generator, size: int | tuple[int, int], centre: Sequence[float], radius: float,
         elongation: float = 1.0, irregularity: float = 0.1, angle: float | None = None) -> Shape:
    """An irregular, possibly elongated outline: a circle deformed by random low harmonics.

    Args:
        rng: Random source.
        size: Canvas side (or ``(h, w)``).
        centre: ``(y, x)``.
        radius: Mean radius (px).
        elongation: Minor / major axis ratio (1 = round).
        irregularity: Amplitude of the harmonics 2..5 relative to the radius.
        angle: Orientation of the major axis (random when None).
    """
    yy, xx = grid(size)
    cy, cx = float(centre[0]), float(centre[1])
    angle = rng.uniform(0, np.pi) if angle is None else angle
    dy, dx = yy - cy, xx - cx
    u = dy * np.cos(angle) + dx * np.sin(angle)
    v = (-dy * np.sin(angle) + dx * np.cos(angle)) / max(elongation, 1e-3)
    theta = np.arctan2(v, u)
    boundary = np.ones_like(theta)
    for k in range(2, 6):
        boundary += irregularity / (k - 1) * rng.uniform(0, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rho = np.hypot(u, v) / (radius * np.clip(boundary, 0.5, None))
    return Shape(rho.astype(np.float32), theta.astype(np.float32), (cy, cx), float(radius))


def smooth_noise(rng: np.random.Generator, size: int | tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to [0, 1]."""
    shape = (size, size) if isinstance(size, int) else size
    n = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), sigma, mode="wrap")
    lo, hi = float(n.min()), float(n.max())
    return (n - lo) / max(hi - lo, 1e-6)


def network(rng: np.random.Generator, size: int | tuple[int, int], sigma: float, sharpness: float = 6.0) -> np.ndarray:
    """A reticular network of thin ridges (ER, mitochondria): the level set of smooth noise at 0.5."""
    n = smooth_noise(rng, size, sigma)
    return (1.0 - np.abs(2.0 * n - 1.0)) ** sharpness


def puncta(rng: np.random.Generator, where: np.ndarray, n: int, sigma: float,
           brightness: tuple[float, float] = (0.6, 1.0), weights: np.ndarray | None = None) -> np.ndarray:
    """``n`` gaussian spots at random pixels of the boolean ``where`` (optionally weighted)."""
    out = np.zeros(where.shape, np.float32)
    ys, xs = np.nonzero(where)
    if len(ys) == 0 or n <= 0:
        return out
    p = None
    if weights is not None:
        w = weights[ys, xs].astype(np.float64)
        p = w / w.sum() if w.sum() > 0 else None
    pick = rng.choice(len(ys), size=int(n), replace=True, p=p)
    np.add.at(out, (ys[pick], xs[pick]), rng.uniform(*brightness, size=len(pick)).astype(np.float32))
    out = ndimage.gaussian_filter(out, sigma)
    return out * (2 * np.pi * sigma**2)  # peak of a spot ~ its brightness


def radial_filaments(rng: np.random.Generator, shape: Shape, origin: Sequence[float], n: int, width: float = 0.8,
                     curl: float = 0.4) -> np.ndarray:
    """``n`` thin filaments radiating from ``origin`` (microtubules from the centrosome).

    Each leaves at a random angle and bends its own way; all fade towards the outline.
    """
    h, w = shape.rho.shape
    yy, xx = grid((h, w))
    theta = np.arctan2(yy - origin[0], xx - origin[1])
    r = np.hypot(yy - origin[0], xx - origin[1])
    out = np.zeros((h, w), np.float32)
    for phi, bend in zip(rng.uniform(-np.pi, np.pi, n), rng.normal(0, curl, n)):
        d_angle = np.angle(np.exp(1j * (theta - phi - bend * r / max(shape.radius, 1))))
        out += np.exp(-((r * d_angle) / width) ** 2) * rng.uniform(0.5, 1.0)
    return (np.clip(out, 0, 1.5) * np.clip(1.1 - shape.rho, 0, 1)).astype(np.float32)


def ring(shape: Shape, inner: float, outer: float = 1.0) -> np.ndarray:
    """A soft band between ``inner`` and ``outer`` of the normalised radius."""
    mid, half = (inner + outer) / 2, max((outer - inner) / 2, 1e-3)
    return np.clip(1.0 - np.abs(shape.rho - mid) / half, 0, 1).astype(np.float32)


@dataclass
class Acquisition:
    """How one image is recorded: per-channel gain and background, illumination, noise.

    Attributes:
        gain: Per-channel multiplicative gain (exposure x detector).
        background: Per-channel offset in dye units (autofluorescence, camera offset).
        illumination: Per-channel ``(H, W)`` multiplicative field (vignetting, gradients), or None.
        photons: Expected photon count at dye intensity 1 (lower = noisier).
        read_noise: Gaussian read noise, in camera counts.
        blur: Optical blur (px).
    """

    gain: np.ndarray
    background: np.ndarray
    illumination: np.ndarray | None = None
    photons: float = 300.0
    read_noise: float = 3.0
    blur: float = 0.8


def random_acquisition(rng: np.random.Generator, n_channels: int, gain: tuple[float, float] = (0.6, 1.6),
                       background: tuple[float, float] = (0.01, 0.08), photons: tuple[float, float] = (150, 600),
                       read_noise: tuple[float, float] = (1.0, 6.0), blur: tuple[float, float] = (0.6, 1.1)
                       ) -> Acquisition:
    """Independent random imaging settings per image (log-uniform gains and photon counts)."""
    return Acquisition(
        gain=np.exp(rng.uniform(np.log(gain[0]), np.log(gain[1]), n_channels)).astype(np.float32),
        background=rng.uniform(*background, n_channels).astype(np.float32),
        photons=float(np.exp(rng.uniform(np.log(photons[0]), np.log(photons[1])))),
        read_noise=float(rng.uniform(*read_noise)),
        blur=float(rng.uniform(*blur)),
    )


def illumination_field(rng: np.random.Generator, size: int | tuple[int, int], strength: float) -> np.ndarray:
    """A smooth multiplicative field: a linear gradient plus radial vignetting, mean about 1."""
    yy, xx = grid(size)
    h, w = yy.shape
    a = rng.uniform(0, 2 * np.pi)
    ramp = ((yy / h - 0.5) * np.cos(a) + (xx / w - 0.5) * np.sin(a))
    vignette = ((yy / h - 0.5) ** 2 + (xx / w - 0.5) ** 2)
    return (1.0 + strength * ramp - strength * vignette).astype(np.float32)


def acquire(rng: np.random.Generator, dye: np.ndarray, acq: Acquisition) -> np.ndarray:
    """Record a ``(C, H, W)`` dye image as a uint16 camera image (blur, gain, noise)."""
    img = ndimage.gaussian_filter(np.clip(dye, 0, None), sigma=(0, acq.blur, acq.blur))
    img = img * acq.gain[:, None, None] + acq.background[:, None, None]
    if acq.illumination is not None:
        img = img * acq.illumination
    counts = rng.poisson(np.clip(img, 0, None) * acq.photons).astype(np.float32)
    counts += rng.normal(100.0, acq.read_noise, size=counts.shape).astype(np.float32)  # camera offset 100
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)
