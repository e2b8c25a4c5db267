"""Randomisation metrics: does the explanation depend on what it should depend on (the class asked about,
the learned parameters)? The model parameter randomisation test itself is
:func:`jlrp.evaluation.parameter_randomization` (jlrp/_src/sanity.py)."""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jlrp._src.metrics_common import resolve_target, similarity as _similarity
from jlrp._src.sanity import parameter_randomization

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("explain", "measure"))
def _random_logit(explain, x, target, other, relevance, *, measure):
    r_other = explain(x, other)
    a, b = relevance, r_other
    if measure in ("ssim",) and a.ndim == 4:  # colour images: maps per pixel
        a, b = a.sum(-1), b.sum(-1)
    return _similarity(measure)(a, b)


def random_logit(explain: Callable, x: Array, target: Any = None, relevance: Array | None = None, *,
                 num_classes: int | None = None, key: Array | None = None, other: Array | None = None,
                 model: Callable | None = None, similarity: str = "ssim") -> Array:
    """Random logit test (Sixt, Granz & Landgraf 2020, "When explanations lie: why many modified BP
    attributions fail"), ``(N,)``; lower = the explanation is class-specific.

    The similarity between the explanation of the target class and that of another class drawn uniformly
    from the ``num_classes - 1`` others (or the given ``other``). ``similarity``: ``"ssim"`` (structural
    similarity on the map's grid, channels summed; Quantus's default computes SSIM on the flattened map:
    ``"ssim_flat"``), ``"spearman"``, ``"pearson"`` or a callable ``(a, b) -> (N,)``. ``target`` None needs
    ``model`` (argmax)."""
    x = jnp.asarray(x)
    target = resolve_target(model, x, target)
    if other is None:
        if key is None or num_classes is None:
            raise ValueError("random_logit draws the other class: pass key= and num_classes= (or other=)")
        if num_classes < 2:
            raise ValueError("random_logit needs at least 2 classes")
        r = jax.random.randint(key, target.shape, 0, num_classes - 1)
        other = r + (r >= target)  # uniform over the classes other than the target
    other = jnp.broadcast_to(jnp.asarray(other), target.shape)
    if relevance is None:
        relevance = explain(x, target)
    measure = similarity if isinstance(similarity, str) else similarity
    return _random_logit(explain, x, target, other, jnp.asarray(relevance), measure=measure)


def smooth_mprt(explain: Callable[[Any, Array], Array], params: Any, x: Array, key: Array, *,
                samples: int = 50, noise_magnitude: float = 0.1, order: Sequence[str] | None = None,
                cascade: bool = True, skip: str | None = None, draws: Any = None, target: Any = None) -> dict[str, Any]:
    """Smooth model parameter randomisation test (Hedström et al. 2023, "Sanity checks revisited: an
    exploration to repair the model parameter randomisation test"): :func:`parameter_randomization` where
    every explanation is denoised by averaging it over ``samples`` copies of the input (``samples - 1``
    with gaussian noise of std ``noise_magnitude * (max x - min x)`` per sample, plus ``x`` itself; Quantus's
    defaults 50 and 0.1), so that gradient noise is not mistaken for sensitivity to the parameters.

    Same program, arguments and result as :func:`parameter_randomization` (one compilation). Quantus's
    ``SmoothMPRT`` randomises bottom-up by default and draws new input noise for every layer; here the
    order is the output layer first (pass ``order=`` to change it) and the same noise serves every step.
    """
    if samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    return parameter_randomization(explain, params, x, key, order=order, cascade=cascade, skip=skip, draws=draws,
                                   smooth_samples=int(samples), smooth_noise=float(noise_magnitude), target=target)
