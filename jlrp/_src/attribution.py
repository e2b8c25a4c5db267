"""The gradient family of attribution methods: gradient, input x gradient, SmoothGrad, Integrated
Gradients and occlusion.

Every method follows the calling convention of jlrp's LRP entry point::

    explain = method(fn, argnums=0, **options)
    R = explain(*args, target=None, relevance=None)   # R is shaped like args[argnums]

``fn(*args)`` returns the model output: logits ``(N, C)`` or ``(C,)``, or a scalar / ``(N, 1)`` for
regression (keep the trailing axis: a 1-D output is always read as ``(C,)`` classes, with a warning when
its length equals the explained input's leading axis). Every method
explains the scalar

    F(x) = sum(g(fn(x)) * w),   w = target_mask(out, target)  or  w = relevance,

with ``g`` the identity, softmax or log-softmax over the last axis (``output=``). ``target`` is an int,
an int array (one class per row) or None (the argmax of the clean output, per row), and the weights ``w``
are fixed on the clean input: noisy, interpolated or occluded copies are scored on the same class.
As long as the model treats rows independently, one pass over F explains the whole batch.

The output is "batched" when it has a row axis (``out.ndim >= 2``) whose length matches the input's
leading axis; per-sample quantities (SmoothGrad's noise scale, the IG completeness gap, occlusion
deltas) are then taken per row, otherwise over the whole input (an unbatched or vmapped call).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jlrp._src.targets import initial_relevance, target_mask, warn_if_ambiguous
from jlrp._src.util import as_function

__all__ = ["gradient", "input_x_gradient", "smoothgrad", "integrated_gradients", "occlusion"]

Output = Literal["logit", "probability", "log_probability"]
Explainer = Callable[..., Any]
_OUTPUTS = ("logit", "probability", "log_probability")
_IG_METHODS = ("riemann_trapezoid", "riemann_midpoint", "riemann_left")


# ----------------------------------------------------------------------------------------------------
# shared plumbing
# ----------------------------------------------------------------------------------------------------

def _check_options(argnums: Any, output: str) -> None:
    if not isinstance(argnums, int) or isinstance(argnums, bool):
        raise TypeError(f"argnums must be an int (pass a pytree as that argument to explain several "
                        f"inputs at once), got {argnums!r}")
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")


def _check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def _arg(args: tuple, argnums: int) -> Any:
    if not -len(args) <= argnums < len(args):
        raise ValueError(f"argnums={argnums} but explain got only {len(args)} positional arguments")
    return args[argnums]


def _check_float(x: Any, name: str) -> None:
    for leaf in jax.tree_util.tree_leaves(x):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name}: the explained input must be floating point, got dtype {dtype}. "
                             f"Gradients of integer inputs (e.g. token ids) do not exist: explain the "
                             f"embedding output instead, or cast the input to float.")


def _array_args(args: tuple, argnums: int, name: str) -> tuple:
    """Check that args[argnums] is a single float array and return args with it as a jax array."""
    x = _arg(args, argnums)
    if not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x)):
        raise TypeError(f"{name} supports a single array as args[argnums], got {type(x).__name__}; "
                        f"use gradient / input_x_gradient for pytree inputs")
    _check_float(x, name)
    i = argnums % len(args)
    return args[:i] + (jnp.asarray(x),) + args[i + 1:]


def _transform(out: Any, output: str) -> jax.Array:
    """The model output as the method sees it: logits, softmax or log-softmax over the last axis."""
    if not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(out)):
        raise TypeError(f"fn must return a single array (the model output), got {type(out).__name__}")
    out = jnp.asarray(out)
    if output == "logit":
        return out
    if out.ndim == 0 or out.shape[-1] < 2:
        # a softmax over one entry is constantly 1: its gradient would be silently zero
        raise ValueError(f"output={output!r} needs a class axis with at least 2 entries, but the model "
                         f"output has shape {out.shape}; use output='logit' for regression")
    return jax.nn.softmax(out, axis=-1) if output == "probability" else jax.nn.log_softmax(out, axis=-1)


def _weights(out: jax.Array, x: Any, target: Any, relevance: Any) -> jax.Array:
    """The cotangent w of F = sum(out * w): the one-hot target mask, or the user's relevance=."""
    warn_if_ambiguous(out.shape, x, target, relevance, seeds_with_output=False)
    if relevance is not None:
        w = initial_relevance(out, target, relevance)  # validates the shape and target-xor-relevance
    else:
        w = target_mask(out, target)
    return jax.lax.stop_gradient(w)


