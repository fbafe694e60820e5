"""The built-in demo dataset: 10 classes of procedurally drawn 48x48 JPEGs in ImageNet layout.

Generated on first use into the cache folder (``$FASTAFD_CACHE``, else ``$XDG_CACHE_HOME/fastafd``,
else ``~/.cache/fastafd``) under a versioned name, deterministically from a fixed seed (every
image has its own generator, so the bytes do not depend on generation order), and atomically: it is
written to a temporary folder next to the final one and renamed into place.

Six shape classes (random colours, position, size, rotation) and four texture classes (random
colours, period, phase, small rotation), plus noise: learnable, but not trivial once
random-resized-crop has cut a shape or a texture down to a few pixels.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fastafd.errors import UserError
from fastafd.observe.progress import iterate

VERSION = 1
SEED = 20200712
SIZE = 48
SUPERSAMPLE = 2
QUALITY = 90
COUNTS = {"train": 320, "val": 60}
SHAPES = ("circle", "cross", "ring", "square", "star", "triangle")
TEXTURES = ("checkerboard", "dots", "hstripes", "vstripes")
DEMO_CLASSES: tuple[str, ...] = tuple(sorted(SHAPES + TEXTURES))
"""Class names in label order."""


def cache_dir() -> Path:
    """``$FASTAFD_CACHE``, else ``$XDG_CACHE_HOME/fastafd``, else ``~/.cache/fastafd``."""
    if os.environ.get("FASTAFD_CACHE"):
        return Path(os.environ["FASTAFD_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fastafd"
    return Path.home() / ".cache" / "fastafd"


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A background and a foreground colour that differ clearly (Euclidean RGB distance >= 120)."""
    bg = rng.integers(0, 256, 3)
    while True:
        fg = rng.integers(0, 256, 3)
        if np.linalg.norm(fg - bg) >= 120:
            return tuple(int(v) for v in bg), tuple(int(v) for v in fg)


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a rotated square, triangle, cross or star of circumradius ``r``."""
    if kind == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif kind == "star":
        pts = [((1.0 if k % 2 == 0 else 0.42) * math.cos(a), (1.0 if k % 2 == 0 else 0.42) * math.sin(a))
               for k, a in enumerate(-math.pi / 2 + k * math.pi / 5 for k in range(10))]
    else:  # cross: a plus sign with arms of half-width w
        w = 0.3
        pts = [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _shape(kind: str, rng: np.random.Generator, n: int) -> Image.Image:
    bg, fg = _colours(rng)
    img = Image.new("RGB", (n, n), bg)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.2, 0.4) * n
    cx, cy = (rng.uniform(r, n - r) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    if kind in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
        if kind == "ring":
            ri = r * rng.uniform(0.45, 0.65)
            draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=bg)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=fg)
    return img


def _texture(kind: str, rng: np.random.Generator, n: int) -> Image.Image:
    bg, fg = _colours(rng)
    period = rng.uniform(0.14, 0.3) * n
    tilt = rng.uniform(-0.25, 0.25)  # radians: stripes stay clearly horizontal or vertical
    if kind == "vstripes":
        tilt += math.pi / 2
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    u = y * math.cos(tilt) - x * math.sin(tilt) + rng.uniform(0, period)
    v = y * math.sin(tilt) + x * math.cos(tilt) + rng.uniform(0, period)
    if kind in ("hstripes", "vstripes"):
        mask = (u % period) < period * rng.uniform(0.35, 0.65)
    elif kind == "checkerboard":
        mask = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    else:  # dots on a grid
        du, dv = u % period - period / 2, v % period - period / 2
        mask = du * du + dv * dv < (period * rng.uniform(0.22, 0.35)) ** 2
    pixels = np.where(mask[..., None], np.array(fg, np.uint8), np.array(bg, np.uint8))
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def render(kind: str, rng: np.random.Generator) -> Image.Image:
    """One SIZE x SIZE RGB image of class ``kind``: drawn at 2x, downsampled, with Gaussian noise."""
    n = SIZE * SUPERSAMPLE
    img = (_shape if kind in SHAPES else _texture)(kind, rng, n).reduce(SUPERSAMPLE)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0.0, rng.uniform(2.0, 14.0), (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def generate(dest: Path, *, progress: bool = True) -> None:
    """Write the whole dataset into ``dest`` (which must exist and be empty)."""
    jobs = [(split, label, i) for split in COUNTS for label in range(len(DEMO_CLASSES)) for i in range(COUNTS[split])]
    for split in COUNTS:
        for name in DEMO_CLASSES:
            (dest / split / name).mkdir(parents=True)
    for split, label, i in iterate(jobs, len(jobs), "fastafd: generating demo data", enabled=progress):
        name = DEMO_CLASSES[label]
        rng = np.random.default_rng([SEED, 0 if split == "train" else 1, label, i])
        render(name, rng).save(dest / split / name / f"{name}_{i:04d}.JPEG", quality=QUALITY)


def demo_root(*, progress: bool = True) -> Path:
    """The demo dataset folder, generated on first use (safe when several processes race)."""
    parent = cache_dir()
    final = parent / f"demo-v{VERSION}"
    if final.is_dir():
        return final
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=parent))
    except OSError as exc:
        raise UserError(f"cannot write the demo data to {parent} ({exc.strerror}): "
                        "set FASTAFD_CACHE to a writable folder or pass --data DIR") from exc
    try:
        generate(tmp, progress=progress)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # a real failure, not a lost race
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
