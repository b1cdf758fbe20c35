"""Image tiles for the browser viewer: a lazily computed mean-pooled pyramid and fast PNG encoders.

The viewer asks for 256-px tiles of the level that matches its zoom, so only what is on screen is read and encoded.
Level 0 tiles slice the stored (possibly memory-mapped) plane directly: a tile of a huge TIFF reads only its own
region. Coarser levels need every pixel once, so each is computed whole on first use (in row bands, to bound the
float32 working memory) and kept. Label and prediction overlays are sampled by striding (nearest neighbour) so that
class values stay class values at every zoom.
"""

from __future__ import annotations

import io
import threading

import numpy as np
from PIL import Image

from deepscope.errors import DeepscopeError

TILE = 256
POOL_BAND = 512  # rows of the finer level converted to float32 at a time while pooling (even, so windows stay whole)
DEFAULT_CHANNEL_COLOURS = ("#ff0000", "#00ff00", "#0000ff", "#ff00ff", "#00ffff", "#ffff00", "#ffffff")
UNKNOWN_CLASS_COLOUR = "#808080"  # labels without a class in the project stay visible
UNCERTAINTY_COLOUR = "#ffff00"
OUTLINE_COLOUR = "#ffff00"
SELECTED_FILL = ("#00ffff", 110)  # an object picked (for a merge): filled, half transparent


def rgb(colour: str) -> np.ndarray:
    """(3,) uint8 of a CSS "#rrggbb" colour; DeepscopeError for anything else."""
    text = colour[1:] if isinstance(colour, str) and colour.startswith("#") else ""
    try:
        if len(text) != 6:
            raise ValueError
        return np.array([int(text[i : i + 2], 16) for i in (0, 2, 4)], np.uint8)
    except ValueError:
        raise DeepscopeError(f"colour {colour!r}: expected a CSS hex colour like #1f77b4") from None


