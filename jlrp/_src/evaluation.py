"""Evaluating explanations: perturbation curves (pixel flipping, region perturbation, AOPC) and localisation.

A whole perturbation curve for a batch is one jitted XLA program: the regions are ranked once, the input
of step ``k`` is ``where(rank < k, baseline, x)`` built with vectorised ops, and the model is evaluated
for a chunk of steps at a time inside a ``lax.map`` (a scan), so memory stays bounded by the chunk.

Input layouts: images ``(N, H, W, C)`` or ``(N, H, W)``, and feature vectors ``(N, D)`` (regions are runs of
``region`` consecutive features). Internally everything is viewed as ``(N, H, W, C)``.
"""
from __future__ import annotations

import functools
import numbers
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jlrp._src.targets import check_target, target_mask

Array = jax.Array
_ORDERS = ("morf", "lerf", "random")
_BASELINES = ("mean", "zero", "blur", "uniform", "min", "max")
# default chunk: about 2**18 perturbed input values (1 MB in f32); on CPU smaller chunks ran faster than
# all steps at once (the activations stay in cache), and memory stays bounded for large images
_AUTO_CHUNK_VALUES = 2 ** 18


# ----------------------------------------------------------------------------------------------------------
# Perturbation curves
# ----------------------------------------------------------------------------------------------------------

def to_array(v: Any) -> Array:
    """``v`` as a jax array without compiling anything: ``jnp.asarray`` of a numpy array compiles a small
    program per shape (``jit(stage)``) on its first call, a device transfer does not (same dtype rules)."""
    if isinstance(v, jax.Array):  # jax arrays and tracers
        return v
    return jax.device_put(np.asarray(v))


def random_normal(key: Array, shape: tuple[int, ...], dtype: Any = None) -> Array:
    """``jax.random.normal(key, shape, dtype)``, the same numbers, drawn flat and reshaped: XLA:CPU compiles
    the random bits of a many-axis shape very slowly (seconds to tens of seconds for a 4-axis draw), a flat
    draw in well under a second."""
    dtype = jnp.result_type(float) if dtype is None else dtype
    return jax.random.normal(key, (int(np.prod(shape, dtype=np.int64)),), dtype).reshape(shape)


def random_uniform(key: Array, shape: tuple[int, ...], dtype: Any = None, minval: Any = 0.0,
                   maxval: Any = 1.0) -> Array:
    """``jax.random.uniform(key, shape, dtype, minval, maxval)`` (the same numbers, by jax's own formula),
    drawn flat: see :func:`random_normal`."""
    dtype = jnp.result_type(float) if dtype is None else dtype
    flat = lambda v: jnp.broadcast_to(jnp.asarray(v, dtype), shape).reshape(-1)
    size = int(np.prod(shape, dtype=np.int64))
    return jax.random.uniform(key, (size,), dtype, flat(minval), flat(maxval)).reshape(shape)


