"""Tiny image data sets the training tests write themselves (PNG files in ImageFolder form).

Each class has its own colour and stripe pattern plus per-image noise, so a small network
learns it in a few epochs; the files are real PNGs read through timm's folder/tar readers.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("circle", "hstripe", "plain", "vstripe")
_COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 220), (200, 200, 40))


def _image(label: int, rng: np.random.Generator, size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size]
    if label == 0:
        mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    elif label == 1:
        mask = (yy // 4) % 2 == 0
    elif label == 2:
        mask = np.ones((size, size), dtype=bool)
    else:
        mask = (xx // 4) % 2 == 0
    img = np.full((size, size, 3), 90.0)
    img[mask] = _COLOURS[label]
    img += rng.normal(0, 25, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_image_folder(root: Path, per_class: int, *, seed: int = 0, size: int = 32) -> Path:
    """``root/<class>/<i>.png`` with ``per_class`` images of each of the 4 classes."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _image(label, rng, size).save(folder / f"{i:04d}.png")
    return root


def write_splits(root: Path, *, train: int, val: int, size: int = 32) -> Path:
    """``root/train/...`` and ``root/val/...`` ImageFolders (different images)."""
    write_image_folder(root / "train", train, seed=1, size=size)
    write_image_folder(root / "val", val, seed=2, size=size)
    return root


def tar_folder(folder: Path, target: Path) -> Path:
    """An uncompressed tar of ``folder`` holding ``folder.name/<class>/<file>``."""
    with tarfile.open(target, "w") as tf:
        tf.add(folder, arcname=folder.name)
    return target
