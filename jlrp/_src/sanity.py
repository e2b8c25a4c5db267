"""Model-parameter randomisation: is an explanation about the model, or an artifact of the input and the
architecture? (Adebayo et al. 2018, "Sanity checks for saliency maps".)

Randomise the trained parameters module by module, from the output down, and compare each explanation of
the randomised model with the explanation of the trained one. An explanation that stays the same although
the function it explains has been destroyed reflects the input (edges, intensity) or the architecture, not
what the model learned: an artifact, in the sense of Landt-Hayen et al.'s "Fact or Artifact?".
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .graph import Lit, flatten
from .evaluation import random_normal, to_array
from .metrics_common import pearson, rankdata
from .util import is_array, partition

Array = jax.Array


def _centred_ranks(v: Array) -> tuple[Array, Array]:
    """Per example (leading axis): the average ranks of the flattened map minus their mean, and whether
    the map has a NaN."""
    v = v.reshape(v.shape[0], -1)
    r = rankdata(v)
    return r - r.mean(1, keepdims=True), jnp.isnan(v).any(1)


def _ranked_correlation(a: tuple[Array, Array], b: tuple[Array, Array]) -> Array:
    """Pearson correlation of centred ranks (Spearman); 0 for a constant map, NaN where a map had a NaN."""
    (ra, na), (rb, nb) = a, b
    return jnp.where(na | nb, jnp.nan, pearson(ra, rb))


@jax.jit
def rank_correlation(a: Array, b: Array) -> Array:
    """Spearman rank correlation per example (leading axis) of two relevance maps, ``(N,)``; ties get
    their average rank. A constant map correlates 0 with anything; a map with a NaN gives NaN (a broken
    explanation must not pass for one that changed)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    return _ranked_correlation(_centred_ranks(a), _centred_ranks(b))


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


def _standard_draws(leaves: Sequence[Any], key: Array) -> list[Array | None]:
    """A standard normal draw shaped like every floating-point leaf (None for the others): one flat draw
    per dtype over the leaves of that dtype, in flattening order, split into the leaves (one random
    number generator in a compiled program instead of one per leaf: XLA:CPU compiles each in about a
    second). A leaf's draw depends only on ``key`` and the parameters' structure."""
    groups: dict = {}
    for i, leaf in enumerate(leaves):
        if _is_float_array(leaf):
            groups.setdefault(jnp.dtype(leaf.dtype), []).append(i)
    out: list[Array | None] = [None] * len(leaves)
    for g, (dtype, idx) in enumerate(groups.items()):
        sizes = [int(np.prod(jnp.shape(leaves[i]))) for i in idx]
        flat = random_normal(jax.random.fold_in(key, g), (sum(sizes),), dtype)
        for i, start, size in zip(idx, np.cumsum([0] + sizes[:-1]), sizes):
            out[i] = flat[int(start):int(start) + size].reshape(jnp.shape(leaves[i]))
    return out


def _redrawn(leaf: Array, z: Array) -> Array:
    """``leaf``'s mean + std * ``z``; ``|.|`` if every entry of ``leaf`` is positive."""
    draw = leaf.mean() + leaf.std() * z
    return jnp.where(leaf.min() > 0, jnp.abs(draw), draw)


def randomize(params: Any, modules: str | Sequence[str], key: Array) -> Any:
    """``params`` with every floating-point leaf of the named modules (exact names, see
    :func:`parameter_randomization`) redrawn from a normal with the leaf's own mean and standard deviation,
    so the layer keeps its scale. A constant leaf (zero-initialised bias, std 0) stays as it is; a leaf
    with only positive entries (BatchNorm variances and scales) is redrawn as ``|draw|``, so it stays
    positive. The draws depend only on ``key`` and the parameters' structure: randomising more modules with
    the same key keeps the earlier draws (and :func:`parameter_randomization` with this key uses the same
    draws). Other leaves are unchanged."""
    names = {modules} if isinstance(modules, str) else set(modules)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    chosen = tuple(_module(path) in names and _is_float_array(leaf) for path, leaf in leaves)
    values = [leaf for _, leaf in leaves]
    arrays = [v if is_array(v) else None for v in values]  # the program sees the arrays only
    new = _randomize_program(chosen)(arrays, key)
    return jax.tree_util.tree_unflatten(treedef, [n if c else v for n, c, v in zip(new, chosen, values)])


