"""Robustness metrics: how much does the explanation change when the input changes a little?

Each metric re-explains ``S`` perturbed copies of the batch inside one jitted program: ``explain(x, target)
-> relevance`` is called on ``chunk_size * N`` rows at a time (so it must treat rows independently, like
every jlrp method on a batch), and is a static argument of the jit: pass the same function object to reuse
the compiled program. ``target``: class per row (None = the argmax of ``model(x)``, which then needs
``model``). ``relevance``: the explanation of the clean input (computed when None).

Perturbations: ``noise`` ``(S, *x.shape)`` added to ``x`` if given, else drawn with ``key`` (uniform in
the L-infinity ball of ``radius``, or gaussian for the Lipschitz estimate). With ``model`` given (and
``exclude_changed`` not False), perturbed copies whose predicted class differs from the clean input's are
left out (the constraint of Agarwal et al. 2022; Quantus's ``return_nan_when_prediction_changes`` instead
makes the whole sample NaN), and a sample with no copy left is NaN.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jlrp._src.evaluation import map_chunked, random_normal, random_uniform, to_array
from jlrp._src.metrics_common import auto_chunk, resolve_target

Array = jax.Array
_KINDS = ("sensitivity", "lipschitz", "input_stability", "output_stability")


def _norm(v: Array, lead: int) -> Array:
    return jnp.sqrt((v * v).reshape(*v.shape[:lead], -1).sum(-1))


@functools.partial(jax.jit, static_argnames=("explain", "model", "kind", "reduce", "samples", "draw", "scale",
                                             "normalise", "eps", "exclude", "chunk_size"))
def _robustness(explain, model, x, target, relevance, key, noise, *, kind, reduce, samples, draw, scale,
                normalise, eps, exclude, chunk_size):
    n = x.shape[0]
    safe = lambda v: v + (v == 0) * eps
    r_norm = _norm(relevance, 1)
    r_safe = safe(relevance)
    pred = jnp.argmax(model(x), -1) if exclude else None
    logits = model(x) if kind == "output_stability" else None

    def perturbation(s):  # sample s: drawn from its own key, so the chunking does not change the draws
        k = jax.random.fold_in(key, s)
        if draw == "normal":
            return scale * random_normal(k, x.shape, x.dtype)
        return scale * random_uniform(k, x.shape, x.dtype, -1.0, 1.0)

    def values(ss):  # (c,) sample indices -> (c, N): the c perturbed copies explained in one call
        c = ss.shape[0]
        eps_x = (noise[ss] if noise is not None else jax.vmap(perturbation)(ss)).astype(x.dtype)
        xs = x[None] + eps_x
        flat = xs.reshape(c * n, *x.shape[1:])
        rs = explain(flat, jnp.tile(target, c)).reshape((c,) + relevance.shape)
        diff = relevance[None] - rs
        if kind == "sensitivity":  # ||R(x) - R(x')|| (/ ||R(x)||)
            value = _norm(diff, 2)
            if normalise:
                value = value / r_norm[None]
        elif kind == "lipschitz":  # ||R(x) - R(x')|| / ||x - x'||
            value = _norm(diff, 2) / (_norm(eps_x, 2) + eps)
        else:  # relative stability: ||(R - R') / R|| / max(||(x - x') / x|| or ||h(x) - h(x')||, eps_min)
            num = _norm(diff / r_safe[None], 2)
            if kind == "input_stability":
                den = _norm(eps_x / safe(x)[None], 2)
            else:
                den = _norm(logits[None] - model(flat).reshape((c,) + logits.shape), 2)
            value = num / jnp.maximum(den, eps)
        if exclude:  # copies whose predicted class changed are left out
            changed = jnp.argmax(model(flat), -1).reshape(c, n) != pred[None]
            value = jnp.where(changed, jnp.nan, value)
        return value

    count = samples if noise is None else noise.shape[0]
    value = map_chunked(values, jnp.arange(count), chunk_size)  # (S, N)
    if reduce == "max":
        return jnp.nanmax(value, axis=0) if exclude else value.max(0)
    return jnp.nanmean(value, axis=0) if exclude else value.mean(0)


def _run(kind, reduce, explain, x, target, relevance, key, noise, samples, draw, scale, model, normalise, eps,
         chunk_size, exclude_changed):
    x = to_array(x)
    if kind == "output_stability" and model is None:
        raise ValueError("relative_output_stability compares logits: pass model=")
    target = resolve_target(model, x, target)
    if relevance is None:
        relevance = explain(x, target)
    relevance = to_array(relevance)
    if noise is None:
        if key is None:
            raise ValueError(f"{kind}: the perturbations are random: pass key= (or noise=)")
        if int(samples) < 1:
            raise ValueError(f"samples must be positive, got {samples}")
    else:
        noise = to_array(noise)
        if noise.shape[1:] != x.shape:
            raise ValueError(f"noise must be (S, *x.shape) = (S, {x.shape}), got {noise.shape}")
        samples = noise.shape[0]
    chunk = auto_chunk(x.size, chunk_size)
    return _robustness(explain, model, x, target, relevance, key, noise, kind=kind, reduce=reduce,
                       samples=int(samples), draw=draw, scale=float(scale), normalise=bool(normalise),
                       eps=float(eps), exclude=model is not None and exclude_changed is not False,
                       chunk_size=chunk)


def max_sensitivity(explain: Callable, x: Array, target: Any = None, relevance: Array | None = None, *,
                    key: Array | None = None, samples: int = 200, radius: float = 0.2, noise: Array | None = None,
                    model: Callable | None = None, normalise: bool = False, chunk_size: int | None = None,
                    exclude_changed: bool | None = None) -> Array:
    """Max-sensitivity (Yeh et al. 2019, "On the (in)fidelity and sensitivity of explanations"), ``(N,)``;
    lower is better.

    ``SENS_max = max_{||x' - x||_inf <= r} ||R(x') - R(x)||_2``, estimated by Monte Carlo over ``samples``
    points drawn uniformly from the ball of ``radius`` r. ``normalise=True`` divides by ``||R(x)||_2``, which
    is what Quantus's ``MaxSensitivity`` computes (its defaults: 200 samples, radius 0.2)."""
    return _run("sensitivity", "max", explain, x, target, relevance, key, noise, samples, "uniform", radius,
                model, normalise, 0.0, chunk_size, exclude_changed)