def _bind(fn: Callable, args: tuple, argnums: int, output: str) -> tuple[Any, Callable[[Any], jax.Array]]:
    """Split args into the explained input x and ``f(x) -> transformed output`` (other args bound)."""
    argnums %= len(args)
    fn = as_function(fn)

    def f(x: Any) -> jax.Array:
        return _transform(fn(*args[:argnums], x, *args[argnums + 1:]), output)

    return args[argnums], f


def _setup(fn: Callable, args: tuple, argnums: int, output: str, target: Any, relevance: Any):
    """Run the clean forward pass; return ``(x, f, out, w)`` with the output weights fixed on it."""
    x, f = _bind(fn, args, argnums, output)
    out = f(x)
    return x, f, out, _weights(out, x, target, relevance)


def _grad_at(f: Callable, x: Any, w: jax.Array) -> Any:
    """d sum(f(x) * w) / dx: one forward and one backward pass."""
    return jax.vjp(f, x)[1](w)[0]


def _is_batched(x: jax.Array, out: jax.Array) -> bool:
    return out.ndim >= 2 and x.ndim >= 1 and x.shape[0] == out.shape[0]


def _row_sum(a: jax.Array, batched: bool) -> jax.Array:
    """Sum over everything but the batch axis (or over everything when unbatched)."""
    return a.sum(axis=tuple(range(1, a.ndim))) if batched else a.sum()


def _weighted_sum(one: Callable[[jax.Array], jax.Array], weights: np.ndarray,
                  chunk_size: int | None) -> jax.Array:
    """sum_j weights[j] * one(j) for j in range(len(weights)), vectorised.

    chunk_size=None vmaps all terms at once. Otherwise a scan over chunks of vmapped terms keeps a
    running sum: lax.map(batch_size=...) would stack all terms before summing, i.e. hold len(weights)
    copies of the input's gradient instead of chunk_size.
    """
    n = len(weights)
    if chunk_size is None or chunk_size >= n:
        w = jnp.asarray(weights)
        vals = jax.vmap(one)(jnp.arange(n))
        return jnp.tensordot(w.astype(vals.dtype), vals, axes=1)
    n_chunks = math.ceil(n / chunk_size)
    # pad with zero-weight copies of the last term so every chunk has the same shape
    padded = np.zeros(n_chunks * chunk_size, dtype=np.float64)
    padded[:n] = weights
    idx = jnp.minimum(jnp.arange(n_chunks * chunk_size), n - 1).reshape(n_chunks, chunk_size)
    w = jnp.asarray(padded.reshape(n_chunks, chunk_size))

    def body(acc, chunk):
        j, wj = chunk
        vals = jax.vmap(one)(j)
        return acc + jnp.tensordot(wj.astype(vals.dtype), vals, axes=1), None

    init = jax.eval_shape(one, idx[0, 0])
    acc, _ = jax.lax.scan(body, jnp.zeros(init.shape, init.dtype), (idx, w))
    return acc


# ----------------------------------------------------------------------------------------------------
# gradient, input x gradient
# ----------------------------------------------------------------------------------------------------

def gradient(fn: Callable[..., jax.Array], argnums: int = 0, output: Output = "logit") -> Explainer:
    """Gradient (saliency) of the explained output with respect to ``args[argnums]``.

    ``R = dF/dx`` with ``F = sum(g(fn(*args)) * w)`` (see the module docstring): for a classifier the
    gradient of the target's logit (``output="logit"``), softmax probability (``"probability"``) or
    log-probability (``"log_probability"``); for regression the gradient of the output itself. For a
    linear model ``x @ W + b`` this is ``W[:, target]`` (Hechtlinger 2016).

    Args:
      fn: the model, ``fn(*args) -> out`` with ``out`` of shape ``(N, C)``, ``(C,)``, ``(N, 1)`` or ``()``.
      argnums: which positional argument to explain; it may be any pytree of float arrays.
      output: which transform of the output to differentiate.

    Returns:
      ``explain(*args, target=None, relevance=None)`` returning a pytree shaped like ``args[argnums]``.
      ``target``: int / int array broadcastable to ``out.shape[:-1]`` / None (argmax per row).
      ``relevance``: an array of ``out``'s shape used as the output weighting instead of the one-hot.
    """
    _check_options(argnums, output)

    def explain(*args: Any, target: Any = None, relevance: Any = None) -> Any:
        _check_float(_arg(args, argnums), "gradient")
        x, f = _bind(fn, args, argnums, output)
        out, vjp = jax.vjp(f, x)  # the clean forward pass is the one differentiated
        return vjp(_weights(out, x, target, relevance))[0]

    return explain