def level_count(spatial_yx: tuple[int, int]) -> int:
    """Levels from full size (0) down to the first that fits in one tile, each half the size (rounded up)."""
    size, count = max(int(s) for s in spatial_yx), 1
    while size > TILE:
        size, count = -(-size // 2), count + 1
    return count


def level_shape(spatial_yx: tuple[int, int], level: int) -> tuple[int, int]:
    """(Y, X) of a pyramid level: halving with rounding up keeps a partial edge window as one pixel."""
    step = 2**level
    return -(-int(spatial_yx[0]) // step), -(-int(spatial_yx[1]) // step)


def tile_box(spatial_yx: tuple[int, int], level: int, ty: int, tx: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of tile (ty, tx) in the coordinates of ``level``; DeepscopeError outside the pyramid."""
    if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in (level, ty, tx)):
        raise DeepscopeError(f"tile ({level!r}, {ty!r}, {tx!r}): level and tile indices must be integers")
    levels = level_count(spatial_yx)
    if not 0 <= level < levels:
        raise DeepscopeError(f"tile level {level} is out of range: the image has levels 0 to {levels - 1}")
    height, width = level_shape(spatial_yx, level)
    rows, cols = -(-height // TILE), -(-width // TILE)
    if not (0 <= ty < rows and 0 <= tx < cols):
        raise DeepscopeError(f"tile ({ty}, {tx}) is out of range at level {level}: it has {rows} x {cols} tiles")
    return ty * TILE, min(height, (ty + 1) * TILE), tx * TILE, min(width, (tx + 1) * TILE)


def _pool(finer: np.ndarray) -> np.ndarray:
    """(C, Y, X) -> (C, ceil(Y/2), ceil(X/2)) float32 means of 2x2 windows.

    An odd last row or column is padded by repeating it, which makes the mean of a partial window exactly the mean
    of its real pixels (a pixel counted twice in both the sum and the divisor). No library pools with partial edge
    windows this way without a float32 copy of the whole input, which a memory-mapped image must avoid.
    """
    channels, height, width = finer.shape
    out = np.empty((channels, *level_shape((height, width), 1)), np.float32)
    for start in range(0, height, POOL_BAND):
        band = np.asarray(finer[:, start : start + POOL_BAND], dtype=np.float32)
        band = np.pad(band, ((0, 0), (0, band.shape[1] % 2), (0, width % 2)), mode="edge")
        rows = band.shape[1] // 2
        out[:, start // 2 : start // 2 + rows] = band.reshape(channels, rows, 2, -1, 2).mean(axis=(2, 4))
    return out


class Pyramid:
    """Mean-pooled levels of one (C, Y, X) plane; level k is 2**k times smaller, the last fits in one tile.

    ``plane`` may be a memory-mapped view in the stored dtype: level 0 tiles are read from it region by region.
    """

    def __init__(self, plane: np.ndarray) -> None:
        if plane.ndim != 3 or min(plane.shape) < 1:
            raise DeepscopeError(f"a pyramid needs a (C, Y, X) plane, got shape {plane.shape}")
        self.spatial: tuple[int, int] = (int(plane.shape[1]), int(plane.shape[2]))
        self.levels = level_count(self.spatial)
        self._computed: list[np.ndarray] = [plane]
        self._lock = threading.Lock()

    def level(self, level: int) -> np.ndarray:
        """The whole (C, Y', X') array of a level; coarser levels are computed from the previous one on first use."""
        if not 0 <= level < self.levels:
            raise DeepscopeError(f"pyramid level {level} is out of range: levels 0 to {self.levels - 1}")
        with self._lock:  # concurrent tile requests must not pool the same level twice
            while len(self._computed) <= level:
                self._computed.append(_pool(self._computed[-1]))
            return self._computed[level]

    def tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        """(C, h, w) float32 tile with h, w <= TILE (smaller at the bottom and right edges)."""
        y0, y1, x0, x1 = tile_box(self.spatial, level, ty, tx)
        return np.ascontiguousarray(self.level(level)[:, y0:y1, x0:x1], dtype=np.float32)


def overlay_region(array: np.ndarray, level: int, ty: int, tx: int) -> np.ndarray:
    """Strided (nearest-neighbour) view of a (..., Y, X) label or prediction map covering tile (level, ty, tx); it
    has the shape of the image tile at that level."""
    y0, y1, x0, x1 = tile_box((array.shape[-2], array.shape[-1]), level, ty, tx)
    step = 2**level
    return array[..., y0 * step : y1 * step : step, x0 * step : x1 * step : step]


def _png(pixels: np.ndarray) -> bytes:
    """PNG bytes of an (h, w, 3|4) uint8 array; compress_level 1 favours encoding speed over size."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _stretched(values: np.ndarray, contrast: list[tuple[float, float]]) -> np.ndarray:
    """(C, h, w) values mapped to [0, 1] between each channel's (low, high) limits; NaN becomes 0."""
    limits = np.asarray(contrast, np.float32).reshape(-1, 2)
    if len(limits) != len(values):
        raise DeepscopeError(f"contrast has {len(limits)} channel limits but the image has {len(values)} channels")
    low, high = limits[:, 0, None, None], limits[:, 1, None, None]
    scaled = (np.asarray(values, np.float32) - low) / np.maximum(high - low, np.float32(1e-12))
    return np.nan_to_num(np.clip(scaled, 0.0, 1.0), copy=False)


def image_png(values: np.ndarray, contrast: list[tuple[float, float]], colours: list[str] | None = None) -> bytes:
    """RGB PNG of a (C, h, w) tile: 1 channel grey, 3 channels RGB, otherwise each channel tinted by its colour
    (``colours``, else a default palette) and the tints summed."""
    stretched = _stretched(values, contrast)
    channels = len(stretched)
    if channels in (1, 3) and colours is None:
        rgb_values = np.repeat(stretched, 3, axis=0) if channels == 1 else stretched
        pixels = np.moveaxis(rgb_values, 0, -1) * 255
    else:
        chosen = (
            colours
            if colours is not None
            else [DEFAULT_CHANNEL_COLOURS[c % len(DEFAULT_CHANNEL_COLOURS)] for c in range(channels)]
        )
        if len(chosen) != channels:
            raise DeepscopeError(f"{len(chosen)} channel colours given for an image of {channels} channels")
        tints = np.stack([rgb(c) for c in chosen]).astype(np.float32)  # (C, 3)
        pixels = np.clip(np.tensordot(stretched, tints, axes=(0, 0)), 0, 255)
    return _png(np.rint(pixels).astype(np.uint8))


def labels_png(labels: np.ndarray, colours: dict[int, str]) -> bytes:
    """RGBA PNG of an (h, w) label map: 0 transparent, each class opaque in its colour (unknown classes grey)."""
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise DeepscopeError("label values must not be negative")
    size = max([int(labels.max()) if labels.size else 0, *colours]) + 1
    lut = np.zeros((size, 4), np.uint8)
    lut[1:] = (*rgb(UNKNOWN_CLASS_COLOUR), 255)
    for value, colour in colours.items():
        if value > 0:
            lut[value] = (*rgb(colour), 255)
    return _png(lut[labels])


def probabilities_png(probs: np.ndarray, colours: list[str]) -> bytes:
    """RGBA PNG of (K, h, w) uint8 class probabilities (0..255): the colours mixed by probability, opaque where the
    probabilities sum to 255 and transparent where nothing is predicted yet (all 0)."""
    if len(colours) != len(probs):
        raise DeepscopeError(f"{len(colours)} class colours given for {len(probs)} probability maps")
    weights = np.asarray(probs, np.float32)
    total = weights.sum(axis=0)
    tints = np.stack([rgb(c) for c in colours]).astype(np.float32)  # (K, 3)
    mixed = np.tensordot(weights, tints, axes=(0, 0)) / np.maximum(total, 1.0)[..., None]
    alpha = np.clip(total, 0, 255)[..., None]
    return _png(np.rint(np.concatenate([mixed, alpha], axis=-1)).astype(np.uint8))


def uncertainty_png(uncertainty: np.ndarray, colour: str = UNCERTAINTY_COLOUR) -> bytes:
    """RGBA PNG of an (h, w) uint8 uncertainty map: one colour whose opacity is the uncertainty."""
    alpha = np.asarray(uncertainty, np.uint8)
    pixels = np.empty((*alpha.shape, 4), np.uint8)
    pixels[..., :3] = rgb(colour)
    pixels[..., 3] = alpha
    return _png(pixels)


def outlines_png(
    instances: np.ndarray,
    colour: str = OUTLINE_COLOUR,
    selected: int | None = None,
    fill: tuple[str, int] = SELECTED_FILL,
) -> bytes:
    """RGBA PNG of the borders of an (h, w) instance map: opaque on the object pixels that touch another object or
    the background, transparent elsewhere; the inside of object ``selected`` (when given) is ``fill`` (colour,
    alpha)."""
    instances = np.asarray(instances)
    # skimage.segmentation imports skimage.morphology and scipy.spatial: not before the page is served
    from skimage.segmentation import find_boundaries

    border = find_boundaries(instances, mode="inner", background=0)
    pixels = np.zeros((*border.shape, 4), np.uint8)
    if selected:
        pixels[(instances == selected) & ~border] = (*rgb(fill[0]), fill[1])
    pixels[border] = (*rgb(colour), 255)
    return _png(pixels)
