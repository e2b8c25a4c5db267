"""PatternNet and PatternAttribution (Kindermans et al. 2017): explanations from signal patterns fitted
on data, and the signal-estimator quality measure rho.

    pats = jlrp.patterns.fit(model.apply, (params, x), batches, argnums=1)       # two-component
    signal = jlrp.patterns.patternnet(model.apply, pats, argnums=1)(params, x)
    relevance = jlrp.patterns.patternattribution(model.apply, pats, argnums=1)(params, x)
    pats.save("patterns.npz"); pats = jlrp.patterns.load("patterns.npz")
    quality = jlrp.patterns.rho(model.apply, (params, x), pats, test_batches, argnums=1)

* :func:`fit` - per dense/conv layer the linear pattern ``a = cov(x, y) / (w^T cov(x, y))`` or the
  two-component patterns ``a_+`` / ``a_-`` (ReLU networks), from a streaming jitted pass over batches.
* :func:`patternnet` - the gradient with weights replaced by patterns, seeded with the one-hot target.
* :func:`patternattribution` - the gradient with weights replaced by ``W * a_+``, seeded with the
  target's output (like LRP).
* :func:`rho` - ``1 - max_v corr(w^T x, v^T (x - S(x)))`` per dense layer for an estimator ``S``.
* :class:`Patterns` - the fitted patterns (a pytree keyed by layer), with ``as_params(params)`` (the same
  patterns arranged like ``params``) and ``save`` / :func:`load` (``.npz``).
"""
from jlrp._src.patterns import Patterns, fit, load, patternattribution, patternnet, rho

__all__ = ["Patterns", "fit", "load", "patternattribution", "patternnet", "rho"]