def _layout(shape: tuple[int, ...], region: int | tuple[int, ...]) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """``(H, W, C)`` of the canonical view of a batch of this shape, and the region size ``(rh, rw)``."""
    region = (region,) if isinstance(region, (int, np.integer)) else tuple(region)
    if len(shape) == 2:  # (N, D): a 1 x D image with one channel
        if len(region) != 1:
            raise ValueError(f"for feature vectors (N, D) region must be an int, got {region}")
        hwc, reg = (1, shape[1], 1), (1, region[0])
    elif len(shape) in (3, 4):
        if len(region) == 1:
            region = region * 2
        if len(region) != 2:
            raise ValueError(f"region must be an int or a pair (h, w), got {region}")
        hwc, reg = (shape[1], shape[2], shape[3] if len(shape) == 4 else 1), region
    else:
        raise ValueError(f"x must be (N, D), (N, H, W) or (N, H, W, C); got shape {shape}")
    if any(int(r) < 1 for r in reg):
        raise ValueError(f"region sizes must be positive, got {reg}")
    return hwc, (int(reg[0]), int(reg[1]))


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """Row-normalised gaussian smoothing matrix: ``K @ v`` blurs ``v`` with no padding artefacts at borders."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    k = np.exp(-0.5 * (d / sigma) ** 2)
    return k / k.sum(1, keepdims=True)


def _baseline(x: Array, baseline: str | float, region: tuple[int, int], key: Array | None) -> Array:
    """The replacement values for every pixel, shape of ``x`` (canonical ``(N, H, W, C)``)."""
    if baseline == "mean":  # per image, per channel
        return jnp.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape)
    if baseline == "zero":
        return jnp.zeros_like(x)
    if baseline == "blur":  # separable gaussian, sigma = region side, so a region's content is washed out
        kh = jnp.asarray(_blur_matrix(x.shape[1], region[0]), x.dtype)
        kw = jnp.asarray(_blur_matrix(x.shape[2], region[1]), x.dtype)
        return jnp.einsum("hi,nijc,wj->nhwc", kh, x, kw)
    if baseline == "uniform":
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        hi = x.max(axis=(1, 2, 3), keepdims=True)
        return random_uniform(key, x.shape, x.dtype, lo, hi)
    if baseline in ("min", "max"):  # per image over all values (Quantus's "black" / "white")
        reduce = jnp.min if baseline == "min" else jnp.max
        return jnp.broadcast_to(reduce(x, axis=(1, 2, 3), keepdims=True), x.shape)
    return jnp.full_like(x, baseline)


def _region_ranks(rel: Array, region: tuple[int, int], order: str, key: Array | None,
                  lerf: Array | None = None) -> Array:
    """Per-pixel rank ``(N, H, W)`` of the region each pixel belongs to (0 = perturbed first). ``order``:
    ``"ranked"`` by relevance, most relevant first, or least relevant first where the traced ``lerf`` is True
    (MoRF and LeRF share one compiled program); ``"random"``; ``"index"`` (row-major region order)."""
    n, h, w = rel.shape
    rh, rw = region
    gh, gw = -(-h // rh), -(-w // rw)  # partial regions at the bottom/right border are regions too
    if order == "random":
        first = -random_uniform(key, (n, gh * gw))
    elif order == "index":  # internal: infidelity's cumulative patches
        first = jnp.broadcast_to(jnp.arange(gh * gw, dtype=jnp.float32), (n, gh * gw))
    else:  # "ranked": most relevant first = least of the negated scores first (-0.0 made 0.0: a tie)
        padded = jnp.pad(rel, ((0, 0), (0, gh * rh - h), (0, gw * rw - w)))
        scores = padded.reshape(n, gh, rh, gw, rw).sum(axis=(2, 4)).reshape(n, gh * gw)
        flipped = jnp.where(lerf, scores, -scores)
        first = jnp.where(flipped == 0, jnp.zeros_like(flipped), flipped)
    # stable sort: equal scores keep region-index order, so the curve is deterministic
    perm = jnp.argsort(first, axis=1, stable=True)
    ranks = jnp.argsort(perm, axis=1).reshape(n, gh, gw)  # inverse permutation: region -> position
    return jnp.repeat(jnp.repeat(ranks, rh, axis=1), rw, axis=2)[:, :h, :w]


@functools.partial(jax.jit, static_argnames=("model_fn", "order", "region", "steps", "baseline", "chunk_size",
                                             "points", "insert"))
def _curve(model_fn, x, relevance, target, key, base_array=None, lerf=None, *, order, region, steps, baseline,
           chunk_size, points=None, insert=False):
    shape, n = x.shape, x.shape[0]
    (h, w, c), region = _layout(shape, region)
    xc = x.reshape(n, h, w, c)
    rel = relevance.reshape(n, h, w, -1).sum(-1)  # channels summed: pixels are ranked, not channels
    k_order, k_base = (None, None) if key is None else (jax.random.fold_in(key, 0), jax.random.fold_in(key, 1))
    ranks = _region_ranks(rel, region, order, k_order, lerf)
    if baseline == "array":  # an array shaped like x, or a number (0-d: every constant shares the program)
        base_array = base_array.astype(xc.dtype)
        base = jnp.broadcast_to(base_array, xc.shape) if base_array.ndim == 0 else base_array.reshape(xc.shape)
    else:
        base = _baseline(xc, baseline, region, k_base)
    # deletion: x^k = x with the first k regions replaced by the baseline; insertion (Petsiuk et al. 2018):
    # the baseline with the first k regions of x put back
    src, dst = (base, xc) if insert else (xc, base)

    out = jax.eval_shape(model_fn, x)
    if out.ndim == 1:  # one score per row (regression): nothing to select
        select = jnp.ones((n, 1), out.dtype)
    else:
        # argmax on the unperturbed input, then held fixed: the curve tracks one class
        select = target_mask(model_fn(x) if target is None else jnp.zeros(out.shape, out.dtype), target)

    def scores(ks):  # (s,) step indices -> (s, N) target scores
        xk = jnp.where((ranks[None] < ks[:, None, None, None])[..., None], dst[None], src[None])
        # one model call on s*N rows: equivalent to vmap for row-independent models, and a plain batch
        logits = model_fn(xk.reshape(ks.shape[0] * n, *shape[1:])).reshape(ks.shape[0], n, -1)
        return jnp.where(select > 0, logits, 0).sum(-1)  # where, not *: inf in another class is no NaN

    ks = jnp.arange(steps + 1) if points is None else jnp.asarray(points)
    return map_chunked(scores, ks, chunk_size).T


def map_chunked(fn: Callable[[Array], Array], ks: Array, chunk_size: int | None) -> Array:
    """``fn`` on ``chunk_size`` entries of ``ks`` at a time (a ``lax.map`` over the full chunks, then the
    remainder once), results concatenated on axis 0; ``chunk_size=None``: all of ``ks`` in one call.
    Memory is bounded by one chunk, which is what every perturbation metric needs."""
    total = ks.shape[0]
    size = total if chunk_size is None else min(chunk_size, total)
    full = total // size * size
    parts = [_map_chunks(fn, ks[:full].reshape(-1, size, *ks.shape[1:]))]
    if full < total:  # the remainder chunk, evaluated once outside the scan
        parts.append(fn(ks[full:]))
    return jnp.concatenate(parts, axis=0)


def _map_chunks(fn: Callable[[Array], Array], chunks: Array) -> Array:
    """``fn`` on each row of ``chunks`` (a scan when there is more than one), results stacked on axis 0."""
    if chunks.shape[0] == 1:
        return fn(chunks[0])
    return jax.lax.map(fn, chunks).reshape(-1, *jax.eval_shape(fn, chunks[0]).shape[1:])


@functools.lru_cache(maxsize=64)
def _out_shape(model_fn, shape, dtype) -> tuple[int, ...]:
    return jax.eval_shape(model_fn, jax.ShapeDtypeStruct(shape, dtype)).shape


def perturbation_curve(model_fn: Callable[[Array], Array], x: Array, relevance: Array, target: Any = None, *,
                       order: str = "morf", region: int | tuple[int, ...] = 1, steps: int | None = None,
                       baseline: str | float = "mean", key: Array | None = None,
                       chunk_size: int | None = None) -> Array:
    """Region perturbation curve (Samek et al. 2017): the target score as regions are perturbed one by one.

    Args:
      model_fn: maps a batch shaped like ``x`` to logits ``(N, C)`` (or scores ``(N,)``). Rows must be
        independent: steps are evaluated as one larger batch. It is a static argument of the internal
        jit, so pass the same function object to reuse the compiled program.
      x: ``(N, H, W, C)``, ``(N, H, W)`` or feature vectors ``(N, D)``.
      relevance: same shape as ``x`` (or ``(N, H, W)`` for ``(N, H, W, C)`` images); channels are summed
        per pixel, and a region's score is the sum over its pixels.
      target: class index per row (or one for all); ``None`` = argmax of ``model_fn(x)``, fixed for all steps.
      order: ``"morf"`` most relevant first, ``"lerf"`` least relevant first, ``"random"`` (needs ``key``).
        Ties are broken by region index (row-major).
      region: side of the square, non-overlapping regions, or ``(h, w)``; along ``D`` for ``(N, D)``.
        Regions cut by the image border are smaller.
      steps: number of perturbation steps ``K``; default all regions.
      baseline: the replacement value: ``"mean"`` (per image and channel), ``"zero"``, ``"blur"`` (gaussian,
        sigma = region side), ``"uniform"`` (noise in ``[min x, max x]`` per image, needs ``key``), ``"min"`` /
        ``"max"`` (per image over all values: Quantus's "black" / "white"), a float, or an array shaped like
        ``x`` (e.g. a blurred copy).
      key: PRNG key for ``order="random"`` and ``baseline="uniform"``.
      chunk_size: number of steps evaluated at once (memory holds ``chunk_size * N`` perturbed inputs and
        the model's activations for them); default: as many as fit in about 2**18 input values
        (at least 1).

    Returns:
      ``(N, K + 1)``: column ``k`` is the target score after perturbing the first ``k`` regions
      (column 0 is the unperturbed input).
    """
    x, relevance = to_array(x), to_array(relevance)
    (h, w, _), reg = _layout(x.shape, region)
    if relevance.shape != x.shape and not (x.ndim == 4 and relevance.shape == x.shape[:3]):
        raise ValueError(f"relevance has shape {relevance.shape}, expected x's shape {x.shape}")
    if order not in _ORDERS:
        raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
    base_array = None
    if not isinstance(baseline, (str, numbers.Real)):  # an array: one replacement value per input value
        base_array = to_array(baseline)
        if base_array.shape != x.shape:
            raise ValueError(f"a baseline array must have x's shape {x.shape}, got {base_array.shape}")
        baseline = "array"
    elif not (baseline in _BASELINES or isinstance(baseline, numbers.Real) and not isinstance(baseline, bool)):
        raise ValueError(f"baseline must be one of {_BASELINES}, a number or an array shaped like x, "
                         f"got {baseline!r}")
    if key is None and (order == "random" or baseline == "uniform"):
        raise ValueError("order='random' and baseline='uniform' need a PRNG key: pass key=")
    n_regions = -(-h // reg[0]) * -(-w // reg[1])
    steps = n_regions if steps is None else int(steps)
    if not 0 <= steps <= n_regions:
        raise ValueError(f"steps={steps} out of range: there are {n_regions} regions")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if chunk_size is None:
        chunk_size = max(1, _AUTO_CHUNK_VALUES // max(1, x.size))
    if int(chunk_size) > steps:
        chunk_size = None  # one chunk holds every step: share the compiled program
    if target is not None:
        target = jnp.asarray(target) if isinstance(target, jax.core.Tracer) else np.asarray(target)
        check_target(_out_shape(model_fn, x.shape, x.dtype), target)  # range checked here, while concrete
    if not isinstance(baseline, str) or baseline == "zero":  # a number: traced, one program for all of them
        base_array, baseline = np.asarray(0.0 if baseline == "zero" else float(baseline)), "array"
    lerf = None
    if order in ("morf", "lerf"):  # traced: MoRF and LeRF curves share one program
        order, lerf = "ranked", np.asarray(order == "lerf")
    return _curve(model_fn, x, relevance, target, key, base_array, lerf, order=order,
                  region=reg if x.ndim > 2 else reg[1], steps=steps, baseline=baseline,
                  chunk_size=None if chunk_size is None else int(chunk_size))


def pixel_flipping(model_fn: Callable[[Array], Array], x: Array, relevance: Array, target: Any = None, *,
                   order: str = "morf", steps: int | None = None, baseline: str | float = "mean",
                   key: Array | None = None, chunk_size: int | None = None) -> Array:
    """Pixel flipping (Bach et al. 2015): :func:`perturbation_curve` with single-pixel regions."""
    return perturbation_curve(model_fn, x, relevance, target, order=order, region=1, steps=steps,
                              baseline=baseline, key=key, chunk_size=chunk_size)


@jax.jit
def aopc(curve: Array) -> Array:
    """Area over the perturbation curve (Samek et al. 2017), per sample.

    ``AOPC = 1/(K+1) * sum_{k=0..K} (f(x^0) - f(x^k))`` for a curve ``(N, K+1)``; returns ``(N,)``. For a
    MoRF curve, higher means the explanation found the evidence faster (more faithful); for LeRF, lower is
    better. Units are those of the score, so values are not comparable across models: see
    :func:`normalized_aopc`.
    """
    curve = jnp.asarray(curve)
    return (curve[:, :1] - curve).mean(axis=1)


@jax.jit
def aopc_difference(curve_morf: Array, curve_lerf: Array) -> Array:
    """``AOPC(MoRF) - AOPC(LeRF)`` per sample ``(N,)``: high when the ranking is right at both ends."""
    return aopc(curve_morf) - aopc(curve_lerf)


@jax.jit
def normalized_aopc(curve_morf: Array, curve_random: Array | None = None) -> Array:
    """AOPC made comparable across models: invariant to the scale and offset of the score, per sample.

    Normalisation: divide by the score range the curves cover, ``max_k f(x^k) - min_k f(x^k)`` (over all
    given curves; ``f(x^0)`` is the maximum for a curve that only falls). Replacing ``f`` by ``a * f + b``
    (``a > 0``, e.g. a different logit temperature or offset) does not change the result, and a curve that
    rises above ``f(x^0)`` cannot blow the ratio up: the result always lies in ``[-1, 1]``.

    - ``normalized_aopc(morf)`` = ``AOPC(morf) / range``, in ``[0, 1]`` for a curve that never rises above
      ``f(x^0)``: 1 = the score falls to its lowest value at the first step, about ``1/(K+1)`` = it falls
      only at the last step.
    - ``normalized_aopc(morf, random)`` = ``(AOPC(morf) - AOPC(random)) / range``: the gain over a random
      ordering; 0 = no better than random, positive = better.

    Samples whose curves are flat (zero range) get 0, never NaN. Returns ``(N,)``.
    """
    curve_morf = jnp.asarray(curve_morf)
    lowest, highest = curve_morf.min(axis=1), curve_morf.max(axis=1)
    value = aopc(curve_morf)
    if curve_random is not None:
        curve_random = jnp.asarray(curve_random)
        lowest = jnp.minimum(lowest, curve_random.min(axis=1))
        highest = jnp.maximum(highest, curve_random.max(axis=1))
        value = value - aopc(curve_random)
    span = highest - lowest
    return jnp.where(span > 0, value / jnp.where(span > 0, span, 1), 0.0)


# ----------------------------------------------------------------------------------------------------------
# Localisation against ground-truth masks
# ----------------------------------------------------------------------------------------------------------

def _pixels(relevance: Array, mask: Array) -> tuple[Array, Array]:
    """Flatten to per-pixel ``(N, P)`` relevance (channels summed) and boolean mask."""
    relevance, mask = jnp.asarray(relevance), jnp.asarray(mask)
    if relevance.ndim == mask.ndim + 1 or (relevance.ndim == mask.ndim == 4):
        relevance = relevance.sum(-1)
    if mask.ndim == 4:  # (N, H, W, 1) or a mask repeated over channels
        mask = (mask != 0).any(-1)
    if relevance.shape != mask.shape:
        raise ValueError(f"relevance {relevance.shape} and mask {mask.shape} do not describe the same pixels")
    n = relevance.shape[0]
    return relevance.reshape(n, -1), (mask != 0).reshape(n, -1)


@jax.jit
def relevance_mass_accuracy(relevance: Array, mask: Array) -> Array:
    """Share of the positive relevance that falls inside the mask (Arras et al. 2022), per sample ``(N,)``.

    ``relevance``: ``(N, H, W, C)`` / ``(N, H, W)`` / ``(N, D)``; ``mask``: the same pixels, with or without
    the channel axis (nonzero = inside). Channels are summed per pixel before taking the positive part.
    0 when a sample has no positive relevance.
    """
    rel, m = _pixels(relevance, mask)
    pos = jnp.maximum(rel, 0)
    total, inside = pos.sum(1), jnp.where(m, pos, 0).sum(1)
    return jnp.where(total > 0, inside / jnp.where(total > 0, total, 1), 0.0)


@jax.jit
def relevance_rank_accuracy(relevance: Array, mask: Array) -> Array:
    """Fraction of the ``K`` most relevant pixels that lie inside the mask, ``K`` = mask size; ``(N,)``.

    Shapes as in :func:`relevance_mass_accuracy`. Ties are broken by pixel index (row-major); 0 for an
    empty mask.
    """
    rel, m = _pixels(relevance, mask)
    k = m.sum(1)
    ranks = jnp.argsort(jnp.argsort(rel, axis=1, stable=True, descending=True), axis=1)
    hits = (m & (ranks < k[:, None])).sum(1)
    return jnp.where(k > 0, hits / jnp.maximum(k, 1), 0.0)


@jax.jit
def mask_fraction(mask: Array) -> Array:
    """Area fraction of the mask per sample ``(N,)``: the expected score of both accuracies for random relevance
    (exactly for rank accuracy, in expectation for mass accuracy)."""
    mask = jnp.asarray(mask)
    return (mask != 0).reshape(mask.shape[0], -1).mean(1)


# ----------------------------------------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------------------------------------

def evaluate_dataset(explain_fn: Callable[[Array, Array], Array], model_fn: Callable[[Array], Array],
                     batches: Iterable[tuple], *, metrics: Sequence[str] = ("morf", "lerf", "localisation"),
                     progress: bool = True, **curve_kwargs: Any) -> dict[str, Any]:
    """Evaluate an explanation method over a data set.

    Args:
      explain_fn: ``(x, y) -> relevance`` shaped like ``x`` (jit it yourself for speed).
      model_fn: batch -> logits, as in :func:`perturbation_curve`. Curves track the label ``y``.
      batches: iterable of ``(x, y)`` or ``(x, y, mask)``.
      metrics: any of ``"morf"``, ``"lerf"``, ``"random"`` (curves and their AOPC) and ``"localisation"``
        (mass / rank accuracy and mask fraction, for batches that carry a mask).
      progress: show a tqdm progress bar.
      **curve_kwargs: passed to :func:`perturbation_curve` (region, steps, baseline, key, chunk_size);
        a ``key`` is folded with the batch index so batches get different noise.

    Returns:
      ``{name: per-sample numpy array}`` with ``curve_<order>`` ``(N, K+1)``, ``aopc_<order>``,
      ``aopc_difference`` (with morf and lerf), ``relevance_mass_accuracy``, ``relevance_rank_accuracy``,
      ``mask_fraction``; plus ``"mean"``: ``{name: mean over samples}``.
    """
    unknown = set(metrics) - {*_ORDERS, "localisation"}
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {[*_ORDERS, 'localisation']}")
    key = curve_kwargs.pop("key", None)
    per_sample: dict[str, list] = defaultdict(list)
    for i, (x, y, *rest) in enumerate(tqdm(batches, disable=not progress, desc="evaluating", unit="batch")):
        relevance = explain_fn(x, y)
        kw = dict(curve_kwargs, key=None if key is None else jax.random.fold_in(key, i))
        for order in (o for o in _ORDERS if o in metrics):
            curve = perturbation_curve(model_fn, x, relevance, y, order=order, **kw)
            per_sample[f"curve_{order}"].append(curve)
            per_sample[f"aopc_{order}"].append(aopc(curve))
        if "morf" in metrics and "lerf" in metrics:
            per_sample["aopc_difference"].append(per_sample["aopc_morf"][-1] - per_sample["aopc_lerf"][-1])
        if "localisation" in metrics and rest and rest[0] is not None:
            per_sample["relevance_mass_accuracy"].append(relevance_mass_accuracy(relevance, rest[0]))
            per_sample["relevance_rank_accuracy"].append(relevance_rank_accuracy(relevance, rest[0]))
            per_sample["mask_fraction"].append(mask_fraction(rest[0]))
    results: dict[str, Any] = {k: np.concatenate([np.asarray(a) for a in v]) for k, v in per_sample.items()}
    results["mean"] = {k: v.mean(axis=0) for k, v in results.items()}
    return results
