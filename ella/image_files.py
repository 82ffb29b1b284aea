"""Image files of batch generation: grids, PNG text metadata and atomic writes.

A PNG is written to a hidden temporary file in its own folder and renamed into place, so a killed run
leaves either the whole file or none; `remove_stale_temporaries` clears what a killed run left behind.
Nothing time- or machine-dependent goes into a file: the same pixels and metadata give the same bytes."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

__all__ = ["TEMP_SUFFIX", "grid_shape", "remove_stale_temporaries", "tile_grid", "to_uint8", "write_png"]

TEMP_SUFFIX = ".png-partial"  # hidden temporaries: `.<name>.<pid>.png-partial`


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] ([N, H, W, C], a diffusers pipeline's output_type="np") as uint8, rounded
    as diffusers rounds its PIL output."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, columns) of a near-square grid for `count` tiles: 4 gives 2 x 2 (DPG-Bench's layout)."""
    columns = math.ceil(math.sqrt(count))
    return math.ceil(count / columns), columns


def tile_grid(tiles: Sequence[np.ndarray]) -> np.ndarray:
    """Tiles [H, W, C] of one size laid out row by row (left to right, then down); empty cells are black."""
    rows, columns = grid_shape(len(tiles))
    height, width, channels = tiles[0].shape
    grid = np.zeros((rows * height, columns * width, channels), dtype=tiles[0].dtype)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = tile
    return grid


def write_png(path: Path, pixels: np.ndarray, text: Mapping[str, str]) -> None:
    """Write uint8 `pixels` [H, W, 3] to `path` as a PNG with `text` as UTF-8 text chunks (iTXt), in key order
    given; atomically: a temporary file in the same folder, flushed to disk, then renamed over `path`."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    temp = path.with_name(f".{path.stem}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        with open(temp, "wb") as f:
            Image.fromarray(pixels).save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporaries a killed run left in `folder`; the number deleted. Call it only while no
    run is writing there."""
    stale = [f for f in folder.glob(f".*{TEMP_SUFFIX}") if f.is_file()]
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)
