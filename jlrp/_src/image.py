"""Heatmaps, colour bars, overlays, input tiles, method grids and PNG input/output, in plain numpy + Pillow;
vector figures (SVG, PDF) and curve plots with matplotlib (the optional ``plot`` extra).

Relevance arrays are per pixel: a trailing channel axis is summed before colouring. Shapes
accepted everywhere: ``(H, W)``, ``(H, W, C)``, ``(N, H, W)`` and ``(N, H, W, C)``. A 3-D array
whose last axis has at most 4 entries is read as one ``(H, W, C)`` image (images are rarely
that narrow), otherwise as an ``(N, H, W)`` batch; pass ``channels=`` to override.
Normalisation is always per image.

Outliers: a few pixels with huge relevance (common for LRP) make the rest of a linearly scaled map
invisible, so every display function clips ``|R|`` at the ``percentile`` (default
:data:`DEFAULT_PERCENTILE` = 99.5) of the non-zero ``|R|`` of each map before scaling; pass
``percentile=None`` for plain linear scaling by the maximum.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["Colormap", "COLORMAPS", "DEFAULT_PERCENTILE", "EVIDENCE_LABEL", "get_colormap", "bwr", "seismic",
           "coldnhot", "gray", "hot", "normalize", "heatmap", "overlay", "input_tile", "colorbar", "add_colorbar",
           "grid", "method_grid", "save_method_grid", "save_png", "load_png", "plot_curves", "CURVE_STYLES"]

#: Default clipping percentile of the display functions: ``|R|`` is clipped at this percentile of the
#: non-zero ``|R|`` of each map, so a few outliers cannot wash out the rest of the map.
DEFAULT_PERCENTILE = 99.5

#: Default colour-bar label of signed maps: positive relevance speaks for the explained output, negative
#: relevance against it.
EVIDENCE_LABEL = "relevance: evidence for (+) / against (-)"


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


def _clip_level(a: np.ndarray, percentile: float, axes: tuple[int, ...]) -> np.ndarray:
    """The ``percentile`` of the non-zero values of ``a >= 0`` over ``axes`` (0 where all are zero)."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100] or None, got {percentile}")
    with warnings.catch_warnings():  # all-zero maps: an all-NaN slice, handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        c = np.nanpercentile(np.where(a > 0, a, np.nan), percentile, axis=axes, keepdims=True)
    return np.nan_to_num(c, nan=0.0)


def _scale(r: np.ndarray, mode: str, percentile: float | None, axes: tuple[int, ...]) -> np.ndarray:
    """Clip at the percentile of the non-zero |r| over ``axes``, then scale (see :func:`normalize`)."""
    if percentile is not None:
        # Clipping outliers keeps a few huge values from washing out the rest of the map.
        c = _clip_level(np.abs(r), percentile, axes)
        r = np.clip(r, -c, c)
    if mode == "symmetric":
        return _safe_div(r, np.abs(r).max(axes, keepdims=True))
    if mode == "absolute":
        a = np.abs(r)
        return _safe_div(a, a.max(axes, keepdims=True))
    if mode == "minmax":
        lo = r.min(axes, keepdims=True)
        return _safe_div(r - lo, r.max(axes, keepdims=True) - lo)
    raise ValueError(f"unknown mode {mode!r}; valid modes: 'symmetric', 'absolute', 'minmax'")


def _normalize_maps(r: np.ndarray, mode: str, percentile: float | None) -> np.ndarray:
    return _scale(r, mode, percentile, (-2, -1))