def input_x_gradient(fn: Callable[..., jax.Array], argnums: int = 0,
                     output: Output = "logit") -> Explainer:
    """Input times gradient: ``R = x * dF/dx`` (elementwise, leaf by leaf for a pytree input).

    Same arguments and returned ``explain(*args, target=None, relevance=None)`` as :func:`gradient`.
    For a linear model without bias ``sum(R) = F(x)`` per row.
    """
    grad = gradient(fn, argnums, output)

    def explain(*args: Any, target: Any = None, relevance: Any = None) -> Any:
        g = grad(*args, target=target, relevance=relevance)
        return jax.tree_util.tree_map(lambda x, gx: jnp.asarray(x) * gx, _arg(args, argnums), g)

    return explain


# ----------------------------------------------------------------------------------------------------
# SmoothGrad
# ----------------------------------------------------------------------------------------------------

def smoothgrad(fn: Callable[..., jax.Array], argnums: int = 0, n: int = 32, noise: float = 0.15,
               key: jax.Array | None = None, square: bool = False, chunk_size: int | None = None,
               output: Output = "logit") -> Explainer:
    """SmoothGrad (Smilkov et al. 2017): the gradient averaged over ``n`` noisy copies of the input.

    ``R = 1/n sum_j dF/dx (x + sigma * eps_j)``, ``eps_j ~ N(0, I)``, with
    ``sigma = noise * (max(x) - min(x))`` per sample (over all non-batch axes; over the whole input when
    the call is unbatched). ``square=True`` averages ``(dF/dx)^2`` instead (SmoothGrad-Squared).
    The target is chosen on the clean input.

    Noise is drawn per row: row ``i`` of a batch uses ``jax.random.split(key, N)[i]``, so a batched call
    equals vmapping an unbatched call over the split keys.

    Args:
      fn, argnums, output: as for :func:`gradient`; ``args[argnums]`` must be a single float array.
      n: number of noisy copies.
      noise: noise standard deviation as a fraction of the per-sample input range (0.1 - 0.2 usual).
      key: a default PRNG key; the ``key=`` of the returned function overrides it. One is required.
      square: average squared gradients.
      chunk_size: evaluate the ``n`` gradients ``chunk_size`` at a time (None: all at once).

    Returns:
      ``explain(*args, key=None, target=None, relevance=None)`` -> array shaped like ``args[argnums]``.
    """
    _check_options(argnums, output)
    _check_chunk_size(chunk_size)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    default_key = key

    def explain(*args: Any, key: jax.Array | None = None, target: Any = None,
                relevance: Any = None) -> jax.Array:
        key = default_key if key is None else key
        if key is None:
            raise ValueError("smoothgrad draws random noise: pass key=jax.random.key(...) to the explain "
                             "function (or to smoothgrad(...) as a default)")
        args = _array_args(args, argnums, "smoothgrad")
        x, f, out, w = _setup(fn, args, argnums, output, target, relevance)
        batched = _is_batched(x, out)
        axes = tuple(range(1, x.ndim)) if batched else None
        sigma = noise * (x.max(axis=axes, keepdims=True) - x.min(axis=axes, keepdims=True))
        row_keys = jax.random.split(key, x.shape[0]) if batched else None

        def draw(k: jax.Array, j: jax.Array, shape: tuple[int, ...]) -> jax.Array:
            return jax.random.normal(jax.random.fold_in(k, j), shape, x.dtype)

        def one(j: jax.Array) -> jax.Array:
            if batched:  # each row its own key: a batch equals single rows vmapped over split keys
                eps = jax.vmap(lambda k: draw(k, j, x.shape[1:]))(row_keys)
            else:
                eps = draw(key, j, x.shape)
            g = _grad_at(f, x + sigma * eps, w)
            return g * g if square else g

        return _weighted_sum(one, np.full(n, 1.0 / n), chunk_size)

    return explain


# ----------------------------------------------------------------------------------------------------
# Integrated Gradients
# ----------------------------------------------------------------------------------------------------