@functools.lru_cache(maxsize=64)
def _randomize_program(chosen: tuple[bool, ...]) -> Callable:
    """One jitted program per selection of leaves: all draws at once (eager, every leaf operation would
    compile a small program of its own)."""
    @jax.jit
    def run(arrays, key):
        draws = _standard_draws(arrays, key)
        return [_redrawn(a, z) if c else None for a, z, c in zip(arrays, draws, chosen)]
    return run


def _default_order(explain: Callable, params: Any, x: Array, target: Any = None) -> list[str]:
    """Modules output first: those the explanation's forward pass combines with the input, in the reverse
    of the order it does so (the order in which the model calls its layers), then the modules it never
    combines with the input, in reverse flattening order. Found on the flattened jaxpr (through jit and
    custom_vjp calls) by following which values derive from which parameters; work on parameters alone
    (folding BatchNorm, casting) does not count, as it may be hoisted."""
    values, rebuild, _ = partition(params)
    paths = [path for path, leaf in jax.tree_util.tree_leaves_with_path(params) if is_array(leaf)]  # same order
    call = (lambda p, x: explain(p, x)) if target is None else (lambda p, x: explain(p, x, target))
    graph = flatten(jax.make_jaxpr(lambda values, x: call(rebuild(values), x))(values, x))
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


_PROGRAMS: dict = {}


def _program(explain: Callable, rebuild: Callable, static_key: Any, smooth: int, with_target: bool) -> Callable:
    """One jitted program for the whole check, cached per explanation function and parameter structure:
    the parameters, the input, the key, the per-step selection of randomised leaves and the draws are traced
    arguments, so neither another step nor another call (same shapes) compiles again."""
    cache_key = (explain, static_key, smooth, with_target)
    try:
        if cache_key in _PROGRAMS:
            return _PROGRAMS[cache_key]
    except TypeError:  # unhashable static leaves: a program for this call only
        cache_key = None

    def explain_values(values, x, noise, target):
        call = (lambda x: explain(rebuild(values), x)) if not with_target else \
            (lambda x: explain(rebuild(values), x, target))
        if noise is None:
            return call(x)
        # SmoothGrad-style denoising (sMPRT): the mean explanation over the noisy copies x + noise[s]
        return jax.lax.map(lambda e: call(x + e), noise).mean(0)

    @jax.jit
    def mprt_program(values, x, key, steps, draws, target, smooth_noise):
        if draws is None:  # as randomize(params, .., key) draws them
            draws = [v if z is None else _redrawn(v, z) for v, z in zip(values, _standard_draws(values, key))]
        else:
            draws = [d.astype(v.dtype) for d, v in zip(draws, values)]
        noise = None
        if smooth:  # smooth_samples - 1 noisy copies and x itself; the same noise serves every step
            axes = tuple(range(1, x.ndim))
            std = smooth_noise.astype(x.dtype) * (x.max(axes, keepdims=True) - x.min(axes, keepdims=True))
            draw = random_normal(jax.random.fold_in(key, -1 % 2 ** 31), (smooth - 1,) + x.shape, x.dtype)
            noise = jnp.concatenate([draw * std[None], jnp.zeros((1,) + x.shape, x.dtype)])

        # one scan over [trained model, step 1, .., step L]: a single instance of the explanation and of the
        # ranking in the program (half the compile time of a separate reference pass); the carry holds the
        # trained model's ranks (signed, absolute), set at step 0
        def step(reference, xs):  # chosen: (L,) bool, which array leaves are randomised at this step
            i, chosen = xs
            mixed = [jnp.where(c, d, v) for c, d, v in zip(chosen, draws, values)]
            r = explain_values(mixed, x, noise, target)
            ranks, broken = _centred_ranks(jnp.stack([r, jnp.abs(r)]).reshape(2 * r.shape[0], -1))
            ranked = (ranks.reshape(2, r.shape[0], -1), broken.reshape(2, -1))
            reference = jax.tree.map(lambda new, old: jnp.where(i == 0, new, old), ranked, reference)
            return reference, _ranked_correlation(reference, ranked)  # (2, N)

        ref_shape = jax.eval_shape(lambda: explain_values(values, x, noise, target))
        n, p = ref_shape.shape[0], math.prod(ref_shape.shape[1:])
        init = (jnp.zeros((2, n, p), jnp.promote_types(ref_shape.dtype, jnp.float32)), jnp.zeros((2, n), bool))
        unchanged = jnp.zeros((1, steps.shape[1]), bool)
        _, corr = jax.lax.scan(step, init, (jnp.arange(steps.shape[0] + 1), jnp.concatenate([unchanged, steps])))
        return corr[1:, 0], corr[1:, 1]

    if cache_key is not None:
        _PROGRAMS[cache_key] = mprt_program
    return mprt_program


