"""Faithfulness metrics: does the model's output change the way the relevance map says it should?

Every metric is one jitted program per (model, settings): the perturbed copies are built from compact
descriptions (unit masks, ranks) inside the program and scored ``chunk_size`` copies of the batch per model
call (memory bounded by one chunk). ``model(x) -> logits (N, C)`` (or scores ``(N,)``) must treat rows
independently; it is a static argument of the jit, so pass the same function object to reuse the compiled
program. Units (what is perturbed) follow the relevance map's shape: see :mod:`jlrp._src.metrics_common`.
Region perturbation / pixel flipping are :func:`jlrp.evaluation.perturbation_curve`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlrp._src import evaluation as ev
from jlrp._src.evaluation import to_array
from jlrp._src.metrics_common import (as_units, auto_chunk, check_baseline, check_model_target, pearson,
                                      perturbed_scores, random_subsets, replace_units, scored_model, select,
                                      selection, spearman, split_baseline, unit_baseline, unit_shape)

Array = jax.Array


def _prepare(model, x, relevance, target, baseline, key):
    x, relevance = to_array(x), to_array(relevance)
    unit_shape(x.shape, relevance.shape)
    target = check_model_target(model, x, target)
    baseline = check_baseline(x, baseline, key)
    return x, relevance, target, baseline


def _fold(key, i):
    return None if key is None else jax.random.fold_in(key, i)


# ----------------------------------------------------------------------------------------------------------
# faithfulness correlation (Bhatt et al. 2020)
# ----------------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("model", "runs", "subset_size", "baseline", "chunk_size"))
def _faithfulness_correlation(model, x, relevance, target, key, subsets, base_array, *, runs, subset_size,
                              baseline, chunk_size):
    xu, ru = as_units(x, relevance)
    n, p, _ = xu.shape
    if subsets is None:  # uniform subsets without replacement, drawn as masks (Floyd's algorithm)
        masks = random_subsets(_fold(key, 0), (runs, n), p, subset_size)  # (runs, N, P)
    else:
        rows, cols = jnp.arange(n)[:, None, None], jnp.arange(runs)[None, :, None]
        masks = jnp.zeros((n, runs, p), bool).at[rows, cols, subsets].set(True).transpose(1, 0, 2)
    base = unit_baseline(xu, baseline if base_array is None else base_array, _fold(key, 1))
    sel = selection(model, x, target)
    f0 = select(model(x), sel)
    make = lambda ks: replace_units(xu[None], base[None], masks[ks]).reshape(ks.shape[0], *x.shape)
    scores = perturbed_scores(model, make, jnp.arange(runs), n, sel, chunk_size)  # (runs, N)
    attributions = jnp.where(masks, ru[None], 0).sum(-1).T  # (N, runs); a repeated index counts once
    return pearson(attributions, (f0[None] - scores).T)


def faithfulness_correlation(model: Callable, x: Array, relevance: Array, target: Any = None, *,
                             key: Array | None = None, runs: int = 100, subset_size: int = 224,
                             baseline: Any = "mean", subsets: Array | None = None,
                             chunk_size: int | None = None) -> Array:
    """Faithfulness correlation (Bhatt, Weller & Moura 2020, "Evaluating and aggregating feature-based model
    explanations"), per sample ``(N,)``.

    ``mu_F = corr_S( sum_{i in S} R_i , f(x) - f(x_[S = baseline]) )``: the Pearson correlation, over ``runs``
    random subsets ``S`` of ``subset_size`` units (uniform, without replacement), between the relevance in
    the subset and the drop of the target score when the subset is replaced by the baseline. 1 = the
    relevance predicts the effect of removing features; 0 for a constant map (where Pearson is undefined).

    Args:
      model: ``x -> logits``; target: class per row (None = argmax of ``model(x)``).
      baseline: ``"mean"``, ``"zero"``, ``"min"`` (Quantus's "black"), ``"max"``, ``"uniform"``, a number (a
        pad / mask id for token ids) or an array shaped like ``x``.
      subsets: optional ``(N, runs, subset_size)`` unit indices to use instead of drawing them with ``key``.
      chunk_size: subsets evaluated per model call (default: about 2**18 input values at once).
    """
    x, relevance, target, baseline = _prepare(model, x, relevance, target, baseline, key)
    p, _ = unit_shape(x.shape, relevance.shape)
    if subsets is None:
        if key is None:
            raise ValueError("faithfulness_correlation draws random subsets: pass key= (or subsets=)")
        if not 0 < subset_size <= p:
            raise ValueError(f"subset_size={subset_size} must lie in [1, {p}] (the number of units)")
    else:
        subsets = to_array(subsets)
        if subsets.ndim != 3 or subsets.shape[0] != x.shape[0]:
            raise ValueError(f"subsets must be (N, runs, subset_size) unit indices, got {subsets.shape}")
        runs, subset_size = subsets.shape[1:]
    static, base_array = split_baseline(baseline)
    return _faithfulness_correlation(model, x, relevance, target, key, subsets, base_array, runs=int(runs),
                                     subset_size=int(subset_size), baseline=static,
                                     chunk_size=auto_chunk(x.size, chunk_size))


# ----------------------------------------------------------------------------------------------------------
# monotonicity correlation (Nguyen & Martinez 2020)
# ----------------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("model", "samples", "step", "low", "high", "chunk_size"))
def _monotonicity_correlation(model, x, relevance, target, key, values, *, samples, step, low, high, chunk_size):
    xu, ru = as_units(x, relevance)
    n, p, _ = xu.shape
    groups = -(-p // step)
    order = jnp.argsort(ru, axis=1, stable=True)  # ascending relevance, ties by unit index
    rank = jnp.arange(p, dtype=jnp.int32)
    group_of = jnp.zeros((n, p), jnp.int32).at[jnp.arange(n)[:, None], order].set(rank // step)
    member = group_of[:, None, :] == jnp.arange(groups)[None, :, None]  # (N, G, P)
    if values is None:
        values = ev.random_uniform(key, (groups, samples, n), x.dtype, low, high)
    sel = selection(model, x, target)
    f0 = select(model(x), sel)

    def make(ts):  # flat index t = g * samples + s
        g, s = ts // samples, ts % samples
        v = values[g, s].astype(x.dtype)  # (c, N)
        m = member[:, g].transpose(1, 0, 2)  # (c, N, P)
        return replace_units(xu[None], v[:, :, None, None], m).reshape(ts.shape[0], *x.shape)

    scores = perturbed_scores(model, make, jnp.arange(groups * samples), n, sel, chunk_size)
    variance = ((scores.reshape(groups, samples, n) - f0) ** 2).mean(1)  # (G, N)
    attributions = jnp.where(member, ru[:, None, :], 0).sum(-1)  # (N, G)
    return spearman(attributions, variance.T)


def monotonicity_correlation(model: Callable, x: Array, relevance: Array, target: Any = None, *,
                             key: Array | None = None, samples: int = 100, features_in_step: int = 1,
                             low: float = 0.0, high: float = 1.0, values: Array | None = None,
                             chunk_size: int | None = None) -> Array:
    """Monotonicity correlation (Nguyen & Martinez 2020, "On quantitative aspects of model
    interpretability"), per sample ``(N,)``.

    Units are sorted by relevance and grouped ``features_in_step`` at a time; group ``g`` is replaced,
    ``samples`` times, by a random value ``v ~ U[low, high)`` (one value per group, sample and row), and
    ``V_g = mean_s (f(x) - f(x_[g = v_s]))^2``. The score is the Spearman rank correlation between the
    groups' summed relevance and ``V_g``: 1 = the more relevant a feature, the more the output varies when
    it is noised. (Quantus also multiplies ``V_g`` by ``1 / f(x)^2``; a positive per-sample factor leaves
    the rank correlation unchanged.) Pass ``|R|`` for the paper's absolute attributions.

    ``values``: optional ``(G, samples, N)`` replacement values instead of drawing them with ``key``.
    """
    x, relevance = to_array(x), to_array(relevance)
    p, _ = unit_shape(x.shape, relevance.shape)
    target = check_model_target(model, x, target)
    if not 1 <= features_in_step <= p:
        raise ValueError(f"features_in_step={features_in_step} must lie in [1, {p}]")
    groups = -(-p // int(features_in_step))
    if values is None:
        if key is None:
            raise ValueError("monotonicity_correlation draws random values: pass key= (or values=)")
    else:
        values = to_array(values)
        if values.shape[0] != groups or values.ndim != 3 or values.shape[2] != x.shape[0]:
            raise ValueError(f"values must be (G={groups}, samples, N={x.shape[0]}), got {values.shape}")
        samples = values.shape[1]
    return _monotonicity_correlation(model, x, relevance, target, key, values, samples=int(samples),
                                     step=int(features_in_step), low=float(low), high=float(high),
                                     chunk_size=auto_chunk(x.size, chunk_size))


# ----------------------------------------------------------------------------------------------------------
# selectivity (Montavon et al. 2018)
# ----------------------------------------------------------------------------------------------------------

def selectivity(model: Callable, x: Array, relevance: Array, target: Any = None, *, region: int = 8,
                baseline: Any = "min", chunk_size: int | None = None) -> Array:
    """Selectivity (Montavon, Samek & Müller 2018, "Methods for interpreting and understanding deep neural
    networks"), per sample ``(N,)``: the area under the target score as ``region x region`` regions are
    removed most relevant first (lower = the relevant regions were found first).

    The curve is :func:`jlrp.evaluation.perturbation_curve` (order ``"morf"``); the area is the trapezoid rule
    with unit spacing over the ``K`` perturbed points ``f(x^1) .. f(x^K)`` (the unperturbed point excluded),
    as in Quantus's ``Selectivity`` + ``calculate_auc``. Default baseline ``"min"`` = Quantus's "black".
    Images ``(N, H, W[, C])`` and sequences ``(N, D)``.
    """
    curve = ev.perturbation_curve(model, x, relevance, target, order="morf", region=region, baseline=baseline,
                                  chunk_size=chunk_size)
    return _unit_trapezoid(curve)


@jax.jit
def _unit_trapezoid(curve: Array) -> Array:
    """Trapezoid rule with unit spacing over the perturbed points ``curve[:, 1:]``."""
    c = curve[:, 1:]
    return c.sum(1) - (c[:, 0] + c[:, -1]) / 2


# ----------------------------------------------------------------------------------------------------------
# insertion / deletion (Petsiuk et al. 2018)
# ----------------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("model", "points", "insert", "baseline", "chunk_size"))
def _insertion_deletion(model, x, relevance, target, base_array, *, points, insert, baseline, chunk_size):
    xu, ru = as_units(x, relevance)
    n = xu.shape[0]
    ranks = jnp.argsort(jnp.argsort(-ru, axis=1, stable=True), axis=1)  # 0 = most relevant (ties: index)
    base = unit_baseline(xu, baseline if base_array is None else base_array)
    src, dst = (base, xu) if insert else (xu, base)
    sel = selection(model, x, target)
    make = lambda ks: replace_units(src[None], dst[None], ranks[None] < ks[:, None, None]).reshape(
        ks.shape[0], *x.shape)
    return perturbed_scores(model, make, jnp.asarray(points), n, sel, chunk_size).T


def _blurred(x: Array, sigma: float) -> Array:
    """Gaussian blur of images (N, H, W[, C]) over H and W (row-normalised kernel, no dark borders)."""
    xc = x if x.ndim == 4 else x[..., None]
    kh = jnp.asarray(ev._blur_matrix(xc.shape[1], sigma), x.dtype)
    kw = jnp.asarray(ev._blur_matrix(xc.shape[2], sigma), x.dtype)
    return jnp.einsum("hi,nijc,wj->nhwc", kh, xc, kw).reshape(x.shape)


def insertion_deletion_curve(model: Callable, x: Array, relevance: Array, target: Any = None, *,
                             mode: str = "deletion", step: int | None = None, baseline: Any = None,
                             output: str = "probability", chunk_size: int | None = None) -> Array:
    """The curve behind :func:`deletion_auc` / :func:`insertion_auc`: ``(N, n_steps + 1)`` target scores
    after ``min(i * step, P)`` units, most relevant first, were deleted (replaced by the baseline) or
    inserted into the baseline."""
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    x, relevance = to_array(x), to_array(relevance)
    p, _ = unit_shape(x.shape, relevance.shape)
    if baseline is None:
        if mode == "deletion" or jnp.issubdtype(x.dtype, jnp.integer):
            baseline = "zero"
        elif x.ndim in (3, 4) and relevance.ndim >= 3:
            baseline = _blurred(x, 5.0)  # Petsiuk et al.: a blurred copy (sigma 5 px)
        else:
            baseline = "mean"
    scored = scored_model(model, output)
    x, relevance, target, baseline = _prepare(scored, x, relevance, target, baseline, None)
    if step is None:
        step = x.shape[2] if relevance.ndim >= 3 else 1  # one image row per step
    if int(step) < 1:
        raise ValueError(f"step must be positive, got {step}")
    points = tuple(min(i * int(step), p) for i in range(-(-p // int(step)) + 1))
    static, base_array = split_baseline(baseline)
    return _insertion_deletion(scored, x, relevance, target, base_array, points=points, insert=mode == "insertion",
                               baseline=static, chunk_size=auto_chunk(x.size, chunk_size))


@jax.jit
def _petsiuk_auc(curve: Array) -> Array:
    return (curve.sum(1) - (curve[:, 0] + curve[:, -1]) / 2) / (curve.shape[1] - 1)


def deletion_auc(model: Callable, x: Array, relevance: Array, target: Any = None, *, step: int | None = None,
                 baseline: Any = None, output: str = "probability", chunk_size: int | None = None) -> Array:
    """Deletion AUC (Petsiuk, Das & Saenko 2018, "RISE"), per sample ``(N,)``; lower is better.

    Units are deleted most relevant first (replaced by ``baseline``, default 0), ``step`` at a time (default:
    one image row, 1 for sequences); the target's probability (``output="logit"`` for the logit) is
    recorded after each step, ``n = ceil(P / step)`` steps, and the AUC is the trapezoid rule on ``n + 1``
    equally spaced points over ``[0, 1]``: ``(sum c - (c_0 + c_n) / 2) / n``. For colour images pass
    ``(N, H, W)`` relevance to delete whole pixels. Token ids: ``baseline`` is the pad / mask id."""
    curve = insertion_deletion_curve(model, x, relevance, target, mode="deletion", step=step, baseline=baseline,
                                     output=output, chunk_size=chunk_size)
    return _petsiuk_auc(curve)


def insertion_auc(model: Callable, x: Array, relevance: Array, target: Any = None, *, step: int | None = None,
                  baseline: Any = None, output: str = "probability", chunk_size: int | None = None) -> Array:
    """Insertion AUC (Petsiuk, Das & Saenko 2018, "RISE"), per sample ``(N,)``; higher is better.

    Starts from ``baseline`` (default for images: a gaussian-blurred copy, sigma 5 pixels, as in the paper;
    the kernel is renormalised at the borders instead of zero-padded; for sequences the per-sample mean,
    for token ids 0) and puts the units of ``x`` back most relevant first; otherwise as
    :func:`deletion_auc`."""
    curve = insertion_deletion_curve(model, x, relevance, target, mode="insertion", step=step, baseline=baseline,
                                     output=output, chunk_size=chunk_size)
    return _petsiuk_auc(curve)


# ----------------------------------------------------------------------------------------------------------
# comprehensiveness / sufficiency (DeYoung et al. 2020)
# ----------------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("model", "ks", "delete", "baseline", "chunk_size"))
def _rationale(model, x, relevance, target, base_array, keep, *, ks, delete, baseline, chunk_size):
    xu, ru = as_units(x, relevance)
    n, p, _ = xu.shape
    ranks = jnp.argsort(jnp.argsort(-ru, axis=1, stable=True), axis=1)
    base = unit_baseline(xu, baseline if base_array is None else base_array)
    sel = selection(model, x, target)
    f0 = select(model(x), sel)

    def make(k):  # (c,) rationale sizes -> (c, N, ...) inputs
        top = ranks[None] < k[:, None, None]  # (c, N, P): the rationale
        gone = top ^ keep  # keep (traced: comprehensiveness and sufficiency share the program): ~top
        if not delete:
            return replace_units(xu[None], base[None], gone).reshape(k.shape[0], *x.shape)
        # deletion: the remaining units move to the front in their order, the baseline fills the end
        order = jnp.argsort(gone, axis=-1, stable=True)
        moved = jnp.take_along_axis(jnp.broadcast_to(xu[None], (k.shape[0],) + xu.shape), order[..., None], 2)
        filled = jnp.arange(p)[None, None] >= (~gone).sum(-1, keepdims=True)
        return replace_units(moved, base[None], filled).reshape(k.shape[0], *x.shape)

    scores = perturbed_scores(model, make, jnp.asarray(ks), n, sel, chunk_size)  # (K, N)
    return (f0[None] - scores).T


def _rationale_metric(keep, model, x, relevance, target, fractions, baseline, delete, output, chunk_size):
    scored = scored_model(model, output)
    x, relevance, target, baseline = _prepare(scored, x, relevance, target, baseline, None)
    p, _ = unit_shape(x.shape, relevance.shape)
    fractions = tuple(float(f) for f in np.atleast_1d(fractions))
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1], got {fractions}")
    ks = tuple(int(math.ceil(f * p - 1e-9)) for f in fractions)
    static, base_array = split_baseline(baseline)
    per_bin = _rationale(scored, x, relevance, target, base_array, np.asarray(bool(keep)), ks=ks,
                         delete=bool(delete), baseline=static, chunk_size=auto_chunk(x.size, chunk_size))
    return _mean_over_bins(per_bin)


@jax.jit
def _mean_over_bins(per_bin: Array) -> Array:
    return per_bin.mean(1)


def comprehensiveness(model: Callable, x: Array, relevance: Array, target: Any = None, *,
                      fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.5), baseline: Any = 0,
                      delete: bool = False, output: str = "probability", chunk_size: int | None = None) -> Array:
    """Comprehensiveness (DeYoung et al. 2020, "ERASER"), per sample ``(N,)``; higher is better.

    ``comp = mean_k [ p(y | x) - p(y | x without r_k) ]`` over the rationales ``r_k`` = the ``ceil(k P)``
    most relevant units for each fraction ``k`` in ``fractions`` (the paper's AOPC over bins 1, 5, 10, 20,
    50 %). Removal replaces the units by ``baseline`` (a pad / mask id for token ids); ``delete=True``
    removes them from the sequence instead (the rest moves up, the end is filled with ``baseline``), the
    paper's token deletion for models that ignore padding. ``output="logit"`` scores logits."""
    return _rationale_metric(False, model, x, relevance, target, fractions, baseline, delete, output, chunk_size)


def sufficiency(model: Callable, x: Array, relevance: Array, target: Any = None, *,
                fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.5), baseline: Any = 0,
                delete: bool = False, output: str = "probability", chunk_size: int | None = None) -> Array:
    """Sufficiency (DeYoung et al. 2020, "ERASER"), per sample ``(N,)``; lower is better.

    ``suff = mean_k [ p(y | x) - p(y | r_k) ]``: only the rationale ``r_k`` is kept, everything else removed
    (as in :func:`comprehensiveness`). Not Quantus's ``Sufficiency``, which is a different metric (Dasgupta
    et al. 2022: agreement of predictions among inputs with similar explanations)."""
    return _rationale_metric(True, model, x, relevance, target, fractions, baseline, delete, output, chunk_size)


# ----------------------------------------------------------------------------------------------------------
# infidelity (Yeh et al. 2019)
# ----------------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("model", "samples", "std", "chunk_size"))
def _infidelity_noise(model, x, relevance, target, key, noise, *, samples, std, chunk_size):
    xu, ru = as_units(x, relevance)
    n = xu.shape[0]
    if noise is None:
        noise = std * ev.random_normal(key, (samples,) + x.shape, x.dtype)
    noise = noise.astype(x.dtype)
    sel = selection(model, x, target)
    f0 = select(model(x), sel)
    make = lambda ks: x[None] - noise[ks]
    scores = perturbed_scores(model, make, jnp.arange(noise.shape[0]), n, sel, chunk_size)  # (S, N)
    projected = (noise.reshape(noise.shape[0], *xu.shape).sum(-1) * ru[None]).sum(-1)  # I . R
    return ((projected - (f0[None] - scores)) ** 2).mean(0)


def infidelity(model: Callable, x: Array, relevance: Array, target: Any = None, *, key: Array | None = None,
               samples: int = 100, std: float = 0.1, noise: Array | None = None, perturbation: str = "gaussian",
               region: int = 4, baseline: Any = "min", chunk_size: int | None = None) -> Array:
    """Infidelity (Yeh et al. 2019, "On the (in)fidelity and sensitivity of explanations"), per sample
    ``(N,)``; lower is better.

    ``INFD = E_I [ (I . R - (f(x) - f(x - I)))^2 ]`` over random perturbations ``I``:

    - ``perturbation="gaussian"`` (default): ``I ~ N(0, std^2)`` on every input value, ``samples`` draws
      (or the given ``noise``, ``(S, *x.shape)``). ``I . R`` sums each unit's relevance times the unit's
      summed perturbation.
    - ``perturbation="patches"``: Quantus's ``Infidelity``: ``region x region`` patches are replaced by the
      baseline cumulatively in row-major order, ``I_k = x - x^k`` for every step ``k``, and the mean over
      the steps (deterministic, so no sampling). Images ``(N, H, W[, C])`` and sequences ``(N, D)``.
    """
    x, relevance = to_array(x), to_array(relevance)
    unit_shape(x.shape, relevance.shape)
    target = check_model_target(model, x, target)
    if perturbation == "patches":
        return _infidelity_patches(model, x, relevance, target, region, baseline, chunk_size)
    if perturbation != "gaussian":
        raise ValueError(f"perturbation must be 'gaussian' or 'patches', got {perturbation!r}")
    if noise is None and key is None:
        raise ValueError("infidelity draws gaussian perturbations: pass key= (or noise=)")
    if noise is not None:
        noise = to_array(noise)
        if noise.shape[1:] != x.shape:
            raise ValueError(f"noise must be (S, *x.shape) = (S, {x.shape}), got {noise.shape}")
    return _infidelity_noise(model, x, relevance, target, key, noise, samples=int(samples), std=float(std),
                             chunk_size=auto_chunk(x.size, chunk_size))


def _infidelity_patches(model, x, relevance, target, region, baseline, chunk_size):
    (h, w, c), reg = ev._layout(x.shape, region)
    if isinstance(baseline, str):
        if baseline not in ev._BASELINES or baseline == "uniform":
            raise ValueError(f"baseline must be one of {[b for b in ev._BASELINES if b != 'uniform']}, a number "
                             f"or an array shaped like x, got {baseline!r}")
        static, base_array = baseline, None
    elif np.ndim(baseline) == 0:  # a number: traced (0-d), one program for every constant
        static, base_array = "array", np.asarray(float(baseline))
    else:
        static, base_array = "array", to_array(baseline)
        if base_array.size != x.size:
            raise ValueError(f"a baseline array must be shaped like x {x.shape}, got {base_array.shape}")
    return _infidelity_patches_program(model, x, relevance, target, base_array, hwc=(h, w, c), reg=reg,
                                       baseline=static, chunk_size=auto_chunk(x.size, chunk_size))


@functools.partial(jax.jit, static_argnames=("model", "hwc", "reg", "baseline", "chunk_size"))
def _infidelity_patches_program(model, x, relevance, target, base_array, *, hwc, reg, baseline, chunk_size):
    (h, w, c), n = hwc, x.shape[0]
    gh, gw = -(-h // reg[0]), -(-w // reg[1])
    curve = ev._curve(model, x, jnp.zeros((n, h, w), x.dtype), target, None, base_array, order="index",
                      region=reg if x.ndim > 2 else reg[1], steps=gh * gw, baseline=baseline, chunk_size=chunk_size)
    xc = x.reshape(n, h, w, c)
    if base_array is None:
        base = ev._baseline(xc, baseline, reg, None)
    else:
        base_array = base_array.astype(x.dtype)
        base = jnp.broadcast_to(base_array, xc.shape) if base_array.ndim == 0 else base_array.reshape(xc.shape)
    if relevance.shape == x.shape:  # R . (x - x^k), value by value
        contrib = (relevance.reshape(xc.shape) * (xc - base)).sum(-1)
    else:  # one relevance per pixel: times the pixel's summed change
        contrib = relevance.reshape(n, h, w) * (xc - base).sum(-1)
    pad = jnp.pad(contrib, ((0, 0), (0, gh * reg[0] - h), (0, gw * reg[1] - w)))
    per_region = pad.reshape(n, gh, reg[0], gw, reg[1]).sum((2, 4)).reshape(n, -1)
    projected = jnp.cumsum(per_region, axis=1)  # I_k . R for k = 1..K
    return ((projected - (curve[:, :1] - curve[:, 1:])) ** 2).mean(1)


# ----------------------------------------------------------------------------------------------------------
# ROAD: remove and debias (Rong et al. 2022)
# ----------------------------------------------------------------------------------------------------------

_NEIGHBOURS = ((1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12), (0, -1, 1 / 6),
               (-1, -1, 1 / 12), (1, 0, 1 / 6), (-1, 0, 1 / 6))


def _shift(v: Array, dy: int, dx: int) -> Array:
    """``out[.., i, j, :] = v[.., i + dy, j + dx, :]``, zero outside the image."""
    h, w = v.shape[-3], v.shape[-2]
    pad = [(0, 0)] * (v.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
    return jnp.pad(v, pad)[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w, :]


def _neighbour_sum(v: Array) -> Array:
    return sum(wt * _shift(v, dy, dx) for dy, dx, wt in _NEIGHBOURS)


@functools.partial(jax.jit, static_argnames=("noise", "rtol", "max_iter"))
def noisy_linear_imputation(x: Array, removed: Array, *, key: Array | None = None, noise: float = 0.01,
                            rtol: float | None = None, max_iter: int | None = None) -> Array:
    """Noisy linear imputation (Rong et al. 2022): the removed pixels of images ``x`` ``(..., H, W, C)``
    (``removed``: ``(..., H, W)`` bool) are set to the solution of ``v_i = sum_j w_ij v_j / sum_j w_ij`` over
    the 8 neighbours inside the image (weight 1/6 direct, 1/12 diagonal; known pixels fixed), for each
    channel, plus ``noise * N(0, 1)`` (per value; needs ``key`` when ``noise > 0``).

    Solved by conjugate gradients on the (symmetric positive definite) restricted graph Laplacian,
    matrix-free, to relative residual ``rtol`` (default 1e-13 in float64, 1e-6 in float32); jittable."""
    x = jnp.asarray(x)
    m = jnp.asarray(removed)[..., None].astype(x.dtype)  # 1 = unknown
    if rtol is None:
        rtol = 1e-13 if x.dtype == jnp.float64 else 1e-6
    if max_iter is None:
        max_iter = 4 * x.shape[-3] * x.shape[-2]
    degree = _neighbour_sum(jnp.ones_like(x))  # sum of the weights of the neighbours inside the image
    apply = lambda v: m * (degree * v - _neighbour_sum(m * v))  # A_UU v on the unknowns, 0 elsewhere
    b = m * _neighbour_sum((1 - m) * x)
    axes = (-3, -2, -1)
    dot = lambda a, c: (a * c).sum(axes, keepdims=True)
    inv_d = m / degree  # Jacobi preconditioner
    v0 = jnp.zeros_like(x)
    r0 = b
    z0 = inv_d * r0
    bnorm = jnp.sqrt(dot(b, b))

    def cond(state):
        i, _, r, _, _ = state
        return (i < max_iter) & jnp.any(jnp.sqrt(dot(r, r)) > rtol * bnorm)

    def body(state):
        i, v, r, z, d = state
        ad = apply(d)
        rz = dot(r, z)
        dad = dot(d, ad)
        alpha = jnp.where(dad > 0, rz / jnp.where(dad > 0, dad, 1), 0)
        v, r_new = v + alpha * d, r - alpha * ad
        z_new = inv_d * r_new
        beta = jnp.where(rz > 0, dot(r_new, z_new) / jnp.where(rz > 0, rz, 1), 0)
        return i + 1, v, r_new, z_new, z_new + beta * d

    _, v, _, _, _ = jax.lax.while_loop(cond, body, (0, v0, r0, z0, z0))
    if noise:
        v = v + noise * ev.random_normal(key, x.shape, x.dtype)
    return jnp.where(m > 0, v, x)


@functools.partial(jax.jit, static_argnames=("model", "counts", "noise", "output", "chunk_size"))
def _road(model, x, relevance, target, key, lerf, *, counts, noise, output, chunk_size):
    n = x.shape[0]
    xc = x if x.ndim == 4 else x[..., None]
    rel = relevance.reshape(n, -1)
    # lerf is traced: MoRF and LeRF share the program
    ranks = jnp.argsort(jnp.argsort(jnp.where(lerf, rel, -rel), axis=1, stable=True), axis=1).reshape(xc.shape[:3])
    out = jax.eval_shape(model, x)
    if output == "accuracy":
        labels = jnp.argmax(model(x), -1) if target is None else jnp.broadcast_to(jnp.asarray(target), (n,))
    else:
        sel = selection(model, x, target)

    def scores(js):  # (c,) percentage indices -> (c, N)
        k = jnp.asarray(counts)[js]
        removed = ranks[None] < k[:, None, None, None]
        keys = None if key is None else jax.vmap(lambda j: jax.random.fold_in(key, j))(js)
        imputed = jax.vmap(lambda xi, ri, ki: noisy_linear_imputation(xi, ri, key=ki, noise=noise))(
            jnp.broadcast_to(xc[None], (js.shape[0],) + xc.shape), removed,
            keys if keys is not None else jnp.zeros(js.shape[0]))
        logits = model(imputed.reshape(js.shape[0] * n, *x.shape[1:])).reshape(js.shape[0], n, *out.shape[1:])
        if output == "accuracy":
            return (jnp.argmax(logits, -1) == labels[None]).astype(x.dtype)
        return select(logits, sel)

    return ev.map_chunked(scores, jnp.arange(len(counts)), chunk_size).T


def road(model: Callable, x: Array, relevance: Array, target: Any = None, *,
         percentages: Sequence[float] = tuple(range(10, 100, 10)), order: str = "morf", noise: float = 0.01,
         key: Array | None = None, output: str = "accuracy", chunk_size: int | None = None) -> Array:
    """ROAD, remove and debias (Rong et al. 2022, "A consistent and efficient evaluation strategy for
    attribution methods"), per sample and percentage ``(N, len(percentages))``.

    For each ``p`` the ``floor(P p / 100)`` most (``order="morf"``) or least (``"lerf"``) relevant pixels are
    removed and filled in by :func:`noisy_linear_imputation` (``noise`` std; 0 = deterministic), and the
    model is evaluated: ``output="accuracy"`` gives 1 where the prediction still equals the target (mean
    over samples = the paper's accuracy curve; MoRF: lower is better, LeRF: higher), ``"logit"`` /
    ``"probability"`` the target score. Images ``(N, H, W[, C])``; relevance ``(N, H, W)`` or with channels
    (summed per pixel). Quantus's ``ROAD``: ``order="morf"``, percentages 1, 3, .., 99, accuracy.
    """
    x, relevance = to_array(x), to_array(relevance)
    if x.ndim not in (3, 4) or relevance.shape[:3] != x.shape[:3]:
        raise ValueError(f"road needs images (N, H, W[, C]) and relevance per pixel, got x {x.shape}, "
                         f"relevance {relevance.shape}")
    relevance = relevance.reshape(*x.shape[:3], -1).sum(-1)
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
    if output not in ("accuracy", "logit", "probability"):
        raise ValueError(f"output must be 'accuracy', 'logit' or 'probability', got {output!r}")
    if noise and key is None:
        raise ValueError("road with noise > 0 needs a PRNG key: pass key= (or noise=0)")
    p = x.shape[1] * x.shape[2]
    counts = tuple(int(p * float(q) / 100) for q in percentages)
    if any(not 0 <= k < p for k in counts):
        raise ValueError(f"percentages must lie in [0, 100), got {tuple(percentages)}")
    scored = model if output != "probability" else scored_model(model, "probability")
    target = check_model_target(model, x, target)
    chunk = max(1, auto_chunk(x.size, chunk_size))
    return _road(scored, x, relevance, target, key, np.asarray(order == "lerf"), counts=counts, noise=float(noise),
                 output=output, chunk_size=chunk)
