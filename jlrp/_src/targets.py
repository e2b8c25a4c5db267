"""Initial relevance: which output is explained, and with how much relevance.

Shared by every explanation method so that ``target=`` means the same thing everywhere.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .util import varying_like


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


def warn_if_ambiguous(out_shape: tuple[int, ...], inputs: Any, target: Any, relevance: Any,
                      seeds_with_output: bool) -> None:
    """Warn when a 1-D output of length N meets an explained array whose leading axis is N: are these N
    classes of one sample (read so: the argmax is explained) or one score per row of a batch (then only
    one row would be explained)? A warning, not an error: unbatched and vmapped models whose first axis
    happens to equal the number of classes are legitimate. Passing ``target=`` or ``relevance=`` (or
    giving per-row scores a trailing axis) says which reading is meant and silences it."""
    leaves = jax.tree_util.tree_leaves(inputs)
    if (target is not None or relevance is not None or len(out_shape) != 1 or out_shape[0] < 2
            or len(leaves) != 1 or np.ndim(leaves[0]) < 2 or np.shape(leaves[0])[0] != out_shape[0]):
        return
    n = out_shape[0]
    rows = f"return shape ({n}, 1)" + (" or pass relevance=out" if seeds_with_output else "")
    warnings.warn(
        f"the model output has shape ({n},) and the explained input has a leading axis of {n}: it is read "
        f"as {n} classes of one sample and only the argmax is explained. If these are per-row scores "
        f"(regression over a batch), {rows}; pass target= to keep the class reading without this warning.",
        stacklevel=4)


def _raise_out_of_range(bad, target, n: int) -> np.ndarray:
    """The target itself, or a ValueError when ``bad`` (run on the host, see :func:`target_mask`)."""
    if bool(np.any(bad)):
        raise ValueError(f"target {np.asarray(target).tolist()} is out of range: the model has {n} outputs on "
                         f"its last axis, so targets must lie in [0, {n - 1}]")
    return np.asarray(target)


def _checked_on_host(target: jax.Array, bad: jax.Array, check) -> jax.Array:
    """``target``, with ``check(bad, target)`` (which raises when ``bad``) run on the host when ``bad``.

    The host is called only on the branch a bad target takes: an unconditional callback is a device -> host
    round trip on every call (an MLP's explanation at batch 1 took 4x ``jax.grad``'s time; now 1x). Under
    vmap the cond becomes a select that runs both branches, so ``check`` tests ``bad`` itself. With one
    process the check is a ``pure_callback`` whose output (the target) is used, which costs nothing when not
    taken. With several processes (``jax.distributed``) the callback runs on process 0 only; an output there
    would make the others wait for it forever if it raised, so it is a ``jax.debug.callback`` without one
    (``explain_dataset`` carries its error to every process).
    """
    if jax.process_count() > 1:
        jax.lax.cond(bad, lambda b, t: jax.debug.callback(check, b, t), lambda b, t: None, bad, target)
        return target
    spec = jax.ShapeDtypeStruct(target.shape, target.dtype)
    return jax.lax.cond(
        bad, lambda b, t: varying_like(jax.pure_callback(check, spec, b, t, vmap_method="sequential"), t),
        lambda b, t: t, bad, target)


def target_mask(out: jax.Array, target: Any) -> jax.Array:
    """One-hot mask over the last axis of ``out`` selecting ``target`` (argmax when None).

    A scalar output is selected as a whole (regression).
    """
    check_target(out.shape, target)
    if out.ndim == 0:
        return jnp.ones_like(out)
    if target is None:
        target = jnp.argmax(out, axis=-1)
    elif not _is_concrete(target):  # checked when the program runs: a one-hot of it would be silently zero
        n = out.shape[-1]
        bad = jnp.any((target < 0) | (target >= n))
        target = _checked_on_host(jnp.asarray(target), bad, functools.partial(_raise_out_of_range, n=n))
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
