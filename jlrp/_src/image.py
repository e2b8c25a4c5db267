"""Heatmaps, overlays, image grids and PNG input/output, in plain numpy + Pillow.

Relevance arrays are per pixel: a trailing channel axis is summed before colouring. Shapes
accepted everywhere: ``(H, W)``, ``(H, W, C)``, ``(N, H, W)`` and ``(N, H, W, C)``. A 3-D array
whose last axis has at most 4 entries is read as one ``(H, W, C)`` image (images are rarely
that narrow), otherwise as an ``(N, H, W)`` batch; pass ``channels=`` to override.
Normalisation is always per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["Colormap", "COLORMAPS", "get_colormap", "bwr", "seismic", "coldnhot", "gray", "hot",
           "normalize", "heatmap", "overlay", "grid", "save_png", "load_png", "plot_curves"]


# --------------------------------------------------------------------------------------------------
# colour maps

@dataclass(frozen=True)
class Colormap:
    """Piecewise-linear colour map; calling it maps values to RGB uint8 (shape ``(..., 3)``).

    Unsigned maps are defined on [0, 1] by ``points``. Signed maps are defined on [-1, 1]:
    ``points`` give the colours on [0, 1] and negative values take the colour of ``|v|`` with red
    and blue swapped. Building the negative half as a mirror makes the symmetry exact (bit for
    bit), which separately interpolated halves would not guarantee after rounding.
    Values outside the domain are clipped; NaN maps to 0.
    """

    name: str
    points: tuple[tuple[float, tuple[int, int, int]], ...]
    signed: bool = False

    def __call__(self, values: np.ndarray | float) -> np.ndarray:
        v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
        v = np.clip(v, -1.0 if self.signed else 0.0, 1.0)
        xs = np.array([p for p, _ in self.points], dtype=np.float64)
        cs = np.array([c for _, c in self.points], dtype=np.float64)
        a = np.abs(v)
        rgb = np.rint(np.stack([np.interp(a, xs, cs[:, i]) for i in range(3)], -1)).astype(np.uint8)
        if self.signed:
            rgb = np.where((v < 0)[..., None], rgb[..., ::-1], rgb)
        return rgb


# Signed maps list only their positive half (0 = neutral colour).
bwr = Colormap("bwr", ((0.0, (255, 255, 255)), (1.0, (255, 0, 0))), signed=True)
# matplotlib's seismic ends in (0, 0, 0.3) / (0.5, 0, 0); we use 0.5 on both ends to stay symmetric.
seismic = Colormap("seismic", ((0.0, (255, 255, 255)), (0.5, (255, 0, 0)), (1.0, (128, 0, 0))), signed=True)
# Zennit's "coldnhot": cyan - blue - black - red - yellow.
coldnhot = Colormap("coldnhot", ((0.0, (0, 0, 0)), (0.5, (255, 0, 0)), (1.0, (255, 255, 0))), signed=True)
gray = Colormap("gray", ((0.0, (0, 0, 0)), (1.0, (255, 255, 255))))
hot = Colormap("hot", ((0.0, (0, 0, 0)), (1 / 3, (255, 0, 0)), (2 / 3, (255, 255, 0)), (1.0, (255, 255, 255))))

COLORMAPS: dict[str, Colormap] = {c.name: c for c in (bwr, seismic, coldnhot, gray, hot)}


def get_colormap(name: str | Colormap) -> Colormap:
    """Look up a colour map by name (a :class:`Colormap` is returned unchanged)."""
    if isinstance(name, Colormap):
        return name
    try:
        return COLORMAPS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown colour map {name!r}; valid names: {sorted(COLORMAPS)}") from None


# --------------------------------------------------------------------------------------------------
# normalisation and heatmaps

def _pixel_maps(relevance: np.ndarray, channels: bool | None = None) -> np.ndarray:
    """Sum the channel axis (if any): returns (H, W) or (N, H, W) float64 with non-finite -> 0."""
    r = np.asarray(relevance, dtype=np.float64)
    if channels is None:
        channels = r.ndim == 4 or (r.ndim == 3 and r.shape[-1] <= 4)
    if channels:
        r = r.sum(-1)
    if r.ndim not in (2, 3):
        raise ValueError(f"expected relevance of shape (H, W), (H, W, C), (N, H, W) or (N, H, W, C), "
                         f"got {np.shape(relevance)}")
    return np.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # All-zero (or constant) maps have nothing to show: return zeros, never NaN.
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape)), where=b > 0)


def _normalize_maps(r: np.ndarray, mode: str, percentile: float | None) -> np.ndarray:
    ax = (-2, -1)
    if percentile is not None:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        # Clipping outliers keeps a few huge values from washing out the rest of the map.
        c = np.percentile(np.abs(r), percentile, axis=ax, keepdims=True)
        r = np.clip(r, -c, c)
    if mode == "symmetric":
        return _safe_div(r, np.abs(r).max(ax, keepdims=True))
    if mode == "absolute":
        a = np.abs(r)
        return _safe_div(a, a.max(ax, keepdims=True))
    if mode == "minmax":
        lo = r.min(ax, keepdims=True)
        return _safe_div(r - lo, r.max(ax, keepdims=True) - lo)
    raise ValueError(f"unknown mode {mode!r}; valid modes: 'symmetric', 'absolute', 'minmax'")


def normalize(relevance: np.ndarray, mode: str = "symmetric", percentile: float | None = None,
              channels: bool | None = None) -> np.ndarray:
    """Scale relevance per image for display; channels are summed first.

    Modes: ``"symmetric"`` divides by max ``|R|`` (result in [-1, 1], sign and 0 preserved);
    ``"absolute"`` gives ``|R| / max |R|`` in [0, 1]; ``"minmax"`` maps [min, max] to [0, 1].
    With ``percentile`` (in (0, 100]) values are first clipped to +-that percentile of ``|R|``.
    An all-zero (or constant) map gives zeros, never NaN.

    Returns:
        float32 array of shape ``(H, W)`` or ``(N, H, W)``.
    """
    return _normalize_maps(_pixel_maps(relevance, channels), mode, percentile).astype(np.float32)


def _colorize(v: np.ndarray, cmap: str | Colormap, mode: str) -> np.ndarray:
    cm = get_colormap(cmap)
    if mode == "symmetric" and not cm.signed:
        v = (v + 1) / 2  # show signed data on an unsigned map in full: -1 -> 0, 0 -> 0.5, 1 -> 1
    return cm(v)


def heatmap(relevance: np.ndarray, cmap: str | Colormap = "bwr", mode: str = "symmetric",
            percentile: float | None = None, channels: bool | None = None) -> np.ndarray:
    """Colour relevance per pixel: uint8 RGB of shape ``(H, W, 3)`` or ``(N, H, W, 3)``.

    See :func:`normalize` for ``mode`` and ``percentile``. With ``mode="symmetric"`` and an
    unsigned map (``gray``, ``hot``), [-1, 1] is spread over the whole map (0 -> middle colour).
    """
    v = _normalize_maps(_pixel_maps(relevance, channels), mode, percentile)
    return _colorize(v, cmap, mode)


def overlay(image: np.ndarray, relevance: np.ndarray, alpha: float = 0.5,
            cmap: str | Colormap = "bwr", mode: str = "symmetric", percentile: float | None = None,
            weighted: bool = True) -> np.ndarray:
    """Blend a heatmap of ``relevance`` over ``image``; returns uint8 RGB ``(..., H, W, 3)``.

    ``image`` is grayscale (same shape as the per-pixel relevance map, or with a channel axis of
    1) or RGB (channel axis of 3), and is min-max scaled to [0, 1] per image. With ``weighted``
    (default) the blend weight per pixel is ``alpha * |normalised R|``, so pixels without
    relevance show the plain image; otherwise it is ``alpha`` everywhere.
    """
    v = _normalize_maps(_pixel_maps(relevance), mode, percentile)
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == v.ndim:
        img = img[..., None]
    if img.ndim != v.ndim + 1 or img.shape[:-1] != v.shape or img.shape[-1] not in (1, 3):
        raise ValueError(f"image of shape {img.shape} does not match relevance maps of shape {v.shape} "
                         f"(expected {v.shape}, {v.shape + (1,)} or {v.shape + (3,)})")
    ax = (-3, -2, -1)
    lo = img.min(ax, keepdims=True)
    img = np.broadcast_to(_safe_div(img - lo, img.max(ax, keepdims=True) - lo), v.shape + (3,))
    heat = _colorize(v, cmap, mode) / 255.0
    w = alpha * (np.abs(v)[..., None] if weighted else np.ones(v.shape + (1,)))
    return np.rint(255 * ((1 - w) * img + w * heat)).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# grids and files

def _rgb_tile(t: np.ndarray) -> np.ndarray:
    t = np.asarray(t)
    if t.dtype != np.uint8:
        raise TypeError(f"grid tiles must be uint8 images (e.g. from heatmap()), got dtype {t.dtype}")
    if t.ndim == 3 and t.shape[-1] == 1:
        t = t[..., 0]
    if t.ndim == 2:
        t = np.repeat(t[..., None], 3, -1)
    if t.ndim != 3 or t.shape[-1] != 3:
        raise ValueError(f"grid tiles must be (H, W), (H, W, 1) or (H, W, 3), got {t.shape}")
    return t


def grid(images: Sequence[Sequence[np.ndarray]] | np.ndarray, row_labels: Sequence[str] | None = None,
         col_labels: Sequence[str] | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Compose equally sized uint8 tiles into one uint8 RGB image on a white background.

    ``images`` is a list of rows (lists of tiles) or an array ``(rows, cols, H, W[, C])``. Tiles
    are enlarged ``scale`` times by pixel repetition. Without labels the result has height
    ``rows * H * scale + (rows + 1) * pad`` (width likewise); labels, drawn in PIL's default
    font, add a margin above the columns / left of the rows.
    """
    if scale < 1 or int(scale) != scale or pad < 0:
        raise ValueError(f"scale must be a positive integer and pad >= 0, got scale={scale}, pad={pad}")
    rows = [[_rgb_tile(t) for t in row] for row in images]
    n_rows, n_cols = len(rows), len(rows[0]) if rows else 0
    if n_cols == 0 or any(len(r) != n_cols for r in rows):
        raise ValueError("grid needs a non-empty rectangular list of rows of tiles")
    h, w = rows[0][0].shape[:2]
    if any(t.shape[:2] != (h, w) for r in rows for t in r):
        raise ValueError("all grid tiles must have the same height and width")
    for labels, count, what in ((row_labels, n_rows, "row"), (col_labels, n_cols, "column")):
        if labels is not None and len(labels) != count:
            raise ValueError(f"got {len(labels)} {what} labels for {count} {what}s")

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    bbox = lambda s: measure.textbbox((0, 0), str(s), font=font)  # noqa: E731
    left = max(bbox(s)[2] - bbox(s)[0] for s in row_labels) + pad if row_labels else 0
    top = max(bbox(s)[3] - bbox(s)[1] for s in col_labels) + pad if col_labels else 0

    th, tw = h * scale, w * scale
    canvas = np.full((top + n_rows * th + (n_rows + 1) * pad, left + n_cols * tw + (n_cols + 1) * pad, 3),
                     255, np.uint8)
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            y0, x0 = top + pad + i * (th + pad), left + pad + j * (tw + pad)
            canvas[y0:y0 + th, x0:x0 + tw] = t.repeat(scale, 0).repeat(scale, 1)
    if not (row_labels or col_labels):
        return canvas

    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    for j, s in enumerate(col_labels or ()):
        l, t, r, b = bbox(s)
        cx = left + pad + j * (tw + pad) + tw / 2
        draw.text((cx - (r - l) / 2 - l, pad / 2 - t), str(s), fill=(0, 0, 0), font=font)
    for i, s in enumerate(row_labels or ()):
        l, t, r, b = bbox(s)
        cy = top + pad + i * (th + pad) + th / 2
        draw.text((pad / 2 - l, cy - (b - t) / 2 - t), str(s), fill=(0, 0, 0), font=font)
    return np.asarray(im)


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 image ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` as a lossless PNG."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise TypeError(f"save_png needs a uint8 image, got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ValueError(f"save_png needs (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {a.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format="PNG")


def load_png(path: str | Path) -> np.ndarray:
    """Read a PNG as uint8: ``(H, W)`` for grayscale, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA."""
    with Image.open(path) as im:
        if im.mode not in ("L", "RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
        return np.array(im)


def plot_curves(curves: dict[str, np.ndarray], path: str | Path, xlabel: str = "", ylabel: str = "",
                title: str = "", x: np.ndarray | None = None) -> None:
    """Write a line plot PNG of ``curves`` (name -> 1-D values) with matplotlib.

    ``x`` gives shared x values (default ``0, 1, ...``). Requires the ``plot`` extra.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("install jlrp[plot] for plots") from e
    # A bare Figure on an Agg canvas: no pyplot, so no global backend switch or figure leaks.
    # wide enough for the legend beside the axes, where it cannot hide a curve
    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, ys in curves.items():
        ys = np.asarray(ys).ravel()
        ax.plot(np.arange(len(ys)) if x is None else np.asarray(x).ravel(), ys, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if curves:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