def normalize(relevance: np.ndarray, mode: str = "symmetric", percentile: float | None = DEFAULT_PERCENTILE,
              channels: bool | None = None) -> np.ndarray:
    """Scale relevance per image for display; channels are summed first.

    Modes: ``"symmetric"`` divides by max ``|R|`` (result in [-1, 1], sign and 0 preserved);
    ``"absolute"`` gives ``|R| / max |R|`` in [0, 1]; ``"minmax"`` maps [min, max] to [0, 1].
    With ``percentile`` (in (0, 100]; default :data:`DEFAULT_PERCENTILE`) values are first clipped to
    +-that percentile of the non-zero ``|R|`` of the image (zeros, e.g. padding or dead units, do not
    count), so that a few outliers do not wash out the map; ``None`` turns clipping off.
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


def _enlarge(a: np.ndarray, scale: int, axes: tuple[int, int]) -> np.ndarray:
    if isinstance(scale, bool) or int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    scale = int(scale)
    return a if scale == 1 else a.repeat(scale, axes[0]).repeat(scale, axes[1])


def heatmap(relevance: np.ndarray, cmap: str | Colormap = "bwr", mode: str = "symmetric",
            percentile: float | None = DEFAULT_PERCENTILE, channels: bool | None = None,
            scale: int = 1) -> np.ndarray:
    """Colour relevance per pixel: uint8 RGB of shape ``(H, W, 3)`` or ``(N, H, W, 3)``.

    See :func:`normalize` for ``mode`` and ``percentile`` (outliers are clipped by default). With
    ``mode="symmetric"`` and an unsigned map (``gray``, ``hot``), [-1, 1] is spread over the whole map
    (0 -> middle colour). With ``bwr`` red is evidence for the explained output, blue against it
    (:func:`colorbar` draws the legend). ``scale`` enlarges by pixel repetition.
    """
    v = _normalize_maps(_pixel_maps(relevance, channels), mode, percentile)
    return _enlarge(_colorize(v, cmap, mode), scale, (-3, -2))


def _unit_image(image: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """(..., H, W, C) -> float64 in [0, 1]: uint8 / 255, else min-max per image (or the given range)."""
    img = np.asarray(image)
    if vmin is None and vmax is None and img.dtype == np.uint8:
        return img / 255.0
    img = np.nan_to_num(img.astype(np.float64))
    ax = (-3, -2, -1)
    lo = img.min(ax, keepdims=True) if vmin is None else np.float64(vmin)
    hi = img.max(ax, keepdims=True) if vmax is None else np.float64(vmax)
    return np.clip(_safe_div(img - lo, np.asarray(hi - lo)), 0.0, 1.0)


def input_tile(image: np.ndarray, *, vmin: float | None = None, vmax: float | None = None,
               mean: Sequence[float] | float | None = None, std: Sequence[float] | float | None = None,
               channels_first: bool = False, scale: int = 1) -> np.ndarray:
    """Turn a model input image (or a batch) into a uint8 RGB display tile, e.g. for :func:`grid`.

    ``image``: ``(H, W)``, ``(H, W, C)``, ``(N, H, W)`` or ``(N, H, W, C)`` with ``C`` 1 (grayscale) or 3
    (RGB); ``(C, H, W)`` layouts with ``channels_first=True``. A 3-D array with a last axis of 1 or 3 is
    one image, otherwise a grayscale batch. uint8 images are shown as they are; float images are min-max
    scaled per image, or mapped from ``[vmin, vmax]`` (clipped). ``mean`` / ``std`` undo a normalisation
    first (``x * std + mean``, per channel), after which the range defaults to [0, 1] (e.g. ImageNet
    preprocessing: ``mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)``). ``scale`` enlarges by
    pixel repetition.

    Returns:
        uint8 ``(H * scale, W * scale, 3)`` or ``(N, H * scale, W * scale, 3)``.
    """
    img = np.asarray(image)
    if channels_first:
        if img.ndim not in (3, 4):
            raise ValueError(f"channels_first needs (C, H, W) or (N, C, H, W), got {img.shape}")
        img = np.moveaxis(img, -3, -1)
    if img.ndim == 2 or (img.ndim == 3 and img.shape[-1] not in (1, 3)):
        img = img[..., None]
    if img.ndim not in (3, 4) or img.shape[-1] not in (1, 3):
        raise ValueError(f"input_tile needs (H, W), (H, W, 1|3), (N, H, W) or (N, H, W, 1|3), got "
                         f"{np.shape(image)}")
    if mean is not None or std is not None:
        img = img * np.asarray(1.0 if std is None else std, np.float64) + np.asarray(0.0 if mean is None else mean,
                                                                                       np.float64)
        vmin = 0.0 if vmin is None else vmin
        vmax = 1.0 if vmax is None else vmax
    unit = _unit_image(img, vmin, vmax)
    rgb = np.rint(255 * np.broadcast_to(unit, unit.shape[:-1] + (3,))).astype(np.uint8)
    return _enlarge(rgb, scale, (-3, -2))


def overlay(image: np.ndarray, relevance: np.ndarray, alpha: float = 0.5,
            cmap: str | Colormap = "bwr", mode: str = "symmetric",
            percentile: float | None = DEFAULT_PERCENTILE, weighted: bool = True, scale: int = 1) -> np.ndarray:
    """Blend a heatmap of ``relevance`` over ``image``; returns uint8 RGB ``(..., H * scale, W * scale, 3)``.

    ``image`` is grayscale (same shape as the per-pixel relevance map, or with a channel axis of
    1) or RGB (channel axis of 3); uint8 images are shown as they are, float images are min-max scaled
    to [0, 1] per image (use :func:`input_tile` first for other ranges). With ``weighted``
    (default) the blend weight per pixel is ``alpha * |normalised R|``, so pixels without
    relevance show the plain image; otherwise it is ``alpha`` everywhere. ``percentile``: see
    :func:`normalize`. ``scale`` enlarges the result by pixel repetition.
    """
    v = _normalize_maps(_pixel_maps(relevance), mode, percentile)
    img = np.asarray(image)
    if img.ndim == v.ndim:
        img = img[..., None]
    if img.ndim != v.ndim + 1 or img.shape[:-1] != v.shape or img.shape[-1] not in (1, 3):
        raise ValueError(f"image of shape {img.shape} does not match relevance maps of shape {v.shape} "
                         f"(expected {v.shape}, {v.shape + (1,)} or {v.shape + (3,)})")
    img = np.broadcast_to(_unit_image(img), v.shape + (3,))
    heat = _colorize(v, cmap, mode) / 255.0
    w = alpha * (np.abs(v)[..., None] if weighted else np.ones(v.shape + (1,)))
    return _enlarge(np.rint(255 * ((1 - w) * img + w * heat)).astype(np.uint8), scale, (-3, -2))


# --------------------------------------------------------------------------------------------------
# text in raster images

def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at ``size`` px (needs FreeType; else the small bitmap font)."""
    try:
        return ImageFont.load_default(size=max(1, int(round(size))))
    except (TypeError, AttributeError, OSError, ImportError):  # old Pillow or no FreeType
        return ImageFont.load_default()