def _ig_nodes(steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes alpha_k in [0, 1] and weights for int_0^1 g(alpha) d alpha, ``steps`` of each."""
    k = np.arange(steps, dtype=np.float64)
    if method == "riemann_left":
        return k / steps, np.full(steps, 1.0 / steps)
    if method == "riemann_midpoint":
        return (k + 0.5) / steps, np.full(steps, 1.0 / steps)
    weights = np.full(steps, 1.0 / (steps - 1))  # trapezoid on linspace(0, 1, steps)
    weights[[0, -1]] /= 2
    return k / (steps - 1), weights


def integrated_gradients(fn: Callable[..., jax.Array], argnums: int = 0, steps: int = 64,
                         baseline: float | jax.Array = 0.0,
                         method: Literal["riemann_trapezoid", "riemann_midpoint",
                                         "riemann_left"] = "riemann_trapezoid",
                         chunk_size: int | None = None, return_gap: bool = False,
                         output: Output = "logit") -> Explainer:
    """Integrated Gradients (Sundararajan et al. 2017) along the straight path from ``baseline`` to ``x``.

    ``R = (x - x0) * int_0^1 dF/dx (x0 + a (x - x0)) da``, the integral by a ``steps``-point Riemann sum
    (``riemann_trapezoid`` on ``linspace(0, 1, steps)``; ``riemann_midpoint``; ``riemann_left``). The
    target is chosen on the clean input. Completeness: ``sum(R) = F(x) - F(x0)`` per row, up to the
    quadrature error.

    Args:
      fn, argnums, output: as for :func:`gradient`; ``args[argnums]`` must be a single float array.
      steps: number of gradient evaluations (>= 2 for the trapezoid rule).
      baseline: ``x0``, a float or an array broadcastable to ``x``.
      method: the quadrature rule.
      chunk_size: evaluate the ``steps`` gradients ``chunk_size`` at a time (None: all at once).
      return_gap: also return the completeness gap ``sum(R) - (F(x) - F(x0))``, of shape ``(N,)`` for a
        batched output (sum over each row's non-batch axes), else a scalar.

    Returns:
      ``explain(*args, target=None, relevance=None)`` -> ``R`` shaped like ``args[argnums]``, or
      ``(R, gap)`` with ``return_gap=True``.
    """
    _check_options(argnums, output)
    _check_chunk_size(chunk_size)
    if method not in _IG_METHODS:
        raise ValueError(f"method must be one of {_IG_METHODS}, got {method!r}")
    if steps < (2 if method == "riemann_trapezoid" else 1):
        raise ValueError(f"steps={steps} is too few for {method}")
    alphas, weights = _ig_nodes(steps, method)

    def explain(*args: Any, target: Any = None, relevance: Any = None) -> Any:
        args = _array_args(args, argnums, "integrated_gradients")
        x, f, out, w = _setup(fn, args, argnums, output, target, relevance)
        x0 = jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)
        dx = x - x0
        a = jnp.asarray(alphas, x.dtype)
        R = dx * _weighted_sum(lambda j: _grad_at(f, x0 + a[j] * dx, w), weights, chunk_size)
        if not return_gap:
            return R
        batched = _is_batched(x, out)
        gap = _row_sum(R, batched) - _row_sum((out - f(x0)) * w, batched)
        return R, gap

    return explain


# ----------------------------------------------------------------------------------------------------
# occlusion
# ----------------------------------------------------------------------------------------------------

def _window_starts(size: int, window: int, stride: int) -> list[int]:
    if not 1 <= window <= size:
        raise ValueError(f"occlusion window {window} does not fit an axis of length {size}")
    if stride < 1:
        raise ValueError(f"occlusion stride must be >= 1, got {stride}")
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)  # one extra window flush with the end, so every element is covered
    return starts


def occlusion(fn: Callable[..., jax.Array], argnums: int = 0, window: int | tuple[int, ...] = (8, 8),
              stride: int | tuple[int, ...] | None = None, baseline: float | jax.Array = 0.0,
              chunk_size: int | None = None, output: Output = "logit") -> Explainer:
    """Occlusion (Zeiler & Fergus 2014): how much the output drops when a window is set to ``baseline``.

    For every window position ``p`` (mask ``m_p``), ``x_p = where(m_p, x0, x)`` and
    ``delta_p = F(x) - F(x_p)`` per row; the attribution of an element is the mean of ``delta_p`` over
    the windows covering it: ``R = sum_p delta_p m_p / sum_p m_p``.

    Windows slide over the leading feature axes (after the batch axis, if batched): a tuple window of
    length k covers the first k of them, and the remaining axes (e.g. channels of NHWC) are occluded
    whole. An int window is used on every feature axis but the last (channels): ``(w, w)`` for NHWC,
    ``(w,)`` for ``(N, D)`` vectors. Positions step by ``stride`` (default: the window), plus one
    window flush with the far edge when the stride does not reach it, so every element is covered.
    All occluded inputs are evaluated at once with vmap (or ``chunk_size`` at a time with lax.map);
    rows of a batch are occluded together, which is exact when the model treats rows independently.

    Args:
      fn, argnums, output: as for :func:`gradient`; ``args[argnums]`` must be a single float array.
      window: window size, an int or a tuple over the leading feature axes.
      stride: step between window positions, an int or a tuple like ``window``; None = ``window``.
      baseline: the occluding value, a float or an array broadcastable to ``x``.
      chunk_size: number of occluded inputs evaluated per batch (None: all window positions at once).

    Returns:
      ``explain(*args, target=None, relevance=None)`` -> array shaped like ``args[argnums]``.
    """
    _check_options(argnums, output)
    _check_chunk_size(chunk_size)

    def explain(*args: Any, target: Any = None, relevance: Any = None) -> jax.Array:
        args = _array_args(args, argnums, "occlusion")
        x, f, out, w = _setup(fn, args, argnums, output, target, relevance)
        batched = _is_batched(x, out)
        lead = 1 if batched else 0
        feat = x.shape[lead:]
        win = (window,) * max(1, len(feat) - 1) if isinstance(window, int) else tuple(window)
        k = len(win)
        if not 1 <= k <= len(feat):
            raise ValueError(f"occlusion window {window} has {k} axes, but the input of shape {x.shape} "
                             f"has {len(feat)} feature axes")
        strd = win if stride is None else (stride,) * k if isinstance(stride, int) else tuple(stride)
        if len(strd) != k:
            raise ValueError(f"stride {stride} must have as many axes as the window {win}")
        # static per-axis indicator matrices: A[a][i, l] = 1 if window start i on axis a covers l
        starts = [_window_starts(L, wa, sa) for L, wa, sa in zip(feat, win, strd)]
        A = [((st[:, None] <= np.arange(L)) & (np.arange(L) < st[:, None] + wa)).astype(np.float32)
             for st, wa, L in zip(map(np.array, starts), win, feat)]
        # all window positions as a (P, k) grid of per-axis start indices
        grid = np.stack(np.meshgrid(*[np.arange(len(st)) for st in starts], indexing="ij"), -1).reshape(-1, k)
        x0 = jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)
        A_j = [jnp.asarray(a, x.dtype) for a in A]
        F_x = _row_sum(out * w, batched)
        mask_shape = (1,) * lead + feat[:k] + (1,) * (len(feat) - k)

        def delta(pos: jax.Array) -> jax.Array:
            m = A_j[0][pos[0]]
            for a in range(1, k):  # outer product of the per-axis window indicators
                m = m[..., None] * A_j[a][pos[a]]
            x_p = jnp.where(m.reshape(mask_shape) > 0, x0, x)
            return F_x - _row_sum(f(x_p) * w, batched)

        grid_j = jnp.asarray(grid, jnp.int32)
        if chunk_size is None:
            d = jax.vmap(delta)(grid_j)
        else:
            d = jax.lax.map(delta, grid_j, batch_size=chunk_size)
        d = d.reshape(tuple(len(st) for st in starts) + d.shape[1:])  # (S_1, ..., S_k, [N])
        # R[n, l_1..l_k] = sum over starts of d * prod_a A_a: the window sum, factorised per axis
        letters = "abcdefghijklmnopqrstuvwxy"
        s_idx, l_idx = letters[:k], letters[k:2 * k]
        row = "z" if batched else ""
        spec = ",".join([s_idx + row] + [s + l for s, l in zip(s_idx, l_idx)]) + "->" + row + l_idx
        total = jnp.einsum(spec, d, *A_j)
        count = functools.reduce(np.multiply.outer, [a.sum(0) for a in A])  # windows covering each element
        R = total / jnp.asarray(count, x.dtype)
        return jnp.broadcast_to(R.reshape(R.shape + (1,) * (len(feat) - k)), x.shape)

    return explain
