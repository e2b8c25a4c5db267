"""Axis bookkeeping for linear layers: which output axes come from the weight, how transposes and size-1
reshapes move them, and where a per-output scale sits in the weight's layout (so it can be folded in)."""
from __future__ import annotations

import types
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .primitives import LINEAR, P


def weight_unit_axes(op: Callable, x, w) -> tuple[int, ...] | None:
    """Axes of the weight that index output units (conv: output features, when the explained input is the
    convolved one; dense: the weight's non-contracted axes), read from the linear primitive at the head of
    ``op(x, w)``; None when there is none (e.g. the weight is the convolved input)."""
    spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    jaxpr = jax.make_jaxpr(op)(spec(x), spec(w)).jaxpr
    w_var = jaxpr.invars[1]
    for eqn in jaxpr.eqns:
        if eqn.primitive in LINEAR:
            pos_w = next((k for k, v in enumerate(eqn.invars) if v is w_var), None)
            if pos_w is None:
                continue
            head = types.SimpleNamespace(prim=eqn.primitive, params=eqn.params)
            fold = fold_axes(head, 1 - pos_w, jnp.ndim(w), len(eqn.outvars[0].aval.shape))
            return tuple(sorted(set(fold.values()))) or None if fold is not None else None
    return None


def fold_axes(head, active_pos: int, w_ndim: int, out_ndim: int) -> dict[int, int] | None:
    """Output axes of a linear node that come from its weight, mapped to the weight's axes.

    A per-output scale (e.g. BatchNorm's) varying only along these axes can be folded into the weight.
    """
    if head.prim is P.conv_general_dilated_p:
        if active_pos != 0 or head.params["batch_group_count"] != 1:
            return None
        dn = head.params["dimension_numbers"]
        return {dn.out_spec[1]: dn.rhs_spec[0]}
    (lc, rc), (lb, rb) = head.params["dimension_numbers"]
    contract, batch = (rc, rb) if active_pos == 0 else (lc, lb)
    axes = {k: int(b) for k, b in enumerate(batch)}
    w_free = [a for a in range(w_ndim) if a not in contract and a not in batch]
    # dot_general's output axes are (batch..., lhs free..., rhs free...)
    start = out_ndim - len(w_free) if active_pos == 0 else len(batch)
    for k, a in enumerate(w_free):
        axes[start + k] = a
    return axes


def chain_axis_map(axis_map: list | None, name: str, params: dict, old: tuple, new: tuple) -> list | None:
    """Track which axis of the linear op's output each axis of the chain's current value comes from.

    Transposes permute axes; reshapes that only insert or drop size-1 axes keep the others in order;
    any other reshape loses track (None), after which only scalar scales can be folded.
    """
    if axis_map is None:
        return None
    if name == "transpose":
        return [axis_map[k] for k in params["permutation"]]
    kept_old = [k for k, n in enumerate(old) if n != 1]
    if [old[k] for k in kept_old] != [n for n in new if n != 1]:
        return None
    it = iter(axis_map[k] for k in kept_old)
    return [next(it) if n != 1 else None for n in new]


def lin_scale_axes(scale_shape: tuple, axis_map: list | None, fold: dict | None) -> list | None:
    """For a scale on the chain's current value: the weight axis of each of its non-1 axes, or None when
    it cannot be folded into the weight (it varies along an axis the weight does not have)."""
    if int(np.prod(scale_shape, dtype=np.int64)) == 1:
        return []
    if axis_map is None or fold is None:
        return None
    shape = (1,) * (len(axis_map) - len(scale_shape)) + tuple(scale_shape)
    out = []
    for k, n in enumerate(shape):
        if n != 1:
            if axis_map[k] is None or axis_map[k] not in fold:
                return None
            out.append(fold[axis_map[k]])
    return out


