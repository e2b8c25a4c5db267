"""Initial relevance: which output is explained, and with how much relevance.

Shared by every explanation method so that ``target=`` means the same thing everywhere.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_target(out_shape: tuple[int, ...], target: Any) -> None:
    """Raise a ValueError when ``target`` cannot select an output of shape ``out_shape``."""
    if target is None:
        return
    t_shape = np.shape(target)
    if not jnp.issubdtype(jnp.result_type(target), jnp.integer):
        raise ValueError(f"target must be an integer (class index) or an integer array, got dtype "
                         f"{jnp.result_type(target)}")
    if len(out_shape) == 0:
        raise ValueError("the model output is a scalar; pass target=None (explain the output itself)")
    lead = out_shape[:-1]
    if len(t_shape) > len(lead) or any(a not in (1, b) for a, b in zip(t_shape[::-1], lead[::-1])):
        raise ValueError(f"target of shape {t_shape} does not fit the model output of shape {out_shape}: "
                         f"expected a scalar or an array broadcastable to {lead} (one class index per row)")
    if _is_concrete(target):
        t = np.asarray(target)
        n = out_shape[-1]
        if t.size and (t.min() < 0 or t.max() >= n):
            raise ValueError(f"target {t.tolist() if t.size < 20 else '...'} is out of range: the model "
                             f"has {n} outputs on its last axis, so targets must lie in [0, {n - 1}]")


def check_unambiguous(out_shape: tuple[int, ...], inputs: Any, target: Any, relevance: Any) -> None:
    """Refuse to guess when a 1-D output of length N meets an explained input with a leading axis of N:
    N classes of one sample (argmax selects one) or one score per row of a batch (each row explains its
    own score)? Silently picking the first would explain one row of a regression batch."""
    if target is not None or relevance is not None or len(out_shape) != 1 or out_shape[0] < 2:
        return
    leads = {np.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(inputs) if np.ndim(leaf) >= 2}
    if out_shape[0] in leads:
        n = out_shape[0]
        raise ValueError(
            f"the model output has shape ({n},) and the explained input has a leading axis of {n}: one score "
            f"per row (regression) or {n} classes of one sample? For per-row scores return shape ({n}, 1) "
            f"or pass relevance=out (each row explains its own score); for classes pass target= (e.g. "
            f"target=jnp.argmax(out)).")


def target_mask(out: jax.Array, target: Any) -> jax.Array:
    """One-hot mask over the last axis of ``out`` selecting ``target`` (argmax when None).

    A scalar output is selected as a whole (regression).
    """
    check_target(out.shape, target)
    if out.ndim == 0:
        return jnp.ones_like(out)
    if target is None:
        target = jnp.argmax(out, axis=-1)
    target = jnp.broadcast_to(jnp.asarray(target), out.shape[:-1])
    return jax.nn.one_hot(target, out.shape[-1], dtype=out.dtype)


def initial_relevance(out: jax.Array, target: Any = None, relevance: Any = None) -> jax.Array:
    """The relevance put on the model output before it is propagated back.

    By default the selected logit itself, ``out * one_hot(target)`` (no softmax): positive relevance is
    evidence for the class. ``relevance`` overrides it with any array of the output's shape.
    """
    if relevance is not None:
        if target is not None:
            raise ValueError("pass either target= or relevance=, not both")
        relevance = jnp.asarray(relevance)
        if relevance.shape != out.shape:
            raise ValueError(f"relevance= has shape {relevance.shape}, expected the model output's shape "
                             f"{out.shape}")
        return relevance.astype(out.dtype)
    return out * target_mask(out, target)
