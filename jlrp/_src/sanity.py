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

Array = jax.Array


def rank_correlation(a: Array, b: Array) -> Array:
    """Spearman rank correlation per example (leading axis) of two relevance maps, ``(N,)``; ties get
    their average rank. NaN-free: a constant map correlates 0 with anything."""
    a, b = (jnp.asarray(v).reshape(v.shape[0], -1) for v in (a, b))
    ra, rb = (jax.vmap(jax.scipy.stats.rankdata)(v) for v in (a, b))
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    norm = jnp.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    return jnp.where(norm > 0, (ra * rb).sum(1) / jnp.where(norm > 0, norm, 1), 0.0)


def _module(path) -> str:
    """The module a parameter belongs to: the first path entry that is not a collection name, with the
    list indices that follow it (``layers/0`` for an Equinox ``MLP``'s first layer)."""
    keys = [k for k in path if str(getattr(k, "key", "")) not in ("params", "batch_stats")]
    if not keys:
        return ""
    name = [str(getattr(keys[0], "key", getattr(keys[0], "name", getattr(keys[0], "idx", keys[0]))))]
    for k in keys[1:]:
        if not hasattr(k, "idx"):
            break
        name.append(str(k.idx))
    return "/".join(name)


def _is_float_array(leaf) -> bool:
    return hasattr(leaf, "dtype") and hasattr(leaf, "shape") and jnp.issubdtype(leaf.dtype, jnp.floating)


def _modules(params: Any) -> list[str]:
    """Modules with floating-point parameters, in the order their parameters are flattened (unique)."""
    seen: dict[str, None] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if _is_float_array(leaf):
            seen.setdefault(_module(path), None)
    return list(seen)


def randomize(params: Any, modules: Sequence[str], key: Array) -> Any:
    """``params`` with every floating-point leaf of the named modules redrawn from a normal with the leaf's
    own mean and standard deviation (so activations keep their scale); other leaves unchanged."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        if _module(path) in modules and _is_float_array(leaf) and leaf.size:
            leaf = jnp.asarray(leaf)
            noise = jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
            std = leaf.std() if leaf.size > 1 else jnp.abs(leaf).max()
            leaf = leaf.mean() + jnp.where(std > 0, std, 1.0) * noise
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def _jit_over_arrays(explain: Callable, params: Any) -> Callable:
    """``jax.jit(explain)`` tracing only the array leaves of ``params``; other leaves (an Equinox module's
    activation functions) are taken from ``params`` as they are (randomisation leaves them alone)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    is_array = [hasattr(leaf, "shape") and hasattr(leaf, "dtype") for leaf in leaves]

    @jax.jit
    def call(arrays, x):
        it = iter(arrays)
        full = [next(it) if a else leaf for leaf, a in zip(leaves, is_array)]
        return explain(jax.tree_util.tree_unflatten(treedef, full), x)

    return lambda p, x: call([leaf for leaf, a in zip(jax.tree_util.tree_leaves(p), is_array) if a], x)


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
      order: module names to randomise, first to last (default: the modules in reverse flattening order,
        which for Flax models is usually output first; pass it explicitly to be sure). A module is the
        first path entry of a parameter that is not ``params`` / ``batch_stats``, with the list indices
        right after it (``Dense_0``, ``layers/2``).
      cascade: randomise cumulatively (the output module, then also the next, ...) or one at a time.
      skip: a regex of modules to leave out of the default order.

    Returns:
      ``{"modules": [...], "spearman": (steps, N), "spearman_abs": (steps, N)}``: per randomisation step
      and example, the rank correlation of the signed and of the absolute relevance with the trained
      model's. High values after the whole model is randomised flag an explanation as an artifact; for a
      faithful method they fall towards 0 as randomisation proceeds.
    """
    names = list(order) if order is not None else [m for m in reversed(_modules(params))
                                                   if not (skip and re.search(skip, m))]
    unknown = sorted(set(names) - set(_modules(params)))
    if unknown:
        raise ValueError(f"unknown modules {unknown}; the parameters have {_modules(params)}")
    explain = _jit_over_arrays(explain, params)
    reference = explain(params, x)
    signed, absolute = [], []
    for step in range(len(names)):
        chosen = names[:step + 1] if cascade else [names[step]]
        r = explain(randomize(params, chosen, key), x)  # one draw per leaf: cascades keep earlier draws
        signed.append(rank_correlation(reference, r))
        absolute.append(rank_correlation(jnp.abs(reference), jnp.abs(r)))
    return {"modules": names, "spearman": jnp.stack(signed), "spearman_abs": jnp.stack(absolute)}
