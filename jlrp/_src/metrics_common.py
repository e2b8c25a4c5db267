"""Shared plumbing of the evaluation metrics: features ("units") of images and token sequences, baselines,
target scores, correlations and the chunked evaluation of many perturbed copies in one compiled program.

Units. A metric perturbs and ranks *units* of the input, fixed by the relevance map's shape:

- ``relevance.shape == x.shape``: every value is a unit (a pixel of a one-channel image, a token id of
  ``(N, T)`` ids, a feature of ``(N, D)`` vectors, a (pixel, channel) pair of a colour image as in
  Quantus).
- ``relevance.shape == x.shape[:k]``: the units are the cells of that leading grid, each spanning the
  remaining axes of ``x``: ``(N, H, W)`` relevance for ``(N, H, W, C)`` images perturbs whole pixels
  (all channels), ``(N, T)`` relevance for ``(N, T, D)`` embeddings perturbs whole tokens.

Units are numbered row-major over the grid (``x.reshape(N, P, U)``).
"""
from __future__ import annotations

import functools
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jlrp._src.evaluation import map_chunked, random_uniform, to_array
from jlrp._src.targets import check_target, target_mask

Array = jax.Array
UNIT_BASELINES = ("mean", "zero", "min", "max", "uniform")
AUTO_CHUNK_VALUES = 2 ** 18  # perturbed input values held at once (as in perturbation_curve)


# ----------------------------------------------------------------------------------------------------------
# units
# ----------------------------------------------------------------------------------------------------------

