"""Axiomatic metrics: does the explanation satisfy properties an attribution should have?"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jlrp._src.metrics_common import (as_units, auto_chunk, check_baseline, check_model_target, perturbed_scores,
                                      replace_units, select, selection, split_baseline, unit_baseline, unit_shape)

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("model", "baseline"))
def _completeness(model, x, relevance, target, base_array, *, baseline):
    xu, _ = as_units(x, relevance)
    base = unit_baseline(xu, baseline if base_array is None else base_array).reshape(x.shape)
    sel = selection(model, x, target)
    # one call on [x; baseline]: a constant baseline alone would be constant-folded through the model by XLA
    both = select(model(jnp.concatenate([x, base])).reshape(2, x.shape[0], -1), sel)
    return relevance.reshape(x.shape[0], -1).sum(1) - (both[0] - both[1])


def completeness(model: Callable, x: Array, relevance: Array, target: Any = None, *, baseline: Any = "zero") -> Array:
    """Completeness (Sundararajan, Taly & Yan 2017, "Axiomatic attribution for deep networks"; also
    "summation to delta", Shrikumar et al. 2017), ``(N,)``: the gap ``sum_i R_i - (f(x) - f(x_baseline))``
    of the target score; 0 = complete. ``baseline`` as for :func:`faithfulness_correlation` (an array for
    any reference input). Quantus's ``Completeness`` returns ``gap == 0`` (exact float equality, True only
    in rare cases) with the per-image minimum (``"min"``) as its default baseline."""
    x, relevance = jnp.asarray(x), jnp.asarray(relevance)
    unit_shape(x.shape, relevance.shape)
    target = check_model_target(model, x, target)
    static, base_array = split_baseline(check_baseline(x, baseline, None))
    return _completeness(model, x, relevance, target, base_array, baseline=static)


@functools.partial(jax.jit, static_argnames=("model", "baseline", "eps", "step", "chunk_size"))
def _non_sensitivity(model, x, relevance, target, base_array, *, baseline, eps, step, chunk_size):
    xu, ru = as_units(x, relevance)
    n, p, _ = xu.shape
    groups = -(-p // step)
    base = unit_baseline(xu, baseline if base_array is None else base_array)
    sel = selection(model, x, target)
    f0 = select(model(x), sel)
    unit_group = jnp.arange(p) // step
    make = lambda gs: replace_units(xu[None], base[None], jnp.broadcast_to(
        (unit_group[None] == gs[:, None])[:, None], (gs.shape[0], n, p))).reshape(gs.shape[0], *x.shape)
    scores = perturbed_scores(model, make, jnp.arange(groups), n, sel, chunk_size)  # (G, N)
    insensitive = (jnp.abs(scores - f0[None]) < eps).T  # (N, G)
    zero = jnp.abs(ru) < eps  # (N, P)
    return (insensitive[:, unit_group] ^ zero).sum(1)


def non_sensitivity(model: Callable, x: Array, relevance: Array, target: Any = None, *, baseline: Any = "min",
                    eps: float = 1e-5, features_in_step: int = 1, chunk_size: int | None = None) -> Array:
    """Non-sensitivity (Nguyen & Martinez 2020, "On quantitative aspects of model interpretability"),
    ``(N,)``; lower is better (0 = the relevance is zero exactly where the model does not react).

    The number of units in the symmetric difference of ``{i : |R_i| < eps}`` (no attribution) and
    ``{i : |f(x) - f(x_[i = baseline])| < eps}`` (the target score does not react when the unit is replaced
    by the baseline): units that get attribution although the model ignores them, plus units the model
    reacts to that get none. ``features_in_step > 1`` replaces consecutive units together and every unit
    of a group shares the group's reaction (Quantus supports only 1). Quantus's defaults: ``"min"``
    ("black") baseline, eps 1e-5, on ``|R|``."""
    x, relevance = jnp.asarray(x), jnp.asarray(relevance)
    p, _ = unit_shape(x.shape, relevance.shape)
    target = check_model_target(model, x, target)
    if not 1 <= features_in_step <= p:
        raise ValueError(f"features_in_step={features_in_step} must lie in [1, {p}]")
    static, base_array = split_baseline(check_baseline(x, baseline, None))
    return _non_sensitivity(model, x, relevance, target, base_array, baseline=static, eps=float(eps),
                            step=int(features_in_step), chunk_size=auto_chunk(x.size, chunk_size))


def input_invariance(explain: Callable, explain_shifted: Callable, x: Array, target: Any = None, *,
                     shift: Any = -1.0, relevance: Array | None = None, atol: float | None = None) -> Array:
    """Input invariance (Kindermans et al. 2017/2019, "The (un)reliability of saliency methods"), ``(N,)``.

    Kindermans et al. shift the input by a constant, ``x' = x + shift``, and compensate in the first layer's
    bias (``b' = b - W shift``) so that the shifted model ``f'(x') = f(x)`` is the same function on the
    shifted data. An input-invariant method gives the same explanation: the result is
    ``max_i |R_f(x)_i - R_f'(x')_i|`` per sample (0 = invariant), or, with ``atol``, 1.0 where every entry
    agrees within ``atol`` (Quantus's ``InputInvariance``: ``atol=1e-4``). ``explain(x, target)`` explains
    ``f``, ``explain_shifted(x', target)`` explains ``f'`` (build ``f'`` by adjusting your first layer's
    bias). ``target``: class per row (required)."""
    x = jnp.asarray(x)
    if target is None:
        raise ValueError("input_invariance: pass target= (both explanations must explain the same class)")
    target = jnp.broadcast_to(jnp.asarray(target), (x.shape[0],))
    r = explain(x, target) if relevance is None else jnp.asarray(relevance)
    r_shift = explain_shifted(x + jnp.asarray(shift, x.dtype), target)
    diff = jnp.abs(r - r_shift).reshape(x.shape[0], -1).max(1)
    if atol is None:
        return diff
    return (diff <= atol).astype(x.dtype)
