"""Localisation metrics: does the relevance fall on the ground-truth object (a mask)?

Shapes as for :func:`jlrp.evaluation.relevance_mass_accuracy`: ``relevance`` ``(N, H, W, C)`` / ``(N, H, W)``
/ ``(N, T)`` / ``(N, T, D)`` and a ``mask`` over the same pixels or tokens (with or without the channel /
feature axis; nonzero = inside). Relevance is summed per pixel (token) first. Every function is jitted and
returns ``(N,)``; samples whose mask is empty get NaN (nothing to localise; Quantus does the same).
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp

from jlrp._src.evaluation import _pixels
from jlrp._src.metrics_common import rankdata

Array = jax.Array


def _grid(relevance: Array, mask: Array) -> tuple[Array, Array]:
    """Per-pixel relevance and boolean mask on the pixel grid ``(N, *grid)``."""
    rel, m = _pixels(relevance, mask)
    grid = jnp.asarray(mask).shape[1:]
    if jnp.asarray(mask).ndim == 4:
        grid = grid[:-1]
    return rel.reshape(rel.shape[0], *grid), m.reshape(m.shape[0], *grid)


def _dilate(m: Array, radius: float) -> Array:
    """Pixels within Euclidean distance ``radius`` of the mask (grid axes after the batch axis)."""
    r = int(radius)
    if r < 1:
        return m
    out = m
    nd = m.ndim - 1
    for d in itertools.product(range(-r, r + 1), repeat=nd):
        if 0 < sum(v * v for v in d) <= radius * radius:
            pad = [(0, 0)] + [(r, r)] * nd
            padded = jnp.pad(m, pad)
            idx = (slice(None),) + tuple(slice(r + v, r + v + s) for v, s in zip(d, m.shape[1:]))
            out = out | padded[idx]
    return out


@functools.partial(jax.jit, static_argnames=("tolerance", "weighted"))
def pointing_game(relevance: Array, mask: Array, *, tolerance: float = 0.0, weighted: bool = False) -> Array:
    """Pointing game (Zhang et al. 2018, "Top-down neural attention by excitation backprop"), ``(N,)``:
    1 if the most relevant pixel lies on the mask, else 0.

    Ties at the maximum: a hit if any of them lies on the mask (as in Quantus). ``tolerance``: a hit also
    within this Euclidean distance (pixels / tokens) of the mask (the paper used 15 px). ``weighted``:
    Quantus's option, a hit scores ``1 - |mask| / P``."""
    rel, m = _grid(relevance, mask)
    n = rel.shape[0]
    top = rel == rel.reshape(n, -1).max(1).reshape((n,) + (1,) * (rel.ndim - 1))
    hit = (top & _dilate(m, tolerance)).reshape(n, -1).any(1).astype(rel.dtype)
    size = m.reshape(n, -1).sum(1)
    if weighted:
        hit = hit * (1 - size / m[0].size)
    return jnp.where(size > 0, hit, jnp.nan)


@functools.partial(jax.jit, static_argnames=("weighted", "attributions", "eps"))
def attribution_localisation(relevance: Array, mask: Array, *, weighted: bool = False,
                             attributions: str = "positive", eps: float = 0.0) -> Array:
    """Attribution localisation (Kohlbrenner et al. 2020, "Towards best practice in explaining neural network
    decisions with LRP"), ``(N,)``: ``mu = R_in / R_tot``, the share of the positive relevance that lies
    inside the mask (equal to :func:`relevance_mass_accuracy` with a mask instead of a box).

    ``weighted=True``: ``mu_w = mu * P / |mask|`` (divided by the mask's area fraction, so that uniform
    relevance scores 1 whatever the object size). ``attributions``: ``"positive"`` (the paper), ``"abs"``
    (Quantus's default ``abs=True``) or ``"signed"``. ``eps`` is added to ``R_tot`` (Quantus: 1e-9); Quantus
    also makes values above 1 NaN, and its ``weighted`` option multiplies by a size ratio instead."""
    rel, m = _pixels(relevance, mask)
    if attributions == "positive":
        rel = jnp.maximum(rel, 0)
    elif attributions == "abs":
        rel = jnp.abs(rel)
    elif attributions != "signed":
        raise ValueError(f"attributions must be 'positive', 'abs' or 'signed', got {attributions!r}")
    total, inside = rel.sum(1), jnp.where(m, rel, 0).sum(1)
    total = total + eps
    mu = jnp.where(total != 0, inside / jnp.where(total != 0, total, 1), 0.0)
    size = m.sum(1)
    if weighted:
        mu = mu * m.shape[1] / jnp.maximum(size, 1)
    return jnp.where(size > 0, mu, jnp.nan)


@functools.partial(jax.jit, static_argnames=("k", "concept_influence"))
def top_k_intersection(relevance: Array, mask: Array, *, k: int = 1000, concept_influence: bool = False) -> Array:
    """Top-k intersection (Theiner, Müller-Budack & Ewerth 2021, "Interpretable semantic photo geolocation"),
    ``(N,)``: the fraction of the ``k`` most relevant pixels that lie on the mask (ties by pixel index).
    ``concept_influence=True`` multiplies by ``P / |mask|`` (1 = chance level)."""
    rel, m = _pixels(relevance, mask)
    p = rel.shape[1]
    if not 0 < k <= p:
        raise ValueError(f"k={k} must lie in [1, {p}] (the number of pixels)")
    ranks = jnp.argsort(jnp.argsort(-rel, axis=1, stable=True), axis=1)
    score = (m & (ranks < k)).sum(1) / k
    size = m.sum(1)
    if concept_influence:
        score = score * p / jnp.maximum(size, 1)
    return jnp.where(size > 0, score, jnp.nan)


@jax.jit
def mask_auc(relevance: Array, mask: Array) -> Array:
    """Area under the ROC curve of the relevance as a detector of the mask (Fawcett 2006, "An introduction
    to ROC analysis"), ``(N,)``: the probability that a random pixel on the mask is more relevant than a
    random pixel off it, ties counting one half (the Mann-Whitney statistic; equal to scikit-learn's
    ``roc_auc_score``, which Quantus's ``AUC`` uses). 0.5 = chance; NaN when the mask is empty or full."""
    rel, m = _pixels(relevance, mask)
    ranks = rankdata(rel)  # average ranks for ties
    pos = m.sum(1)
    neg = m.shape[1] - pos
    u = jnp.where(m, ranks, 0).sum(1) - pos * (pos + 1) / 2
    ok = (pos > 0) & (neg > 0)
    return jnp.where(ok, u / jnp.where(ok, pos * neg, 1), jnp.nan)
