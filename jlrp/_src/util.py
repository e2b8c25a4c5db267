"""Small helpers: array leaves of pytrees, and jit / eval_shape over them (non-array leaves static)."""
from __future__ import annotations

import sys
from typing import Any, Callable

import jax
import numpy as np
from jax.extend.core import jaxpr_as_fun


def varying_over(a: Any) -> frozenset:
    """The mesh axes ``a`` varies over inside ``jax.shard_map`` (empty outside)."""
    manual = getattr(jax.typeof(a), "manual_axis_type", None)
    return frozenset(manual.varying) if manual is not None else frozenset()


def varying_like(w: Any, x: Any) -> Any:
    """``w`` cast to vary over the mesh axes ``x`` varies over inside ``jax.shard_map`` (a value made from
    replicated ones, e.g. a rule's modified weight or a host callback's result; JAX requires the operands of
    an op, and the branches of a cond, to agree)."""
    missing = varying_over(x) - varying_over(w)
    return jax.lax.pcast(w, tuple(sorted(missing)), to="varying") if missing else w


def is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def partition(tree: Any) -> tuple[list, Callable[[list], Any], tuple]:
    """The array leaves of ``tree``, a function rebuilding ``tree`` from new array leaves, and a key
    describing everything else (structure and the non-array leaves, e.g. an Equinox module's functions)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    arrays = tuple(is_array(leaf) for leaf in leaves)
    statics = tuple(None if a else leaf for a, leaf in zip(arrays, leaves))

    def rebuild(values: list) -> Any:
        it = iter(values)
        return jax.tree_util.tree_unflatten(treedef, [next(it) if a else s for a, s in zip(arrays, statics)])

    return [leaf for leaf, a in zip(leaves, arrays) if a], rebuild, (treedef, arrays, statics)


def jit_arrays(fn: Callable) -> Callable:
    """``jax.jit(fn)`` tracing only the array leaves of its positional arguments; the other leaves are
    static (part of the cache key, or, when unhashable, closed over for that call)."""
    cache: dict = {}

    def call(*args):
        values, rebuild, key = partition(args)
        try:
            hash(key)
        except TypeError:
            key = None
        if key is None or key not in cache:
            jitted = jax.jit(lambda values: fn(*rebuild(values)))
            if key is None:
                return jitted(values)
            cache[key] = jitted
        return cache[key](values)

    return call


def eval_shape_arrays(fn: Callable, *args) -> Any:
    """``jax.eval_shape(fn, *args)`` for arguments with non-array leaves (kept as they are)."""
    values, rebuild, _ = partition(args)
    return jax.eval_shape(lambda values: fn(*rebuild(values)), values)


def as_function(fn: Any) -> Any:
    """A Flax NNX module becomes a pure function of its call arguments (its state: the one it has now).

    NNX refuses to mix Variables and values of different trace levels (``nnx.scan`` under ``jax.grad``:
    "different trace level"), so the module is traced to a jaxpr with its state and the arguments all as
    inputs of one trace, and that jaxpr is what gets called (and differentiated). Anything else is returned
    as it is."""
    nnx = sys.modules.get("flax.nnx")  # a user with an NNX module has imported it; jlrp does not need to
    if nnx is None or not isinstance(fn, nnx.Module):
        return fn
    graphdef, state = nnx.split(fn)

    def call(*args, **kwargs):
        def pure(state, args):
            return nnx.merge(graphdef, state)(*args, **kwargs)
        closed, shape = jax.make_jaxpr(pure, return_shape=True)(state, args)
        out = jaxpr_as_fun(closed)(*jax.tree_util.tree_leaves((state, args)))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), out)

    call.__name__ = type(fn).__name__
    # the state's arrays are constants of the traced model: their paths, as if the state were an argument
    # (so that param_path selectors match the same layers either way)
    call.param_paths = {id(leaf): jax.tree_util.keystr(path, simple=True, separator="/")
                        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
    return call