def _text_width(font, s: str) -> int:
    l, _, r, _ = font.getbbox(s) if s else (0, 0, 0, 0)
    return r - l


def _line_height(font) -> int:
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return ascent + descent
    _, t, _, b = font.getbbox("Ag")
    return b - t + 2


def _split_words(label: str) -> list[str]:
    """Break points of a label: after spaces, underscores and hyphens (separators stay attached)."""
    return [w for w in re.split(r"(?<=[ _\-/])", str(label)) if w]


def _wrap(label: str, font, width: float) -> list[str]:
    """Greedy line breaking of ``label`` at :func:`_split_words` points to lines at most ``width`` wide."""
    lines: list[str] = []
    for paragraph in str(label).split("\n"):
        line = ""
        for word in _split_words(paragraph):
            if line and _text_width(font, (line + word).rstrip()) > width:
                lines.append(line.rstrip())
                line = word
            else:
                line += word
        lines.append(line.rstrip())
    return lines


def _draw_lines(draw: ImageDraw.ImageDraw, lines: Sequence[str], font, x: float, y: float, align: str = "center",
                fill=(0, 0, 0)) -> None:
    """Draw ``lines`` from top ``y``; ``x`` is the centre (align 'center'), left or right edge."""
    lh = _line_height(font)
    for k, line in enumerate(lines):
        l, t, r, _ = font.getbbox(line) if line else (0, 0, 0, 0)
        w = r - l
        x0 = {"center": x - w / 2, "left": x, "right": x - w}[align]
        draw.text((x0 - l, y + k * lh), line, fill=fill, font=font)


def _auto_font_size(labels: Sequence[str], tile_width: int, tile_height: int) -> int:
    """A label size readable when the figure is printed: 1/6 of the tile (at least 12 px), shrunk by up to a
    quarter when that saves lines (the column titles wrap at a tile's width)."""
    target = max(12, round(min(tile_width, tile_height) / 6))
    best, best_lines = target, None
    for size in range(target, max(12, math.ceil(0.75 * target)) - 1, -1):
        font = _font(size)
        lines = max((len(_wrap(str(s), font, tile_width)) for s in labels), default=1)
        if best_lines is None or lines < best_lines:
            best, best_lines = size, lines
    return best


# --------------------------------------------------------------------------------------------------
# colour bars