def unit_shape(x_shape: tuple[int, ...], r_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(P, U)``: number of units and values per unit for inputs ``x_shape`` and relevance ``r_shape``."""
    if len(x_shape) < 2:
        raise ValueError(f"x must have a batch axis and at least one more, got shape {x_shape}")
    if tuple(r_shape) != tuple(x_shape[:len(r_shape)]) or len(r_shape) < 2:
        raise ValueError(f"relevance of shape {tuple(r_shape)} does not fit x of shape {tuple(x_shape)}: it must "
                         f"be x's shape or a leading part of it with the batch axis, e.g. (N, H, W) for "
                         f"(N, H, W, C) images or (N, T) for (N, T, D) embeddings")
    p = int(np.prod(r_shape[1:]))
    return p, int(np.prod(x_shape[1:])) // p


def as_units(x: Array, relevance: Array) -> tuple[Array, Array]:
    """``x`` as ``(N, P, U)`` and the relevance as ``(N, P)``."""
    p, u = unit_shape(x.shape, relevance.shape)
    n = x.shape[0]
    return x.reshape(n, p, u), relevance.reshape(n, p)


def unit_baseline(xu: Array, baseline: Any, key: Array | None = None) -> Array:
    """Replacement values ``(N, P, U)`` for units ``xu``: ``"mean"`` (per sample, over units, so per channel
    for pixel units), ``"zero"``, ``"min"`` / ``"max"`` (per sample over all values: Quantus's "black" /
    "white"), ``"uniform"`` (per value in ``[min, max]`` of the sample, needs ``key``), a number, or an
    array with ``N * P * U`` values (shaped like x)."""
    if isinstance(baseline, str):
        if baseline == "mean":
            return jnp.broadcast_to(xu.mean(axis=1, keepdims=True), xu.shape)
        if baseline == "zero":
            return jnp.zeros_like(xu)
        if baseline in ("min", "max"):
            reduce = jnp.min if baseline == "min" else jnp.max
            return jnp.broadcast_to(reduce(xu, axis=(1, 2), keepdims=True), xu.shape)
        if baseline == "uniform":
            lo, hi = xu.min(axis=(1, 2), keepdims=True), xu.max(axis=(1, 2), keepdims=True)
            return random_uniform(key, xu.shape, xu.dtype, lo, hi)
        raise ValueError(f"baseline must be one of {UNIT_BASELINES}, a number or an array, got {baseline!r}")
    b = jnp.asarray(baseline)
    if b.ndim == 0:
        return jnp.full(xu.shape, b, xu.dtype)
    return b.reshape(xu.shape).astype(xu.dtype)


def check_baseline(x: Array, baseline: Any, key: Array | None) -> Any:
    """Validate a unit baseline; returns it hashable (strings and floats) or as an array."""
    integer = jnp.issubdtype(x.dtype, jnp.integer)
    if isinstance(baseline, str):
        if baseline not in UNIT_BASELINES:
            raise ValueError(f"baseline must be one of {UNIT_BASELINES}, a number or an array, got {baseline!r}")
        if integer and baseline != "zero":
            raise ValueError(f"token ids (integer x) need an integer baseline (a pad or mask id), got {baseline!r}")
        if baseline == "uniform" and key is None:
            raise ValueError("baseline='uniform' needs a PRNG key: pass key=")
        return baseline
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
        if integer and int(baseline) != baseline:
            raise ValueError(f"token ids (integer x) need an integer baseline, got {baseline!r}")
        return int(baseline) if integer else float(baseline)
    b = jnp.asarray(baseline)
    if b.size != x.size:
        raise ValueError(f"a baseline array must be shaped like x {x.shape}, got {b.shape}")
    return b


def split_baseline(baseline: Any) -> tuple[Any, Array | None]:
    """(static part, traced array or None) of a checked baseline, for jit. Numbers (and ``"zero"``) are
    traced 0-d arrays, so every constant baseline shares one compiled program."""
    if isinstance(baseline, str) and baseline == "zero":
        baseline = 0
    if isinstance(baseline, str):
        return baseline, None
    if isinstance(baseline, (int, float)):
        return "array", np.asarray(baseline)
    return "array", baseline


def replace_units(xu: Array, base: Array, mask: Array) -> Array:
    """``xu`` with the units where ``mask`` (``(..., N, P)``) is True replaced by ``base``."""
    return jnp.where(mask[..., None], base, xu)


# ----------------------------------------------------------------------------------------------------------
# model scores
# ----------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=128)
def probability_model(model: Callable) -> Callable:
    """``softmax(model(x))``, the same function object for the same model (so compiled programs are reused)."""
    return lambda x: jax.nn.softmax(model(x), axis=-1)


def scored_model(model: Callable, output: str) -> Callable:
    if output == "logit":
        return model
    if output == "probability":
        return probability_model(model)
    raise ValueError(f"output must be 'logit' or 'probability', got {output!r}")


def check_model_target(model: Callable, x: Array, target: Any) -> Any:
    """Validate ``target`` against the model's output (while concrete); returns it as an array or None."""
    if target is None:
        return None
    target = jnp.asarray(target) if isinstance(target, jax.core.Tracer) else np.asarray(target)
    out = jax.eval_shape(model, jax.ShapeDtypeStruct(x.shape, x.dtype))
    check_target(out.shape, target)
    return target


def selection(model: Callable, x: Array, target: Any) -> Array:
    """One-hot ``(N, C)`` of the scored class (argmax of ``model(x)`` when ``target`` is None); all ones
    for a model with one score per row."""
    out = jax.eval_shape(model, x)
    if out.ndim == 1:
        return jnp.ones((x.shape[0], 1), out.dtype)
    return target_mask(model(x) if target is None else jnp.zeros(out.shape, out.dtype), target)


def select(logits: Array, sel: Array) -> Array:
    """The selected score of each row; ``where``, not ``*``: inf in another class gives no NaN."""
    logits = logits.reshape(*logits.shape[:-1], -1) if logits.ndim > 1 else logits[..., None]
    return jnp.where(sel > 0, logits, 0).sum(-1)


def perturbed_scores(model: Callable, make: Callable[[Array], Array], ks: Array, n: int, sel: Array,
                     chunk_size: int | None) -> Array:
    """Target scores ``(S, N)`` of the perturbed batches ``make(ks[i:j]) -> (s, N, ...)``, ``chunk_size``
    entries of ``ks`` per model call (one call on ``s * N`` rows)."""
    def scores(k):
        xs = make(k)
        logits = model(xs.reshape(xs.shape[0] * n, *xs.shape[2:]))
        return select(logits.reshape(xs.shape[0], n, *logits.shape[1:]), sel)
    return map_chunked(scores, ks, chunk_size)


def auto_chunk(x_size: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        return int(chunk_size)
    return max(1, AUTO_CHUNK_VALUES // max(1, x_size))


def resolve_target(model: Callable | None, x: Array, target: Any) -> Array:
    """``target`` as an ``(N,)`` int array; the argmax of ``model(x)`` when None."""
    if target is None:
        if model is None:
            raise ValueError("target=None needs the model (its argmax is explained): pass target= or model=")
        return jnp.argmax(model(x), axis=-1)
    if isinstance(target, jax.Array):
        return jnp.broadcast_to(target, (x.shape[0],))
    return to_array(np.broadcast_to(np.asarray(target), (x.shape[0],)).copy())


# ----------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------

@jax.jit
def pearson(a: Array, b: Array) -> Array:
    """Pearson correlation along the last axis; 0 where either side is constant."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    norm = jnp.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return jnp.where(norm > 0, (a * b).sum(-1) / jnp.where(norm > 0, norm, 1), 0.0)


def sort_key(v: Array) -> Array:
    """Integers ordered as the values ``v`` (same shape): floats bit-cast to signed integers of their width
    with the magnitude bits of negative numbers flipped, ``-0.0`` equal to ``0.0``, every NaN one value
    above ``inf``. XLA:CPU sorts a single integer operand about ten times faster than floats (whose
    comparator handles NaN and signed zeros), so ranks and order statistics sort these keys."""
    v = jnp.asarray(v)
    if not jnp.issubdtype(v.dtype, jnp.floating):
        return v.astype(jnp.int32) if v.dtype == jnp.bool_ else v
    bits = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[v.dtype.itemsize]
    v = jnp.where(jnp.isnan(v), jnp.asarray(jnp.nan, v.dtype), jnp.where(v == 0, jnp.zeros_like(v), v))
    i = jax.lax.bitcast_convert_type(v, bits)
    return jnp.where(i < 0, i ^ jnp.asarray(jnp.iinfo(bits).max, bits), i)


_DIRECT_RANKS = 128


@jax.jit
def rankdata(v: Array) -> Array:
    """Ranks (1-based) along the last axis; tied values share the mean of their positions (scipy's
    ``rankdata``): ``(#{u < v} + #{u <= v} + 1) / 2``, counted directly for rows of at most 128 values, else
    by binary search in the sorted row of :func:`sort_key` (compiles faster than
    ``jax.scipy.stats.rankdata``, runs several times faster on CPU than a float sort)."""
    keys = sort_key(v).reshape(-1, v.shape[-1])
    if keys.shape[-1] <= _DIRECT_RANKS:  # short rows: count directly (P^2 comparisons, compiles at once)
        less = (keys[:, None, :] < keys[:, :, None]).sum(-1)
        equal = (keys[:, None, :] == keys[:, :, None]).sum(-1)
        r = less + (equal + 1) / 2
    else:
        s = jnp.sort(keys, axis=-1)
        count = lambda si, vi, side: jnp.searchsorted(si, vi, side, method="scan")
        r = jax.vmap(lambda si, vi: (count(si, vi, "left") + count(si, vi, "right") + 1) / 2)(s, keys)
    dtype = jnp.promote_types(v.dtype, jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else \
        jnp.result_type(float)  # float32 ranks are exact below 2**23 positions
    return r.reshape(v.shape).astype(dtype)


def random_subsets(key: Array, batch: tuple[int, ...], p: int, k: int) -> Array:
    """``(*batch, p)`` bool: in every row a uniformly random subset of exactly ``k`` of the ``p`` positions.

    Floyd's algorithm (Bentley & Floyd 1987), vectorised over the rows: for ``j = p - k, .., p - 1`` draw
    ``t`` uniform in ``[0, j]`` and add ``t``, or ``j`` if ``t`` is already in; ``k`` steps of a gather and a
    scatter, exact (every k-subset equally likely) and far cheaper on CPU than sorting or ``top_k`` of ``p``
    random numbers per row (for ``k > p / 2`` the complement is drawn)."""
    if not 0 <= k <= p:
        raise ValueError(f"subset size {k} must lie in [0, {p}]")
    if 2 * k > p:
        return ~random_subsets(key, batch, p, p - k)
    rows = int(np.prod(batch, dtype=np.int64))
    mask = jnp.zeros((rows, p), bool)
    if k == 0:
        return mask.reshape(*batch, p)
    js = jnp.arange(p - k, p, dtype=jnp.int32)
    # t_i uniform in [0, j_i], drawn flat (see evaluation.random_normal)
    t = jax.random.randint(key, (k * rows,), 0, jnp.repeat(js + 1, rows), jnp.int32).reshape(k, rows)
    r = jnp.arange(rows)

    def add(i, mask):
        ti = t[i]
        return mask.at[r, jnp.where(mask[r, ti], js[i], ti)].set(True)

    return jax.lax.fori_loop(0, k, add, mask).reshape(*batch, p)


@jax.jit
def spearman(a: Array, b: Array) -> Array:
    """Spearman rank correlation along the last axis (ties: average ranks); 0 where either side is constant."""
    return pearson(rankdata(a), rankdata(b))


@functools.partial(jax.jit, static_argnames=("win_size", "k1", "k2"))
def ssim(a: Array, b: Array, *, win_size: int = 7, data_range: Array | None = None, k1: float = 0.01,
         k2: float = 0.03) -> Array:
    """Structural similarity (Wang et al. 2004) of two batches of maps ``(N, *grid)``, per sample ``(N,)``.

    The definition and defaults of scikit-image's ``structural_similarity`` (uniform ``win_size`` window
    on every grid axis, sample covariance, ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, the mean over the positions
    whose window lies inside the map). ``L = data_range`` defaults to ``max - min`` over both maps, per
    sample (what Quantus passes)."""
    n, grid = a.shape[0], a.shape[1:]
    if any(g < win_size for g in grid):
        raise ValueError(f"ssim: every map axis must be at least win_size={win_size}, got {grid}")
    if data_range is None:
        both = jnp.concatenate([a.reshape(n, -1), b.reshape(n, -1)], 1)
        data_range = both.max(1) - both.min(1)
    shape = (n,) + (1,) * len(grid)
    lr = jnp.reshape(data_range, shape)

    def box(v):  # mean over each window lying inside the map ("valid"), every grid axis; direct sums of
        for axis in range(1, v.ndim):  # shifted copies, not a running sum (which loses digits to cancellation)
            size = v.shape[axis] - win_size + 1
            v = sum(jax.lax.slice_in_dim(v, k, k + size, axis=axis) for k in range(win_size)) / win_size
        return v

    ux, uy = box(a), box(b)
    np_ = win_size ** len(grid)
    cov = np_ / (np_ - 1)
    vx, vy = cov * (box(a * a) - ux * ux), cov * (box(b * b) - uy * uy)
    vxy = cov * (box(a * b) - ux * uy)
    c1, c2 = (k1 * lr) ** 2, (k2 * lr) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.reshape(n, -1).mean(1)


def similarity(name: str | Callable) -> Callable[[Array, Array], Array]:
    """A per-sample similarity of two batches of maps: ``"spearman"``, ``"pearson"``, ``"ssim"`` (on the
    maps' grids), ``"ssim_flat"`` (on the flattened maps, as Quantus calls scikit-image), or a callable."""
    if callable(name):
        return name
    n2 = lambda v: v.reshape(v.shape[0], -1)
    table = {"spearman": lambda a, b: spearman(n2(a), n2(b)), "pearson": lambda a, b: pearson(n2(a), n2(b)),
             "ssim": ssim, "ssim_flat": lambda a, b: ssim(n2(a), n2(b))}
    if name not in table:
        raise ValueError(f"similarity must be one of {sorted(table)} or a callable, got {name!r}")
    return table[name]
