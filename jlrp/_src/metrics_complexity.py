"""Complexity metrics: how concentrated is an explanation? (Fewer, stronger features are easier to read.)

All take a relevance map ``(N, ...)`` as given (every value is a feature: pass a per-pixel or per-token
sum for per-pixel complexity), work on ``|R|``, are jitted and return ``(N,)``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _flat(relevance: Array) -> Array:
    relevance = jnp.asarray(relevance)
    return jnp.abs(relevance.reshape(relevance.shape[0], -1))


@functools.partial(jax.jit, static_argnames=("eps",))
def sparseness(relevance: Array, *, eps: float = 0.0) -> Array:
    """Sparseness (Chalasani et al. 2020, "Concise explanations of neural networks using adversarial
    training"): the Gini index of ``|R|`` (Hurley & Rickard 2009), ``(N,)``; higher = sparser.

    ``G = sum_i (2 i - P - 1) a_(i) / (P sum_i a_i)`` with ``a_(1) <= .. <= a_(P)`` the sorted ``|R| + eps``:
    0 for a uniform map, ``1 - 1/P`` for a single nonzero value; 0 for an all-zero map. Quantus adds
    ``eps = 1e-7``."""
    a = jnp.sort(_flat(relevance) + eps, axis=1)
    p = a.shape[1]
    i = jnp.arange(1, p + 1, dtype=a.dtype)
    total = a.sum(1)
    g = ((2 * i - p - 1) * a).sum(1) / (p * jnp.where(total > 0, total, 1))
    return jnp.where(total > 0, g, 0.0)


@functools.partial(jax.jit, static_argnames=("eps",))
def complexity(relevance: Array, *, eps: float = 0.0) -> Array:
    """Complexity (Bhatt, Weller & Moura 2020, "Evaluating and aggregating feature-based model
    explanations"): the entropy of the fractional contributions ``p_i = |R_i| / sum_j |R_j|``,
    ``-sum_i p_i log(p_i + eps)`` (natural log, ``0 log 0 = 0``), ``(N,)``; lower = simpler. Between 0 (one
    feature) and ``log P`` (uniform); 0 for an all-zero map. Quantus uses ``eps = 1e-12``."""
    a = _flat(relevance)
    total = a.sum(1, keepdims=True)
    q = a / jnp.where(total > 0, total, 1)
    terms = jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1) + eps), 0.0)
    return -terms.sum(1)


@functools.partial(jax.jit, static_argnames=("eps",))
def effective_complexity(relevance: Array, *, eps: float = 1e-5) -> Array:
    """Effective complexity (Nguyen & Martinez 2020, "On quantitative aspects of model interpretability"):
    the number of features with ``|R_i| > eps``, ``(N,)``; lower = simpler (Quantus's default eps)."""
    return (_flat(relevance) > eps).sum(1)
