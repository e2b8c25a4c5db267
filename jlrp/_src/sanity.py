"""Model-parameter randomisation: is an explanation about the model, or an artifact of the input and the
architecture? (Adebayo et al. 2018, "Sanity checks for saliency maps".)

Randomise the trained parameters module by module, from the output down, and compare each explanation of
the randomised model with the explanation of the trained one. An explanation that stays the same although
the function it explains has been destroyed reflects the input (edges, intensity) or the architecture, not
what the model learned: an artifact, in the sense of Landt-Hayen et al.'s "Fact or Artifact?".
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import jax.scipy.stats

from .graph import Lit, flatten
from .util import is_array, jit_arrays, partition

Array = jax.Array


def rank_correlation(a: Array, b: Array) -> Array:
    """Spearman rank correlation per example (leading axis) of two relevance maps, ``(N,)``; ties get
    their average rank. A constant map correlates 0 with anything; a map with a NaN gives NaN (a broken
    explanation must not pass for one that changed)."""
    a, b = (jnp.asarray(v).reshape(v.shape[0], -1) for v in (a, b))
    ra, rb = (jax.vmap(jax.scipy.stats.rankdata)(v) for v in (a, b))
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    norm = jnp.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    corr = jnp.where(norm > 0, (ra * rb).sum(1) / jnp.where(norm > 0, norm, 1), 0.0)
    broken = jnp.isnan(a).any(1) | jnp.isnan(b).any(1)
    return jnp.where(broken, jnp.nan, corr)


_COLLECTIONS = ("params", "batch_stats")


def _module(path) -> str:
    """The module a parameter belongs to: its path without the leaf's own name and without collection
    names (``Dense_0`` for ``params/Dense_0/kernel`` and ``batch_stats/..``; ``hidden`` for an NNX state's
    ``hidden/kernel/value``; ``layers/0`` for an Equinox MLP's first layer; ``block/Dense_1`` when nested;
    ``''`` for the top-level leaves of a flat dict)."""
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if len(keys) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and keys[-1] == "value":
        keys.pop()  # an NNX Variable's value: the parameter's name is the entry before
    return "/".join(k for k in keys[:-1] if k not in _COLLECTIONS)


def _is_float_array(leaf) -> bool:
    return is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.size > 0


def _modules(params: Any) -> list[str]:
    """Modules with floating-point parameters, in the order their parameters are flattened (unique)."""
    seen: dict[str, None] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if _is_float_array(leaf):
            seen.setdefault(_module(path), None)
    return list(seen)


def randomize(params: Any, modules: str | Sequence[str], key: Array) -> Any:
    """``params`` with every floating-point leaf of the named modules (exact names, see
    :func:`parameter_randomization`) redrawn from a normal with the leaf's own mean and standard deviation,
    so the layer keeps its scale. A constant leaf (zero-initialised bias, std 0) stays as it is; a leaf
    with only positive entries (BatchNorm variances and scales) is redrawn as ``|draw|``, so it stays
    positive. The draw of a leaf depends only on ``key`` and the leaf's position: randomising more modules
    with the same key keeps the earlier draws. Other leaves are unchanged."""
    names = {modules} if isinstance(modules, str) else set(modules)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        if _module(path) in names and _is_float_array(leaf):
            leaf = jnp.asarray(leaf)
            draw = leaf.mean() + leaf.std() * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
            leaf = jnp.where(leaf.min() > 0, jnp.abs(draw), draw)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def _default_order(explain: Callable, params: Any, x: Array) -> list[str]:
    """Modules output first: those the explanation's forward pass combines with the input, in the reverse
    of the order it does so (the order in which the model calls its layers), then the modules it never
    combines with the input, in reverse flattening order. Found on the flattened jaxpr (through jit and
    custom_vjp calls) by following which values derive from which parameters; work on parameters alone
    (folding BatchNorm, casting) does not count, as it may be hoisted."""
    values, rebuild, _ = partition(params)
    paths = [path for path, leaf in jax.tree_util.tree_leaves_with_path(params) if is_array(leaf)]  # same order
    graph = flatten(jax.make_jaxpr(lambda values, x: explain(rebuild(values), x))(values, x))
    from_params = {v: frozenset([_module(path)]) for path, leaf, v in zip(paths, values, graph.inputs)
                   if _is_float_array(leaf)}
    from_input = set(graph.inputs[len(values):])
    first: dict[str, int] = {}
    for n, node in enumerate(graph.nodes):
        ids = [v for v in node.inputs if not isinstance(v, Lit)]
        names = frozenset().union(*(from_params.get(v, frozenset()) for v in ids))
        if any(v in from_input for v in ids):
            from_input.update(node.outputs)
            for name in sorted(names):
                first.setdefault(name, n)
        elif names:
            from_params.update((v, names) for v in node.outputs)
    used = sorted(first, key=first.get, reverse=True)
    return used + [m for m in reversed(_modules(params)) if m not in first]


def parameter_randomization(explain: Callable[[Any, Array], Array], params: Any, x: Array, key: Array, *,
                            order: Sequence[str] | None = None, cascade: bool = True,
                            skip: str | None = None) -> dict[str, Any]:
    """Explanations of progressively randomised models compared with the trained model's.

    Args:
      explain: ``explain(params, x) -> relevance`` shaped like ``x`` (e.g.
        ``lambda p, x: jlrp.lrp(model.apply, composite, argnums=1)(p, x, target=y)``); jitted here once
        over the array leaves of ``params`` (non-array leaves such as functions stay as they are).
      params: the trained parameters (any pytree: linen variables, an NNX state, a dict).
      x: a batch of inputs.
      key: PRNG key for the random parameters.
      order: module names to randomise, first to last (default: the modules the explanation's forward
        pass combines with the input, output layer first, i.e. the reverse of the model's call order;
        then any others). A module is a parameter's path without the leaf's name and without collection
        names (``Dense_0``, ``block/Dense_1``, ``layers/2``; ``''`` for a flat dict's leaves).
      cascade: randomise cumulatively (the output module, then also the next, ...) or one at a time.
      skip: a regex of modules to leave out of the default order.

    Returns:
      ``{"modules": [...], "spearman": (steps, N), "spearman_abs": (steps, N)}``: per randomisation step
      and example, the rank correlation of the signed and of the absolute relevance with the trained
      model's. High values after the whole model is randomised flag an explanation as an artifact; for a
      faithful method they fall towards 0 as randomisation proceeds.
    """
    names = list(order) if order is not None else [m for m in _default_order(explain, params, x)
                                                   if not (skip and re.search(skip, m))]
    unknown = sorted(set(names) - set(_modules(params)))
    if unknown:
        raise ValueError(f"unknown modules {unknown}; the parameters have {_modules(params)}")
    if not names:
        raise ValueError("parameter_randomization: no module to randomise (the parameters have no "
                         "floating-point arrays, or `skip` / `order` left none)")
    explain = jit_arrays(explain)
    reference = explain(params, x)
    signed, absolute = [], []
    for step in range(len(names)):
        chosen = names[:step + 1] if cascade else [names[step]]
        r = explain(randomize(params, chosen, key), x)  # one draw per leaf: cascades keep earlier draws
        signed.append(rank_correlation(reference, r))
        absolute.append(rank_correlation(jnp.abs(reference), jnp.abs(r)))
    return {"modules": names, "spearman": jnp.stack(signed), "spearman_abs": jnp.stack(absolute)}