def avg_sensitivity(explain: Callable, x: Array, target: Any = None, relevance: Array | None = None, *,
                    key: Array | None = None, samples: int = 200, radius: float = 0.2, noise: Array | None = None,
                    model: Callable | None = None, normalise: bool = False, chunk_size: int | None = None,
                    exclude_changed: bool | None = None) -> Array:
    """Average sensitivity (Yeh et al. 2019), ``(N,)``; lower is better: the mean of ``||R(x') - R(x)||_2``
    over ``x'`` uniform in the L-infinity ball of ``radius`` (Monte Carlo); ``normalise`` as in
    :func:`max_sensitivity` (Quantus's ``AvgSensitivity`` normalises)."""
    return _run("sensitivity", "mean", explain, x, target, relevance, key, noise, samples, "uniform", radius,
                model, normalise, 0.0, chunk_size, exclude_changed)


def local_lipschitz_estimate(explain: Callable, x: Array, target: Any = None, relevance: Array | None = None, *,
                             key: Array | None = None, samples: int = 200, std: float = 0.1,
                             noise: Array | None = None, model: Callable | None = None, eps: float = 0.0,
                             chunk_size: int | None = None,
                             exclude_changed: bool | None = None) -> Array:
    """Local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018, "On the robustness of interpretability
    methods"), ``(N,)``; lower is better.

    ``L(x) = max_{x'} ||R(x) - R(x')||_2 / ||x - x'||_2`` over ``samples`` points ``x' = x + N(0, std^2)``
    (Quantus's defaults: 200 samples, std 0.1; Quantus adds ``eps = 1e-10`` to the denominator)."""
    return _run("lipschitz", "max", explain, x, target, relevance, key, noise, samples, "normal", std,
                model, False, eps, chunk_size, exclude_changed)


def relative_input_stability(explain: Callable, x: Array, target: Any = None, relevance: Array | None = None, *,
                             key: Array | None = None, samples: int = 200, radius: float = 0.2,
                             noise: Array | None = None, model: Callable | None = None, eps_min: float = 1e-6,
                             chunk_size: int | None = None,
                             exclude_changed: bool | None = None) -> Array:
    """Relative input stability (Agarwal et al. 2022, "Rethinking stability for attribution-based
    explanations"), ``(N,)``; lower is better.

    ``RIS = max_{x'} ||(R(x) - R(x')) / R(x)||_2 / max(||(x - x') / x||_2, eps_min)``, divisions elementwise
    (a zero entry of ``R(x)`` or ``x`` is replaced by ``eps_min``), over ``x'`` uniform in the L-infinity
    ball of ``radius``; pass ``model`` to keep only ``x'`` with the same predicted class (the paper's
    constraint). Quantus adds ``eps_min`` to a zero denominator instead of taking the maximum (the same
    unless the denominator lies in ``(0, eps_min)``) and draws noise in ``[0.02, 0.2]``."""
    return _run("input_stability", "max", explain, x, target, relevance, key, noise, samples, "uniform", radius,
                model, False, eps_min, chunk_size, exclude_changed)


def relative_output_stability(explain: Callable, x: Array, target: Any = None, relevance: Array | None = None, *,
                              key: Array | None = None, samples: int = 200, radius: float = 0.2,
                              noise: Array | None = None, model: Callable | None = None, eps_min: float = 1e-6,
                              chunk_size: int | None = None,
                              exclude_changed: bool | None = None) -> Array:
    """Relative output stability (Agarwal et al. 2022), ``(N,)``; lower is better.

    ``ROS = max_{x'} ||(R(x) - R(x')) / R(x)||_2 / max(||h(x) - h(x')||_2, eps_min)`` with ``h`` the logits
    of ``model`` (required; copies that change the predicted class are left out). Otherwise as
    :func:`relative_input_stability`."""
    return _run("output_stability", "max", explain, x, target, relevance, key, noise, samples, "uniform", radius,
                model, False, eps_min, chunk_size, exclude_changed)