def parameter_randomization(explain: Callable[[Any, Array], Array], params: Any, x: Array, key: Array | None, *,
                            order: Sequence[str] | None = None, cascade: bool = True,
                            skip: str | None = None, draws: Any = None, smooth_samples: int = 0,
                            smooth_noise: float = 0.1, target: Any = None) -> dict[str, Any]:
    """Explanations of progressively randomised models compared with the trained model's (the model
    parameter randomisation test, MPRT, of Adebayo et al. 2018, "Sanity checks for saliency maps").

    The whole check is one jitted program (a ``lax.scan`` over the randomisation steps, parameters and
    draws as traced arguments), cached per ``explain`` function object: it compiles once, and calling it
    again with the same ``explain`` and parameter shapes does not compile at all.

    Args:
      explain: ``explain(params, x) -> relevance`` shaped like ``x`` (e.g.
        ``lambda p, x: jlrp.lrp(model.apply, composite, argnums=1)(p, x, target=y)``). Non-array leaves of
        ``params`` (such as functions) stay as they are. Pass the same function object to reuse the program.
      params: the trained parameters (any pytree: linen variables, an NNX state, a dict).
      x: a batch of inputs.
      key: PRNG key for the random parameters (unused with ``draws``).
      order: module names to randomise, first to last (default: the modules the explanation's forward
        pass combines with the input, output layer first, i.e. the reverse of the model's call order;
        then any others). A module is a parameter's path without the leaf's name and without collection
        names (``Dense_0``, ``block/Dense_1``, ``layers/2``; ``''`` for a flat dict's leaves).
      cascade: randomise cumulatively (the output module, then also the next, ...) or one at a time.
      skip: a regex of modules to leave out of the default order.
      draws: optional parameters shaped like ``params`` whose leaves replace the randomised ones (default:
        each leaf redrawn as in :func:`randomize` from ``key``), e.g. another framework's random init.
      target: optional; then ``explain(params, x, target)`` is called with it as a traced argument (so one
        program serves every batch of a data set).
      smooth_samples, smooth_noise: with ``smooth_samples > 0`` every explanation (trained and randomised)
        is the mean over ``smooth_samples`` copies of ``x``: ``smooth_samples - 1`` with gaussian noise of
        std ``smooth_noise * (max x - min x)`` per sample, and ``x`` itself (smooth MPRT, Hedström et al.
        2023; :func:`jlrp.evaluation.smooth_mprt`). The same noise serves every step.

    Returns:
      ``{"modules": [...], "spearman": (steps, N), "spearman_abs": (steps, N)}``: per randomisation step
      and example, the rank correlation of the signed and of the absolute relevance with the trained
      model's. High values after the whole model is randomised flag an explanation as an artifact; for a
      faithful method they fall towards 0 as randomisation proceeds.
    """
    names = list(order) if order is not None else [m for m in _default_order(explain, params, x, target)
                                                   if not (skip and re.search(skip, m))]
    unknown = sorted(set(names) - set(_modules(params)))
    if unknown:
        raise ValueError(f"unknown modules {unknown}; the parameters have {_modules(params)}")
    if not names:
        raise ValueError("parameter_randomization: no module to randomise (the parameters have no "
                         "floating-point arrays, or `skip` / `order` left none)")
    if draws is None and key is None:
        raise ValueError("parameter_randomization: pass key= (or draws=)")
    values, rebuild, static_key = partition(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    leaf_modules = [_module(path) if _is_float_array(leaf) else None for path, leaf in flat if is_array(leaf)]
    steps = []
    for step in range(len(names)):
        chosen = set(names[:step + 1] if cascade else [names[step]])
        steps.append([m is not None and m in chosen for m in leaf_modules])
    draw_values = None
    if draws is not None:
        draw_values, _, draw_key = partition(draws)
        if len(draw_values) != len(values) or any(jnp.shape(a) != jnp.shape(b) for a, b in zip(draw_values, values)):
            raise ValueError("draws must have the structure and leaf shapes of params")
    if smooth_samples and key is None:
        raise ValueError("smooth_samples > 0 draws input noise: pass key=")
    # arrays go to the program as they are (numpy included): converting them first would compile a small
    # program per shape (jnp.asarray), and the check is meant to compile once
    run = _program(explain, rebuild, static_key, int(smooth_samples), target is not None)
    signed, absolute = run(list(values), to_array(x), key, np.asarray(steps, bool), draw_values,
                           None if target is None else to_array(target), np.asarray(float(smooth_noise)))
    return {"modules": names, "spearman": signed, "spearman_abs": absolute}