def _colorbar_spec(mode: str, label: str | None, ticks: Mapping[float, str] | None):
    if mode == "symmetric":
        lo, default_ticks = -1.0, {1.0: "for", 0.0: "0", -1.0: "against"}
        default_label = EVIDENCE_LABEL
    elif mode == "absolute":
        lo, default_ticks, default_label = 0.0, {1.0: "max", 0.0: "0"}, "|relevance| (for or against)"
    elif mode == "minmax":
        lo, default_ticks, default_label = 0.0, {1.0: "max", 0.0: "min"}, "relevance"
    else:
        raise ValueError(f"unknown mode {mode!r}; valid modes: 'symmetric', 'absolute', 'minmax'")
    return lo, (default_ticks if ticks is None else dict(ticks)), (default_label if label is None else label)


def colorbar(cmap: str | Colormap = "bwr", mode: str = "symmetric", *, length: int = 256,
             thickness: int | None = None, label: str | None = None, ticks: Mapping[float, str] | None = None,
             orientation: str = "vertical", font_size: int | None = None) -> np.ndarray:
    """A colour bar for heatmaps made with the same ``cmap`` and ``mode``: uint8 RGB on white.

    The bar spans the normalised range (``[-1, 1]`` for ``mode="symmetric"``, else ``[0, 1]``) over
    ``length`` pixels, with tick labels (default for signed maps: ``for`` at +1, ``0``, ``against`` at -1)
    and a ``label`` along it (default :data:`EVIDENCE_LABEL`: positive relevance is evidence for the
    explained output, negative against it). ``orientation``: ``"vertical"`` (maximum at the top; the label
    reads bottom to top on the right) or ``"horizontal"`` (maximum on the right; ticks and label below).
    ``font_size`` defaults to ``max(12, length // 14)``.
    """
    if orientation not in ("vertical", "horizontal"):
        raise ValueError(f"orientation must be 'vertical' or 'horizontal', got {orientation!r}")
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    cm = get_colormap(cmap)
    lo, tick_map, label = _colorbar_spec(mode, label, ticks)
    fs = max(12, length // 14) if font_size is None else int(font_size)
    thickness = max(8, fs) if thickness is None else int(thickness)
    font = _font(fs)
    lh = _line_height(font)
    gap = max(2, fs // 3)
    values = np.linspace(1.0, lo, length)  # top (or right) = maximum
    strip = _colorize(values, cm, mode)  # (length, 3)
    tick_w = max((_text_width(font, t) for t in tick_map.values()), default=0)
    if orientation == "vertical":
        label_lines = _wrap(label, font, length) if label else []
        width = thickness + gap + 4 + tick_w + (gap + len(label_lines) * lh if label_lines else 0)
        margin = lh // 2 + 1  # room for the end ticks' text
        canvas = Image.new("RGB", (width, length + 2 * margin), (255, 255, 255))
        canvas.paste(Image.fromarray(np.repeat(strip[:, None], thickness, 1)), (0, margin))
        draw = ImageDraw.Draw(canvas)
        for v, t in tick_map.items():
            y = margin + (1.0 - v) / (1.0 - lo) * (length - 1)
            draw.line([(thickness, y), (thickness + 3, y)], fill=(0, 0, 0))
            _draw_lines(draw, [t], font, thickness + gap + 4, y - lh / 2, align="left")
        if label_lines:
            text = Image.new("RGB", (length + 2 * margin, len(label_lines) * lh), (255, 255, 255))
            _draw_lines(ImageDraw.Draw(text), label_lines, font, text.width / 2, 0)
            canvas.paste(text.rotate(90, expand=True), (thickness + gap + 4 + tick_w + gap, 0))
        return np.asarray(canvas)
    label_lines = _wrap(label, font, length) if label else []
    margin = max(_text_width(font, t) for t in tick_map.values()) // 2 + 1 if tick_map else 0
    height = thickness + 4 + lh + (len(label_lines) * lh + gap if label_lines else 0)
    canvas = Image.new("RGB", (length + 2 * margin, height), (255, 255, 255))
    canvas.paste(Image.fromarray(np.repeat(strip[::-1][None], thickness, 0)), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for v, t in tick_map.items():
        x = margin + (v - lo) / (1.0 - lo) * (length - 1)
        draw.line([(x, thickness), (x, thickness + 3)], fill=(0, 0, 0))
        _draw_lines(draw, [t], font, x, thickness + 4)
    _draw_lines(draw, label_lines, font, margin + length / 2, thickness + 4 + lh + gap)
    return np.asarray(canvas)


def add_colorbar(image: np.ndarray, cmap: str | Colormap = "bwr", mode: str = "symmetric", *,
                 label: str | None = None, ticks: Mapping[float, str] | None = None, side: str = "right",
                 span: tuple[int, int] | None = None, pad: int = 8, font_size: int | None = None) -> np.ndarray:
    """``image`` (e.g. a :func:`heatmap` or a :func:`grid`) with a :func:`colorbar` on its right (or below).

    The bar runs along the image's rows ``span = (start, stop)`` (default: all of them; columns for
    ``side="bottom"``). Returns uint8 RGB on a white background.
    """
    img = _rgb_tile(np.asarray(image))
    if side not in ("right", "bottom"):
        raise ValueError(f"side must be 'right' or 'bottom', got {side!r}")
    extent = img.shape[0] if side == "right" else img.shape[1]
    start, stop = (0, extent) if span is None else span
    if not 0 <= start < stop <= extent:
        raise ValueError(f"span {span} is not inside the image's {extent} {'rows' if side == 'right' else 'columns'}")
    bar = colorbar(cmap, mode, length=stop - start, label=label, ticks=ticks, font_size=font_size,
                   orientation="vertical" if side == "right" else "horizontal")
    if side == "right":
        margin = (bar.shape[0] - (stop - start)) // 2  # the bar's text margin above the colours
        top = max(0, margin - start)
        h = max(img.shape[0] + top, start + top - margin + bar.shape[0])
        out = np.full((h, img.shape[1] + pad + bar.shape[1], 3), 255, np.uint8)
        out[top:top + img.shape[0], :img.shape[1]] = img
        y0 = start + top - margin
        out[y0:y0 + bar.shape[0], img.shape[1] + pad:] = bar
        return out
    margin = (bar.shape[1] - (stop - start)) // 2
    left = max(0, margin - start)
    w = max(img.shape[1] + left, start + left - margin + bar.shape[1])
    out = np.full((img.shape[0] + pad + bar.shape[0], w, 3), 255, np.uint8)
    out[:img.shape[0], left:left + img.shape[1]] = img
    x0 = start + left - margin
    out[img.shape[0] + pad:, x0:x0 + bar.shape[1]] = bar
    return out


# --------------------------------------------------------------------------------------------------
# grids and files

def _rgb_tile(t: np.ndarray) -> np.ndarray:
    t = np.asarray(t)
    if t.dtype != np.uint8:
        raise TypeError(f"grid tiles must be uint8 images (e.g. from heatmap() or input_tile()), got dtype "
                        f"{t.dtype}")
    if t.ndim == 3 and t.shape[-1] == 1:
        t = t[..., 0]
    if t.ndim == 2:
        t = np.repeat(t[..., None], 3, -1)
    if t.ndim != 3 or t.shape[-1] != 3:
        raise ValueError(f"grid tiles must be (H, W), (H, W, 1) or (H, W, 3), got {t.shape}")
    return t


def grid(images: Sequence[Sequence[np.ndarray]] | np.ndarray, row_labels: Sequence[str] | None = None,
         col_labels: Sequence[str] | None = None, pad: int = 2, scale: int = 1,
         font_size: int | None = None) -> np.ndarray:
    """Compose equally sized uint8 tiles into one uint8 RGB image on a white background.

    ``images`` is a list of rows (lists of tiles) or an array ``(rows, cols, H, W[, C])``. Tiles
    are enlarged ``scale`` times by pixel repetition. Without labels the result has height
    ``rows * H * scale + (rows + 1) * pad`` (width likewise); labels add a margin above the columns /
    left of the rows. Labels are drawn in Pillow's scalable font at ``font_size`` px, by default 1/6 of
    the (enlarged) tile, at least 12 px, so they stay readable when the figure is printed with its tiles a
    few centimetres wide (shrunk by up to a quarter to keep every column title on one line; longer titles
    wrap at spaces, ``_``, ``-`` and ``/``).
    """
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got pad={pad}")
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
    rows = [[_enlarge(t, scale, (0, 1)) for t in row] for row in rows]
    th, tw = rows[0][0].shape[:2]

    labels_all = [str(s) for s in (col_labels or [])]
    fs = _auto_font_size(labels_all, tw, th) if font_size is None else int(font_size)
    font = _font(fs)
    lh = _line_height(font)
    col_lines = [_wrap(s, font, tw) for s in (col_labels or [])]
    row_lines = [str(s).split("\n") for s in (row_labels or [])]
    left = max(_text_width(font, line) for lines in row_lines for line in lines) + 2 * pad if row_labels else 0
    top = max(len(lines) for lines in col_lines) * lh + pad if col_labels else 0

    canvas = np.full((top + n_rows * th + (n_rows + 1) * pad, left + n_cols * tw + (n_cols + 1) * pad, 3),
                     255, np.uint8)
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            y0, x0 = top + pad + i * (th + pad), left + pad + j * (tw + pad)
            canvas[y0:y0 + th, x0:x0 + tw] = t
    if not (row_labels or col_labels):
        return canvas

    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    for j, lines in enumerate(col_lines):
        cx = left + pad + j * (tw + pad) + tw / 2
        _draw_lines(draw, lines, font, cx, top - pad - len(lines) * lh + pad / 2)
    for i, lines in enumerate(row_lines):
        cy = top + pad + i * (th + pad) + th / 2
        _draw_lines(draw, lines, font, left - pad, cy - len(lines) * lh / 2, align="right")
    return np.asarray(im)


def _as_batch(a: np.ndarray) -> np.ndarray:
    return a[None] if a.ndim == 3 else a


def _method_tiles(relevance: Mapping[str, Any], images: Any, input_label: str, cmap: str | Colormap, mode: str,
                  percentile: float | None, channels: bool | None, image_kwargs: Mapping[str, Any] | None):
    """(tiles[row][col] uint8 at scale 1, column titles)."""
    if not relevance:
        raise ValueError("method_grid needs at least one method in `relevance`")
    columns, titles = [], []
    if images is not None:
        columns.append(_as_batch(input_tile(images, **dict(image_kwargs or {}))))
        titles.append(input_label)
    for name, r in relevance.items():
        columns.append(_as_batch(heatmap(np.asarray(r), cmap, mode, percentile, channels)))
        titles.append(str(name))
    n = {c.shape[0] for c in columns}
    shapes = {c.shape[1:3] for c in columns}
    if len(n) != 1 or len(shapes) != 1:
        raise ValueError(f"method_grid: every method (and the images) needs the same number of samples and the "
                         f"same height and width, got {[c.shape[:3] for c in columns]} for {titles}")
    rows = [[c[i] for c in columns] for i in range(n.pop())]
    return rows, titles


def method_grid(relevance: Mapping[str, Any], images: Any = None, *, row_labels: Sequence[str] | None = None,
                input_label: str = "input", cmap: str | Colormap = "bwr", mode: str = "symmetric",
                percentile: float | None = DEFAULT_PERCENTILE, channels: bool | None = None, scale: int = 4,
                pad: int = 4, font_size: int | None = None, colorbar: bool = True, label: str | None = None,
                image_kwargs: Mapping[str, Any] | None = None) -> np.ndarray:
    """Side-by-side comparison of explanation methods: one row per sample, one column per method.

    Args:
      relevance: method name (the column title) -> relevance of the samples, ``(N, H, W[, C])`` (or one
        sample ``(H, W[, C])``), all of the same shape.
      images: optional inputs ``(N, H, W[, C])``, shown first (column ``input_label``) via
        :func:`input_tile` (with ``image_kwargs``, e.g. ``{"mean": ..., "std": ...}``).
      row_labels: one title per sample (e.g. its class).
      cmap, mode, percentile, channels: as in :func:`heatmap` (each map normalised on its own).
      scale, pad, font_size: as in :func:`grid`.
      colorbar: add a :func:`colorbar` (with ``label``, default :data:`EVIDENCE_LABEL`) on the right.

    Returns:
      uint8 RGB image; write it with :func:`save_png`, or use :func:`save_method_grid` for PNG/SVG/PDF.
    """
    rows, titles = _method_tiles(relevance, images, input_label, cmap, mode, percentile, channels, image_kwargs)
    g = grid(rows, row_labels=row_labels, col_labels=titles, pad=pad, scale=scale, font_size=font_size)
    if not colorbar:
        return g
    th = rows[0][0].shape[0] * scale
    n = len(rows)
    stop, start = g.shape[0] - pad, g.shape[0] - pad - (n * th + (n - 1) * pad)
    fs = font_size if font_size is not None else _auto_font_size(titles, rows[0][0].shape[1] * scale, th)
    return add_colorbar(g, cmap, mode, label=label, span=(start, stop), pad=2 * pad, font_size=fs)


def _require_matplotlib(what: str):
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"install jlrp[plot] (matplotlib) for {what}") from e
    return matplotlib, FigureCanvasAgg, Figure


def _wrap_chars(label: str, max_chars: int) -> str:
    lines, line = [], ""
    for word in _split_words(label):
        if line and len((line + word).rstrip()) > max_chars:
            lines.append(line.rstrip())
            line = word
        else:
            line += word
    lines.append(line.rstrip())
    return "\n".join(lines)


def save_method_grid(path: str | Path, relevance: Mapping[str, Any], images: Any = None, *,
                     row_labels: Sequence[str] | None = None, input_label: str = "input",
                     cmap: str | Colormap = "bwr", mode: str = "symmetric",
                     percentile: float | None = DEFAULT_PERCENTILE, channels: bool | None = None,
                     colorbar: bool = True, label: str | None = None, image_kwargs: Mapping[str, Any] | None = None,
                     width: float = 7.0, font_size: float = 8.0, scale: int = 4, dpi: int = 300) -> Path:
    """Write :func:`method_grid` to ``path``: ``.png`` (raster, via Pillow; ``scale`` as in :func:`grid`), or
    ``.svg`` / ``.pdf`` (vector, via matplotlib: the ``plot`` extra).

    The vector figure is ``width`` inches wide (7 in: a two-column paper's text width; 3.3 in: one column)
    with titles, row labels and the colour bar's label set as text at ``font_size`` points, so they have
    that size when the figure is included at its natural width (fonts embedded as TrueType in PDF, kept as
    editable text in SVG); the heatmaps are embedded as images with pixels enlarged without smoothing.
    Other arguments: see :func:`method_grid`. Returns the path.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg", "pdf"):
        raise ValueError(f"save_method_grid writes .png, .svg or .pdf files, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "png":
        save_png(path, method_grid(relevance, images, row_labels=row_labels, input_label=input_label, cmap=cmap,
                                   mode=mode, percentile=percentile, channels=channels, scale=scale,
                                   colorbar=colorbar, label=label, image_kwargs=image_kwargs))
        return path
    matplotlib, FigureCanvasAgg, Figure = _require_matplotlib("SVG/PDF figures")
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    rows, titles = _method_tiles(relevance, images, input_label, cmap, mode, percentile, channels, image_kwargs)
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"got {len(row_labels)} row labels for {len(rows)} rows")
    n_rows, n_cols = len(rows), len(titles)
    h, w = rows[0][0].shape[:2]
    lo, tick_map, label = _colorbar_spec(mode, label, None)
    pt = font_size / 72.0  # inches per point of text
    char = 0.55 * pt  # average character width
    gap = 0.04
    left = 0.05 + (max(len(str(s)) for s in row_labels) * char + 0.1 if row_labels is not None else 0.0)
    right = (0.15 + max(len(t) for t in tick_map.values()) * char + 2.8 * pt + 0.1) if colorbar else 0.05
    tile_w = (width - left - right - (n_cols - 1) * gap) / n_cols
    if tile_w <= 0.2:
        raise ValueError(f"width={width} in leaves {tile_w:.2f} in per column: widen the figure or use fewer "
                         f"columns")
    wrapped = [_wrap_chars(t, max(4, int(tile_w / char))) for t in titles]
    top = (max(t.count("\n") + 1 for t in wrapped) * 1.25 + 0.6) * pt
    tile_h = tile_w * h / w
    bottom = 0.05 + 0.6 * pt  # room for the colour bar's lowest tick label
    height = top + n_rows * tile_h + (n_rows - 1) * gap + bottom
    up = max(1, math.ceil(256 / max(h, w)))  # embedded pixels: enlarged, never smoothed by a viewer

    with matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42, "font.size": font_size}):
        fig = Figure(figsize=(width, height), dpi=dpi)
        FigureCanvasAgg(fig)
        for i, row in enumerate(rows):
            for j, tile in enumerate(row):
                x0 = left + j * (tile_w + gap)
                y0 = height - top - (i + 1) * tile_h - i * gap
                ax = fig.add_axes((x0 / width, y0 / height, tile_w / width, tile_h / height))
                ax.imshow(_enlarge(tile, up, (0, 1)), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if i == 0:
                    ax.set_title(wrapped[j], fontsize=font_size, pad=0.3 * font_size)
                if j == 0 and row_labels is not None:
                    ax.set_ylabel(str(row_labels[i]), fontsize=font_size, rotation=0, ha="right", va="center",
                                  labelpad=0.3 * font_size)
        if colorbar:
            x0 = width - right + 0.1
            y0 = height - top - n_rows * tile_h - (n_rows - 1) * gap
            cax = fig.add_axes((x0 / width, y0 / height, 0.12 / width, (height - top - y0) / height))
            values = np.linspace(lo, 1.0, 256)
            colours = ListedColormap(_colorize(values, cmap, mode) / 255.0)
            bar = fig.colorbar(ScalarMappable(norm=Normalize(lo, 1.0), cmap=colours), cax=cax,
                               ticks=sorted(tick_map))
            bar.ax.set_yticklabels([tick_map[v] for v in sorted(tick_map)], fontsize=font_size)
            bar.set_label(label, fontsize=font_size)
            bar.outline.set_linewidth(0.5)
        fig.savefig(path, format=fmt, metadata={"Date": None} if fmt == "svg" else {"CreationDate": None})
    return path


def save_png(path: str | Path, image: np.ndarray, scale: int = 1) -> None:
    """Write a uint8 image ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` as a lossless PNG,
    enlarged ``scale`` times by pixel repetition (sharp pixels at any print size)."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise TypeError(f"save_png needs a uint8 image, got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ValueError(f"save_png needs (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {a.shape}")
    a = _enlarge(a, scale, (0, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format="PNG")


def load_png(path: str | Path) -> np.ndarray:
    """Read a PNG as uint8: ``(H, W)`` for grayscale, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA."""
    with Image.open(path) as im:
        if im.mode not in ("L", "RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
        return np.array(im)


#: Line styles and markers cycled by :func:`plot_curves` (with the colours), so that curves stay
#: distinguishable where they overlap and in grayscale print.
CURVE_STYLES = (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1, 1, 1, 1, 1)), "v"),
                ((0, (1, 1)), "P"), ((0, (8, 2)), "X"), ((0, (3, 1, 3, 3)), "*"))


def plot_curves(curves: Mapping[str, np.ndarray], path: str | Path, xlabel: str = "", ylabel: str = "",
                title: str = "", x: np.ndarray | None = None, markers: int = 8):
    """Write a line plot of ``curves`` (name -> 1-D values) with matplotlib; returns the ``Figure``.

    ``x`` gives shared x values (default ``0, 1, ...``). The format follows the suffix of ``path``:
    ``.png`` (7 x 3.5 in at 100 dpi), or ``.svg`` / ``.pdf`` (vector). Every curve gets its own colour,
    line style and marker (:data:`CURVE_STYLES`); about ``markers`` markers per curve, staggered between
    curves, so that curves lying on top of each other remain distinguishable. Requires the ``plot`` extra.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("install jlrp[plot] for plots") from e
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".") or "png"
    if fmt not in ("png", "svg", "pdf"):
        raise ValueError(f"plot_curves writes .png, .svg or .pdf files, got {path.name!r}")
    # A bare Figure on an Agg canvas: no pyplot, so no global backend switch or figure leaks.
    # wide enough for the legend beside the axes, where it cannot hide a curve
    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    n = max(1, len(curves))
    for k, (name, ys) in enumerate(curves.items()):
        ys = np.asarray(ys).ravel()
        xs = np.arange(len(ys)) if x is None else np.asarray(x).ravel()
        step = max(1, len(ys) // max(1, markers), min(n, len(ys)))  # >= n: staggered markers never coincide
        linestyle, marker = CURVE_STYLES[k % len(CURVE_STYLES)]
        ax.plot(xs, ys, label=name, color=f"C{k % 10}", linestyle=linestyle, marker=marker, markersize=4,
                markevery=((k * step) // n % step, step), linewidth=1.4)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if curves:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt, metadata={"png": None, "svg": {"Date": None}, "pdf": {"CreationDate": None}}[fmt])
    return fig
