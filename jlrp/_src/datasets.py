"""Synthetic data sets with ground truth (the implementation of :mod:`jlrp.datasets`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

__all__ = ["Dataset", "shapes", "pattern_toy", "fields", "text"]


@dataclass(frozen=True, eq=False)  # eq=False: element-wise array comparison makes == meaningless
class Dataset:
    """A labelled data set held as numpy arrays.

    Attributes:
        x: inputs, leading axis = samples.
        y: labels, shape ``(n,)``.
        mask: ground-truth relevance mask (bool, same leading axis as ``x``), or None.
        info: extra metadata (class names, true directions, ...), see each generator.
    """

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int, seed: int | None = None,
                drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(x, y)`` batches of ``batch_size`` samples; shuffled iff ``seed`` is given.

        The last, smaller batch is yielded unless ``drop_last``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            idx = order[i:i + batch_size]
            yield self.x[idx], self.y[idx]


def _balanced_labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    # Exactly balanced (up to n % k), in random order.
    return rng.permutation(np.arange(n) % k).astype(np.int32)


# --------------------------------------------------------------------------------------------------
# shapes

SHAPE_CLASSES = ("square", "circle", "triangle", "cross")


def _shape_masks(kind: np.ndarray, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Rasterise shape ``kind`` (index into SHAPE_CLASSES) of half-size ``r``; u, v = offsets from centre."""
    au, av = np.abs(u), np.abs(v)
    arm = np.maximum(r / 3.5, 0.75)  # cross arm half-width; >= 0.75 so arms stay >= 2 px wide
    masks = [
        np.maximum(au, av) <= r,                                  # square
        u * u + v * v <= r * r,                                   # disc
        (v <= r) & (au <= (v + r) / 2),                           # triangle, apex up (image y grows down)
        ((au <= r) & (av <= arm)) | ((av <= r) & (au <= arm)),    # plus sign
    ]
    return np.choose(kind, masks)


def _box_count(m: np.ndarray, k: int) -> np.ndarray:
    """Number of True pixels in the (2k+1)^2 window centred on each pixel of (n, H, W) bool ``m``."""
    c = np.pad(m.astype(np.int32), ((0, 0), (k + 1, k), (k + 1, k))).cumsum(1).cumsum(2)
    w = 2 * k + 1
    return c[:, w:, w:] - c[:, :-w, w:] - c[:, w:, :-w] + c[:, :-w, :-w]


def shapes(n: int, size: int = 32, seed: int = 0, noise: float = 0.1) -> Dataset:
    """Synthetic-shapes image classification with a ground-truth mask of the deciding shape.

    Each image holds one *deciding* shape whose type is the label (0 square, 1 circle (filled
    disc), 2 triangle, 3 cross (plus sign)), random in position, size (half-size 14-22 % of
    ``size``) and brightness, plus 1-2 *distractors* - small hollow rings of fixed radius - that
    appear in every class and therefore carry no label information. A model (and a faithful
    explanation) must look at the deciding shape. Distractors are placed where they overlap the
    deciding shape and each other least (not at all whenever there is room). Gaussian noise of
    standard deviation ``noise`` is added; pixel values are roughly in [0, 1] (not clipped).

    The ring was chosen over a bar as distractor because a bar is half a cross, which would make
    class 3 partly ambiguous; a hollow ring is clearly different from the filled disc.

    Returns:
        Dataset with ``x`` float32 ``(n, size, size, 1)`` (NHWC), ``y`` int32 ``(n,)`` balanced over
        the 4 classes, ``mask`` bool ``(n, size, size)`` of the deciding shape, and ``info`` with
        ``class_names``, ``distractor`` (= "ring"), ``ring_radius`` and ``distractor_mask``
        (bool ``(n, size, size)``).
    """
    if size < 16:
        raise ValueError(f"size must be >= 16 to draw recognisable shapes, got {size}")
    rng = np.random.default_rng(seed)
    y = _balanced_labels(rng, n, len(SHAPE_CLASSES))
    yy, xx = np.mgrid[:size, :size].astype(np.float64)           # pixel centres at integer coords
    yy, xx = yy[None], xx[None]

    # Deciding shape: fully inside the image.
    r = rng.uniform(0.14, 0.22, n) * size
    cy, cx = (rng.uniform(r, size - 1 - r) for _ in range(2))
    deciding = _shape_masks(y[:, None, None], xx - cx[:, None, None], yy - cy[:, None, None],
                            r[:, None, None])
    img = deciding * rng.uniform(0.6, 1.0, (n, 1, 1))

    # Distractor rings: centre drawn uniformly among integer pixels whose (2k+1)^2 box (ring +
    # 1 px gap) covers the fewest occupied pixels. The random fraction < 1 breaks ties only.
    ring_r = max(2.0, 0.09 * size)
    k = int(np.ceil(ring_r + 1.0))
    inside = np.zeros((size, size), bool)
    inside[k:size - k, k:size - k] = True
    occupied = deciding.copy()
    distractor = np.zeros_like(deciding)
    n_rings = rng.integers(1, 3, n)
    for j in range(2):
        score = _box_count(occupied, k) + rng.random((n, size, size))
        score[:, ~inside] = np.inf
        flat = score.reshape(n, -1).argmin(1)
        ry, rx = (flat // size)[:, None, None], (flat % size)[:, None, None]
        ring = (np.abs(np.hypot(xx - rx, yy - ry) - ring_r) <= 0.6) & (n_rings > j)[:, None, None]
        img = np.where(ring, rng.uniform(0.6, 1.0, (n, 1, 1)), img)
        occupied |= ring
        distractor |= ring

    x = img + noise * rng.standard_normal((n, size, size))
    return Dataset(x=x[..., None].astype(np.float32), y=y, mask=deciding,
                   info={"class_names": list(SHAPE_CLASSES), "distractor": "ring",
                         "ring_radius": ring_r, "distractor_mask": distractor})


# --------------------------------------------------------------------------------------------------
# PatternNet toy data

def pattern_toy(n: int, seed: int = 0, mu: float = 0.0, sigma: float = 1.0) -> Dataset:
    """The 2-D toy problem of PatternNet/PatternAttribution (Kindermans et al. 2017).

    ``x = s + d`` with signal ``s = a_s * y``, ``a_s = (1, 0)``, ``y ~ U[-1, 1]``, and distractor
    ``d = a_d * eps``, ``a_d = (1, 1)``, ``eps ~ N(mu, sigma^2)``. The optimal linear model is
    ``w = (1, -1)`` (it cancels the distractor), so ``w`` is *not* the signal direction; a good
    explanation recovers ``a_s``.

    Returns:
        Dataset with ``x`` float32 ``(n, 2)``, ``y`` float32 ``(n,)`` (regression target),
        ``mask`` None, and ``info`` with ``a_s``, ``a_d`` (float64 ``(2,)``) and the components
        ``signal``, ``distractor`` (float32 ``(n, 2)``).
    """
    rng = np.random.default_rng(seed)
    a_s, a_d = np.array([1.0, 0.0]), np.array([1.0, 1.0])
    y = rng.uniform(-1.0, 1.0, n)
    eps = rng.normal(mu, sigma, n)
    s, d = y[:, None] * a_s, eps[:, None] * a_d
    return Dataset(x=(s + d).astype(np.float32), y=y.astype(np.float32),
                   info={"a_s": a_s, "a_d": a_d, "signal": s.astype(np.float32),
                         "distractor": d.astype(np.float32)})


# --------------------------------------------------------------------------------------------------
# geospatial-style fields

def _gauss2d(xx: np.ndarray, yy: np.ndarray, cx: np.ndarray, cy: np.ndarray,
             s: np.ndarray) -> np.ndarray:
    # Separable outer product: (n, H, 1) * (n, 1, W), cheaper than exp over the full grid.
    col = np.exp(-((yy - cy[:, None]) ** 2) / (2 * s[:, None] ** 2))[:, :, None]
    row = np.exp(-((xx - cx[:, None]) ** 2) / (2 * s[:, None] ** 2))[:, None, :]
    return col * row


def fields(n: int, size: int = 32, seed: int = 0) -> Dataset:
    """Smooth random 2-D fields, half of them with a localised positive anomaly.

    In the spirit of the synthetic geoscience data of "Fact or Artifact?" (Landt-Hayen et al.
    2023). Background: 4 broad Gaussian bumps (width 20-45 % of ``size``, signed amplitudes,
    centres possibly outside the image) plus a low-frequency plane wave, standardised per sample
    to mean 0 and standard deviation 1. Anomaly (label 1 only): a narrow Gaussian blob (width
    sigma 5-8 % of ``size``, amplitude 1.5-2.5) added fully inside the image; being much
    narrower than the background it is identifiable by scale, not just by value.

    Returns:
        Dataset with ``x`` float32 ``(n, size, size, 1)`` (NHWC), ``y`` int32 ``(n,)`` balanced in
        {0, 1}, ``mask`` bool ``(n, size, size)``: where the blob exceeds ``1/e^2`` of its peak
        (radius ``2 sigma``), all False for label 0; ``info`` with ``class_names``,
        ``anomaly_center`` (float ``(n, 2)``, (row, col), NaN for label 0), ``anomaly_sigma``.
    """
    rng = np.random.default_rng(seed)
    y = _balanced_labels(rng, n, 2)
    xx = yy = np.arange(size, dtype=np.float64)

    bg = np.zeros((n, size, size))
    for _ in range(4):
        c = rng.uniform(-0.25, 1.25, (2, n)) * size
        bg += rng.normal(0, 1, (n, 1, 1)) * _gauss2d(xx, yy, c[1], c[0], rng.uniform(0.2, 0.45, n) * size)
    k = rng.normal(0, 2 * np.pi / size, (n, 2))                  # wavelengths of order >= size
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    bg += rng.uniform(0, 0.5, (n, 1, 1)) * np.sin(k[:, 0, None, None] * yy[:, None]
                                                  + k[:, 1, None, None] * xx[None, :] + phase)
    bg = (bg - bg.mean((1, 2), keepdims=True)) / (bg.std((1, 2), keepdims=True) + 1e-8)

    sig = rng.uniform(0.05, 0.08, n) * size
    cy, cx = (rng.uniform(2 * sig, size - 1 - 2 * sig) for _ in range(2))
    blob = _gauss2d(xx, yy, cx, cy, sig)
    has = (y == 1)[:, None, None]
    x = bg + has * rng.uniform(1.5, 2.5, (n, 1, 1)) * blob
    mask = has & (blob >= np.exp(-2.0))
    center = np.where(y[:, None] == 1, np.stack([cy, cx], 1), np.nan)
    return Dataset(x=x[..., None].astype(np.float32), y=y, mask=mask,
                   info={"class_names": ["no anomaly", "anomaly"], "anomaly_center": center,
                         "anomaly_sigma": sig})


# --------------------------------------------------------------------------------------------------
# text

def text(n: int, seq_len: int = 16, vocab: int = 50, seed: int = 0) -> Dataset:
    """Synthetic sentiment classification over token ids.

    Ids 1-4 are "positive" words, ids 5-8 "negative" words, ids 9..vocab-1 filler; id 0 is never
    emitted (free for padding). Each sequence holds an odd number (1, 3 or 5, at most
    ``seq_len``) of sentiment words at random positions, so their counts can never tie; label 1
    iff positive words outnumber negative ones. Labels are balanced.

    Returns:
        Dataset with ``x`` int32 ``(n, seq_len)`` token ids, ``y`` int32 ``(n,)``, ``mask`` bool
        ``(n, seq_len)`` marking sentiment-word positions, and ``info`` with ``positive`` and
        ``negative`` (lists of ids), ``vocab`` and ``class_names``.
    """
    if vocab < 10:
        raise ValueError(f"vocab must be >= 10 (0 = pad, 1-8 sentiment words, >= 1 filler), got {vocab}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    pos_ids, neg_ids = np.arange(1, 5), np.arange(5, 9)
    rng = np.random.default_rng(seed)
    y = _balanced_labels(rng, n, 2)
    k = rng.choice([c for c in (1, 3, 5) if c <= seq_len], n)   # number of sentiment words (odd)
    # Number of positive words: majority for label 1, minority for label 0.
    lo = np.where(y == 1, (k + 1) // 2, 0)
    hi = np.where(y == 1, k, (k - 1) // 2)
    p = lo + (rng.random(n) * (hi - lo + 1)).astype(int)
    # rank[i, t] = place of position t in a random order; the first k places carry sentiment
    # words, the first p of them positive ones.
    rank = rng.random((n, seq_len)).argsort(1).argsort(1)
    mask = rank < k[:, None]
    positive = rank < p[:, None]
    tokens = rng.integers(9, vocab, (n, seq_len))
    tokens = np.where(mask, rng.choice(neg_ids, (n, seq_len)), tokens)
    tokens = np.where(positive, rng.choice(pos_ids, (n, seq_len)), tokens)
    return Dataset(x=tokens.astype(np.int32), y=y, mask=mask,
                   info={"positive": pos_ids.tolist(), "negative": neg_ids.tolist(), "vocab": vocab,
                         "class_names": ["negative", "positive"]})
